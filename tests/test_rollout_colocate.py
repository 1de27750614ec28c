"""Colocated rollouts: `megaent serve`'s /release_memory_occupation and /resume_memory_occupation.

References: the server's own seeded answers before the release (after release + resume they must be equal,
tokens and log-probs exactly: the same weights come back from the host copy); an in-process `EmbeddedEngine`
on a perturbed export (what the server must serve after a colocated trainer's release -> update -> sync);
clones of the parameters for the engine-side ops (bit-exact round trip, 0 bytes while released). SGLang's
shapes: `null` body on success, 400 `{"error": {"message"}}` naming the fix otherwise.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_rollout_colocate.py
"""
import httpx
import pytest
import torch

from hf_tiny import make_tiny_hf

from megaent.parallel.launch import free_port
from megaent.rollout.client import SGLangClient
from megaent.rollout.embedded import EmbeddedEngine
from megaent.rollout.launcher import launch_megaent
from megaent.rollout.memory_api import device_bytes, op_release, op_resume
from megaent.rollout.types import RolloutError, SamplingParams

PROMPTS = [[5, 17, 33, 8], [40, 41], [7, 7, 9, 60, 61, 62, 63, 11, 12]]
SAMPLED = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("colo") / "m", "qwen2", vocab_size=320, layers=2, seed=5)


@pytest.fixture(scope="module")
def server(hf_dir, tmp_path_factory):
    group = launch_megaent(str(hf_dir), ports=[free_port()], log_dir=tmp_path_factory.mktemp("logs"),
                           env={"OMP_NUM_THREADS": "1"}, timeout_s=240)
    yield group
    group.stop()


@pytest.fixture(scope="module")
def state():
    from megaent.parallel import init_parallel

    return init_parallel(1, 1)


def _answers(groups):
    return [[(s.output_ids, s.logprobs) for s in g] for g in groups]


def test_release_resume_round_trip_in_process(hf_dir, state):
    engine = EmbeddedEngine.from_hf(hf_dir, state)
    before = {n: p.detach().clone() for n, p in engine.policy.named_parameters()}
    want = engine.generate(PROMPTS, SAMPLED)
    full = device_bytes(engine)
    assert op_release(engine, ["weights", "kv_cache"]) == full > 0
    assert device_bytes(engine) == 0
    assert op_release(engine, ["weights"]) == 0  # a second release keeps the host copy it has
    assert op_resume(engine, ["weights"]) == full
    for n, p in engine.policy.named_parameters():
        assert torch.equal(p, before[n]), n
    assert _answers(engine.generate(PROMPTS, SAMPLED)) == _answers(want)
    assert op_resume(engine, ["weights"]) == 0  # nothing released: a no-op


def test_served_answers_after_resume_equal_those_before_release(server):
    url = server.urls[0]
    client = SGLangClient([url])
    before = client.generate(PROMPTS, SAMPLED)
    with httpx.Client(timeout=60) as http:
        r = http.post(url + "/release_memory_occupation", json={"tags": ["weights", "gpu"]})
        assert r.status_code == 400 and "tags" in r.json()["error"]["message"]
        r = http.post(url + "/release_memory_occupation", json={})
        assert r.status_code == 200 and r.json() is None  # SGLang answers null
        gen = {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 2}}
        for path, body in (("/generate", gen), ("/v1/completions", {"prompt": [1, 2], "max_tokens": 2}),
                           ("/update_weights_from_disk", {"model_path": "/x"})):
            r = http.post(url + path, json=body)
            assert r.status_code == 400 and "/resume_memory_occupation" in r.json()["error"]["message"], path
        assert http.get(url + "/health_generate").status_code == 200  # alive: a client must not fail over
        assert http.post(url + "/resume_memory_occupation", json={"tags": ["weights"]}).status_code == 200
        r = http.post(url + "/generate", json=gen)
        assert r.status_code == 400 and "kv_cache" in r.json()["error"]["message"]
        assert http.get(url + "/resume_memory_occupation").status_code == 200  # GET, no body: all tags
    assert _answers(client.generate(PROMPTS, SAMPLED)) == _answers(before)
    client.release_memory(["kv_cache"])
    with pytest.raises(RolloutError, match="HTTP 400"):
        client.generate(PROMPTS[:1], SAMPLED)
    client.resume_memory()
    assert _answers(client.generate(PROMPTS, SAMPLED)) == _answers(before)


def test_colocated_trainer_releases_then_syncs(server, hf_dir, state, tmp_path):
    """RolloutPhase with rollout.colocate: release before the update, then resume weights, disk sync, resume
    the KV cache; the server then serves the updated weights."""
    from megaent.config import RolloutConfig
    from megaent.model import load_hf
    from megaent.trainer.rollout_phase import RolloutPhase

    url = server.urls[0]
    policy = load_hf(str(hf_dir), state)
    phase = RolloutPhase(RolloutConfig(engine="http", urls=[url], colocate=True), policy=policy, state=state,
                         hf_dir=str(hf_dir), run_dir=tmp_path, eos_token_ids=[], seed=0)
    phase.release()
    with pytest.raises(RolloutError, match="resume_memory_occupation"):
        phase.client.generate(PROMPTS[:1], SAMPLED)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "the update", while the server holds no weights
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    assert phase.sync(step=1) == "disk"
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, seed=0)
    got = phase.client.generate(PROMPTS, greedy)
    ref = EmbeddedEngine(policy, state)
    want = [ref.generate([p], greedy)[0] for p in PROMPTS]
    assert [[s.output_ids for s in g] for g in got] == [[s.output_ids for s in g] for g in want]
    phase.client.update_weights_from_disk(str(hf_dir))  # leave the module's server as it started
