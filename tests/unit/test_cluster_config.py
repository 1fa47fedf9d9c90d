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


def test_cpu_workers_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """`runtime up` on CPU: decode workers split the cores among themselves, prefill workers
    take an even share of all workers' (OpenMP teams asking for more threads than there
    are cores stall each other); RUNTIME_CPU_THREADS, when set, wins."""
    from runtime.config import ClusterConfig, EngineConfig
    from runtime.controller import process

    monkeypatch.setattr(process, "physical_cores", lambda: 8)
    monkeypatch.delenv("RUNTIME_CPU_THREADS", raising=False)
    cfg = ClusterConfig(engine=EngineConfig(device="cpu"), num_prefill=2, num_decode=2)
    assert process.cpu_threads_per_worker(cfg, "decode") == 4
    assert process.cpu_threads_per_worker(cfg, "prefill") == 2
    assert process.cpu_threads_per_worker(cfg, "gateway") is None
    one = ClusterConfig(engine=EngineConfig(device="cpu"), num_prefill=1, num_decode=1)
    assert (process.cpu_threads_per_worker(one, "decode"), process.cpu_threads_per_worker(one, "prefill")) == (8, 4)
    many = ClusterConfig(engine=EngineConfig(device="cpu"), num_prefill=8, num_decode=16)
    assert process.cpu_threads_per_worker(many, "prefill") == 1 and process.cpu_threads_per_worker(many, "decode") == 1
    monkeypatch.setenv("RUNTIME_CPU_THREADS", "3")
    assert process.cpu_threads_per_worker(cfg, "decode") is None
