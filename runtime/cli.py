"""The `runtime` command: `runtime generate "prompt"` (offline, streaming to the terminal)."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from runtime.config import (ATTENTION_BACKENDS, DEVICES, DTYPES, INT4_GROUP_SIZES, KV_CACHE_DTYPES, LOAD_FORMATS,
                            QUANTIZATIONS, SPECULATIVE, ClusterConfig, JoinConfig)
from runtime.env import ENV


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine flags of INTERFACE.md, shared by every subcommand that runs a model."""
    p.add_argument("--model", default=None, help="HF folder, .gguf file, or omit for SmolLM2-135M-Instruct")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    p.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="auto: what the checkpoint declares (FP8 config on CUDA, GGUF Q4_0/Q4_1/Q8_0 on CPU), "
                        "else none; fp8: e4m3 weights, per-token activation scales (CUDA); int8/int4: CPU "
                        "weight-only. Dense weights are quantized at load")
    p.add_argument("--int4-group-size", type=int, default=32, choices=INT4_GROUP_SIZES)
    p.add_argument("--no-quant-dense-prefill", action="store_true",
                   help="CPU int8/int4: keep only the quantized weights (default: also a dense copy of each "
                        "projection for prefill-sized batches, where the packed ops are 4-10x slower)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto: the model's dtype; fp8_e4m3: K/V stored as e4m3 with scale 1 (half the KV bytes "
                        "per decode step, twice the cached tokens; triton/torch attention, bf16/fp16 models)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size (default: from memory)")
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="tokens per forward (chunked prefill budget)")
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--attention-backend", default=ENV.attention_backend, choices=ATTENTION_BACKENDS)
    p.add_argument("--speculative", default="none", choices=SPECULATIVE)
    p.add_argument("--num-draft-tokens", type=int, default=4)
    p.add_argument("--draft-model", default=None)
    p.add_argument("--speculative-policy", default="adaptive", choices=("fixed", "adaptive"),
                   help="adaptive: draft only at batch sizes where measured speculative steps give more "
                        "tokens/s than plain ones (re-checked as the text and load change); fixed: always")
    p.add_argument("--speculative-tree", default="chain",
                   help="eagle: 'chain', or BxN: a draft tree expanding the B best tokens per node, "
                        "keeping the N best nodes (N <= 63; depth up to --num-draft-tokens)")
    p.add_argument("--no-jump-forward", action="store_true",
                   help="constrained decoding samples every token (default: tokens the grammar forces are "
                        "appended without sampling, several per step)")
    p.add_argument("--overlap-schedule", action=argparse.BooleanOptionalAction, default=True,
                   help="launch each decode step before reading the previous step's tokens on the host, so "
                        "scheduling overlaps the GPU's work (steps that draft, and requests with grammars or "
                        "prompt logprobs, run as before); on by default")
    p.add_argument("--disable-overlap-schedule", dest="overlap_schedule", action="store_false",
                   help="the same as --no-overlap-schedule (SGLang's spelling)")
    p.add_argument("--log-level", default=ENV.log_level)


def engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        model=a.model,
        device=a.device,
        dtype=a.dtype,
        load_format=a.load_format,
        quantization=a.quantization,
        int4_group_size=a.int4_group_size,
        quant_dense_prefill=not a.no_quant_dense_prefill,
        max_model_len=a.max_model_len,
        kv_cache_dtype=a.kv_cache_dtype,
        page_size=a.page_size,
        kv_cache_tokens=a.kv_cache_tokens,
        max_batch_tokens=a.max_batch_tokens,
        chunked_prefill=not a.no_chunked_prefill,
        prefix_cache=not a.no_prefix_cache,
        attention_backend=a.attention_backend,
        speculative=a.speculative,
        num_draft_tokens=a.num_draft_tokens,
        draft_model=a.draft_model,
        speculative_policy=a.speculative_policy,
        speculative_tree=a.speculative_tree,
        jump_forward=not a.no_jump_forward,
        overlap_schedule=a.overlap_schedule,
    )


