"""`model.compile=true` (torch.compile of each decoder layer, `megaent.model.backends.apply_backend`) on CPU.

Reference: the same checkpoint loaded without compile (the eager path is checked against `transformers` in
tests/test_model_parity.py). Logits and every parameter gradient of a tiny Qwen2 must match (fp32, 1e-5),
on two different sequence lengths (the layers are compiled with dynamic shapes). Inductor builds C++
kernels here, so this takes ~1 minute on the CI machine.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_compile.py
"""
import pytest
import torch

from hf_tiny import make_tiny_hf


@pytest.mark.slow
def test_compiled_layers_match_eager(tmp_path):
    from megaent.model import load_hf
    from megaent.model.backends import apply_backend
    from megaent.parallel import init_parallel

    d = make_tiny_hf(tmp_path / "m", "qwen2", vocab_size=300, layers=2, seed=5)
    st = init_parallel(1, 1)
    eager, compiled = load_hf(str(d), st), load_hf(str(d), st)
    assert apply_backend(compiled, compile=True)["compiled_layers"] == 2
    g = torch.Generator().manual_seed(0)
    for length in (12, 7):
        ids = torch.randint(0, 300, (2, length), generator=g)
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            logits = model(ids)
            (logits.float().pow(2).mean()).backward()
            outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=1e-5)
        for name, grad in outs[0][1].items():
            torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
