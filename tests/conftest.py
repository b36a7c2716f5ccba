"""Shared test fixtures: the shipped tiny vanilla model, loaded once per test module."""

import pytest
import torch

from mlunlearn.models import ASSET_DIR, load_model

torch.set_num_threads(1)  # small models: one thread is fastest and deterministic

# Modules that need the shipped weights mark themselves with `pytestmark = needs_vanilla`.
needs_vanilla = pytest.mark.skipif(not (ASSET_DIR / "model.safetensors").is_file(),
                                   reason="the tiny vanilla weights (mlunlearn/assets/tiny-vanilla) are not built")


@pytest.fixture(scope="module")
def vanilla():
    """``(model, processor)`` of the vanilla tiny model on CPU in float32. Tests deep-copy before training."""
    return load_model("tiny", device="cpu", dtype=torch.float32)


def assert_one_line_error(code, err, *needles):
    """A command-line error as the README promises it: exit status 2 and one line on stderr, no
    traceback, holding every one of ``needles``."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
