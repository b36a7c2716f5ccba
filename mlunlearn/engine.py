"""The unlearning engine: one Hugging Face ``Trainer`` for every method (book chapter 2).

    from mlunlearn.engine import UnlearnConfig, unlearn
    result = unlearn("tiny", "toyworld", forget=5, method="npo", config=UnlearnConfig(lr=1e-3, epochs=10))

The ``Trainer`` supplies what a home-made loop would get wrong: gradient accumulation, mixed precision on
GPU, checkpoints and resume, a progress bar, multi-GPU through accelerate. Multi-GPU (data parallel) is
the same code launched with accelerate::

    accelerate launch --num_processes 2 -m mlunlearn unlearn --model llava-hf/llava-1.5-7b-hf \\
        --data mllmu-bench --forget 5 --method npo --output runs/npo

A method (:mod:`mlunlearn.methods`) only says which parameters train and what the loss is; the engine
pairs forget and retain examples, calls the method's loss, logs each of its terms, and stops a run whose
loss is no longer finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from mlunlearn.data.unlearning import (
    PairedCollator, PairedDataset, PairedSampler, UnlearningData, add_prompt_decouple, add_refusals, unlearning_data,
)
from mlunlearn.methods import Method, MethodError, Reference, get_method, trainable_parameter_names
from mlunlearn.methods.registry import convert


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped (earlier checkpoints are kept)."""


