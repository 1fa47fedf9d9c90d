"""The gateway's incremental (windowed) detokenization gives exactly the text and deltas of
decoding the whole output each time, for a byte-level BPE (GPT-2/Llama-3/SmolLM2 style)
and a SentencePiece-style tokenizer (Metaspace + byte fallback, Llama-2/Mistral style),
including tokens that hold part of a UTF-8 character, special tokens and stop strings."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from runtime.common.detokenizer import IncrementalDetokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, 世界 🙂 — naïve café",
    "def add(a, b):\n    return a + b\n",
    "  spaces   and\ttabs  ",
]


def sentencepiece_style() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = sorted({c for t in TEXTS for c in t if ord(c) < 128 and c not in " "})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["\u2581", *chars, "\u2581t", "he", "\u2581the", "\u2581a", "re", "\u2581re", "ur", "urn"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("\u2581", "a"), ("r", "e"), ("\u2581", "re"), ("u", "r"), ("ur", "n")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest, tiny_model_dir: str):
    if request.param == "byte_level":
        return AutoTokenizer.from_pretrained(tiny_model_dir)
    return sentencepiece_style()


def is_sp(tok) -> bool:
    return "<0x41>" in tok.get_vocab()


def run(tok, ids: list[int], chunks: list[int], stop: list[str], incremental: bool) -> tuple[list[str], str, str | None]:
    d = IncrementalDetokenizer(tok, True, stop, incremental=incremental)
    deltas, i = [], 0
    for k, n in enumerate(chunks):
        part = ids[i:i + n]
        i += n
        deltas.append(d.add(part, final=k == len(chunks) - 1))
    return deltas, d.text, d.stopped_by


def chunking(rng: random.Random, n: int) -> list[int]:
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(rng.choice([1, 1, 1, 2, 3, 5]), n - sum(sizes)))
    return sizes


def test_same_text_as_full_decode(tokenizer) -> None:
    rng = random.Random(0)
    cases = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    # Random texts mixing ASCII, spaces, accents, CJK and emoji (split into byte tokens).
    alphabet = list("abcdefgh     .,\n") + ["é", "ö", "世", "界", "🙂", "—"]
    cases += [tokenizer("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))), add_special_tokens=False)["input_ids"] for _ in range(40)]
    if not is_sp(tokenizer):
        # Random ids: byte tokens that never form valid UTF-8, special tokens mid-text. (Not
        # for SentencePiece: its ByteFallback turns a whole run of byte tokens into U+FFFDs
        # once the run is invalid, so earlier text changes; see the test below.)
        cases += [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))] for _ in range(40)]
    for ids in cases:
        chunks = chunking(rng, len(ids))
        full = run(tokenizer, ids, chunks, [], incremental=False)
        inc = run(tokenizer, ids, chunks, [], incremental=True)
        assert inc == full
        assert "".join(inc[0]) == inc[1] == tokenizer.decode(ids, skip_special_tokens=True)
        if "\ufffd" not in inc[1]:
            # Valid text: no delta ever holds half a character.
            assert not any("\ufffd" in d for d in inc[0])


def test_stop_strings_same_in_both_modes(tokenizer) -> None:
    rng = random.Random(1)
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for stop in (text[5:8], text[-3:], "界 ", "zzz"):
            chunks = chunking(rng, len(ids))
            full = run(tokenizer, ids, chunks, [stop], incremental=False)
            inc = run(tokenizer, ids, chunks, [stop], incremental=True)
            assert inc == full
            decoded = tokenizer.decode(ids, skip_special_tokens=True)
            if stop in decoded:
                assert inc[2] == stop and inc[1] == decoded[: decoded.find(stop)]
            else:
                assert inc[2] is None and inc[1] == decoded


def test_ascii_byte_tokens_do_not_stall() -> None:
    """[a, <0x6C>, <0xFF>] decodes to "a l" then "a ��": earlier text changed. The output
    stays consistent (deltas add up to the text) and later text still flows."""
    tok = sentencepiece_style()
    ids = tok.convert_tokens_to_ids(["\u2581a", "<0x6C>", "<0xFF>", "\u2581the", "\u2581a"])
    d = IncrementalDetokenizer(tok, True, [], incremental=True)
    deltas = [d.add([t], final=k == len(ids) - 1) for k, t in enumerate(ids)]
    assert "".join(deltas) == d.text
    assert d.text.endswith(" the a")


@pytest.mark.parametrize("cleanup", [False, True])
def test_backend_decoding_is_the_tokenizers_decode(tokenizer, cleanup: bool) -> None:
    """The detokenizer calls a fast tokenizer's Rust backend directly (not transformers'
    decode wrapper) only where that gives the same text: no clean-up of spaces. Random ids,
    special ones included, both skip settings; with clean-up asked for, the wrapper."""
    before, tokenizer.clean_up_tokenization_spaces = tokenizer.clean_up_tokenization_spaces, cleanup
    try:
        rng = random.Random(7)
        size = len(tokenizer)
        for skip in (True, False):
            d = IncrementalDetokenizer(tokenizer, skip)
            for _ in range(300):
                ids = [rng.randrange(size) for _ in range(rng.randrange(1, 10))]
                assert d._decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip), ids
        text = "hello , world ."
        ids = tokenizer(text)["input_ids"]
        assert IncrementalDetokenizer(tokenizer)._decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    finally:
        tokenizer.clean_up_tokenization_spaces = before
