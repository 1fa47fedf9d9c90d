"""A GGUF's tensors under Hugging Face names, with the projections' Q4_0 / Q4_1 / Q8_0
blocks kept as integers (`QWeight`) instead of being dequantized.

Where the blocks go (no fp32 round trip except where said):
* Q4_1 (32 values: fp16 d, fp16 m, 16 bytes of nibbles; w = d q + m) -> int4 group 32,
  scale d, zero m + 8 d; Q4_0 (w = d (q - 8)) -> scale d, zero 0. Exact: the nibbles are
  repacked as they are, and the scales are the file's (rounded to bf16 when the model runs
  in bf16, the activation dtype torch's op takes them in).
* Q8_0 (fp16 d, 32 int8) -> int8 with one scale per row: re-quantized from the int8 values
  (payload.requantize_q8_0_per_channel), because torch's int8 op has no group scales.
* Every other tensor and block type (F32, F16, BF16, K-quants, ...) is dequantized by the
  gguf package, as the dense path does.
llama.cpp stores Llama q/k rows permuted for its rope layout; the rows are permuted back
(blocks run along K, so whole rows move and the blocks are untouched).
"""
from __future__ import annotations

import numpy as np
import torch

from runtime.engine.quant.payload import Payload, QWeight

_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_PROJ = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_SCHEME_OF = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor; None for derived state (rope_freqs)."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    if gguf_name == "rope_freqs.weight":
        return None
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in a Llama-family model")


def declared_scheme(reader) -> str:
    """The scheme a GGUF's projections are stored in: int4 (Q4_0/Q4_1), int8 (Q8_0), or
    none (float or other block types), by the majority of projection tensors."""
    votes: dict[str, int] = {}
    for t in reader.tensors:
        if t.name.split(".")[-2:-1] and t.name.split(".")[-2] in _PROJ and t.name.endswith(".weight"):
            s = _SCHEME_OF.get(t.tensor_type.name, "none")
            votes[s] = votes.get(s, 0) + 1
    return max(votes, key=votes.get) if votes else "none"


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (HF's rotate-half layout back)."""
    n = rows.shape[0]
    return rows.reshape(n_head, n // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _blocks(raw: np.ndarray, kind: str) -> QWeight:
    """raw uint8 [N, bytes per row] of Q4_0 / Q4_1 / Q8_0 blocks -> QWeight."""
    n = raw.shape[0]
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    b = torch.from_numpy(np.array(raw, dtype=np.uint8)).view(n, -1, size)  # [N, K/32, block bytes]
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0].float()  # [N, K/32]
    if kind == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).reshape(n, -1)
        return QWeight("q8_0", (q, d))
    off = 4 if kind == "Q4_1" else 2
    qs = b[..., off:].to(torch.int32)  # [N, K/32, 16]: value j in the low nibble, j + 16 in the high one
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, -1)
    zero = b[..., 2:4].contiguous().view(torch.float16)[..., 0].float() + 8 * d if kind == "Q4_1" else torch.zeros_like(d)
    return QWeight("int4", (q, d, zero))


def read_tensors(path: str, n_heads: int, n_kv_heads: int, keep_blocks: bool) -> tuple[dict[str, Payload], str]:
    """(HF name -> payload, the declared scheme). Projections in Q4_0/Q4_1/Q8_0 stay blocks
    when keep_blocks; everything else is a float32 tensor in HF layout."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    out: dict[str, Payload] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        kind = t.tensor_type.name
        layer_part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        heads = {"attn_q": n_heads, "attn_k": n_kv_heads}.get(layer_part) if arch == "llama" else None
        if keep_blocks and kind in ("Q4_0", "Q4_1", "Q8_0") and layer_part in _PROJ:
            raw = np.asarray(t.data).reshape(int(t.shape[1]), -1)  # rows: GGUF's ne[1]
            out[name] = _blocks(_unpermute(raw, heads) if heads else raw, kind)
            continue
        a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        a = a.reshape(tuple(int(x) for x in reversed(t.shape)))  # GGUF lists ne innermost first
        if heads and a.ndim >= 1:
            a = _unpermute(a, heads)
        out[name] = torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy, off the mmap
    return out, declared_scheme(reader)
