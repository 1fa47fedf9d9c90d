"""Weight loading: a local Hugging Face folder (safetensors), a GGUF file, the embedded
default model, or random weights of a configured shape (`load_format="dummy"`).

The model is built on the 'meta' device and each tensor is assigned straight from the
checkpoint (cast to the target dtype on the target device), so a large model is never
materialised twice. Tensors are read only through safetensors or gguf: never pickle.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from runtime.common.model_files import model_source
from runtime.config import CPU_ONLY
from runtime.engine.default_model import (DEFAULT_MODEL_NAME, DEFAULT_MODEL_SCHEME, default_model_path,
                                          is_default_model, is_default_model_folder)
from runtime.engine.model import LlamaForCausalLM, rope_inv_freq
from runtime.engine.model_config import ModelConfig
from runtime.engine.quant import Payload, QWeight
from runtime.engine.quant.checkpoint import SCALE_SUFFIXES, declared_quantization, read_projection, resolve_quantization

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# Checkpoint entries that are derived state, not weights (old Llama checkpoints hold them).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary.inv_freq")
DUMMY_SEED = 0  # dummy weights are identical in every process (prefill and decode agree)
DUMMY_STD = 0.02


@dataclass
class LoadedModel:
    model: LlamaForCausalLM  # on device, in dtype, eval(), requires_grad False
    config: ModelConfig
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase | None  # None only for a dummy load without tokenizer files
    path: str  # the resolved local folder or .gguf file
    name: str  # served model name

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on CUDA and on CPUs that multiply bf16 natively (AVX-512 BF16 or
    AMX: 3-5x fp32's GEMM rate), float32 elsewhere. Comparisons with transformers ask for
    float32 explicitly."""
    if dtype == "auto":
        from runtime.engine.cpu import native_bf16

        return torch.bfloat16 if torch.device(device).type == "cuda" or native_bf16() else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def load_model(
    model: str | None,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    load_format: str = "auto",
    quantization: str = "auto",
    int4_group_size: int | None = None,
    quant_dense_prefill: bool = True,
) -> LoadedModel:
    """Load `model`: None / "SmolLM2-135M-Instruct" (the embedded default), a local HF folder
    (config.json + *.safetensors + tokenizer) or a .gguf file.

    load_format "dummy" needs only the config (config.json or the GGUF metadata) and fills
    the weights with seeded N(0, 0.02) values (norm weights 1, biases 0); the tokenizer is
    loaded when its files are present and is None otherwise.

    quantization: "none", "fp8", "int8", "int4", or "auto" (what the checkpoint declares:
    an FP8 config.json, a GGUF's Q4/Q8 blocks on CPU). With a scheme, the projections are
    fused and quantized here (quant/); the loaded model's `quantization` says which. CPU
    int8/int4 also quantize lm_head to int8 for decode-sized inputs, and with
    quant_dense_prefill keep each projection's dense copy for prefill-sized ones (quant/base.py).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; use one of {', '.join(LOAD_FORMATS)}")
    dev = _resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if is_default_model(model):
        path, name = default_model_path(), DEFAULT_MODEL_NAME
    else:
        assert model is not None
        path = os.path.abspath(os.path.expanduser(model))
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"model {model!r} not found: pass a local Hugging Face folder (config.json + "
                f"*.safetensors), a .gguf file, or {DEFAULT_MODEL_NAME!r} for the embedded default"
            )
        name = Path(path).stem if os.path.isfile(path) else Path(path).name
    fmt = model_source(path)[0] if load_format in ("auto", "dummy") else load_format

    tensors: dict[str, Payload] | None = None
    if fmt == "gguf":
        gguf_file = model_source(path)[1]
        hf_config = gguf_config(gguf_file)
        declared = "none" if load_format == "dummy" else declared_quantization(gguf_file=gguf_file)
        scheme = resolve_quantization(quantization, declared, dev)
        if load_format == "dummy":
            tokenizer = _load_tokenizer(gguf_file, required=False)
        elif scheme == "none":
            hf_config, tokenizer, tensors = read_gguf(gguf_file, torch_dtype)  # type: ignore[assignment]
        else:
            from runtime.engine.quant.gguf import read_tensors

            mc = ModelConfig.from_hf(hf_config)
            tokenizer = _load_tokenizer(gguf_file, required=True)
            tensors, _ = read_tensors(gguf_file, mc.num_heads, mc.num_kv_heads, keep_blocks=True)
    else:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        hf_config = AutoConfig.from_pretrained(path)
        tokenizer = _load_tokenizer(path, required=load_format != "dummy")
        declared = declared_quantization(hf_config=hf_config)
        if is_default_model_folder(path) and load_format != "dummy" and torch_dtype != torch.float32:
            declared = DEFAULT_MODEL_SCHEME
        scheme = resolve_quantization(quantization, declared, dev)
    cfg = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)

    keep = net.projection_names() if scheme != "none" else set()
    if load_format == "dummy":
        state = _dummy_state(net, dev, torch_dtype)
        projections = {k: (lambda t=state.pop(k): t) for k in keep}
    elif tensors is not None:
        state, projections = _assignable_state(
            net, {k: (v.shape, (lambda v=v: v)) for k, v in tensors.items()}, dev, torch_dtype, where=path, keep=keep)
        del tensors
    else:
        state, projections = _load_safetensors(net, path, dev, torch_dtype, keep)
    _materialise(net, cfg, state, dev)
    if scheme != "none":
        net.build_projections(lambda k: projections.pop(k)(), scheme, torch_dtype, int4_group_size,
                              dense_prefill=quant_dense_prefill)
    if scheme in CPU_ONLY:
        net.quantize_lm_head_for_decode(torch_dtype)
    _check_loaded(net)
    net.quantization = scheme
    return LoadedModel(model=net, config=cfg, hf_config=hf_config, tokenizer=tokenizer, path=path, name=name)


def load_config_only(path: str) -> ModelConfig:
    """The model's shape without its weights (an HF folder or a .gguf file)."""
    fmt, source = model_source(path)
    if fmt == "gguf":
        return ModelConfig.from_hf(gguf_config(source))
    return ModelConfig.from_hf(AutoConfig.from_pretrained(path))


