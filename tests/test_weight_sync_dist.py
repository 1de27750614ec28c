"""Weight sync over a process group, end to end on CPU: a TP=2 trainer pushes its weights into `megaent serve`.

A `megaent serve` subprocess serves a tiny random Qwen2 (untied head, odd vocabulary: padded at TP=2). Two
gloo ranks load it as megatron-core GPTModel shards at TP=2, perturb every parameter, and sync through
`RolloutPhase.sync` with rollout.weight_sync=distributed: /init_weights_update_group, a session of
/update_weights_from_distributed buckets (gloo broadcasts from trainer rank 0), /end_weight_update.

References: the same trainer's `save_hf` export. Every served tensor, read back through SGLang's
/get_weights_by_name, must equal the export's bit for bit; the server's greedy answers must equal an
in-process `EmbeddedEngine` on the export (tokens exact, log-probs to 1e-5: the server batches the
prompts together, the reference decodes them one by one). The sync writes no file under the run
directory. Then a session whose second bucket has a wrong shape is rejected as a whole: every served
tensor and the weight_version stay those of the synced weights.

The server-side steps alone (check, shard, copy into a fused parameter) are also compared in process with
`hf_names.hf_to_megaent` (the table's own HF -> megaent conversion) of the new tensors.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_weight_sync_dist.py
"""
import os
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from dist import run_ranks
from hf_tiny import make_tiny_hf

from megaent.parallel.launch import free_port
from megaent.rollout.client import SGLangClient
from megaent.rollout.embedded import EmbeddedEngine
from megaent.rollout.launcher import launch_megaent
from megaent.rollout.types import SamplingParams

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 33, 8], [40, 41, 300], [7, 7, 9, 60, 61, 62, 63, 11, 12]]


def _wait_up(url, timeout_s=240.0):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up in {timeout_s:.0f} s")


def _trainer(rank, world, hf_dir, url, out):
    from megaent.config import RolloutConfig
    from megaent.model import load_hf, save_hf
    from megaent.parallel import init_parallel
    from megaent.rollout.types import RolloutError
    from megaent.trainer.rollout_phase import RolloutPhase

    state = init_parallel(2, 1)
    policy = load_hf(hf_dir, state, engine="mcore")
    g = torch.Generator().manual_seed(1)  # the same draws on both ranks: replicated norms stay replicated
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    run_dir = Path(out) / "run"
    run_dir.mkdir(exist_ok=True)
    phase = RolloutPhase(RolloutConfig(engine="http", urls=[url], weight_sync="distributed"), policy=policy,
                         state=state, hf_dir=hf_dir, run_dir=run_dir, eos_token_ids=[2], seed=0)
    if rank == 0:
        _wait_up(url)  # the server starts while the ranks import
    route = phase.sync(step=1)
    files = sorted(str(f) for f in run_dir.rglob("*"))
    save_hf(policy, state, Path(out) / "ref")  # the reference export (outside the run directory)
    rejected = None
    if rank == 0:
        # One session of two buckets: a plausible norm, then a down_proj one column short. Neither may load.
        phase.sender.bucket_bytes = 1  # every tensor its own bucket
        h = policy.arch.hidden_size
        bad = [("model.norm.weight", torch.full((h,), 7.0)),
               ("model.layers.0.mlp.down_proj.weight", torch.zeros(h, policy.arch.intermediate_size - 1))]
        try:
            phase.sender.push(bad, weight_version="bad")
        except RolloutError as e:
            rejected = str(e)
        phase.close()
    return route, files, rejected


def _served(url, names):
    with httpx.Client(timeout=60) as http:
        return {n: torch.tensor(http.post(url + "/get_weights_by_name", json={"name": n, "truncate_size": 10**6})
                                .json()) for n in names}


def _expected(engine, prompts, params):
    """The client sends prompt i with sampling seed = seed + i (see tests/test_rollout_server.py)."""
    return [engine.generate([p], replace(params, seed=params.seed + i))[0] for i, p in enumerate(prompts)]


