"""Several processes (data parallel): each loads its model onto its own GPU, and a real two-process run on
the CPU (gloo) trains one run that only the first process writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_vanilla
from mlunlearn.utils import default_device, is_main_process, launched_processes, local_rank, process_device


def _launch(monkeypatch, rank, world=2, gpus=2):
    """The environment of process ``rank`` of ``world`` on a machine that shows ``gpus`` CUDA devices."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_each_process_of_a_launch_gets_its_own_gpu(monkeypatch):
    _launch(monkeypatch, rank=1)
    assert (launched_processes(), local_rank(), is_main_process()) == (2, 1, False)
    assert default_device() == process_device("cuda") == "cuda:1"
    assert process_device("cuda:0") == "cuda:0" and process_device("cpu") == "cpu"  # explicit: as given
    _launch(monkeypatch, rank=1, gpus=1)  # a launcher that shows each process only its own GPU
    assert process_device("cuda") == "cuda"
    _launch(monkeypatch, rank=0, world=1)  # one process: no launch
    assert (local_rank(), is_main_process(), process_device("cuda")) == (None, True, "cuda")
    monkeypatch.delenv("WORLD_SIZE")
    assert launched_processes() == 1 and local_rank() is None


@needs_vanilla
@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_load_model_in_process_1_places_the_model_on_gpu_1(monkeypatch, quantization):
    """What load_model asks transformers for in process 1 of 2: 4 bits on device_map {"": "cuda:1"}, full
    precision moved to cuda:1 (both were GPU 0 before). from_pretrained is replaced by a recorder (no GPU
    here); everything before it (device check, bitsandbytes check) runs for real."""
    import importlib.util

    from transformers import LlavaForConditionalGeneration

    from mlunlearn.models import load_model

    _launch(monkeypatch, rank=1)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    seen = {}

    class Loaded:
        def to(self, device):
            seen["to"] = device
            return self

        def eval(self):
            return self

    def from_pretrained(source, **kwargs):
        seen["kwargs"] = kwargs
        return Loaded()

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", from_pretrained)
    load_model("tiny", quantization=quantization)
    assert seen["kwargs"]["dtype"] == torch.bfloat16
    if quantization:
        assert seen["kwargs"]["device_map"] == {"": "cuda:1"} and "to" not in seen
        assert seen["kwargs"]["quantization_config"].load_in_4bit
    else:
        assert "device_map" not in seen["kwargs"] and seen["to"] == "cuda:1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_vanilla
def test_two_processes_train_one_run_and_only_the_first_writes_it(tmp_path, capsys):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: the engine trains on the
    CPU (use_cpu), so accelerate runs DDP over gloo. Two steps of GA; each step sees 2 x 4 forget pairs, so
    the 15 forget pairs are one epoch in 2 steps (4 with one process), and the logged terms are the mean over
    both processes like the Trainer's loss. The folder loads with load_model and `mlunlearn eval` reads it.
    (`accelerate launch --cpu --num_processes 2` would start a single process: accelerate needs mpirun for
    several CPU processes.) About 35 s on one core."""
    from mlunlearn.cli import main
    from mlunlearn.models import load_model

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()),
               "-m", "mlunlearn", "unlearn", "--model", "tiny", "--method", "ga", "--set", "max_steps=2",
               "--no-progress", "--output", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("ga: ")]
    assert len(reports) == 1 and f"wrote {out}/run.json" in reports[0], done.stdout  # one process reports
    assert sorted(p.name for p in out.iterdir()) == ["model", "run.json"]
    run = json.loads((out / "run.json").read_text())
    assert (run["processes"], run["steps"], run["examples"]["forget"]) == (2, 2, 15)
    steps = [r for r in run["log"] if "loss" in r]
    assert [r["epoch"] for r in steps] == [0.5, 1.0]  # 2 processes x batch 4: 15 pairs in 2 steps
    for r in steps:  # GA: loss = -forget NLL, both averaged over the two processes
        assert r["objective"] == pytest.approx(r["loss"], abs=1e-6)
        assert r["forget_nll"] == pytest.approx(-r["loss"], abs=1e-6)
    model, _ = load_model(str(out), device="cpu")
    vanilla, _ = load_model("tiny", device="cpu")
    trained = {n for n, p in model.state_dict().items() if not torch.equal(p, vanilla.state_dict()[n])}
    assert trained and all(".language_model." in n for n in trained), sorted(trained)[:5]  # LoRA, merged
    code = main(["eval", "--model", str(out), "--limit", "1", "--max-new-tokens", "5", "--no-progress",
                 "--output", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert "Forget Set Results" in json.loads((tmp_path / "r.json").read_text())


def test_bench_under_a_distributed_launch_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """bench is one process running cells in turn: launched twice, both would write the whole grid into one
    folder. It refuses, naming the way that works (one bench per GPU, disjoint cells, own folders)."""
    from conftest import assert_one_line_error
    from mlunlearn.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code = main(["bench", "--output", str(tmp_path / "grid"), "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "2 processes", "CUDA_VISIBLE_DEVICES=<i> mlunlearn bench",
                          "own --output")
    assert not (tmp_path / "grid").exists()
