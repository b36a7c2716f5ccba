"""The GPU path (LLaVA-1.5 on Colab), checked on the CPU with the tiny model: 4-bit loading settings,
SineProject in half precision, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback

from conftest import needs_vanilla
from mlunlearn.engine import FAMILY_SETTINGS, UnlearnConfig, split_settings, unlearn
from mlunlearn.methods import MethodError

pytestmark = needs_vanilla


# -- gradient checkpointing --------------------------------------------------------------------------------


class _Seen(TrainerCallback):
    """What the Trainer trained with: its checkpointing argument, and whether the model checkpointed."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.argument = args.activation_checkpointing
        self.model_checkpointing = base.is_activation_checkpointing


def _losses(vanilla, method, checkpointing):
    model, processor = vanilla
    seen = _Seen()
    config = UnlearnConfig(lr=1e-3, max_steps=2, batch_size=2, progress=False, gradient_checkpointing=checkpointing)
    result = unlearn(copy.deepcopy(model), "toyworld", 5, method, config, processor=processor, callbacks=[seen])
    return [r["loss"] for r in result.log if "loss" in r], seen, result


@pytest.mark.parametrize("method", ["graddiff", "sineproject"])  # LoRA only; LoRA + the sine projector
def test_gradient_checkpointing_reaches_the_trainer_and_keeps_the_losses(vanilla, method):
    off, seen_off, _ = _losses(vanilla, method, False)
    on, seen_on, result = _losses(vanilla, method, True)
    assert (seen_off.argument, seen_off.model_checkpointing) == (False, False)
    assert (seen_on.argument, seen_on.model_checkpointing) == (True, True)
    assert len(on) == len(off) == 2 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(on, off)), (on, off)
    assert result.run["config"]["gradient_checkpointing"] is True
    assert not result.model.is_activation_checkpointing  # the returned model evaluates as usual


def test_gradient_checkpointing_defaults_per_family_and_parses():
    assert FAMILY_SETTINGS["tiny"]["gradient_checkpointing"] is False
    assert FAMILY_SETTINGS["llava-1.5"]["gradient_checkpointing"] is True
    assert UnlearnConfig().gradient_checkpointing is None  # unset: the family's
    for text, value in (("true", True), ("false", False), ("1", True)):
        assert split_settings({"gradient_checkpointing": text}, "ga") == ({}, {"gradient_checkpointing": value})
    with pytest.raises(MethodError, match="gradient_checkpointing='maybe': expected a bool"):
        split_settings({"gradient_checkpointing": "maybe"}, "ga")
    with pytest.raises(MethodError, match="gradient_checkpointing"):
        UnlearnConfig(gradient_checkpointing="yes")


def test_the_tiny_family_trains_without_checkpointing_by_default(vanilla):
    model, processor = vanilla
    seen = _Seen()
    result = unlearn(copy.deepcopy(model), "toyworld", 5, "ga", UnlearnConfig(max_steps=1, progress=False),
                     processor=processor, callbacks=[seen])
    assert seen.argument is False and result.run["config"]["gradient_checkpointing"] is False
