"""The pieces every process shares: sampling parameters, the incremental detokenizer,
continuation scoring, token logprobs, reading a model's config files, the host's CPU cores.
This package imports nothing from the engine, the workers (decode, prefill), the gateway
(tokenizer), transfer or the controller (nor runtime.lang); they all may import it
(tests/unit/test_layering.py checks)."""