@pytest.mark.slow
def test_tp2_trainer_syncs_megaent_serve_over_gloo(tmp_path):
    from megaent.parallel import init_parallel

    hf_dir = make_tiny_hf(tmp_path / "m", "qwen2", vocab_size=321, layers=2, tie=False, seed=5)
    (tmp_path / "logs").mkdir()
    started: dict = {}
    port = free_port()
    # The server runs this checkout's megaent, whichever one the `megaent` script was installed from.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    th = threading.Thread(target=lambda: started.setdefault("group", launch_megaent(
        str(hf_dir), ports=[port], log_dir=tmp_path / "logs", env=env, timeout_s=240)))
    th.start()
    url = f"http://127.0.0.1:{port}"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        route, files, rejected = run_ranks(_trainer, 2, str(hf_dir), url, str(tmp_path))[0]
        th.join()
        assert route == "distributed" and files == []  # the sync moved no file

        ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
        original = load_file(str(hf_dir / "model.safetensors"))
        served = _served(url, sorted(ref))
        assert sorted(ref) == sorted(original)
        for name, t in ref.items():
            assert torch.equal(served[name], t), name  # bit for bit
            assert not torch.equal(t, original[name]), name  # and really new

        greedy = SamplingParams(max_new_tokens=8, temperature=0.0, seed=0)
        got = SGLangClient([url]).generate(PROMPTS, greedy)
        want = _expected(EmbeddedEngine.from_hf(tmp_path / "ref", init_parallel(1, 1)), PROMPTS, greedy)
        assert [[s.output_ids for s in g] for g in got] == [[s.output_ids for s in g] for g in want]
        torch.testing.assert_close(torch.tensor([s.logprobs for g in got for s in g]),
                                   torch.tensor([s.logprobs for g in want for s in g]), rtol=0, atol=1e-5)

        assert rejected is not None and "down_proj" in rejected and "shape" in rejected, rejected
        after = _served(url, sorted(ref))
        assert all(torch.equal(after[k], ref[k]) for k in ref)  # nothing of the rejected session loaded
        assert httpx.get(url + "/model_info").json()["weight_version"] == "1"
    finally:
        torch.set_num_threads(n)
        th.join()
        if "group" in started:
            started["group"].stop()


def test_checked_shards_load_like_hf_to_megaent(tmp_path):
    """dist_update's check / shard / apply on a served policy == hf_names.hf_to_megaent of the new tensors."""
    from megaent.model import load_hf
    from megaent.model.hf_names import hf_to_megaent
    from megaent.parallel import init_parallel
    from megaent.rollout.dist_update import apply_shards, check_tensors, local_shards

    hf_dir = make_tiny_hf(tmp_path / "a", "qwen2", vocab_size=300, layers=1, tie=False, seed=1)
    served = load_hf(hf_dir, init_parallel(1, 1))
    g = torch.Generator().manual_seed(2)
    tensors = [(n, t + torch.randn(t.shape, generator=g)) for n, t in
               sorted(load_file(str(hf_dir / "model.safetensors")).items())]
    want = hf_to_megaent(dict(tensors), served.arch)
    assert check_tensors(served, tensors) == []
    # Only q_proj of the fused QKV first: the k and v rows of the fused parameter must stay the old ones.
    q, qkv = "model.layers.0.self_attn.q_proj.weight", "layers.0.attn.qkv.weight"
    before = dict(served.named_parameters())[qkv].detach().clone()
    apply_shards(served, local_shards(served, [(n, t) for n, t in tensors if n == q]))
    rows = served.arch.q_size
    got = dict(served.named_parameters())[qkv]
    assert torch.equal(got[:rows], want[qkv][:rows]) and torch.equal(got[rows:], before[rows:])
    apply_shards(served, local_shards(served, tensors))
    got = dict(served.named_parameters())
    assert sorted(got) == sorted(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    h = served.arch.hidden_size
    bad = [("model.norm.weight", torch.ones(h + 1)), ("lm_head.bias", torch.ones(3)),
           ("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))]
    problems = check_tensors(served, bad)
    assert any(f"shape [{h + 1}]" in p for p in problems), problems
    assert any("lm_head.bias: the served model has no" in p for p in problems), problems
    assert any("sent twice" in p for p in problems) and any("dtype bfloat16" in p for p in problems), problems
