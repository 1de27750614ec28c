"""megatron-core's own engine on CPU: the smallest explicit redirect of its CUDA touch points.

megatron-core (pinned: `MEGATRON_CORE_VERSION`) runs its GPTModel, pipeline schedules,
DistributedDataParallel and (distributed) optimizer over gloo unchanged, except at a known
set of call sites that assume a GPU. `enable()` redirects exactly those, and only inside
megatron-core's own modules, so megaent's code keeps the real `torch.cuda` (a megaent
tensor created on the wrong device still fails):

1. module scope (`MODULES`): the module's global `torch` becomes `_TorchOnCpu`, which is
   torch except that `torch.cuda.<name>` resolves through `_CUDA_ON_CPU` (current_device ->
   the CPU device, synchronize / empty_cache -> no-ops, the RNG calls -> the CPU default
   generator) and tensor factories given `device="cuda"` allocate on the CPU. An attribute
   of `torch.cuda` not in that table raises `CpuBackendError` naming the module: a touch
   point nobody checked never runs silently.
2. the RNG tracker (`tensor_parallel.random`): `_get_cuda_rng_state` / `_set_cuda_rng_state`
   read and write the CPU default generator. On a CPU build of torch the originals queue a
   lazy CUDA call that never runs, so the tracker's `fork()` would silently not fork (the
   trap `tests/test_cpu_backend.py` guards against).
3. function scope (`FUNCTIONS`): the few functions that dispatch on `Tensor.type()` strings
   (`'torch.cuda.FloatTensor'`) or call `Tensor.cuda()` run under `_CudaTensorMethodsOnCpu`,
   a TorchFunctionMode entered only for the call, which spells CPU tensor types as CUDA ones
   and makes `.cuda()` the identity.

`touch_points()` lists every call site of the pinned megatron-core that these cover, found
by scanning its source (`scan_sites`); `UNREDIRECTED` lists the sites left alone with the
reason (not on megaent's CPU paths). The test scans the source again and fails on a site in
neither list, so a megatron-core upgrade cannot add a touch point unnoticed. `hits()` records
which redirected `torch.cuda` names actually ran, per module.

Applied by `megaent.parallel.init_parallel` when the policy's device is the CPU; never on GPUs.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

MEGATRON_CORE_VERSION = "0.16.1"
"""The megatron-core release whose call sites `FUNCTIONS`, `MODULES` and `UNREDIRECTED` were read from."""


class CpuBackendError(RuntimeError):
    """megatron-core reached a CUDA call that megaent's CPU backend does not redirect."""


# ---- 1. torch.cuda inside megatron-core modules -------------------------------------------------------------------
_CPU = torch.device("cpu")
_hits: dict[str, set[str]] = {}


def _noop(*_: Any, **__: Any) -> None:
    return None


def _cpu_get_rng_state(device: Any = None) -> torch.Tensor:
    del device
    return torch.get_rng_state()


_CUDA_ON_CPU: dict[str, Any] = {
    "current_device": lambda: _CPU,  # only ever used as `device=` of a new buffer
    "synchronize": _noop,  # gloo collectives are synchronous on CPU
    "empty_cache": _noop,
    "is_available": lambda: False,
    "get_rng_state": _cpu_get_rng_state,
    "manual_seed": torch.manual_seed,  # on CPU the "CUDA" generator is the CPU default generator
    "random": types.SimpleNamespace(get_rng_state=_cpu_get_rng_state),
}


class _CudaOnCpu:
    """What `torch.cuda` means inside one redirected megatron-core module."""

    def __init__(self, module: str) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        if name not in _CUDA_ON_CPU:
            raise CpuBackendError(
                f"{self._module} called torch.cuda.{name}, which megaent's CPU backend does not redirect "
                f"(megatron-core {MEGATRON_CORE_VERSION}); add it to megaent/parallel/cpu_backend.py's table "
                "after checking what it means on CPU, or run on a GPU")
        _hits.setdefault(self._module, set()).add(name)
        return _CUDA_ON_CPU[name]


_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn")


def _on_cpu(device: Any) -> Any:
    """A `device=` argument that names CUDA ("cuda", "cuda:0", torch.device("cuda"), an int) -> the CPU."""
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or \
            (isinstance(device, torch.device) and device.type == "cuda"):
        return _CPU
    return device


