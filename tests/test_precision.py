"""One precision rule for inference and training (segcore.precision), training restricting the allowed set."""

import pytest
import torch

import segcore.fast
from segcore.errors import OptionError
from segcore.precision import PRECISIONS, resolve_precision
from train.config import TRAIN_PRECISIONS, ConfigError, config_from_dict


def test_training_precisions_are_inference_precisions_without_the_fused_kernels():
    assert set(TRAIN_PRECISIONS) <= set(PRECISIONS) and "fp32-fused" not in TRAIN_PRECISIONS


def test_a_precision_outside_the_allowed_set_is_an_option_error():
    with pytest.raises(OptionError, match="fp32-fused"):
        resolve_precision("fp32-fused", torch.device("cpu"), ("auto", "fp32", "bf16", "fp16"))
    with pytest.raises(OptionError, match="int4"):
        resolve_precision("int4", torch.device("cpu"))


def test_auto_falls_back_to_fp32_when_its_choice_is_not_allowed(monkeypatch):
    monkeypatch.setattr(segcore.fast, "cpu_bf16_supported", lambda: False)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32-fused"
    assert resolve_precision("auto", cpu, ("auto", "fp32", "bf16", "fp16")) == "fp32"
    monkeypatch.setattr(segcore.fast, "cpu_bf16_supported", lambda: True)
    assert resolve_precision("auto", cpu, ("auto", "fp32", "bf16", "fp16")) == "bf16"


def test_training_config_rejects_an_inference_only_precision():
    with pytest.raises(ConfigError, match="runtime.precision must be auto, fp32, bf16 or fp16"):
        config_from_dict({"data": {"synthetic": {"enabled": True}}, "runtime": {"precision": "fp32-fused"}})
