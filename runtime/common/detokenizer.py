"""Incremental detokenization: text deltas that never split a multi-byte character, and
stop strings found across token boundaries."""
from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Feed token ids, get the new text. Decoding the whole output each time is simple and
    handles tokenizers whose pieces depend on their neighbours (SentencePiece spaces); a
    trailing U+FFFD means an unfinished UTF-8 sequence, so that part is held back.

    `incremental=True` (the gateway: long outputs, many requests) decodes only a small
    window of recent tokens per call, as vLLM does: the text of ids[prefix:] minus that of
    the context ids[prefix:read] is the new piece, so a call costs O(window), not O(output).
    Both modes give the same text for valid UTF-8 output (byte-level BPE, SentencePiece)."""

    def __init__(
        self, tokenizer: Any, skip_special_tokens: bool = True, stop: list[str] | None = None, incremental: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A fast tokenizer that cleans up no spaces decodes to exactly what its Rust backend
        # gives: call that directly (transformers' decode wrapper cost about as much as the
        # decoding itself, twice per token in the gateway).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self.stop = [s for s in (stop or []) if s]
        self.incremental = incremental
        self.ids: list[int] = []
        self.text = ""  # text emitted so far
        self.stopped_by: str | None = None
        # incremental mode: ids[:_read] decode to _decoded; ids[_prefix:_read] give context
        self._prefix = 0
        self._read = 0
        self._decoded = ""

    def _decode_all(self) -> str:
        if not self.incremental:
            return self._decode(self.ids)
        context = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        piece = window[len(context):] if len(window) > len(context) else ""
        if piece and not window.endswith("\ufffd"):
            # The piece is complete: later tokens only need ids[read:] as context.
            self._decoded += piece
            self._prefix, self._read = self._read, len(self.ids)
            return self._decoded
        return self._decoded + piece

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Returns the text to emit for these tokens. After a stop string is seen, the text
        ends right before it and later calls return ''."""
        if self.stopped_by is not None:
            return ""
        self.ids += token_ids
        full = self._decode_all()
        if not final and full.endswith("\ufffd"):
            full = full.rstrip("\ufffd")
        if self.stop:
            # Search only where a new match can start: just before the emitted text's end.
            start = max(0, len(self.text) - max(map(len, self.stop)) + 1)
            hits = [(full.find(s, start), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.stopped_by = s
                full = full[:i]
            elif not final:
                # Hold back a tail that could still grow into a stop string.
                hold = max((len(s) - 1 for s in self.stop), default=0)
                full = full[: max(len(self.text), len(full) - hold)] if hold else full
        if not full.startswith(self.text):
            # The tokenizer re-segmented earlier text (rare); emit nothing more than the
            # common prefix would allow rather than repeat text.
            common = 0
            while common < min(len(full), len(self.text)) and full[common] == self.text[common]:
                common += 1
            full = self.text + full[common:] if common == len(self.text) else self.text
        delta = full[len(self.text):]
        self.text = full
        return delta