def cmd_generate(a: argparse.Namespace) -> int:
    from runtime import Engine, SamplingParams

    try:
        params = SamplingParams(
            max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed
        )
        engine = Engine(**engine_kwargs(a))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"runtime: error: {e}", file=sys.stderr)
        return 2
    try:
        use_chat = not a.raw and getattr(engine.tokenizer, "chat_template", None)
        prompt = engine.apply_chat_template([{"role": "user", "content": a.prompt}]) if use_chat else a.prompt
        for delta in engine.stream(prompt, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        engine.shutdown()
    return 0


def _gpus(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else ()


def _cpu_pool(kw: dict) -> dict:
    if kw["kv_cache_tokens"] is None and kw["device"] in ("auto", "cpu"):
        import torch

        if kw["device"] == "cpu" or not torch.cuda.is_available():
            # Several workers share one host's memory: a smaller pool each by default.
            kw["kv_cache_tokens"] = 8192
    return kw


def _cluster_config(a: argparse.Namespace, **extra: object) -> ClusterConfig:
    from runtime.config import EngineConfig

    return ClusterConfig(
        engine=EngineConfig(**_cpu_pool(engine_kwargs(a))), num_prefill=a.prefill, num_decode=a.decode, host=a.host,
        port=a.port, api_key=a.api_key, served_model_name=a.served_model_name, transfer=a.transfer,
        routing=a.routing, prefill_gpus=_gpus(a.prefill_gpus), decode_gpus=_gpus(a.decode_gpus),
        fail_transfer_rate=a.fail_transfer_rate, max_prompts_per_request=a.max_prompts_per_request,
        max_request_tokens=a.max_request_tokens, max_queued_requests=a.max_queued_requests, **extra,
    )


def cmd_up(a: argparse.Namespace) -> int:
    from runtime.launcher import run_up

    try:
        cfg = _cluster_config(a)
    except ValueError as e:
        print(f"runtime up: error: {e}", file=sys.stderr)
        return 2
    return run_up(cfg, a.log_level)


def cmd_controller(a: argparse.Namespace) -> int:
    from runtime.launcher import run_up

    try:
        cfg = _cluster_config(a, controller_url=a.listen, curve_keys=a.curve_keys, insecure=a.insecure)
    except ValueError as e:
        print(f"runtime controller: error: {e}", file=sys.stderr)
        return 2
    return run_up(cfg, a.log_level, a.advertise_host)


def cmd_worker(a: argparse.Namespace) -> int:
    from runtime.config import EngineConfig, JoinConfig
    from runtime.controller.listen import cluster_transfer
    from runtime.join import run_worker
    from runtime.launcher import StartupError, resolve_model

    try:
        join = JoinConfig(a.role, listen=a.listen, advertise_host=a.advertise_host, drain_timeout_s=a.drain_timeout,
                          register_timeout_s=a.register_timeout, health_port=a.health_port)
        cfg = resolve_model(ClusterConfig(
            engine=EngineConfig(**_cpu_pool(engine_kwargs(a))), num_prefill=0, num_decode=0,
            transfer=cluster_transfer(a.transfer), controller_url=a.controller, curve_keys=a.curve_keys,
            insecure=a.insecure,
        ))
    except (ValueError, StartupError) as e:
        print(f"runtime worker: error: {e}", file=sys.stderr)
        return 2
    return run_worker(cfg, join)


def cmd_keys(a: argparse.Namespace) -> int:
    from runtime.security import create_keys

    for path in create_keys(a.out, a.client):
        print(path)
    return 0


def _add_link_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-keys", default=None,
                   help="directory from `runtime keys` (or a mounted Secret): CURVE on every tcp:// link")
    p.add_argument("--insecure", action="store_true", help="tcp:// links without CURVE (a network you trust)")
    p.add_argument("--advertise-host", default=None,
                   help="the address other hosts reach this one at, when listening on 0.0.0.0")


def _add_serving_args(u: argparse.ArgumentParser, prefill: int, decode: int) -> None:
    if prefill:
        u.add_argument("--prefill", type=int, default=prefill,
                       help="prefill workers; 0: colocated, each decode worker prefills and decodes its own requests "
                            "(no KV transfer)")
        u.add_argument("--decode", type=int, default=decode, help="decode replicas (with --prefill 0: the engine workers)")
    else:
        u.add_argument("--prefill", type=int, default=0, help="prefill workers started on this host (they join as remote ones do)")
        u.add_argument("--decode", type=int, default=0, help="decode workers started on this host")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=8000)
    u.add_argument("--api-key", default=None)
    u.add_argument("--served-model-name", default=None)
    u.add_argument("--transfer", default="auto", choices=("auto", "zmq", "nixl"))
    u.add_argument("--routing", default="prefix_aware", choices=("prefix_aware", "shortest_queue", "round_robin"))
    u.add_argument("--prefill-gpus", default="", help="CUDA device per prefill worker, e.g. 0,1")
    u.add_argument("--decode-gpus", default="", help="CUDA device per decode worker (colocated too), e.g. 2,3,4,5")
    u.add_argument("--max-prompts-per-request", type=int, default=ClusterConfig.max_prompts_per_request,
                   help="prompts in one /v1/completions batch; more is a 400")
    u.add_argument("--max-request-tokens", type=int, default=ClusterConfig.max_request_tokens,
                   help="prompt tokens in one request, over all its prompts x n; more is a 400")
    u.add_argument("--max-queued-requests", type=int, default=ClusterConfig.max_queued_requests,
                   help="sequences (prompts x n) in flight per live decode worker; beyond it new requests get 429")
    u.add_argument("--fail-transfer-rate", type=float, default=0.0, help=argparse.SUPPRESS)  # tests only
    add_engine_args(u)