class _TorchOnCpu(types.ModuleType):
    """`torch` as one megatron-core module sees it on CPU: torch, with `cuda` and the factories redirected."""

    def __init__(self, module: str) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu(module)
        for name in _FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name)))
        self.autocast = self._autocast

    @staticmethod
    def _factory(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def make(*args: Any, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _on_cpu(kwargs["device"])
            kwargs.pop("pin_memory", None)
            return fn(*args, **kwargs)

        return make

    @staticmethod
    def _autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:
        return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


MODULES = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.attention",
    "megatron.core.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.router",
)
"""Modules whose global `torch` is redirected (mechanism 1): their `torch.cuda.*` and `device="cuda"` sites."""


# ---- 2. the RNG tracker ----------------------------------------------------------------------------------------------
def _cpu_get_cuda_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    if graph_safe:
        raise CpuBackendError("CUDA-graph-safe RNG states (use_cudagraphable_rng) need a GPU")
    del device, clone
    return torch.get_rng_state()


def _cpu_set_cuda_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    if graph_safe:
        raise CpuBackendError("CUDA-graph-safe RNG states (use_cudagraphable_rng) need a GPU")
    del device
    torch.set_rng_state(new_state)


class _ForkWarningFilter(logging.Filter):
    """On CPU the tracker's state IS the CPU generator, so its "CPU RNG state changed within GPU RNG context"
    warning fires on every fork that draws; it is expected here, not a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


# ---- 3. Tensor.type() strings and Tensor.cuda() inside a few functions ---------------------------------------------------
class _CudaTensorMethodsOnCpu(TorchFunctionMode):
    """Inside one megatron-core call: `t.type()` of a CPU tensor reads 'torch.cuda.<T>Tensor', `t.cuda()` is `t`."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].device.type == "cpu":
            name = func(args[0])  # an enclosing scope's mode may already have spelled it
            return name if name.startswith("torch.cuda.") else "torch.cuda." + name.split(".", 1)[1]
        if func is torch.Tensor.cuda and args[0].device.type == "cpu":
            return args[0]
        return func(*args, **kwargs)


FUNCTIONS = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
)
"""(module, qualname) run under `_CudaTensorMethodsOnCpu` (mechanism 3)."""

UNREDIRECTED = {
    ("megatron.core.tensor_parallel.layers", ""): "torch.cuda.amp decorators, applied at import",
    ("megatron.core.tensor_parallel.mappings", "_AllToAll"): "expert-parallel all-to-all (no MoE on CPU yet)",
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "MultimodalRotaryEmbedding"): "mrope",
    ("megatron.core.transformer.attention", "Attention._allocate_memory"): "inference KV cache (megaent's "
                                                                           "rollout engine has its own)",
    ("megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank"): "context parallelism",
    ("megatron.core.transformer.transformer_layer", "TransformerLayer.get_layer_static_inputs"): "CUDA graphs",
    ("megatron.core.transformer.transformer_layer", "TransformerLayer._get_te_cuda_graph_replay_args"): "CUDA graphs",
    ("megatron.core.transformer.mlp", "apply_swiglu_sharded_factory.sh_ten_merge_fn"):
        "megatron dist_checkpointing's SwiGLU merge (OOM fallback only)",
    ("megatron.core.utils", "GlobalSymmetricMemoryBuffer"): "symmetric memory (NVLink)",
    ("megatron.core.utils", "check_param_hashes_across_dp_replicas"): "debugging aid",
    ("megatron.core.utils", "StragglerDetector"): "GPU timing events",
    ("megatron.core.utils", "get_batch_on_this_hybrid_cp_rank"): "hybrid context parallelism",
    ("megatron.core.utils", "nvtx_range_p"): "NVTX ranges, only when enabled for profiling",
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.__init__"):
        "torch.cuda.CUDAGraph probe, only with use_cudagraphable_rng (refused on CPU)",
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBucketGroup.start_grad_sync"):
        "communication streams: only with several distributed-optimizer instances",
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBucketGroup.finish_grad_sync"):
        "communication streams: only with several distributed-optimizer instances",
    ("megatron.core.distributed.distributed_data_parallel",
     "DistributedDataParallel.__init__._allocate_buffers_for_parameters"):
        "torch.cuda.Stream: only with several distributed-optimizer instances",
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer.restore_from_cpu"): "optimizer CPU offload",
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"):
        "legacy torch.save optimizer format (megaent checkpoints through torch.distributed.checkpoint)",
}
"""(module, qualname prefix; "" = module level) of call sites left alone: not reached on megaent's CPU paths. A `torch.cuda` one that is
reached anyway raises `CpuBackendError` (mechanism 1); a `.cuda()` one raises torch's own "not compiled with CUDA"."""


# ---- scanning megatron-core's source ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """One CUDA touch point in megatron-core's source."""

    module: str
    qualname: str  # enclosing function
    kind: str  # 'torch.cuda.<name>', 'device="cuda"', '.cuda()' or 'type string'
    line: int