def _load_tokenizer(path: str, required: bool) -> PreTrainedTokenizerBase | None:
    try:
        if os.path.isfile(path):
            return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a missing/broken tokenizer
        if required:
            raise RuntimeError(f"could not load the tokenizer from {path}: {e}") from e
        return None


def gguf_config(gguf_file: str) -> PretrainedConfig:
    path = os.path.abspath(gguf_file)
    hf_config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    # GGUF stores eps as float32 (1e-5 reads 9.9999997e-06): keep the decimal the model
    # was made with, so a GGUF and its HF folder give the same config.
    if getattr(hf_config, "rms_norm_eps", None) is not None:
        hf_config.rms_norm_eps = float(f"{hf_config.rms_norm_eps:.7g}")
    return hf_config


def read_gguf(gguf_file: str, dtype: torch.dtype) -> tuple[PretrainedConfig, PreTrainedTokenizerBase, dict[str, torch.Tensor]]:
    """Config, tokenizer and dequantised HF-layout tensors (CPU, `dtype`) of a GGUF file.

    transformers maps GGUF names to HF names (and undoes llama.cpp's q/k row permutation)
    by walking an HF model's state dict; a 'meta' HF model serves, so nothing is allocated
    and `accelerate` is not needed.
    """
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config = gguf_config(gguf_file)
    ModelConfig.from_hf(hf_config)  # fail on an unsupported architecture before dequantising
    tokenizer = _load_tokenizer(gguf_file, required=True)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    tensors = load_gguf_checkpoint(gguf_file, return_tensors=True, model_to_load=hf_model, torch_dtype=dtype)["tensors"]
    return hf_config, tokenizer, tensors


# name -> (shape, function that reads the tensor or quantized payload)
_Source = dict[str, tuple[tuple[int, ...], Callable[[], Payload]]]
_Lazy = dict[str, Callable[[], Payload]]  # projections, read when their layer is built