def cmd_bench(a: argparse.Namespace, rest: list[str]) -> int:
    from runtime.bench import main as bench_main

    return bench_main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runtime", description="A disaggregated, speculative LLM serving runtime.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt, offline, streaming to the terminal")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    u = sub.add_parser("up", help="serve the OpenAI API with disaggregated prefill and decode workers "
                       "(or colocated engines: --prefill 0)")
    _add_serving_args(u, 1, 1)
    u.set_defaults(func=cmd_up)

    c = sub.add_parser("controller", help="the gateway and controller, listening for workers that join over tcp://")
    c.add_argument("--listen", required=True, help="tcp://HOST:PORT of the controller's inbox (the gateway's is PORT+1)")
    _add_link_args(c)
    _add_serving_args(c, 0, 0)
    c.set_defaults(func=cmd_controller)

    w = sub.add_parser("worker", help="a prefill or decode worker that joins a `runtime controller`")
    w.add_argument("--role", required=True, choices=("prefill", "decode"))
    w.add_argument("--controller", required=True, help="tcp://HOST:PORT the controller listens on")
    w.add_argument("--listen", default=JoinConfig.listen, help="this worker's inbox; * takes a free port")
    w.add_argument("--transfer", default="auto", choices=("auto", "zmq", "nixl"),
                   help="KV transfer; auto: inline over the (CURVE) zmq link; nixl: NIXL's network path (UCX)")
    w.add_argument("--drain-timeout", type=float, default=JoinConfig.drain_timeout_s,
                   help="SIGTERM: seconds running requests get to finish before the worker leaves")
    w.add_argument("--register-timeout", type=float, default=JoinConfig.register_timeout_s,
                   help="seconds to keep asking the controller to admit this worker")
    w.add_argument("--health-port", type=int, default=0, help="HTTP /livez and /readyz for probes; 0: off")
    _add_link_args(w)
    add_engine_args(w)
    w.set_defaults(func=cmd_worker)

    k = sub.add_parser("keys", help="create the CURVE keys of a cluster (runtime/security.py says which)")
    k.add_argument("--out", required=True, help="directory to write server.key[_secret] and client.key[_secret] into")
    k.add_argument("--client", default="client", help="name of the client keypair (another host's own key)")
    k.set_defaults(func=cmd_keys)

    b = sub.add_parser("bench", help="serving benchmark against a running server (see runtime bench --help)", add_help=False)
    b.set_defaults(func=cmd_bench)
    sub.add_parser("train-draft", help="train an EAGLE-style draft head by self-distillation (see --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argparse.Namespace(), argv[1:])
    if argv[:1] == ["train-draft"]:
        from runtime.engine.speculative.train_draft import main as train_main

        return train_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "info")).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
