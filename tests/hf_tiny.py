"""Tiny random HuggingFace Qwen2 / Llama checkpoints (with a tokenizer) for tests and demos.

`make_tiny_hf(out_dir, family="qwen2")` writes a `transformers` model directory
(config.json, model.safetensors, generation_config.json) plus a byte-level BPE
tokenizer without merges built in memory with `tokenizers` (special tokens
`<|endoftext|>` (pad, id 0), `<|im_start|>` (1), `<|im_end|>` (eos, 2), `<unk>` (3), then
the 256 bytes) and a Qwen-style chat template, saved via `PreTrainedTokenizerFast.save_pretrained`.
The model vocabulary (`vocab_size`) may exceed the tokenizer's, as in Qwen.

All weights are redrawn from `seed` (norm weights near 1, nonzero biases) so
that parity tests exercise every parameter. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2's byte-to-unicode table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def make_tiny_tokenizer():
    """A byte-level BPE `PreTrainedTokenizerFast` without merges: ids 0-3 special tokens, 4-259 the bytes.

    Byte-level like the real Qwen2 tokenizer, so `AutoTokenizer` (which rebuilds a Qwen2Tokenizer
    from tokenizer.json for model_type qwen2) encodes any text losslessly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for sym in _byte_symbols():
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", bos_token=None, chat_template=CHAT_TEMPLATE)


def tokenizer_size() -> int:
    return len(SPECIAL_TOKENS) + 256


def make_tiny_hf(out_dir: str | Path, family: str = "qwen2", *, vocab_size: int = 1001, hidden: int = 64,
                 layers: int = 4, heads: int = 4, kv_heads: int = 2, intermediate: Optional[int] = None,
                 tie: Optional[bool] = None, qkv_bias: Optional[bool] = None,
                 rope_scaling: Optional[dict[str, Any]] = None, rope_theta: float = 10000.0,
                 max_position_embeddings: int = 2048, weight_std: float = 0.1, seed: int = 0) -> Path:
    """Write a tiny random `family` ("qwen2" | "llama") checkpoint with a tokenizer to `out_dir`; return it.

    Defaults: qwen2 -> tied embeddings, QKV bias (always on for qwen2); llama -> untied, no bias.
    rope_scaling: e.g. {"rope_type": "linear", "factor": 2.0} or {"rope_type": "llama3", "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab_size < tokenizer_size():
        raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {tokenizer_size()} tokens")
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {**rope, **rope_scaling}
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, rope_parameters=rope,
                  pad_token_id=0, eos_token_id=2, bos_token_id=None)
    if family == "qwen2":
        if qkv_bias is False:
            raise ValueError("qwen2 always has QKV bias; use family='llama' for a bias-free model")
        config = Qwen2Config(tie_word_embeddings=True if tie is None else tie, **common)
    elif family == "llama":
        config = LlamaConfig(tie_word_embeddings=bool(tie), attention_bias=bool(qkv_bias), **common)
    else:
        raise ValueError(f"family={family!r}: expected 'qwen2' or 'llama'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(weight_std * noise)
    model.save_pretrained(out)
    make_tiny_tokenizer().save_pretrained(out)
    return out
