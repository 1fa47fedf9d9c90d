"""Jump-forward decoding: where the grammar allows exactly one continuation for the next
characters (a JSON key and its `": `, punctuation, a fixed string), the engine appends the
tokens of that text without sampling them; the next step runs them through the model as
one extend (a chain "verified" without checks, so their KV is written) and samples the
token after them from the last row.

Tokenization. The forced text is tokenized as the model's tokenizer writes it, with the
text of the last output token in front: tokenize(text(last) + forced). The jump is made
only when that keeps the last token as it is (a stable boundary), else nothing is forced
this step and the model decodes one token as usual (the boundary is tried again after
it). The last forced token is dropped when its string is a strict prefix of a longer
vocabulary token, since the text after it (not forced) might merge into it. What can then
differ from token-by-token decoding: the token boundaries inside and just after the forced
text are the tokenizer's, not necessarily the ones the model would have sampled (the text
is the same: the grammar forces it either way); the model's next tokens are conditioned
on that tokenization, so greedy outputs can differ after a jump. A tokenizer whose
encode() of a lone word adds a prefix (SentencePiece's "▁") never has a stable boundary
here: it never jumps."""
from __future__ import annotations

import bisect
from typing import Any

from runtime.config import MAX_TREE_NODES

# Tokens one jump appends at most: they are verified as a chain (one tree row mask each).
MAX_JUMP_TOKENS = MAX_TREE_NODES


class JumpForward:
    """Per engine: the model's tokenizer and, built on first use, its token strings in order
    (to tell whether a token is a strict prefix of another)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._sorted: list[str] | None = None
        self.num_jumps = 0  # jumps found (a request that ends first does not make its jump)
        self.num_tokens = 0  # the tokens of those jumps

    def _extendable(self, token: int) -> bool:
        """Whether some longer vocabulary token starts with this token's string."""
        if self._sorted is None:
            self._sorted = sorted(t for t in self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
                                  if t is not None)
        s = self.tokenizer.convert_ids_to_tokens(token)
        i = bisect.bisect_right(self._sorted, s)
        return i < len(self._sorted) and self._sorted[i].startswith(s)

    def tokens(self, matcher: Any, last_token: int, room: int) -> list[int]:
        """The tokens to append after `last_token` (the newest output token, which `matcher`
        has accepted): at most `room`, each accepted by the matcher in turn (tentatively:
        the matcher ends where it began). Empty when nothing is forced or the boundary is
        not stable."""
        if room <= 0:
            return []
        forced = matcher.find_jump_forward_string()
        if not forced:
            return []
        tok = self.tokenizer
        ids = tok.encode(tok.decode([last_token]) + forced, add_special_tokens=False)
        if len(ids) < 2 or ids[0] != last_token:
            return []
        ids = ids[1:]
        if self._extendable(ids[-1]):
            ids.pop()
        ids = ids[:room]
        n = 0
        for t in ids:
            if not matcher.accept_token(t):
                break
            n += 1
        if n:
            matcher.rollback(n)
            self.num_jumps += 1
            self.num_tokens += n
        return ids[:n]
