"""The unlearning engine: one Hugging Face ``Trainer`` for every method (book chapter 2).

    from mlunlearn.engine import UnlearnConfig, unlearn
    result = unlearn("tiny", "toyworld", forget=5, method="npo", config=UnlearnConfig(lr=1e-3, epochs=10))

The ``Trainer`` supplies what a home-made loop would get wrong: gradient accumulation, mixed precision on
GPU, checkpoints and resume, a progress bar, multi-GPU through accelerate. Multi-GPU (data parallel) is
the same code launched with accelerate (each process loads onto its own GPU; only the first writes the
run; README "Several GPUs")::

    accelerate launch --multi_gpu --num_processes 2 -m mlunlearn unlearn --model llava-hf/llava-1.5-7b-hf \\
        --data mllmu-bench --forget 5 --method npo --output runs/npo

A method (:mod:`mlunlearn.methods`) only says which parameters train and what the loss is; the engine
pairs forget and retain examples, calls the method's loss, logs each of its terms, and stops a run whose
loss is no longer finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from mlunlearn.data.unlearning import (
    PairedCollator, PairedDataset, PairedSampler, PhasedDataset, UnlearningData, add_knowledge, add_prompt_decouple,
    add_refusals, unlearning_data,
)
from mlunlearn.methods import Method, MethodError, get_method, trainable_parameter_names
from mlunlearn.methods.params import STATE_FILE, load_trainable_state, save_trainable_state
from mlunlearn.methods.registry import convert
from mlunlearn.utils import progress_enabled

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Settings that shape the trajectory: a resume must use the values its checkpoints were written with.
_TRAJECTORY = ("lr", "batch_size", "grad_accum", "warmup", "scheduler", "weight_decay", "max_grad_norm", "seed",
               "precision")
CHECKPOINT_METHOD = "method.json"  # in each checkpoint: the method and settings that wrote it


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped (earlier checkpoints are kept)."""


class OutputFolderError(ValueError):
    """The output folder cannot take this run: it holds another run (use overwrite) or has nothing to resume."""


