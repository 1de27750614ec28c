"""megaent's CPU backend for megatron-core (`megaent.parallel.cpu_backend`): what it redirects, and that it works.

Checks, against megatron-core's own source and behaviour (no megaent engine code involved):
- every CUDA touch point in the redirected modules, and in every megatron-core module the engine runs
  (`ENGINE_MODULES`), is known: redirected by module, RNG or function scope, or listed as unredirected with
  its reason; a megatron-core upgrade that adds one fails here;
- a `torch.cuda` attribute nobody checked raises `CpuBackendError` naming the module (never runs silently);
- the RNG tracker really forks and restores on CPU (on a CPU build of torch the originals silently do
  nothing: the trap this backend exists for), and TP ranks get distinct model-parallel streams;
- a GPTModel forward/backward over the redirect records the `torch.cuda` names it used;
- enable/disable restores megatron-core's originals, and megaent's own code keeps the real `torch.cuda`.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_cpu_backend.py -q
"""
from __future__ import annotations

import importlib

import pytest
import torch

from dist import run_ranks
from megaent.parallel import cpu_backend as cb

ENGINE_MODULES = (
    "megatron.core.models.gpt.gpt_model", "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.models.common.embeddings.rotary_pos_embedding", "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.transformer.transformer_block", "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.attention", "megatron.core.transformer.mlp", "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.layers", "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random", "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer", "megatron.core.distributed.finalize_model_grads",
    "megatron.core.pipeline_parallel.schedules", "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads", "megatron.core.utils",
)
"""megatron-core modules on megaent's training path (model, DDP, schedules, optimizer)."""


def test_every_touch_point_of_the_redirected_modules_is_known():
    unknown = [s for s, how in cb.touch_points() if how is None]
    assert not unknown, f"CUDA touch points the CPU backend does not know: {unknown}"
    kinds = {how.split(":")[0] for _, how in cb.touch_points()}
    assert {"module", "rng", "function", "unredirected"} <= kinds


def test_engine_modules_have_no_unknown_touch_point():
    problems = []
    for module in ENGINE_MODULES:
        for site in cb.scan_sites(module):
            if cb.covered(site) is None:
                problems.append(site)
    assert not problems, f"engine modules reach CUDA where the CPU backend does not redirect: {problems}"


def test_the_scan_sees_known_sites():
    sites = cb.scan_sites("megatron.core.optimizer.clip_grads")
    assert any(s.qualname == "clip_grad_by_total_norm_fp32" and s.kind == "type string" for s in sites)
    assert any(s.qualname == "get_grad_norm_fp32" and s.kind == 'device="cuda"' for s in sites)


@pytest.fixture
def backend():
    was = cb.is_enabled()
    cb.enable()
    yield cb
    if not was:
        cb.disable()


def test_unknown_cuda_attribute_raises_naming_the_module(backend):
    mod = importlib.import_module("megatron.core.optimizer.clip_grads")
    with pytest.raises(cb.CpuBackendError, match="clip_grads called torch.cuda.Stream"):
        mod.torch.cuda.Stream()
    assert mod.torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.cuda.is_available() is False and not isinstance(torch.cuda, cb._CudaOnCpu)


def test_rng_tracker_forks_and_restores_on_cpu(backend):
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    tracker.add("stream", 123)
    torch.manual_seed(0)
    with tracker.fork("stream"):
        a = torch.rand(4)
    after = torch.rand(4)
    with tracker.fork("stream"):
        b = torch.rand(4)
    torch.manual_seed(123)
    ref = torch.rand(8)
    torch.manual_seed(0)
    plain = torch.rand(8)
    assert torch.equal(a, ref[:4]) and torch.equal(b, ref[4:])  # the tracker's own stream, continued
    assert torch.equal(after, plain[:4])  # the default stream did not move inside the forks


def test_without_the_backend_megatron_rng_set_is_a_silent_no_op():
    """The trap: megatron-core's own _set_cuda_rng_state on a CPU build queues a CUDA call that never runs."""
    if cb.is_enabled():
        pytest.skip("backend enabled in this process")
    from megatron.core.tensor_parallel import random as rnd

    torch.manual_seed(0)
    before = torch.get_rng_state()
    torch.manual_seed(1)
    rnd._set_cuda_rng_state(before)  # no error ...
    assert not torch.equal(torch.get_rng_state(), before)  # ... and nothing happened


def test_disable_restores_the_originals():
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as rnd

    was = cb.is_enabled()
    cb.disable()
    orig = rnd._set_cuda_rng_state, clip_grads.clip_grad_by_total_norm_fp32
    cb.enable()
    assert rnd._set_cuda_rng_state is not orig[0] and clip_grads.torch is not torch
    cb.disable()
    assert (rnd._set_cuda_rng_state, clip_grads.clip_grad_by_total_norm_fp32) == orig and clip_grads.torch is torch
    if was:
        cb.enable()


def _tp2_streams(rank: int, world: int) -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megaent.model.arch import ModelArch
    from megaent.model.gpt_policy import GPTPolicy
    from megaent.parallel import init_parallel

    st = init_parallel(2, 1, seed=7)
    with get_cuda_rng_tracker().fork():
        mp = torch.rand(3)
    with get_cuda_rng_tracker().fork("data-parallel-rng"):
        dp = torch.rand(3)
    arch = ModelArch.from_hf_config(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    pol = GPTPolicy(arch, st)
    torch.manual_seed(0)
    for p in pol.parameters():
        torch.nn.init.normal_(p, std=0.1)
    pol(torch.randint(0, 64, (2, 6))).float().sum().backward()  # sequence parallel: gathers, reduce-scatters
    return {"mp": mp, "dp": dp, "hits": cb.hits(), "grads": all(p.grad is not None for p in pol.parameters())}


@pytest.mark.slow
def test_tp2_streams_and_recorded_hits():
    r0, r1 = run_ranks(_tp2_streams, 2)
    assert not torch.equal(r0["mp"], r1["mp"])  # model-parallel stream differs per TP rank
    assert torch.equal(r0["dp"], r1["dp"])  # the data-parallel stream does not
    assert r0["grads"] and r1["grads"]
    hits = r0["hits"]
    assert "current_device" in hits["megatron.core.tensor_parallel.mappings"]  # sequence-parallel all-gather
    assert "current_device" in hits["megatron.core.models.common.embeddings.rotary_pos_embedding"]
