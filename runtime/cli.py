"""The `runtime` command: `runtime generate "prompt"` (offline, streaming to the terminal)."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from runtime.config import (ATTENTION_BACKENDS, DEVICES, DTYPES, INT4_GROUP_SIZES, LOAD_FORMATS, QUANTIZATIONS,
                            SPECULATIVE, ClusterConfig)
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
    p.add_argument("--max-model-len", type=int, default=None)
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
    p.add_argument("--log-level", default=ENV.log_level)


def engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        model=a.model,
        device=a.device,
        dtype=a.dtype,
        load_format=a.load_format,
        quantization=a.quantization,
        int4_group_size=a.int4_group_size,
        max_model_len=a.max_model_len,
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


def cmd_up(a: argparse.Namespace) -> int:
    from runtime.config import EngineConfig
    from runtime.launcher import run_up

    kw = engine_kwargs(a)
    if kw["kv_cache_tokens"] is None and kw["device"] in ("auto", "cpu"):
        import torch

        if kw["device"] == "cpu" or not torch.cuda.is_available():
            # Several workers share one host's memory: a smaller pool each by default.
            kw["kv_cache_tokens"] = 8192
    try:
        cfg = ClusterConfig(
            engine=EngineConfig(**kw), num_prefill=a.prefill, num_decode=a.decode, host=a.host, port=a.port,
            api_key=a.api_key, served_model_name=a.served_model_name, transfer=a.transfer, routing=a.routing,
            prefill_gpus=_gpus(a.prefill_gpus), decode_gpus=_gpus(a.decode_gpus),
            fail_transfer_rate=a.fail_transfer_rate, max_prompts_per_request=a.max_prompts_per_request,
            max_request_tokens=a.max_request_tokens, max_queued_requests=a.max_queued_requests,
        )
    except ValueError as e:
        print(f"runtime up: error: {e}", file=sys.stderr)
        return 2
    return run_up(cfg, a.log_level)


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
    u.add_argument("--prefill", type=int, default=1,
                   help="prefill workers; 0: colocated, each decode worker prefills and decodes its own requests (no KV transfer)")
    u.add_argument("--decode", type=int, default=1, help="decode replicas (with --prefill 0: the engine workers)")
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
    u.set_defaults(func=cmd_up)

    b = sub.add_parser("bench", help="serving benchmark against a running server (see runtime bench --help)", add_help=False)
    b.set_defaults(func=cmd_bench)
    sub.add_parser("train-draft", help="train an EAGLE-style draft head by self-distillation (see --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argparse.Namespace(), argv[1:])
    if argv[:1] == ["train-draft"]:
        from runtime.decode.speculative.train_draft import main as train_main

        return train_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
