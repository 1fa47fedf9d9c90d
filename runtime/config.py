"""Layered, frozen configuration. The CLI flags and `runtime.Engine` keyword arguments map
one to one onto these fields; derived values are properties; `__post_init__` validates."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy")
SPECULATIVE = ("none", "ngram", "eagle", "draft")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer")
# auto: the model's dtype; fp8_e4m3: K and V stored as e4m3 (scale 1), half the bytes a decode
# step reads and twice the tokens the pool holds (Triton and torch attention; not flashinfer).
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
# What `--quantization` accepts. "auto": what the checkpoint declares (an FP8 config.json,
# a GGUF's Q4_0/Q4_1/Q8_0 blocks on CPU), else none.
QUANTIZATIONS = ("auto", "none", "fp8", "int8", "int4")
CPU_ONLY = ("int8", "int4")  # torch's weight-only packed ops exist for CPU only
INT4_GROUP_SIZES = (32, 64, 128)  # without a choice: 32 (GGUF Q4 blocks are 32 wide)
# Draft tree nodes (one bit per node in the tree rule): verification masks a node's ancestors
# with one int64 per row.
MAX_TREE_NODES = 63


def _choose(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded default, SmolLM2-135M-Instruct
    device: str = "auto"
    dtype: str = "auto"
    load_format: str = "auto"
    # auto: what the checkpoint declares (FP8 config on CUDA, GGUF Q4/Q8 blocks on CPU), else
    # none; fp8 (CUDA _scaled_mm; a dequantizing reference on CPU), int8 / int4 (CPU only).
    quantization: str = "auto"
    int4_group_size: int = 32  # input channels per int4 scale (32, 64 or 128; 32 = GGUF's blocks)
    # CPU int8/int4: also keep each projection dense for prefill-sized inputs (the packed ops
    # lose 4-10x to the bf16 GEMM there); off: the quantized weights only (less memory).
    quant_dense_prefill: bool = True
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES
    page_size: int = 16
    kv_cache_tokens: int | None = None  # None: sized from kv_mem_fraction (CUDA) or 32k (CPU)
    kv_mem_fraction: float = 0.85  # of the GPU memory left after the weights
    max_running: int = 256
    max_batch_tokens: int = 4096
    chunked_prefill: bool = True
    prefix_cache: bool = True
    attention_backend: str = "auto"
    cuda_graph: bool = True  # decode steps replay captured CUDA graphs (CUDA + Triton only)
    # Decode rows the CUDA graphs cover; None: max_running (at most 512), so every decode batch
    # the scheduler admits replays a graph (at 128 graphs and 256 running, batches above 128
    # ran eagerly: on an H200 the 8B shape's throughput at concurrency 256 halved).
    cuda_graph_max_batch: int | None = None
    speculative: str = "none"
    num_draft_tokens: int = 4
    draft_model: str | None = None
    # fixed: always k drafts; adaptive: draft where measured steps say it pays (policy.py)
    speculative_policy: str = "adaptive"
    speculative_max_batch: int = 32  # adaptive: no drafting above this many decoding requests
    # eagle only: "chain", or "BxN": a draft tree that expands the B most likely tokens of
    # every node and keeps the N best nodes (N <= 63), depth up to num_draft_tokens.
    speculative_tree: str = "chain"
    # Keep each request's prompt hidden states (a prefill worker whose decode workers draft
    # with EAGLE sends them along with the KV).
    export_prompt_hidden: bool = False
    # Constrained requests append the tokens their grammar forces without sampling them
    # (runtime/engine/jump_forward.py); off: every token is sampled.
    jump_forward: bool = True
    # Launch each decode step before the host has read the previous one's tokens (the new
    # rows take them on the device), so the scheduling and bookkeeping of a step run while
    # the GPU computes the next: engine/overlap.py. Steps that draft, and requests with a
    # grammar or prompt logprobs, run as before. On by default: on the H100, 8B shape, it
    # gave +8% out tok/s at concurrency 64 and +14% at 256 (benchmarks/RESULTS.md).
    overlap_schedule: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _choose("device", self.device, DEVICES)
        _choose("dtype", self.dtype, DTYPES)
        _choose("load_format", self.load_format, LOAD_FORMATS)
        _choose("quantization", self.quantization, QUANTIZATIONS)
        if self.int4_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4_group_size must be one of {INT4_GROUP_SIZES} (got {self.int4_group_size})")
        _choose("speculative", self.speculative, SPECULATIVE)
        _choose("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choose("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if self.kv_cache_dtype != "auto" and self.attention_backend == "flashinfer":
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} runs on the triton or torch attention backend, "
                             "not flashinfer (pass --attention-backend triton)")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1 (got {self.page_size})")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 2 * self.page_size:
            raise ValueError(f"kv_cache_tokens must hold at least two pages (got {self.kv_cache_tokens})")
        if not 0.0 < self.kv_mem_fraction <= 1.0:
            raise ValueError(f"kv_mem_fraction must be in (0, 1] (got {self.kv_mem_fraction})")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (got {self.max_model_len})")
        _choose("speculative_policy", self.speculative_policy, ("fixed", "adaptive"))
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1 (got {self.num_draft_tokens})")
        tree = self.draft_tree  # parses and checks the spelling
        if tree is not None:
            branch, nodes = tree
            if self.speculative != "eagle":
                raise ValueError(f"speculative_tree {self.speculative_tree!r} needs speculative 'eagle' "
                                 f"(got {self.speculative!r})")
            if (self.num_draft_tokens - 1) * branch > MAX_TREE_NODES:
                raise ValueError(
                    f"speculative_tree {self.speculative_tree!r} with num_draft_tokens {self.num_draft_tokens}: "
                    f"(num_draft_tokens - 1) * B must be <= {MAX_TREE_NODES}; lower B or num_draft_tokens"
                )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        if self.quantization in CPU_ONLY and self.torch_device.type != "cpu":
            raise ValueError(f"quantization {self.quantization!r} runs on CPU only (torch's weight-only packed "
                             f"ops); on {self.torch_device.type} use fp8 or none, or pass --device cpu")

    @property
    def draft_tree(self) -> tuple[int, int] | None:
        """(branch B, max nodes N) of speculative_tree "BxN"; None for "chain"."""
        spec = self.speculative_tree.strip().lower()
        if spec == "chain":
            return None
        parts = spec.split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"speculative_tree must be 'chain' or 'BxN', e.g. '4x24' (got {self.speculative_tree!r})")
        branch, nodes = int(parts[0]), int(parts[1])
        if not 2 <= branch <= nodes <= MAX_TREE_NODES:
            raise ValueError(
                f"speculative_tree {self.speculative_tree!r}: need 2 <= B <= N <= {MAX_TREE_NODES} (B = 1 is 'chain')"
            )
        return branch, nodes

    @property
    def draft_tree_nodes(self) -> int:
        """N of a "BxN" draft tree; 0 for chains."""
        tree = self.draft_tree
        return tree[1] if tree else 0

    def kv_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV pool's element type beside a model of `model_dtype`."""
        if self.kv_cache_dtype == "fp8_e4m3":
            if model_dtype == torch.float32:
                raise ValueError("kv_cache_dtype 'fp8_e4m3' needs a bfloat16 or float16 model (got float32): "
                                 "pass --dtype bfloat16")
            return torch.float8_e4m3fn
        return model_dtype

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


