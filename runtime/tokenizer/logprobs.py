"""Logprobs in OpenAI's two formats. A worker sends, per token, [logprob, [[id, logprob], ...]];
here ids become token strings and bytes (a token may hold part of a UTF-8 character, so its
exact bytes come from the tokenizer's vocabulary, not from decoding it alone)."""
from __future__ import annotations

import codecs
import math
import re
from typing import Any

from runtime.tokenizer.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clamp(lp: float) -> float:
    return lp if lp >= MIN_LOGPROB else MIN_LOGPROB if not math.isnan(lp) else MIN_LOGPROB


class TokenText:
    """Token id -> its bytes and a printable string (OpenAI writes bytes that are not whole
    UTF-8 as `bytes:\\xe2\\x80`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = decoder is not None and "ByteLevel" in repr(decoder)
        self.byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._bytes: dict[int, bytes] = {}

    def bytes(self, tid: int) -> bytes:
        b = self._bytes.get(tid)
        if b is None:
            b = self._bytes[tid] = self._token_bytes(tid)
        return b

    def _token_bytes(self, tid: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(tid)
        if not isinstance(piece, str) or tid in self.special:
            return (piece if isinstance(piece, str) else self.tokenizer.decode([tid])).encode()
        if self.byte_level and all(ch in self.byte_decoder for ch in piece):
            return bytes(self.byte_decoder[ch] for ch in piece)
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if "\u2581" in piece:
            return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([tid], skip_special_tokens=False).encode()

    def text(self, tid: int) -> str:
        b = self.bytes(tid)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class TextOffsets:
    """Character offset of each output token in the completion text (completions'
    `text_offset`), counted with an incremental UTF-8 decoder over the tokens' bytes."""

    def __init__(self, skip_special_tokens: bool = True) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0
        self.skip_special_tokens = skip_special_tokens

    def take(self, tt: TokenText, ids: list[int]) -> list[int]:
        out = []
        for t in ids:
            out.append(self.chars)
            if not (self.skip_special_tokens and t in tt.special):
                self.chars += len(self.decoder.decode(tt.bytes(t)))
        return out


def completion_logprobs(tt: TokenText, ids: list[int], raw: list[Any], offsets: TextOffsets) -> CompletionLogprobs:
    out = CompletionLogprobs()
    ids = ids[: len(raw)]
    out.text_offset = offsets.take(tt, ids)
    for t, (lp, top) in zip(ids, raw):
        tok = tt.text(t)
        out.tokens.append(tok)
        out.token_logprobs.append(_clamp(lp))
        tops = {tt.text(i): _clamp(v) for i, v in top}
        tops.setdefault(tok, _clamp(lp))  # the chosen token is always listed, as vLLM does
        out.top_logprobs.append(tops)
    return out


def chat_logprobs(tt: TokenText, ids: list[int], raw: list[Any]) -> ChatLogprobs:
    out = ChatLogprobs()
    for t, (lp, top) in zip(ids, raw):
        out.content.append(
            ChatTokenLogprob(
                token=tt.text(t),
                logprob=_clamp(lp),
                bytes=list(tt.bytes(t)),
                top_logprobs=[TopLogprob(token=tt.text(i), logprob=_clamp(v), bytes=list(tt.bytes(i))) for i, v in top],
            )
        )
    return out
