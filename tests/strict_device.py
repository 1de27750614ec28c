"""A dispatch mode that records every tensor factory called from megaent's own code without an explicit device.

On a GPU such a call makes a CPU tensor; on CPU it goes unnoticed, because the policy's device is the CPU too.
`StrictDevice` closes that gap: run CPU code under it and every `torch.zeros(...)`, `torch.tensor(...)`, ...
reached from a file under `megaent/` without `device=` (or with `device=None`) is recorded with its file and
line. Host tensors are fine when they say so (`device="cpu"`); `*_like` factories and `.to()` keep a device
and are not checked. Factories inside torch, megatron-core or transformers are theirs, not megaent's, and are
not checked (megatron-core's own CUDA factories are redirected by the CPU backend).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

PACKAGE = Path(__file__).resolve().parents[1] / "megaent"
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand,
             torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.as_tensor,
             torch.scalar_tensor, torch.empty_strided}
SKIP = {str(PACKAGE / "parallel" / "cpu_backend.py")}


def _caller(package: Path) -> tuple[str, int, str] | None:
    """(file, line, function) of the code that called the factory, if it is megaent's and not a module's
    constructor (a module's parameters and buffers move with `module.to(device)`; GPTPolicy does that)."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename == __file__ or f.f_code.co_filename.endswith("torch/overrides.py")):
        f = f.f_back
    if f is None or not f.f_code.co_filename.startswith(str(package)) or f.f_code.co_filename in SKIP:
        return None
    where = (f.f_code.co_filename, f.f_lineno, f.f_code.co_name)
    while f is not None and f.f_code.co_filename.startswith(str(package)):
        if f.f_code.co_name == "__init__" and isinstance(f.f_locals.get("self"), torch.nn.Module):
            return None
        f = f.f_back
    return where


class StrictDevice(TorchFunctionMode):
    def __init__(self, package: Path = PACKAGE) -> None:
        super().__init__()
        self.package = package
        self.violations: dict[tuple[str, int, str], str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            if not (func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)):
                where = _caller(self.package)
                if where is not None:
                    self.violations.setdefault(where, func.__name__)
        return func(*args, **kwargs)

    def report(self) -> list[str]:
        return [f"{Path(f).relative_to(self.package.parent)}:{line} {fn}: torch.{name} without device="
                for (f, line, fn), name in sorted(self.violations.items())]