TRANSFER_BACKENDS = ("auto", "zmq", "nixl")


def split_tcp(url: str | None) -> tuple[str, int]:
    """("HOST", PORT) of tcp://HOST:PORT, or a clear error."""
    rest = (url or "").removeprefix("tcp://")
    host, _, port = rest.rpartition(":")
    if not (url or "").startswith("tcp://") or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ValueError(f"expected tcp://HOST:PORT with PORT in 1..65534 (got {url!r})")
    return host, int(port)


@dataclass(frozen=True)
class JoinConfig:
    """`runtime worker`: how one worker joins a controller over tcp://."""

    role: str  # prefill | decode
    listen: str = "tcp://0.0.0.0:*"  # this worker's inbox; * takes a free port
    advertise_host: str | None = None  # how peers reach it; None: the address that routes to the controller
    drain_timeout_s: float = 30.0  # SIGTERM: running requests get this long to finish
    register_timeout_s: float = 300.0  # the controller may start after its workers (Kubernetes)
    health_port: int = 0  # HTTP /livez, /readyz for probes; 0: none

    def __post_init__(self) -> None:
        _choose("role", self.role, ("prefill", "decode"))
        if not self.listen.startswith("tcp://"):
            raise ValueError(f"--listen must be tcp://HOST:PORT or tcp://HOST:* (got {self.listen!r})")
        if self.drain_timeout_s < 0 or self.register_timeout_s <= 0:
            raise ValueError("--drain-timeout must be >= 0 and --register-timeout > 0")
        if not 0 <= self.health_port < 65536:
            raise ValueError(f"--health-port must be in 0..65535 (got {self.health_port})")
ROUTING_POLICIES = ("prefix_aware", "shortest_queue", "round_robin")


