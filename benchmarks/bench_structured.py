"""Structured output: tokens/s of JSON-schema decoding against unconstrained decoding, and
jump-forward on against off on a schema of long fixed keys, at each batch size, in one run.

    python benchmarks/bench_structured.py                      # SmolLM2 (the default model), GPU
    python benchmarks/bench_structured.py --device cpu --batch-sizes 1,2 --max-tokens 24 --num-prompts 2

Rows (greedy; batch B runs --num-prompts prompts in groups of B, one group after another):
  free       unconstrained, --max-tokens tokens each (ignore_eos), the baseline
  free=json  unconstrained, each request as many tokens (ignore_eos) as the json row gave
             the same prompt at the same batch: the same work as json without a grammar
  json       a JSON schema (nested object, bounded strings, an array), jump-forward off:
             the cost of masking alone (target: within 10% at batch 16). Its ratio is
             against free=json: against free it also counts that constrained requests stop
             at different lengths, so a batch's last steps run fewer rows (also printed)
  json+jf    the same schema, jump-forward on
  keys       a schema of long fixed keys, jump-forward off
  keys+jf    the same, jump-forward on (target: 1.5x keys at batch 1)
tokens/s counts the tokens each request generated (constrained requests stop when their
JSON is complete); `forwards` is the engine steps the timed groups took and `valid` the
share of outputs that parse and validate. A warm-up on the same group shapes runs first
(Triton compiles, grammar compiles: the compile cache is per engine, as in serving).
Prints a table and writes JSON (--out)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_spec import timed_generate  # noqa: E402
from runtime import Engine, SamplingParams  # noqa: E402

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "[A-Za-z ]{1,40}"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "pattern": "[A-Za-z ]{1,40}"},
        "hobbies": {"type": "array", "items": {"type": "string", "pattern": "[A-Za-z ]{1,30}"}, "maxItems": 5},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "hobbies", "employed"],
    "additionalProperties": False,
}
LONG_KEYS = {
    "type": "object",
    "properties": {
        "customer_full_legal_name_as_printed_on_identity_document": {"type": "string", "pattern": "[A-Za-z ]{1,30}"},
        "customer_primary_residential_address_including_postcode": {"type": "string", "pattern": "[A-Za-z0-9 ]{1,40}"},
        "customer_preferred_method_of_contact_for_account_notices": {"enum": ["email", "telephone", "letter"]},
        "customer_has_agreed_to_the_updated_terms_and_conditions": {"type": "boolean"},
        "number_of_years_the_customer_has_held_an_account_with_us": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["customer_full_legal_name_as_printed_on_identity_document",
                 "customer_primary_residential_address_including_postcode",
                 "customer_preferred_method_of_contact_for_account_notices",
                 "customer_has_agreed_to_the_updated_terms_and_conditions",
                 "number_of_years_the_customer_has_held_an_account_with_us"],
    "additionalProperties": False,
}
SUBJECTS = ["a retired teacher", "a young chef", "a famous painter", "a software engineer", "a marathon runner",
            "a jazz musician", "a city mayor", "a farmer", "a ship captain", "a librarian", "a nurse", "a pilot",
            "a gardener", "a student", "a firefighter", "a photographer"]


def validate(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def run(engine: Engine, prompts: list[list[int]], batch: int, params: SamplingParams | list[SamplingParams],
        schema: dict | None, repeats: int = 1) -> tuple[dict, list[int]]:
    """The row's figures, and each request's output length."""
    res, dt, forwards = timed_generate(engine, prompts, batch, params, repeats)
    lengths = [len(r.token_ids) for r in res]
    n = sum(lengths)
    valid = sum(validate(r.text, schema) for r in res) / len(res) if schema is not None else None
    return dict(tok_s=n / dt, seconds=dt, tokens=n, forwards=forwards, tokens_per_forward=n / max(forwards, 1),
                valid=valid, requests=len(res), stopped=sum(r.finish_reason == "stop" for r in res) / len(res)), lengths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--load-format", default="auto", help="dummy: random weights (a config.json beside the "
                    "tokenizer): the masking and jump-forward mechanics without real text")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256, help="per request (constrained ones stop when complete)")
    ap.add_argument("--repeats", type=int, default=3, help="time each group this many times; the median counts")
    ap.add_argument("--out", default="bench_structured.json")
    a = ap.parse_args()
    batches = [int(x) for x in a.batch_sizes.split(",")]
    rows: list[dict] = []
    # (row name, engine's jump_forward, schema): one engine per jump-forward setting.
    plan = [(False, [("free", None), ("json", RECORD), ("free=json", "json"), ("keys", LONG_KEYS)]),
            (True, [("json+jf", RECORD), ("keys+jf", LONG_KEYS)])]
    for jump, modes in plan:
        engine = Engine(a.model, device=a.device, dtype=a.dtype, load_format=a.load_format, jump_forward=jump)
        prompts = []
        for i in range(a.num_prompts):
            ask = f"Describe {SUBJECTS[i % len(SUBJECTS)]} as a JSON record."
            prompts.append(engine.apply_chat_template([{"role": "user", "content": ask}]))
        lengths: dict[tuple[str, int], list[int]] = {}
        for name, schema in modes:
            for bs in batches:
                check = schema if isinstance(schema, dict) else None
                if isinstance(schema, str):  # free, each request as long as that row's
                    params = [SamplingParams(max_tokens=max(n, 1), temperature=0.0, ignore_eos=True)
                              for n in lengths[(schema, bs)]]
                else:
                    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=check is None,
                                            json_schema=json.dumps(check) if check is not None else None)
                figures, lengths[(name, bs)] = run(engine, prompts, bs, params, check, a.repeats)
                r = dict(mode=name, batch=bs, jump_forward=jump, **figures)
                rows.append(r)
                print(json.dumps(r), flush=True)
        engine.shutdown()
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    by = {(r["mode"], r["batch"]): r["tok_s"] for r in rows}
    for r in rows:
        base = {"free": "free", "json": "free=json", "free=json": "free", "json+jf": "json", "keys": "keys",
                "keys+jf": "keys"}[r["mode"]]
        r["vs"] = base
        r["ratio"] = r["tok_s"] / by[(base, r["batch"])]
        if r["mode"] == "json":
            r["ratio_vs_free"] = r["tok_s"] / by[("free", r["batch"])]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else "cpu"
    with open(a.out, "w") as f:
        json.dump(dict(args=vars(a), device=device, rows=rows), f, indent=2)
    print(f"\n{'mode':>9} {'batch':>5} {'tok/s':>9} {'vs':>9} {'ratio':>6} {'tok/fwd':>7} {'forwards':>8} "
          f"{'valid':>5} {'stop':>5}   ({device}, max_tokens={a.max_tokens})")
    for r in rows:
        valid = f"{r['valid']:5.2f}" if r["valid"] is not None else "    -"
        also = f"   ({r['ratio_vs_free']:.2f}x vs free)" if "ratio_vs_free" in r else ""
        print(f"{r['mode']:>9} {r['batch']:>5} {r['tok_s']:9.1f} {r['vs']:>9} {r['ratio']:5.2f}x "
              f"{r['tokens_per_forward']:7.2f} {r['forwards']:8d} {valid} {r['stopped']:5.2f}{also}")


if __name__ == "__main__":
    main()
