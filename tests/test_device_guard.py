"""`common.device.device_guard`: the check `make gpu-check` and the device tests run every forward under."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.device import device_guard
from common.models import load_model, micro_model


def test_guard_fails_on_an_input_away_from_the_parameters():
    layer = nn.Linear(3, 2)
    with pytest.raises(AssertionError, match=r"got an input .* on meta, its parameters are on cpu"):
        with device_guard("cpu"):
            layer(torch.empty(4, 3, device="meta"))


def test_guard_fails_on_parameters_away_from_the_requested_device():
    layer = nn.Linear(3, 2)
    with pytest.raises(AssertionError, match="Linear has its parameters on cpu, not on meta"):
        with device_guard("meta"):
            layer(torch.randn(4, 3))


def test_guard_counts_checked_forwards_and_records_load_model_devices(tmp_path):
    micro_model("gpt2").save_pretrained(tmp_path / "m")
    with device_guard("cpu") as report:
        model = load_model(tmp_path / "m")  # the default: "auto"
        load_model(tmp_path / "m", device="cpu")
        model(torch.tensor([[1, 2, 3]]))
    assert report.loads == ["auto", "cpu"]
    # embeddings (2), per block 2 LayerNorms + 4 Conv1D, final LayerNorm, lm_head
    n_layer = model.config.n_layer
    assert report.forwards == 2 + 6 * n_layer + 2
    model(torch.tensor([[1, 2, 3]]))  # the hook is gone after the block
    assert report.forwards == 2 + 6 * n_layer + 2