def _load_safetensors(net: LlamaForCausalLM, folder: str, dev: torch.device, dtype: torch.dtype,
                      keep: set[str]) -> tuple[dict[str, torch.Tensor], _Lazy]:
    from safetensors import safe_open

    files = _safetensors_files(folder)
    source: _Source = {}
    handles = []
    # safetensors reads straight onto the device; "cuda" needs an index.
    load_dev = f"cuda:{dev.index}" if dev.type == "cuda" else dev.type
    for f in files:
        h = safe_open(f, framework="pt", device=load_dev)
        handles.append(h)
        for k in h.keys():
            if k in source:
                raise ValueError(f"tensor {k} appears in more than one file of {folder}")
            source[k] = (tuple(h.get_slice(k).get_shape()), (lambda h=h, k=k: h.get_tensor(k)))
    return _assignable_state(net, source, dev, dtype, where=folder, keep=keep)


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        files = sorted({os.path.join(folder, f) for f in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"shards named in {index} are missing: {missing}")
        return files
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(str(p) for p in Path(folder).glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in Path(folder).glob("*.bin")] + [p.name for p in Path(folder).glob("*.pt")]
        hint = f" (found {pickles}: pickle checkpoints are not loaded; convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors files in {folder}{hint}")
    return files


def _assignable_state(
    net: LlamaForCausalLM, source: _Source, dev: torch.device, dtype: torch.dtype, where: str, keep: set[str]
) -> tuple[dict[str, torch.Tensor], _Lazy]:
    """Check the checkpoint's names and shapes against the model, then read each tensor
    onto `dev` in `dtype`; the names in `keep` (projections to quantize) are returned as
    readers of their payloads instead, not cast. FP8 weights come with their scales
    (`*.weight_scale`): kept as e4m3 for `keep`, dequantized into `dtype` otherwise.
    Raises naming every missing, unexpected or misshapen tensor."""
    cfg = net.config
    expected = {k: tuple(p.shape) for k, p in net.named_parameters()}  # tied lm_head is deduplicated
    ckpt = {k: v for k, v in source.items() if not k.endswith(_IGNORED_SUFFIXES)}
    scales = {k: ckpt.pop(k)[1] for k in [k for k in ckpt if k.endswith(SCALE_SUFFIXES)]}
    if cfg.tie_word_embeddings:
        ckpt.pop("lm_head.weight", None)  # some checkpoints store the tied copy too
    missing = sorted(set(expected) - set(ckpt))
    unexpected = sorted(set(ckpt) - set(expected))
    mismatched = [
        f"{k}: checkpoint {list(ckpt[k][0])} vs model {list(shape)}"
        for k, shape in expected.items()
        if k in ckpt and ckpt[k][0] != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_names(mismatched)}")
    if problems:
        raise ValueError(f"checkpoint {where} does not fit the model config: " + "; ".join(problems))
    state, lazy = {}, {}
    for k in expected:
        read = functools.partial(read_projection, ckpt[k][1], scales, k, dev)
        if k in keep:
            lazy[k] = read
        else:
            t = read()
            state[k] = (t.dequantize() if isinstance(t, QWeight) else t).to(dtype)
    return state, lazy


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def _dummy_state(net: LlamaForCausalLM, dev: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=dev)
    gen.manual_seed(DUMMY_SEED)
    state = {}
    for k, p in sorted(net.named_parameters()):
        t = torch.empty(p.shape, device=dev, dtype=dtype)
        if k.endswith("norm.weight"):
            t.fill_(1.0)
        elif k.endswith(".bias"):
            t.zero_()
        else:
            t.normal_(0.0, DUMMY_STD, generator=gen)
        state[k] = t
    return state


def _materialise(net: LlamaForCausalLM, cfg: ModelConfig, state: dict[str, torch.Tensor], dev: torch.device) -> None:
    net.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    # Non-persistent buffers are not in any checkpoint; rope frequencies stay fp32.
    net.model.rotary.inv_freq = rope_inv_freq(cfg).to(dev)
    net.eval()
    net.requires_grad_(False)


def _check_loaded(net: LlamaForCausalLM) -> None:
    left = [k for k, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unloaded: {_names(left)}")


def reference_hf_model(path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The `transformers` model of the same folder, eval() on CPU: the correctness reference
    for tests and benchmarks (works without `accelerate`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model
