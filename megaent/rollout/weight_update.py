"""`/update_weights_from_disk` for `megaent serve`: check the checkpoint against the served model, load, roll back.

SGLang loads new weights into the model it already serves (model_runner.py
`update_weights_from_disk`): a checkpoint of another architecture or with
other tensor names / shapes fails, the old weights stay, and the route answers
`{"success": false, "message", "num_paused_requests"}` with 400. Here:

1. `check_compatible` compares the new directory's config.json (the
   architecture keys in `ARCH_KEYS`) and its safetensors headers (every
   tensor's name, shape and dtype, read without loading a tensor) with the
   checkpoint the server started from;
2. `load_checked` (run on every TP rank) builds the new policy, compares its
   parameters' names, shapes and dtypes with the served one, and puts the old
   policy back on any failure.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings", "head_dim",
             "attention_bias")


class WeightMismatch(ValueError):
    """The checkpoint does not fit the served model; the message says what differs."""


def arch_of(hf_dir: str | Path) -> dict:
    f = Path(hf_dir) / "config.json"
    if not f.is_file():
        raise WeightMismatch(f"{hf_dir}: no config.json (give a HF checkpoint directory)")
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise WeightMismatch(f"{f}: not valid JSON ({e})") from None
    return {k: cfg.get(k) for k in ARCH_KEYS}


def manifest(hf_dir: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) over every *.safetensors file, from the headers only."""
    from safetensors import safe_open

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise WeightMismatch(f"{hf_dir}: no *.safetensors files")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        except Exception as e:  # a damaged header
            raise WeightMismatch(f"{f}: unreadable safetensors header ({e})") from None
    return out


def _diff(want: dict, got: dict, what: str) -> list[str]:
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    lines = [f"missing {what} {missing[:5]}"] if missing else []
    lines += [f"unexpected {what} {extra[:5]}"] if extra else []
    lines += [f"{k}: {got[k]} where the served model has {want[k]}" for k in sorted(want.keys() & got.keys())
              if want[k] != got[k]][:5]
    return lines


def check_compatible(served_dir: str | Path, new_dir: str | Path) -> None:
    """Raise WeightMismatch unless `new_dir` has the served architecture and tensor names / shapes / dtypes."""
    if not Path(new_dir).is_dir():
        raise WeightMismatch(f"model_path={str(new_dir)!r}: no such directory")
    problems = _diff(arch_of(served_dir), arch_of(new_dir), "config keys")
    if not problems:
        problems = _diff(manifest(served_dir), manifest(new_dir), "tensors")
    if problems:
        raise WeightMismatch(f"{new_dir} does not fit the served model: " + "; ".join(problems))


def _param_table(policy: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    return {n: (tuple(p.shape), str(p.dtype)) for n, p in policy.named_parameters()}


def load_checked(engine: Any, path: str) -> None:
    """engine.load_weights(path), then the same parameter names / shapes / dtypes, else the old policy back."""
    old = engine.policy
    try:
        engine.load_weights(path)
        problems = _diff(_param_table(old), _param_table(engine.policy), "parameters")
        if problems:
            raise WeightMismatch(f"{path} loaded into a different model: " + "; ".join(problems))
    except BaseException:
        engine.policy = old
        raise