@dataclass
class UnlearnConfig:
    """Optimisation settings shared by every method (a method's own hyper-parameters live on the method).

    ``lr``, ``epochs`` and ``batch_size`` left at ``None`` take the method's defaults for the model's family
    (:meth:`mlunlearn.methods.Method.engine_defaults`): on the tiny model the rates and epochs the book's
    chapters tuned, on LLaVA-1.5 MLLMU-Bench's published 7B settings (lr 2e-5, batch 4, 1 epoch). What
    was applied is recorded in ``run.json``.
    """

    lr: float | None = None
    epochs: float | None = None
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int | None = None
    grad_accum: int = 1
    warmup: float = 0.0  # steps, or a fraction of all steps when < 1
    scheduler: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 ("auto": bf16 on GPUs that have it, fp16 on others, fp32 on CPU)
    logging_steps: int = 1
    save_steps: int = 0  # > 0: a checkpoint every N steps (resumable)
    save_total_limit: int = 2
    resume: bool = False  # resume from the last checkpoint in ``output/checkpoints``
    merge: bool = True  # fold the trained tensors into plain weights when saving / returning (not 4-bit)
    progress: bool = True
    # Recompute activations in the backward pass instead of storing them (less memory, ~30% slower; same
    # losses). None: the family's (FAMILY_SETTINGS: off on the tiny model, on for LLaVA-1.5). Added after
    # the run-record format was fixed: records.LATER_FIELDS keeps it out of record keys while it is None.
    gradient_checkpointing: bool | None = None

    def __post_init__(self):
        self.check()

    def check(self) -> "UnlearnConfig":
        """One-line :class:`MethodError` for a value that cannot make a run; returns ``self``."""
        def fail(key, why):
            raise MethodError(f"{key}={getattr(self, key)!r}: {why}")

        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            fail("lr", "must be a positive number (e.g. lr=1e-3)")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            fail("epochs", "must be > 0 (or set max_steps)")
        if self.max_steps == 0 or self.max_steps < -1:
            fail("max_steps", "must be >= 1 (or -1: train for `epochs`)")
        for key in ("batch_size", "grad_accum", "logging_steps", "save_total_limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                fail(key, "must be >= 1")
        for key in ("warmup", "weight_decay", "max_grad_norm", "save_steps"):
            if getattr(self, key) < 0:
                fail(key, "must be >= 0")
        if self.scheduler not in SCHEDULERS:
            fail("scheduler", f"use one of {', '.join(SCHEDULERS)}")
        if self.precision not in PRECISIONS:
            fail("precision", f"use one of {', '.join(PRECISIONS)}")
        if self.gradient_checkpointing is not None and not isinstance(self.gradient_checkpointing, bool):
            fail("gradient_checkpointing", "use true or false (or leave it unset: the model family's)")
        return self

    def resolved(self, defaults: dict) -> "UnlearnConfig":
        """A copy with every unset (``None``) setting taken from ``defaults``."""
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    @classmethod
    def keys(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def types(cls) -> dict:
        """The type each setting converts a command-line string to (``None`` defaults have one too)."""
        kinds = {"lr": 1.0, "epochs": 1.0, "batch_size": 1, "gradient_checkpointing": True}
        return {k: kinds.get(k, v) for k, v in cls.keys().items()}


# Engine settings per model family that no method changes (a method's defaults are
# mlunlearn.methods.base.FAMILY_DEFAULTS): filled in for each such setting left unset (None), like those.
# Gradient checkpointing: LLaVA-1.5-7B's activations at batch 4 do not fit a 16 GB card without it; the
# tiny model does not need it (and the book's numbers were made without it).
FAMILY_SETTINGS = {
    "tiny": {"gradient_checkpointing": False},
    "llava-1.5": {"gradient_checkpointing": True},
}


def model_family(model) -> str:
    """``"llava-1.5"`` for a model of LLaVA-1.5's width (a 4096- or 5120-wide language model, real weights
    or a reduced-depth stand-in), else ``"tiny"``: which engine defaults apply."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = getattr(base.config, "text_config", None)
    return "llava-1.5" if getattr(text, "hidden_size", 0) >= 4096 else "tiny"


@dataclass
class UnlearnResult:
    """What a run returns: the unlearned model, its processor, the per-step log and the run record."""

    model: object
    processor: object
    log: list
    run: dict

    def curves(self):
        """The per-step log as a DataFrame (one row per logged step, one column per loss term)."""
        import pandas as pd

        return pd.DataFrame([r for r in self.log if "loss" in r]).set_index("step")


def split_settings(settings: dict, method_name: str) -> tuple[dict, dict]:
    """Split ``--set key=value`` pairs into method hyper-parameters and engine settings.

    Raises :class:`MethodError` naming every valid key when a key is neither.
    """
    from mlunlearn.methods import METHODS

    if method_name not in METHODS:
        get_method(method_name)  # raises the "unknown method" error
    method_keys, engine_keys = METHODS[method_name].hyperparameters(), UnlearnConfig.keys()
    method_kw, engine_kw = {}, {}
    for key, value in settings.items():
        if key in method_keys:
            method_kw[key] = value
        elif key in engine_keys:
            engine_kw[key] = convert(UnlearnConfig.types()[key], value, key)
        else:
            raise MethodError(f"unknown setting {key!r} for {method_name}; method settings: "
                              f"{', '.join(method_keys)}; engine settings: {', '.join(engine_keys)}")
    return method_kw, engine_kw


def check_llava(model) -> None:
    """A one-line error unless ``model`` has LLaVA's parts (vision tower, projector, language model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    missing = [p for p in ("vision_tower", "multi_modal_projector", "language_model") if not hasattr(inner, p)]
    if missing or not hasattr(base, "lm_head"):
        raise MethodError(f"{type(base).__name__} is not LLaVA-shaped (no {', '.join(missing) or 'lm_head'}); "
                          "unlearning needs a LlavaForConditionalGeneration, e.g. load_model('llava-hf/llava-1.5-7b-hf')")


class UnlearnTrainer(Trainer):
    """A ``Trainer`` whose loss is the method's (plus its add-on terms), every term logged, a finiteness
    guard, and checkpoints that hold the method's whole trainable state."""

    def __init__(self, *args, method: Method, reference, parametrisation, method_record: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.reference, self.parametrisation = method, reference, parametrisation
        self.method_record = method_record
        self._terms: dict = {}
        # Why: LLaVA's forward takes **kwargs, so the Trainer would assume the loss is already normalised
        # over gradient-accumulation steps; ours is a per-batch mean, so let the Trainer divide it.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        terms = self.method.total_loss(model, inputs, self.reference)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            last = _last_checkpoint(self.args.output_dir)
            raise NonFiniteLossError(
                f"the {self.method.name} loss became {loss.item()} at step {self.state.global_step + 1} "
                f"({', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
                + (f"the last good checkpoint is {last}; " if last else "no checkpoint was saved (use save_steps); ")
                + "lower the learning rate or add a retain term")
        for k, v in terms.items():
            self._terms.setdefault(k, []).append(float(v.detach()))
        return (loss, None) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # Why not the Trainer's sampler: its order and our retain draws must not depend on torch's global
        # generator (dropout consumes it), or a resumed or multi-process run would see other pairs.
        return PairedSampler(len(dataset), seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                             shuffle=getattr(dataset, "shuffled", True))

    def _save(self, output_dir=None, state_dict=None):
        # Why not save_pretrained: peft would save only the LoRA tensors (a sine projector, biases or masks
        # would restart from vanilla on resume); the trainable state is every tensor that trains.
        folder = Path(output_dir or self.args.output_dir)
        save_trainable_state(self.parametrisation, self.model, folder)
        _write_json(folder / CHECKPOINT_METHOD, self.method_record)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        folder = Path(resume_from_checkpoint)
        _check_resumable(folder, self.method_record)
        load_trainable_state(self.parametrisation, model if model is not None else self.model, folder)

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs and self._terms:  # a training log: add the mean of each term since the last one
            names = list(self._terms)
            means = [sum(v) / len(v) for v in self._terms.values()]
            if self.args.world_size > 1:  # data parallel: the mean over every process, as the Trainer's loss
                means = self.accelerator.reduce(torch.tensor(means, device=self.args.device), "mean").tolist()
            for k, v in zip(names, means):
                logs[k if k != "loss" else "objective"] = v
            self._terms = {}
        super().log(logs, start_time)


def _check_resumable(folder: Path, record: dict) -> None:
    """A one-line error unless the checkpoint in ``folder`` was written by this method with these settings."""
    path = folder / CHECKPOINT_METHOD
    if not path.is_file():
        raise MethodError(f"{folder} was not written by this version of mlunlearn (no {CHECKPOINT_METHOD}); "
                          "start over with overwrite")
    saved = json.loads(path.read_text())
    if saved.get("method") != record["method"]:
        raise MethodError(f"cannot resume {record['method']} from {folder}: its checkpoints were written by "
                          f"{saved.get('method')}; use --method {saved.get('method')}, or start over with overwrite")
    diff = [f"{k}: {saved[part].get(k)!r} -> {v!r}" for part in ("hyperparameters", "trajectory")
            for k, v in record[part].items() if saved.get(part, {}).get(k) != v]
    if diff:
        raise MethodError(f"cannot resume from {folder} with other settings ({'; '.join(diff)}); use the "
                          "checkpoint's settings (only max_steps/epochs may grow), or start over with overwrite")


class _UpdateHook(TrainerCallback):
    """Apply a method's hooks around every optimiser step: ``gradient`` to each (clipped) gradient before
    the step, ``update`` to each update after it: θ ← θ_before + update(θ_after − θ_before)."""

    def __init__(self, model, update=None, gradient=None):
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.update, self.gradient, self.before = update, gradient, None

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self.gradient is not None:
            for name, p in self.params:
                if p.grad is not None:
                    p.grad.copy_(self.gradient(name, p, p.grad))
        if self.update is not None:
            self.before = [p.detach().clone() for _, p in self.params]

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kw):
        if self.update is None:
            return
        for (name, p), before in zip(self.params, self.before):
            p.copy_(before + self.update(name, p, p - before))
        self.before = None


def _last_checkpoint(folder) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(folder) if folder and Path(folder).is_dir() else None


# What a checkpoint needs to resume exactly: the Trainer writes these files in place, one after another, so a
# kill while it saves leaves a checkpoint-N missing some or holding one cut short.
CHECKPOINT_FILES = ("trainer_state.json", CHECKPOINT_METHOD, STATE_FILE, "optimizer.pt", "scheduler.pt")


def _checkpoint_damage(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` cannot be resumed exactly (a file missing or cut short), or None.
    Cheap: JSON files parse, the safetensors header reads, each ``.pt``/``.pth`` (a zip) has its directory."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    for name in CHECKPOINT_FILES:
        if not (folder / name).is_file():
            return f"no {name}"
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            elif path.suffix in (".pt", ".pth") and not zipfile.is_zipfile(path):
                return f"{path.name} is cut short"
        except (OSError, ValueError, SafetensorError):
            return f"{path.name} is cut short or unreadable"
    return None


def _resumable_checkpoint(folder) -> str | None:
    """The newest checkpoint in ``folder`` that is complete; a damaged newer one (a kill while saving) is
    skipped with a warning: resuming from the one before gives the same run, only a few steps later."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not folder or not Path(folder).is_dir():
        return None
    found = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                   if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit())
    skipped = []
    for _, path in reversed(found):
        damage = _checkpoint_damage(path)
        if damage is None:
            if skipped:
                warnings.warn(f"skipped the damaged {'; '.join(skipped)} (a kill while saving?); resuming from "
                              f"{path}", stacklevel=3)
            return str(path)
        skipped.append(f"{path.name} ({damage})")
    if skipped:
        raise OutputFolderError(f"resume=true but no checkpoint in {folder} is complete ({'; '.join(skipped)}); "
                                "start over with --overwrite")
    return None


class _Timing(TrainerCallback):
    def __init__(self):
        self.step_seconds: list = []
        self._t = None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.step_seconds.append(time.perf_counter() - self._t)


def _checkpointing(config: UnlearnConfig) -> dict:
    """The ``TrainingArguments`` for ``config.gradient_checkpointing`` (transformers 5 calls it activation
    checkpointing). Non-reentrant checkpointing: with LoRA only adapters train, and the reentrant variant
    would give them no gradient unless the inputs required one (``enable_input_require_grads``)."""
    if not config.gradient_checkpointing:
        return {}
    return {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _precision(choice: str, device: torch.device) -> dict:
    if choice == "auto":
        if device.type != "cuda":
            return {}
        return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
    if choice == "fp32":
        return {}
    if choice in ("bf16", "fp16"):
        return {choice: True}
    raise MethodError(f"precision={choice!r}: use auto, fp32, bf16 or fp16")


def prepare_data(method: Method, bench, forget: int, model, processor) -> UnlearningData:
    """The forget/retain examples plus what the method needs (refusal answers, Prompt Decouple pairs, the
    text-only questions of every profile).

    ``bench`` may also be an :class:`UnlearningData` (e.g. one round of a continual run): it is used as is
    (a copy; the derived examples are made afresh with the current model).
    """
    from mlunlearn.benchmarks import as_benchmark

    if isinstance(bench, UnlearningData):
        data = dataclasses.replace(bench, forget_refusal=None, pd=bench.pd if bench.pd_given else None)
    else:
        benchmark = as_benchmark(bench)
        data = benchmark.unlearning_data(forget)
        if hasattr(benchmark, "complete"):  # what only the model can give (VLGuard's forget answers)
            data = benchmark.complete(data, model, processor)
    if method.needs_refusals:
        add_refusals(data)
    if getattr(method, "needs_knowledge", False) and data.knowledge is None:
        if isinstance(bench, UnlearningData):
            raise MethodError(f"{method.name} needs the text-only questions of every profile: fill the "
                              "UnlearningData's knowledge with mlunlearn.data.unlearning.add_knowledge(data, bench)")
        files = getattr(as_benchmark(bench), "files", None)  # MLLMU-Bench's layout: Full_Set
        if not hasattr(files, "load"):  # e.g. SafeEraser, whose `files` names JSON files
            raise MethodError(f"{method.name} needs Full_Set's text-only questions of every profile; "
                              f"{bench!r} has no MLLMU-Bench files")
        add_knowledge(data, files)
    if method.pd <= 0:
        data.pd = None  # a benchmark's own pairs (SafeEraser) are not trained on without the term
    elif not (data.pd_given and data.pd is not None):
        add_prompt_decouple(data, model, processor)
    return data


# transformers 5.23's Trainer calls its own deprecated `is_gradient_checkpointing` on peft models: a warning
# about transformers' internals, not about anything the user did.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


def check_output(output, overwrite: bool = False, resume: bool = False) -> Path | None:
    """Check, before anything loads or trains, that ``output`` can take this run; returns it as a Path.

    A folder that already holds files is refused unless ``overwrite`` (the new run replaces the old one)
    or ``resume`` (the run continues the folder's checkpoints). The folder must be writable.
    """
    if output is None:
        return None
    from mlunlearn.utils import check_writable

    out = check_writable(output, kind="folder", what="--output")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not (overwrite or resume):
        raise OutputFolderError(f"--output {out} already holds {', '.join(held[:4])}{' ...' if len(held) > 4 else ''}; "
                                "pass --overwrite to replace that run, or --set resume=true to continue it")
    if resume and not (out / "checkpoints").is_dir():
        raise OutputFolderError(f"resume=true but {out} has no checkpoints/ folder; train with save_steps=N "
                                "to write checkpoints, or drop resume")
    return out


def unlearn(model="tiny", data="toyworld", forget: int = 5, method="ga", config: UnlearnConfig | None = None,
            output: str | Path | None = None, processor=None, callbacks=None, overwrite: bool = False,
            quantization: str | None = None, **hparams) -> UnlearnResult:
    """Unlearn ``forget_{forget}`` of ``data`` from ``model`` with ``method``.

    ``model``: a name for :func:`mlunlearn.models.load_model` or a loaded model (then pass ``processor``).
    ``data``: a source for :func:`mlunlearn.benchmarks.get_benchmark` (``"toyworld"``, ``"mllmu-bench"``,
    a folder), a benchmark, the files of one (:func:`mlunlearn.data.open_benchmark`), or the
    :class:`~mlunlearn.data.unlearning.UnlearningData` to train on (then ``forget`` only labels the run).
    ``method``: a registered name (with ``**hparams``) or a :class:`Method`. ``config``: engine settings;
    those left unset take the method's defaults for the model's family. ``output``: a folder for the model,
    checkpoints and ``run.json``; a folder that holds a run needs ``overwrite=True`` or ``config.resume``.
    ``callbacks``: extra ``transformers.TrainerCallback`` objects (e.g.
    :class:`mlunlearn.analysis.ProjectorMonitor`). The loaded model is modified in place (pass a copy to
    keep the original). ``quantization="4bit"``: load ``model``, a name, in 4 bits
    (:func:`mlunlearn.models.load_model`; a loaded model keeps how it was loaded). A method's separate
    reference model (NPO's ``reference="<folder>"``) loads as the model was loaded: same device, dtype and
    quantization (:func:`mlunlearn.models.loading.load_settings`).

    Under a distributed launch (``accelerate launch``/``torchrun``, several processes) every process trains
    its share of each batch (data parallel) and only the first writes ``output``.
    """
    from mlunlearn.benchmarks import as_benchmark
    from mlunlearn.models import load_model
    from mlunlearn.models.loading import load_settings

    config = (config or UnlearnConfig()).check()
    method = method if isinstance(method, Method) else get_method(method, **hparams)
    out = check_output(output, overwrite, config.resume)
    model_name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
    if isinstance(model, str):
        model, processor = load_model(model, quantization=quantization)
    elif quantization is not None:
        raise MethodError(f"quantization={quantization!r} applies when model is a name; a loaded model keeps how it "
                          f"was loaded: load it with load_model(..., quantization={quantization!r})")
    elif processor is None:
        raise MethodError("pass processor=... together with a loaded model")
    check_llava(model)
    bench = data if isinstance(data, UnlearningData) else as_benchmark(data)
    family = model_family(model)
    defaults = method.engine_defaults(family)
    applied = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    config = config.resolved({**FAMILY_SETTINGS[family], **defaults})
    device = next(model.parameters()).device
    precision = _precision(config.precision, device)

    t0 = time.time()
    set_seed(config.seed)  # before the adapters are initialised: same seed, same run
    examples = prepare_data(method, bench, forget, model.eval(), processor)
    separate = None
    if method.uses_reference() and getattr(method, "reference", "vanilla") != "vanilla":
        # Why the model's own settings: a 4-bit model's reference at full precision would not fit beside it.
        separate, _ = load_model(method.reference, **load_settings(model))
    parametrisation = method.parametrisation()
    model = parametrisation.apply(model)
    reference = parametrisation.reference(model, separate) if method.uses_reference() else None
    method.setup(model, examples, processor)
    trainable = trainable_parameter_names(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trainable:
        raise MethodError(f"{method.name} with params={method.params!r} trains no parameter")

    keep = out is not None and (config.save_steps > 0 or config.resume)
    ckpt_dir = str(out / "checkpoints") if keep else _scratch_dir()
    if keep and overwrite and not config.resume:  # an older run's checkpoints must not be resumed by mistake
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    args = TrainingArguments(
        output_dir=ckpt_dir, learning_rate=config.lr, num_train_epochs=config.epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        warmup_steps=config.warmup, lr_scheduler_type=config.scheduler, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, seed=config.seed, data_seed=config.seed,
        logging_steps=config.logging_steps, logging_first_step=True,
        save_strategy="steps" if config.save_steps > 0 else "no", save_steps=max(1, config.save_steps),
        save_total_limit=config.save_total_limit, save_only_model=False,
        report_to=[], disable_tqdm=not progress_enabled(config.progress), remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=device.type == "cpu", **precision, **_checkpointing(config),
    )
    record = {"method": method.name, "hyperparameters": _jsonable(method.settings()),
              "trajectory": {k: getattr(config, k) for k in _TRAJECTORY}}
    timing = _Timing()
    update_hook, gradient_hook = method.update_hook(), method.gradient_hook()
    extra = [_UpdateHook(model, update_hook, gradient_hook)] if (update_hook or gradient_hook) else []
    trainer = UnlearnTrainer(model=model, args=args, train_dataset=training_dataset(method, examples, config, args.world_size),
                             data_collator=PairedCollator(processor), method=method, reference=reference,
                             parametrisation=parametrisation, method_record=record,
                             callbacks=[timing, *extra, *(callbacks or [])])
    if not progress_enabled(config.progress):  # without a bar the Trainer prints every log dict: keep quiet
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    resume = _resumable_checkpoint(ckpt_dir) if config.resume else None
    if config.resume and resume is None:
        raise OutputFolderError(f"resume=true but there is no checkpoint in {ckpt_dir}")
    start_step = int(Path(resume).name.rsplit("-", 1)[-1]) if resume else 0
    if resume:
        _check_resumable(Path(resume), record)  # the method first: its error names the fix
    if resume and start_step >= _planned_steps(trainer, config):
        # Why check here: the Trainer, resumed at its last step, would still train one more.
        raise MethodError(f"nothing to resume: {resume} already has {start_step} steps, as many as asked for; "
                          "raise max_steps or epochs to train on (nothing was written)")
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if not keep:  # the scratch folder: nothing in it is needed
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    log = [dict(r) for r in trainer.state.log_history]
    model = trainer.model
    if config.gradient_checkpointing:  # the returned model evaluates and generates as usual
        base = _base_model(model)
        base.activation_checkpointing_disable()
        if hasattr(base, "_require_grads_hook"):  # the Trainer's enable_input_require_grads
            base.disable_input_require_grads()
    merged = config.merge and parametrisation.can_merge(model)
    if merged:
        model = parametrisation.merge(model)
    model = model.eval()

    run = {
        "method": method.name, "hyperparameters": method.settings(), "config": dataclasses.asdict(config),
        "defaults": {"family": family, "applied": applied},
        "model": model_name, "data": bench.source if not isinstance(bench, UnlearningData) else (bench.source or "UnlearningData"),
        "forget": forget, "seed": config.seed,
        "examples": {"forget": len(examples.forget), "retain": len(examples.retain)},
        "trainable_parameters": n_trainable,
        "trainable_tensors": len(trainable),
        "parametrisation": parametrisation.name,
        # how the trained model's weights were loaded: load_model(<this run>) reloads the base the same way
        "quantization": "4bit" if getattr(_base_model(model), "is_loaded_in_4bit", False) else None,
        "reference": reference.kind if reference else None,
        "steps": trainer.state.global_step,
        "processes": args.world_size,  # > 1: a distributed launch, each step on world_size x batch_size pairs
        "resumed_from": Path(resume).name if resume else None,
        "seconds": {"total": round(time.time() - t0, 2),
                    "train": round(sum(timing.step_seconds), 2),
                    "per_step_median": round(sorted(timing.step_seconds)[len(timing.step_seconds) // 2], 4)
                    if timing.step_seconds else None},
        "log": log,
    }
    run["saved"] = ("model" if merged else STATE_FILE) if out is not None else None
    if out is not None and trainer.is_world_process_zero():  # one writer under a distributed launch
        save_run(model, processor, run, out, progress=config.progress, merged=merged,
                 parametrisation=parametrisation)
    if args.world_size > 1:  # every process returns once the folder is whole
        trainer.accelerator.wait_for_everyone()
    return UnlearnResult(model, processor, log, run)


def training_dataset(method: Method, examples: UnlearningData, config: UnlearnConfig, processes: int = 1):
    """Paired forget/retain items, or the method's alternating step plan (:meth:`Method.phases`)."""
    per_step = config.batch_size * config.grad_accum * processes
    plan = method.phases(math.ceil(len(examples.forget) / per_step), math.ceil(len(examples.retain) / per_step))
    if plan is None:
        return PairedDataset(examples, seed=config.seed)
    return PhasedDataset(examples, plan, config.batch_size, repeat=config.grad_accum * processes, seed=config.seed)


def _planned_steps(trainer, config: UnlearnConfig) -> int:
    """Optimiser steps the run asks for in all, counted as the Trainer counts them."""
    if config.max_steps > 0:
        return config.max_steps
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(batches // config.grad_accum + int(batches % config.grad_accum > 0), 1)
    return math.ceil(config.epochs * per_epoch)


def _scratch_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="mlunlearn-")


def save_run(model, processor, run: dict, out: Path, progress: bool = True, merged: bool = True,
             parametrisation=None) -> Path:
    """Write the run's model and ``run.json`` into ``out``, and remove what an older run left there.

    ``model/``: a plain LLaVA checkpoint (``merged``); else ``trainable.safetensors``: every trained tensor,
    which :func:`mlunlearn.models.load_model` applies to the base model ``run["model"]`` through the
    method's parametrisation. Each is written under a temporary name and renamed; ``run.json`` is written
    last, atomically, so a folder with a ``run.json`` always holds the model it describes.
    """
    from transformers.utils import logging as hf_logging

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").unlink(missing_ok=True)  # from here until the end the folder holds no valid run
    if merged:
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        bars = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        processor.save_pretrained(tmp)
        shutil.rmtree(out / "model", ignore_errors=True)
        tmp.replace(out / "model")
        written = {"model"}
    else:
        save_trainable_state(parametrisation, model, out)
        written = {STATE_FILE}
    written.add("run.json")
    if run.get("config", {}).get("save_steps", 0) > 0 or run.get("resumed_from"):
        written.add("checkpoints")  # this run's own checkpoints (an older run's are removed below)
    for stale in out.iterdir():  # what an older run wrote and this one did not (model/ vs trainable, adapter/)
        if stale.name not in written:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    _write_json(out / "run.json", dict(run, saved=next(iter(written & {"model", STATE_FILE}))))
    return out


def _write_json(path: Path, obj) -> None:
    """Write JSON atomically (:func:`mlunlearn.utils.write_atomic`): the old file or the whole new one."""
    from mlunlearn.utils import write_atomic

    write_atomic(path, json.dumps(obj, indent=1, default=_json_default))


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(x):
    return str(x)