def scan_sites(module: str) -> list[Site]:
    """Every CUDA touch point in `module`'s source (parsed, not imported)."""
    path = Path(importlib.util.find_spec(module).origin)
    out: list[Site] = []

    def visit(node: ast.AST, qual: str) -> None:
        for ch in ast.iter_child_nodes(node):
            q = qual
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                q = f"{qual}.{ch.name}" if qual else ch.name
            kind = None
            if (isinstance(ch, ast.Attribute) and isinstance(ch.value, ast.Attribute)
                    and isinstance(ch.value.value, ast.Name) and ch.value.value.id == "torch"
                    and ch.value.attr == "cuda"):
                kind = f"torch.cuda.{ch.attr}"
            elif isinstance(ch, ast.Call) and isinstance(ch.func, ast.Attribute) and ch.func.attr == "cuda":
                kind = ".cuda()"
            elif (isinstance(ch, ast.keyword) and ch.arg == "device" and isinstance(ch.value, ast.Constant)
                  and isinstance(ch.value.value, str) and ch.value.value.startswith("cuda")):
                kind = 'device="cuda"'
            elif (isinstance(ch, ast.Constant) and isinstance(ch.value, str) and ch.value.startswith("torch.cuda.")
                  and ch.value.endswith("Tensor")):
                kind = "type string"
            if kind:
                out.append(Site(module, q, kind, ch.lineno))
            visit(ch, q)

    visit(ast.parse(path.read_text()), "")
    return out


def covered(site: Site) -> Optional[str]:
    """How `site` is handled: 'module', 'rng', 'function', 'unredirected: <why>', or None (unknown)."""
    for (module, prefix), why in UNREDIRECTED.items():
        if site.module == module and site.qualname.startswith(prefix) and (prefix or not site.qualname):
            return f"unredirected: {why}"
    if site.module == "megatron.core.tensor_parallel.random" and site.qualname.startswith(
            ("_get_cuda_rng_state", "_set_cuda_rng_state")):
        return "rng"
    if site.kind in (".cuda()", "type string"):
        return "function" if any((site.module, site.qualname) == f for f in FUNCTIONS) else None
    if site.module in MODULES and (site.kind == 'device="cuda"' or site.kind.split(".")[-1] in _CUDA_ON_CPU):
        return "module"
    return None


def touch_points() -> list[tuple[Site, Optional[str]]]:
    """Every site of the redirected modules and functions with how it is handled (None = unknown)."""
    mods = dict.fromkeys(MODULES + tuple(m for m, _ in FUNCTIONS))
    return [(s, covered(s)) for m in mods for s in scan_sites(m)]


# ---- enable / disable ---------------------------------------------------------------------------------------------
_saved: list[tuple[Any, str, Any]] = []


def _resolve(module: str, qualname: str) -> tuple[Any, str]:
    owner: Any = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _scoped(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _CudaTensorMethodsOnCpu():
            return fn(*args, **kwargs)

    run.__megaent_cpu_backend__ = True
    return run


_ABSENT = object()


def _patch(owner: Any, name: str, value: Any) -> None:
    _saved.append((owner, name, inspect.getattr_static(owner, name, _ABSENT)))
    setattr(owner, name, value)


def is_enabled() -> bool:
    return bool(_saved)


def enable() -> None:
    """Redirect megatron-core's CUDA touch points to the CPU (idempotent). Call before building the engine."""
    import megatron.core

    if megatron.core.__version__ != MEGATRON_CORE_VERSION:
        raise CpuBackendError(f"megatron-core {megatron.core.__version__} is installed; megaent's CPU backend was "
                              f"checked against {MEGATRON_CORE_VERSION} (pip install megatron-core=="
                              f"{MEGATRON_CORE_VERSION})")
    if _saved:
        return
    for module in MODULES:
        _patch(importlib.import_module(module), "torch", _TorchOnCpu(module))
    rng = importlib.import_module("megatron.core.tensor_parallel.random")
    _patch(rng, "_get_cuda_rng_state", _cpu_get_cuda_rng_state)
    _patch(rng, "_set_cuda_rng_state", _cpu_set_cuda_rng_state)
    logging.getLogger(rng.__name__).addFilter(_FORK_FILTER)
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):  # read by router_gating_linear; defined only when TE imports
        _patch(moe_utils, "te_general_gemm", None)
    for module, qualname in FUNCTIONS:
        owner, name = _resolve(module, qualname)
        raw = inspect.getattr_static(owner, name)
        if isinstance(raw, classmethod):
            _patch(owner, name, classmethod(_scoped(raw.__func__)))
        elif isinstance(raw, staticmethod):
            _patch(owner, name, staticmethod(_scoped(raw.__func__)))
        else:
            wrapped = _scoped(raw)
            _patch(owner, name, wrapped)
            if "." not in qualname:  # module functions: also the `from ... import f` copies in megatron-core
                for alias_mod in [m for n, m in list(sys.modules.items()) if n.startswith("megatron.core")]:
                    for attr, val in list(vars(alias_mod).items()):
                        if val is raw:
                            _patch(alias_mod, attr, wrapped)
    log.debug("megatron-core CPU backend on: %d modules, %d functions", len(MODULES), len(FUNCTIONS))


def disable() -> None:
    """Undo `enable()` (tests)."""
    while _saved:
        owner, name, value = _saved.pop()
        if value is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_FORK_FILTER)


def hits() -> dict[str, set[str]]:
    """{module: torch.cuda names it called through the redirect} since the process started."""
    return {m: set(v) for m, v in _hits.items()}


_FORK_FILTER = _ForkWarningFilter()
