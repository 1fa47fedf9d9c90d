"""`runtime up` topology checks that need no process: colocated mode (--prefill 0) and how a
worker names the GPU it was placed on."""
from __future__ import annotations

import pytest
import torch

from runtime.config import ClusterConfig
from runtime.worker_base import device_label


def test_colocated_roles_and_bad_topologies() -> None:
    assert ClusterConfig(num_prefill=0, num_decode=2).roles == ("decode",)
    assert ClusterConfig().roles == ("prefill", "decode")
    with pytest.raises(ValueError, match="--decode must be at least 1"):
        ClusterConfig(num_prefill=0, num_decode=0)
    with pytest.raises(ValueError, match="--prefill must be 0"):
        ClusterConfig(num_prefill=-1)
    with pytest.raises(ValueError, match="--decode-gpus"):
        ClusterConfig(num_prefill=0, prefill_gpus=(0,))


def test_device_label_names_the_physical_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert device_label(torch.device("cuda", 1)) == "cuda:6"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device_label(torch.device("cuda", 1)) == "cuda:1"
    assert device_label(torch.device("cpu")) == "cpu"