@dataclass
class UnlearnConfig:
    """Optimisation settings shared by every method (a method's own hyper-parameters live on the method).

    Defaults are MLLMU-Bench's for LLaVA-1.5-7B (AdamW, lr 2e-5, batch 4, 1 epoch); the tiny model needs
    a larger learning rate and more epochs (book chapter 2 sets them and shows why).
    """

    lr: float = 2e-5
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4
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
    merge: bool = True  # fold LoRA adapters into the weights when saving / returning (not for 4-bit models)
    progress: bool = True

    @classmethod
    def keys(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)}


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
            engine_kw[key] = convert(engine_keys[key], value, key)
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
    """A ``Trainer`` whose loss is the method's, with every loss term logged and a finiteness guard."""

    def __init__(self, *args, method: Method, reference: Reference | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.reference = method, reference
        self._terms: dict = {}
        # Why: LLaVA's forward takes **kwargs, so the Trainer would assume the loss is already normalised
        # over gradient-accumulation steps; ours is a per-batch mean, so let the Trainer divide it.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        terms = self.method.loss(model, inputs, self.reference)
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
        return PairedSampler(len(dataset), seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        if hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # Why: save_pretrained writes LLaVA's weights under its legacy key names and the Trainer reloads
        # them verbatim (every key "missing"); from_pretrained applies the key mapping.
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict())

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs and self._terms:  # a training log: add the mean of each term since the last one
            for k, v in self._terms.items():
                logs[k if k != "loss" else "objective"] = sum(v) / len(v)
            self._terms = {}
        super().log(logs, start_time)


def _last_checkpoint(folder) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(folder) if folder and Path(folder).is_dir() else None


class _Timing(TrainerCallback):
    def __init__(self):
        self.step_seconds: list = []
        self._t = None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.step_seconds.append(time.perf_counter() - self._t)


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
    """The forget/retain examples plus what the method needs (refusal answers, Prompt Decouple pairs)."""
    data = unlearning_data(bench, forget)
    if method.needs_refusals:
        add_refusals(data)
    if method.pd > 0:
        add_prompt_decouple(data, model, processor)
    return data


# transformers 5.23's Trainer calls its own deprecated `is_gradient_checkpointing` on peft models: a warning
# about transformers' internals, not about anything the user did.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


def unlearn(model="tiny", data="toyworld", forget: int = 5, method="ga", config: UnlearnConfig | None = None,
            output: str | Path | None = None, processor=None, callbacks=None, **hparams) -> UnlearnResult:
    """Unlearn ``forget_{forget}`` of ``data`` from ``model`` with ``method``.

    ``model``: a name for :func:`mlunlearn.models.load_model` or a loaded model (then pass ``processor``).
    ``data``: a source for :func:`mlunlearn.data.open_benchmark` or a :class:`Benchmark`.
    ``method``: a registered name (with ``**hparams``) or a :class:`Method`. ``output``: a folder to write
    the model (``model/``, or ``adapter/`` when not merged), checkpoints and ``run.json``. ``callbacks``:
    extra ``transformers.TrainerCallback`` objects (e.g. :class:`mlunlearn.analysis.ProjectorMonitor`).
    The loaded model is modified in place (pass a copy to keep the original).
    """
    from mlunlearn.data import open_benchmark
    from mlunlearn.models import load_model

    config = config or UnlearnConfig()
    method = method if isinstance(method, Method) else get_method(method, **hparams)
    model_name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
    if isinstance(model, str):
        model, processor = load_model(model)
    elif processor is None:
        raise MethodError("pass processor=... together with a loaded model")
    check_llava(model)
    bench = open_benchmark(data) if isinstance(data, str) else data
    device = next(model.parameters()).device
    precision = _precision(config.precision, device)

    t0 = time.time()
    set_seed(config.seed)  # before the adapters are initialised: same seed, same run
    examples = prepare_data(method, bench, forget, model.eval(), processor)
    separate = None
    if method.needs_reference and getattr(method, "reference", "vanilla") != "vanilla":
        separate, _ = load_model(method.reference, device=str(device))
    model = method.prepare(model)
    hooks = method.install_hooks(model)
    reference = Reference(model, separate) if method.needs_reference else None
    trainable = trainable_parameter_names(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trainable:
        raise MethodError(f"{method.name} with params={method.params!r} trains no parameter")

    out = Path(output) if output is not None else None
    keep = out is not None and (config.save_steps > 0 or config.resume)
    ckpt_dir = str(out / "checkpoints") if keep else _scratch_dir()
    args = TrainingArguments(
        output_dir=ckpt_dir, learning_rate=config.lr, num_train_epochs=config.epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        warmup_steps=config.warmup, lr_scheduler_type=config.scheduler, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, seed=config.seed, data_seed=config.seed,
        logging_steps=config.logging_steps, logging_first_step=True,
        save_strategy="steps" if config.save_steps > 0 else "no", save_steps=max(1, config.save_steps),
        save_total_limit=config.save_total_limit, save_only_model=False,
        report_to=[], disable_tqdm=not config.progress, remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=device.type == "cpu", **precision,
    )
    timing = _Timing()
    trainer = UnlearnTrainer(model=model, args=args, train_dataset=PairedDataset(examples, seed=config.seed),
                             data_collator=PairedCollator(processor), method=method, reference=reference,
                             callbacks=[timing, *(callbacks or [])])
    if not config.progress:  # without a bar the Trainer prints every log dict: keep notebooks quiet
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    resume = _last_checkpoint(ckpt_dir) if config.resume else None
    if config.resume and resume is None:
        raise MethodError(f"resume=true but there is no checkpoint in {ckpt_dir}")
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        for h in hooks:
            h.remove()
        if not keep and config.save_steps == 0:  # nothing was written there: leave no empty folder behind
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    model = method.finalize(trainer.model).eval()
    log = [dict(r) for r in trainer.state.log_history]
    if config.merge and hasattr(model, "merge_and_unload") and not getattr(model, "is_loaded_in_4bit", False):
        model = model.merge_and_unload()

    run = {
        "method": method.name, "hyperparameters": method.settings(), "config": dataclasses.asdict(config),
        "model": model_name, "data": bench.name, "forget": forget, "seed": config.seed,
        "examples": {"forget": len(examples.forget), "retain": len(examples.retain)},
        "trainable_parameters": n_trainable,
        "trainable_tensors": len(trainable),
        "reference": reference.kind if reference else None,
        "steps": trainer.state.global_step,
        "seconds": {"total": round(time.time() - t0, 2),
                    "train": round(sum(timing.step_seconds), 2),
                    "per_step_median": round(sorted(timing.step_seconds)[len(timing.step_seconds) // 2], 4)
                    if timing.step_seconds else None},
        "log": log,
    }
    if out is not None:
        save_run(model, processor, run, out, progress=config.progress)
    return UnlearnResult(model, processor, log, run)


def _scratch_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="mlunlearn-")


def save_run(model, processor, run: dict, out: Path, progress: bool = True) -> Path:
    """Write ``run.json`` and the model: ``model/`` (a plain LLaVA checkpoint) or ``adapter/`` (peft)."""
    from transformers.utils import logging as hf_logging

    out.mkdir(parents=True, exist_ok=True)
    target = out / ("adapter" if hasattr(model, "peft_config") else "model")
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(target, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if target.name == "model":
        processor.save_pretrained(target)
    run = dict(run, saved=target.name)
    (out / "run.json").write_text(json.dumps(run, indent=1, default=_json_default))
    return out


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return str(x)
