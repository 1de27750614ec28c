"""`PeakMemory`: the peak bytes of live tensor storages on CPU (or any device), measured honestly.

torch has no allocator peak counter on CPU. This dispatch mode sees every op's outputs (factories,
in-place ops, autograd's backward ops on the calling thread), keeps a weak reference
(`torch.multiprocessing.reductions.StorageWeakRef`) to each new untyped storage with its byte size, and before each op drops
the ones that have been freed; `peak` is the largest sum of live storages seen. Storages that existed before
the mode was entered are counted when an op first touches them (so parameters, gradients and optimizer state
are counted from the first op of a step that reads them). `reset_peak()` starts a new peak at the current sum.
Cost: one pass over the live storages per op (fine for the small models of tests and benchmarks).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.multiprocessing.reductions import StorageWeakRef


class PeakMemory(TorchDispatchMode):
    """with PeakMemory() as pm: ...; pm.peak (bytes), pm.current; pm.reset_peak()."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def track(self, *objs: Any) -> None:
        """Count the storages of the tensors in `objs` (nested containers allowed) as live now."""
        for t in tree_flatten(list(objs))[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live:
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self._sweep()
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        self.track(args, kwargs or {})
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out
