"""`megaent serve --tp 2` under torchrun (two processes, gloo) against the in-process TP=1 engine.

The server's rank 0 answers HTTP and drives rank 1 over the TP group; sampling streams are keyed by (seed,
prompt, sample), not by the TP layout, so the TP=2 server must return the TP=1 engine's tokens exactly and
its log-probs to 1e-5, for sampled and greedy requests, and follow a weight update from disk and one over a
process group (rollout.weight_sync=distributed: both TP ranks join the group and keep their shards).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_rollout_server_tp.py
"""
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from hf_tiny import make_tiny_hf

from megaent.parallel.launch import free_port
from megaent.rollout.client import SGLangClient
from megaent.rollout.embedded import EmbeddedEngine
from megaent.rollout.launcher import ServerGroup, wait_healthy
from megaent.rollout.types import SamplingParams

PROMPTS = [[5, 17, 33, 8], [40, 41], [7, 7, 9, 60, 61, 62, 63, 11, 12]]


def _expected(engine, prompts, params):
    """The client sends prompt i with sampling seed = seed + i (see tests/test_rollout_server.py)."""
    return [engine.generate([p], replace(params, seed=params.seed + i))[0] for i, p in enumerate(prompts)]


def _ids(groups):
    return [[s.output_ids for s in g] for g in groups]


@pytest.mark.slow
def test_tp2_server_under_torchrun_matches_tp1_engine(tmp_path):
    from megaent.model import load_hf
    from megaent.parallel import init_parallel
    from megaent.rollout.weight_sync import sync_weights_disk

    hf_dir = make_tiny_hf(tmp_path / "m", "qwen2", vocab_size=321, layers=2, seed=6)  # odd vocab: padded at TP=2
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megaent.rollout.server", "--model", str(hf_dir), "--tp", "2",
           "--port", str(port)]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ServerGroup(urls=[url], procs=[proc], logs=[log]):
            try:
                wait_healthy([url], [proc], timeout_s=240)
            except Exception:
                raise AssertionError((tmp_path / "server.log").read_text()[-3000:])
            client = SGLangClient([url])
            state = init_parallel(1, 1)
            local = EmbeddedEngine.from_hf(hf_dir, state)
            sampled = SamplingParams(n=3, max_new_tokens=10, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
            got, want = client.generate(PROMPTS, sampled), _expected(local, PROMPTS, sampled)
            assert _ids(got) == _ids(want)
            for g, w in zip(got, want):
                for a, b in zip(g, w):
                    torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
            # Teacher-forced input log-probs run on both ranks (the TP bus) and give the sampling log-probs back.
            import httpx

            ids = PROMPTS[0] + got[0][0].output_ids
            meta = httpx.post(url + "/generate", timeout=60, json={
                "input_ids": ids, "return_logprob": True, "logprob_start_len": len(PROMPTS[0]),
                "sampling_params": {"max_new_tokens": 0, "temperature": 0.8}}).json()["meta_info"]
            torch.testing.assert_close(torch.tensor([x[0] for x in meta["input_token_logprobs"]]),
                                       torch.tensor(got[0][0].logprobs), rtol=0, atol=1e-4)
            greedy = SamplingParams(max_new_tokens=8, temperature=0.0, seed=0)
            before = client.generate(PROMPTS, greedy)
            assert _ids(before) == _ids(_expected(local, PROMPTS, greedy))
            # A weight update reaches both TP ranks: outputs follow the perturbed checkpoint.
            policy = load_hf(str(hf_dir), state)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
            sync_weights_disk(policy, state, tmp_path / "perturbed", client, weight_version="v1")
            after = client.generate(PROMPTS, greedy)
            assert _ids(after) != _ids(before)
            perturbed = EmbeddedEngine(policy, state, eos_token_ids=local.eos_token_ids)
            assert _ids(after) == _ids(_expected(perturbed, PROMPTS, greedy))
            # The distributed sync reaches both TP ranks too (their TP bus runs the weight-update ops).
            from megaent.config import RolloutConfig
            from megaent.trainer.rollout_phase import RolloutPhase

            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
            phase = RolloutPhase(RolloutConfig(engine="http", urls=[url], weight_sync="distributed"), policy=policy,
                                 state=state, hf_dir=str(hf_dir), run_dir=tmp_path, eos_token_ids=[], seed=0)
            try:
                assert phase.sync(step=2) == "distributed"
            finally:
                phase.close()
            synced = client.generate(PROMPTS, greedy)
            assert _ids(synced) != _ids(after) and _ids(synced) == _ids(_expected(perturbed, PROMPTS, greedy))
    finally:
        torch.set_num_threads(n)
