"""`runtime bench`: a serving benchmark against a running OpenAI-compatible server.

Sends `--num-prompts` streaming /v1/completions requests (temperature 0, ignore_eos,
max_tokens = --output-len, usage included), at most `--concurrency` at a time, and
measures per request: TTFT (time to the first content chunk), ITL (gaps between
content chunks; a chunk may carry several tokens under speculation), TPOT
((e2e - TTFT) / (output tokens - 1)), end-to-end latency, output and cached tokens.
Prints a table and writes everything (config, summary, per-request records) as JSON.

Baseline (CONVENTIONS 10): the warm-up requests run one at a time before the timed
phase; the last one's latencies are reported as "1 request alone", so the table shows
what concurrency costs each request in the same run.

Datasets are made of random words from a fixed vocabulary (each a single token in
common BPE vocabularies, so `--input-len` words is about that many tokens; the table
reports the prompt tokens the server counted). With `--tokenizer` the prompts are
token-id lists of exactly `--input-len` tokens instead.
  random         independent prompts
  shared-prefix  `--num-groups` groups sharing a prefix of `--prefix-ratio` * input-len
  repeat         one prompt, sent num-prompts times
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.client import AsyncClient
from runtime.env import ENV

DATASETS = ("random", "shared-prefix", "repeat")

VOCAB = """
time year people way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work
government number night point home water room mother area money story fact month lot
right study book eye job word business issue side kind head house service friend father
power hour game line end member law car city community name president team minute idea
kid body information back parent face others level office door health person art war
history party result change morning reason research girl guy moment air teacher force
education foot boy age policy music market sense nation plan college interest death
experience effect class control care field development role effort rate heart drug show
leader light voice wife police mind price report decision son view relationship town
road arm difference value building action model season society tax director position
player record paper space ground form event official matter center couple site project
activity star table need court oil situation cost industry figure street image phone
data picture practice piece land product doctor wall patient worker news test movie
north love support technology step baby computer type attention film tree source organ
""".split()


@dataclass
class Prompt:
    prompt: str | list[int]
    approx_tokens: int  # words (text) or exact ids; used only if the server sends no usage


@dataclass
class RequestResult:
    index: int
    start_s: float = 0.0  # since the timed phase began
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)  # type: ignore[operator]


# ---- datasets --------------------------------------------------------------------


class _PromptMaker:
    """Random word text, or exact-length token ids when a tokenizer is given."""

    def __init__(self, rng: random.Random, tokenizer: Any | None) -> None:
        self.rng = rng
        self.tok = tokenizer

    def make(self, n: int) -> str | list[int]:
        if self.tok is None:
            return " ".join(self.rng.choice(VOCAB) for _ in range(n))
        ids: list[int] = []
        while len(ids) < n:
            words = " " + " ".join(self.rng.choice(VOCAB) for _ in range(n - len(ids) + 1))
            ids += self.tok(words, add_special_tokens=False)["input_ids"]
        return ids[:n]

    def join(self, prefix: str | list[int], suffix: str | list[int]) -> str | list[int]:
        if isinstance(prefix, list):
            return prefix + suffix  # type: ignore[operator]
        return f"{prefix} {suffix}" if prefix and suffix else f"{prefix}{suffix}"


def make_prompts(
    dataset: str,
    num_prompts: int,
    input_len: int,
    seed: int = 0,
    num_groups: int | None = None,
    prefix_ratio: float = 0.8,
    tokenizer: Any | None = None,
) -> list[Prompt]:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if input_len < 1 or num_prompts < 1:
        raise ValueError("--input-len and --num-prompts must be at least 1")
    maker = _PromptMaker(random.Random(seed), tokenizer)
    if dataset == "random":
        return [Prompt(maker.make(input_len), input_len) for _ in range(num_prompts)]
    if dataset == "repeat":
        one = maker.make(input_len)
        return [Prompt(one, input_len) for _ in range(num_prompts)]
    if not 0.0 <= prefix_ratio <= 1.0:
        raise ValueError(f"--prefix-ratio must be in [0, 1], got {prefix_ratio}")
    groups = num_groups or max(1, math.ceil(num_prompts / 16))
    prefix_len = round(input_len * prefix_ratio)
    prefixes = [maker.make(prefix_len) if prefix_len else ([] if tokenizer else "") for _ in range(groups)]
    # Group-major order: each group's first request computes the prefix, the rest reuse it.
    per_group = [num_prompts // groups + (g < num_prompts % groups) for g in range(groups)]
    out = []
    for g, count in enumerate(per_group):
        for _ in range(count):
            suffix = maker.make(input_len - prefix_len) if input_len > prefix_len else ([] if tokenizer else "")
            out.append(Prompt(maker.join(prefixes[g], suffix), input_len))
    return out


# ---- measurement -----------------------------------------------------------------


async def _one(client: AsyncClient, r: RequestResult, p: Prompt, output_len: int, t0: float) -> RequestResult:
    start = time.perf_counter()
    r.start_s = start - t0
    usage: dict[str, Any] | None = None
    chunks = ids = 0
    last = start
    try:
        async with client.generate(
            p.prompt, max_tokens=output_len, temperature=0.0, ignore_eos=True,
            stream_options={"include_usage": True},
        ) as stream:
            async for c in stream:
                now = time.perf_counter()
                if c.text or c.token_ids:
                    if r.ttft_s is None:
                        r.ttft_s = now - start
                    else:
                        r.itl_s.append(now - last)
                    last = now
                    chunks += 1
                    ids += len(c.token_ids)
                if c.usage:
                    usage = c.usage
        r.e2e_s = time.perf_counter() - start
    except Exception as e:  # a failed request is a data point, not the end of the run
        r.error = f"{type(e).__name__}: {e}"
        return r
    if r.ttft_s is None:
        r.error = "the server finished without sending any output"
    if usage:
        r.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        r.output_tokens = int(usage.get("completion_tokens") or 0)
        r.cached_tokens = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
    else:
        r.prompt_tokens = p.approx_tokens
        r.output_tokens = ids or chunks
    return r


def _percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _stats(name: str, xs_s: list[float]) -> dict[str, float | None]:
    xs = [x * 1000.0 for x in xs_s]
    if not xs:
        return {f"mean_{name}_ms": None, f"p50_{name}_ms": None, f"p99_{name}_ms": None}
    return {
        f"mean_{name}_ms": sum(xs) / len(xs),
        f"p50_{name}_ms": _percentile(xs, 50),
        f"p99_{name}_ms": _percentile(xs, 99),
    }


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tin = sum(r.prompt_tokens for r in ok)
    tout = sum(r.output_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    out: dict[str, Any] = {
        "num_prompts": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / dur,
        "output_token_throughput": tout / dur,
        "total_token_throughput": (tin + tout) / dur,
        "total_input_tokens": tin,
        "total_output_tokens": tout,
        "total_cached_tokens": cached,
        "cache_hit_ratio": cached / tin if tin else 0.0,
    }
    out.update(_stats("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]))
    out.update(_stats("itl", [x for r in ok for x in r.itl_s]))
    out.update(_stats("tpot", [t for r in ok if (t := r.tpot_s) is not None]))
    out.update(_stats("e2e", [r.e2e_s for r in ok if r.e2e_s is not None]))
    out["errors"] = dict(Counter(r.error for r in results if r.error).most_common(5))
    return out


def _record(r: RequestResult) -> dict[str, Any]:
    d = asdict(r)
    d["tpot_s"] = r.tpot_s
    return d


async def run(a: argparse.Namespace) -> dict[str, Any]:
    tokenizer = None
    if a.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    prompts = make_prompts(a.dataset, a.num_prompts, a.input_len, a.seed, a.num_groups, a.prefix_ratio, tokenizer)
    warm = make_prompts("random", max(a.warmup, 1), a.input_len, a.seed + 1_000_003, tokenizer=tokenizer)
    async with AsyncClient(a.url, api_key=a.api_key, model=a.model, timeout=a.request_timeout) as client:
        model = await client.resolve_model()
        baseline: dict[str, Any] | None = None
        for i in range(a.warmup):  # one at a time: the last one is the unloaded baseline
            w = await _one(client, RequestResult(-1 - i), warm[i], a.output_len, time.perf_counter())
            if w.ok:
                baseline = {"ttft_ms": w.ttft_s * 1000.0, "tpot_ms": (w.tpot_s or 0.0) * 1000.0,  # type: ignore[operator]
                            "e2e_ms": w.e2e_s * 1000.0}  # type: ignore[operator]
            else:
                print(f"runtime bench: warm-up request failed: {w.error}", file=sys.stderr)
        results = [RequestResult(i) for i in range(len(prompts))]
        sem = asyncio.Semaphore(a.concurrency)
        rng = random.Random(a.seed)
        t0 = time.perf_counter()

        async def limited(i: int) -> None:
            async with sem:
                await _one(client, results[i], prompts[i], a.output_len, t0)

        async def dispatch() -> None:
            tasks = []
            try:
                for i in range(len(prompts)):
                    tasks.append(asyncio.create_task(limited(i)))
                    if a.request_rate != math.inf and i + 1 < len(prompts):
                        await asyncio.sleep(rng.expovariate(a.request_rate))  # Poisson arrivals
                await asyncio.gather(*tasks)
            finally:  # on --timeout: cancelling closes their streams, so the server aborts them
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        try:
            await asyncio.wait_for(dispatch(), a.timeout)
        except asyncio.TimeoutError:
            for r in results:
                if not r.ok and r.error is None:
                    r.error = f"timeout: the benchmark ran past --timeout {a.timeout:g} s"
        duration = time.perf_counter() - t0
    return {
        "config": {**{k: v for k, v in vars(a).items() if k not in ("api_key", "func")},
                   "model": model, "request_rate": None if a.request_rate == math.inf else a.request_rate},
        "summary": summarize(results, duration),
        "baseline": baseline,
        "requests": [_record(r) for r in results],
    }


# ---- report ----------------------------------------------------------------------


def format_table(res: dict[str, Any]) -> str:
    s, c, b = res["summary"], res["config"], res["baseline"]

    def f(x: float | None, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)

    rows: list[tuple[str, str] | str] = [
        "Serving benchmark",
        ("server / model", f"{c['url']} / {c['model']}"),
        ("dataset", f"{c['dataset']}, {s['num_prompts']} prompts, concurrency {c['concurrency']}, "
                    f"in {c['input_len']} / out {c['output_len']}"),
        ("completed / failed", f"{s['completed']} / {s['failed']}"),
        ("duration (s)", f(s["duration_s"])),
        ("request throughput (req/s)", f(s["request_throughput"])),
        ("output token throughput (tok/s)", f(s["output_token_throughput"])),
        ("total token throughput (tok/s)", f(s["total_token_throughput"])),
        ("input / output tokens", f"{s['total_input_tokens']} / {s['total_output_tokens']}"),
        ("cache hit ratio", f"{s['cache_hit_ratio']:.3f} ({s['total_cached_tokens']} cached)"),
    ]
    rows.append(("latency (ms)", f"{'mean':>9} {'p50':>9} {'p99':>9}"))
    for name, label in (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"), ("e2e", "E2E")):
        rows.append((label, f"{f(s[f'mean_{name}_ms']):>9} {f(s[f'p50_{name}_ms']):>9} {f(s[f'p99_{name}_ms']):>9}"))
    if b:
        rows.append(("baseline, 1 request alone (ms)",
                     f"TTFT {f(b['ttft_ms'])}, TPOT {f(b['tpot_ms'])}, E2E {f(b['e2e_ms'])}"))
    for err, n in s["errors"].items():
        rows.append((f"error x{n}", err[:200]))
    width = 34
    lines = []
    for row in rows:
        if isinstance(row, str):
            lines.append(f"---- {row} " + "-" * max(0, 60 - len(row)))
        else:
            lines.append(f"{row[0]:<{width}} {row[1]}")
    return "\n".join(lines)


# ---- CLI -------------------------------------------------------------------------


def _rate(x: str) -> float:
    v = float(x)
    if v <= 0:
        raise argparse.ArgumentTypeError("--request-rate must be > 0 (inf: send all at once)")
    return v


def add_args(p: argparse.ArgumentParser) -> None:
    """The `runtime bench` flags (INTERFACE.md)."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root, as printed by `runtime up`")
    p.add_argument("--dataset", default="random", choices=DATASETS)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (approximately, without --tokenizer)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens, with ignore_eos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runtime-bench.json", help="JSON results file ('' to skip)")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-groups", type=int, default=None, help="shared-prefix groups (default: 1 per 16 prompts)")
    p.add_argument("--prefix-ratio", type=float, default=0.8, help="shared-prefix: shared part of --input-len")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer: send exact-length token-id prompts")
    p.add_argument("--request-rate", type=_rate, default=math.inf, help="Poisson arrival rate (req/s)")
    p.add_argument("--warmup", type=int, default=2, help="sequential warm-up requests; the last is the baseline")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds to connect / wait for a chunk")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole timed phase")
    if not any(a.dest == "log_level" for a in p._actions):
        p.add_argument("--log-level", default=ENV.log_level)


def cmd_bench(a: argparse.Namespace) -> int:
    """Run, print, write. Exit 0 when every request completed, 1 otherwise, 2 on bad flags."""
    if a.concurrency < 1 or a.output_len < 1 or a.warmup < 0 or a.timeout <= 0:
        print("runtime bench: error: --concurrency and --output-len must be >= 1, --warmup >= 0, "
              "--timeout > 0", file=sys.stderr)
        return 2
    try:
        res = asyncio.run(run(a))
    except ValueError as e:
        print(f"runtime bench: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # e.g. the server is down: /v1/models fails before any request
        print(f"runtime bench: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_table(res))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"results written to {a.out}")
    return 0 if res["summary"]["failed"] == 0 and res["summary"]["completed"] > 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="runtime bench", description=__doc__.split("\n")[0])
    add_args(p)
    return cmd_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