@dataclass(frozen=True)
class ClusterConfig:
    """`runtime up`: the processes and the one place their socket addresses are derived."""

    engine: EngineConfig = EngineConfig()
    # 0 prefill workers: colocated serving, each decode worker prefills its own requests
    # (no KV transfer), the non-disaggregated baseline.
    num_prefill: int = 1
    num_decode: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # default: the model folder's name
    ipc_dir: str = "/tmp/runtime-ipc"  # one run's socket files live in a fresh subfolder
    # tcp://HOST:BASE+k instead of ipc:// sockets (workers on other hosts)
    tcp_host: str | None = None
    tcp_base_port: int = 29500
    # Several hosts: tcp://HOST:PORT of the controller's inbox, where `runtime controller`
    # listens or where `runtime worker` joins; the gateway's inbox is PORT+1 on that host.
    # Workers then register themselves (controller/registry.py) instead of being numbered here.
    controller_url: str | None = None
    curve_keys: str | None = None  # directory of `runtime keys`: CURVE on every tcp:// link
    insecure: bool = False  # tcp:// without CURVE, by explicit choice (benchmarks, trusted networks)
    transfer: str = "auto"  # auto: nixl when importable, else zmq (KV inline in messages)
    transfer_timeout_s: float = 30.0  # one KV transfer, from the prefill being done to the data landing
    prefill_wait_s: float = 600.0  # decode side: queueing + prefill + transfer of one prompt
    routing: str = "prefix_aware"
    heartbeat_s: float = 0.5
    dead_after_s: float = 5.0  # no heartbeat this long: the worker is dead
    restart_dead: bool = True
    prefill_gpus: tuple[int, ...] = ()  # CUDA device per prefill worker (default: all on 0)
    decode_gpus: tuple[int, ...] = ()
    fail_transfer_rate: float = 0.0  # TEST ONLY: fraction of transfers the prefill side fails
    # The gateway's bounds on one request, a 400 beyond them: prompts in a completions batch
    # (n is at most 128 on its own), and prompt tokens over all prompts x n, as the workers
    # admit them: 256 prompts of 1k tokens, or a 2k-token prompt at n = 128.
    max_prompts_per_request: int = 256
    max_request_tokens: int = 262_144
    # Sequences (prompts x n) in flight per live decode worker before the gateway answers 429:
    # 16 full batches of the engine's default max_running (256), so a concurrency-1024
    # benchmark on one decode worker (n up to 4) is never refused.
    max_queued_requests: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_prompts_per_request", "max_request_tokens", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.distributed:
            split_tcp(self.controller_url)
            if self.curve_keys is None and not self.insecure:
                raise ValueError("tcp:// links need CURVE keys: pass --curve-keys DIR (create them with "
                                 "`runtime keys --out DIR`), or --insecure on a network you trust")
        if self.num_decode < 1 and not self.distributed:
            why = " (with --prefill 0 the decode workers serve every request, prefill included)" if self.colocated else ""
            raise ValueError(f"--decode must be at least 1, got {self.num_decode}{why}")
        if self.num_prefill < 0:
            raise ValueError(f"--prefill must be 0 (colocated) or more (got {self.num_prefill})")
        if self.colocated and self.prefill_gpus:
            raise ValueError("--prefill-gpus was given, but --prefill 0 starts no prefill worker; "
                             "place the colocated workers with --decode-gpus")
        _choose("transfer", self.transfer, TRANSFER_BACKENDS)
        _choose("routing", self.routing, ROUTING_POLICIES)
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535 (got {self.port})")

    @property
    def distributed(self) -> bool:
        """Workers join over tcp:// (`runtime controller` / `runtime worker`)."""
        return self.controller_url is not None

    @property
    def colocated(self) -> bool:
        # A controller that listens for workers runs disaggregated pools: --prefill 0 there
        # means no local prefill worker, not colocated serving.
        return self.num_prefill == 0 and not self.distributed

    @property
    def roles(self) -> tuple[str, ...]:
        """The worker roles this cluster runs (each must have a live worker to serve)."""
        return ("decode",) if self.colocated else ("prefill", "decode")

    def _addr(self, name: str, k: int) -> str:
        if self.tcp_host:
            return f"tcp://{self.tcp_host}:{self.tcp_base_port + k}"
        return f"ipc://{self.ipc_dir}/{name}"

    def _remote(self, offset: int, bind: bool) -> str:
        host, port = split_tcp(self.controller_url)
        if not bind and host in ("0.0.0.0", "*"):
            host = "127.0.0.1"  # this host's own listener, reached from this host
        return f"tcp://{host}:{port + offset}"

    @property
    def gateway_addr(self) -> str:  # gateway PULL: TokenDelta, RequestError, ClusterStatus
        return self._remote(1, bind=False) if self.distributed else self._addr("gateway", 0)

    @property
    def gateway_bind(self) -> str:
        return self._remote(1, bind=True) if self.distributed else self.gateway_addr

    @property
    def controller_addr(self) -> str:  # controller PULL: Generate, Abort, Ready, Heartbeat, TaskDone, Register
        return self._remote(0, bind=False) if self.distributed else self._addr("controller", 1)

    @property
    def controller_bind(self) -> str:
        return self._remote(0, bind=True) if self.distributed else self.controller_addr

    def prefill_addr(self, i: int) -> str:  # prefill worker i PULL: PrefillTask, KVDestination, AbortTask
        return self._addr(f"prefill-{i}", 2 + i)

    def decode_addr(self, i: int) -> str:  # decode worker i PULL: DecodeTask | GenerateTask, KVDone, AbortTask
        return self._addr(f"decode-{i}", 2 + self.num_prefill + i)
