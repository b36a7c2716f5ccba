"""Small helpers every chapter uses: seeding, device and dtype choice."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def set_seed(seed: int = 0, threads: int | None = 1) -> None:
    """Seed Python, NumPy and torch; pin torch to ``threads`` CPU threads (None leaves it alone).

    One thread makes small models deterministic and, on 2-core machines, faster: with two threads
    step times of a tiny model jump erratically.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if threads is not None:
        torch.set_num_threads(threads)


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``mps`` on Apple silicon, else ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs that support it (A100, L4, H100), fp16 on those that don't (Colab's T4), fp32 on CPU."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
