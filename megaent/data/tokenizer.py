"""Character-level tokenizer shipped with the synthetic demo task.

One token per character of a small alphabet (digits, arithmetic operators,
space, newline) plus specials `<pad>`, `<s>` (bos), `</s>` (eos), `<unk>`.
Encoding prepends `<s>`; decoding concatenates characters (no spaces
between tokens) and drops specials when asked.

Saved HF-style with `PreTrainedTokenizerFast.save_pretrained`. Load it back
with `AutoTokenizer` only from a folder whose config.json names a `llama`
model: a `qwen2` config makes transformers 5 rebuild a Qwen2Tokenizer that
re-tokenizes differently (tests/test_data_prompts.py round-trips it), which is why the
demo policy is a Llama-family model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
CHARS = "0123456789+-*/=() \n"
"""Alphabet of the demo tasks; every other character encodes as <unk>."""


def build_raw_tokenizer(chars: str = CHARS) -> Tokenizer:
    """The `tokenizers` object: WordLevel over single characters, bos prepended, fused decoding."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(list(SPECIALS))
    return tok


def build_task_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """The demo task's HF tokenizer (pad/bos/eos/unk set, left padding for generation)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_raw_tokenizer(chars),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def save_task_tokenizer(out_dir: Union[str, Path], chars: str = CHARS) -> PreTrainedTokenizerFast:
    """Write the task tokenizer to `out_dir` (tokenizer.json + configs) and return it."""
    tok = build_task_tokenizer(chars)
    tok.save_pretrained(str(out_dir))
    return tok
