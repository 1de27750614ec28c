"""`megaent serve` as real subprocesses on loopback, driven by `SGLangClient` and raw HTTP.

References: the in-process `EmbeddedEngine` (itself checked against `transformers` in
test_rollout_engine.py) with the same seed, for sample-exact comparisons; SGLang's response
shapes (see megaent/rollout/protocol.py) for the raw-HTTP checks; a perturbed checkpoint for
weight updates. The module starts two servers once; the last test kills one of them
while requests are in flight and checks that every sample still comes back, correct.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_rollout_server.py
"""
import threading
import time

import httpx
import pytest
import torch

from hf_tiny import make_tiny_hf

from megaent.parallel.launch import free_port
from megaent.rollout.client import SGLangClient
from megaent.rollout.embedded import EmbeddedEngine
from megaent.rollout.launcher import SGLANG_MISSING, launch_megaent, launch_sglang
from megaent.rollout.types import RolloutError, SamplingParams

pytestmark = pytest.mark.slow
PROMPTS = [[5, 17, 33, 8], [40, 41], [7, 7, 9, 60, 61, 62, 63, 11, 12]]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("srv") / "m", "qwen2", vocab_size=320, layers=2, seed=4)


@pytest.fixture(scope="module")
def servers(hf_dir, tmp_path_factory):
    group = launch_megaent(str(hf_dir), ports=[free_port(), free_port()], log_dir=tmp_path_factory.mktemp("logs"),
                           env={"OMP_NUM_THREADS": "1"}, timeout_s=240)
    yield group
    group.stop()


@pytest.fixture(scope="module")
def local(hf_dir):
    from megaent.parallel import init_parallel

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield EmbeddedEngine.from_hf(hf_dir, init_parallel(1, 1))
    torch.set_num_threads(n)


def _expected(engine, prompts, params):
    """What the client should get: prompt i is sent with sampling_seed = seed + i, prompt index 0."""
    from dataclasses import replace

    return [engine.generate([p], replace(params, seed=params.seed + i))[0] for i, p in enumerate(prompts)]


def _ids(groups):
    return [[s.output_ids for s in g] for g in groups]


def test_generate_n_and_stop_match_embedded_engine(servers, local):
    client = SGLangClient(servers.urls, max_concurrency=8)
    params = SamplingParams(n=3, max_new_tokens=12, temperature=0.9, top_k=40, seed=100, ignore_eos=True)
    got = client.generate(PROMPTS, params)
    want = _expected(local, PROMPTS, params)
    assert _ids(got) == _ids(want)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
            assert a.finish_reason == "length" and a.prompt_ids == b.prompt_ids
    stop = got[0][0].output_ids[4]
    stopped = client.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=12, temperature=0.9, top_k=40, seed=100,
                                                      ignore_eos=True, stop_token_ids=(stop,)))
    a = stopped[0][0]
    assert a.output_ids == got[0][0].output_ids[:got[0][0].output_ids.index(stop) + 1]
    assert a.finish_reason == "stop" and a.matched_stop == stop
    # Greedy through the server equals the local engine.
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0, seed=0)
    assert _ids(client.generate(PROMPTS, greedy)) == _ids(_expected(local, PROMPTS, greedy))


def test_raw_http_shapes_and_errors(servers, hf_dir):
    url = servers.urls[0]
    with httpx.Client(timeout=60) as http:
        one = http.post(url + "/generate", json={"input_ids": PROMPTS[0], "return_logprob": True,
                                                 "sampling_params": {"max_new_tokens": 5, "temperature": 0}}).json()
        assert isinstance(one, dict) and set(one) >= {"text", "output_ids", "meta_info"}
        meta = one["meta_info"]
        assert meta["prompt_tokens"] == len(PROMPTS[0]) and meta["completion_tokens"] == len(one["output_ids"])
        assert meta["finish_reason"]["type"] in ("stop", "length")
        assert [t[1] for t in meta["output_token_logprobs"]] == one["output_ids"]
        assert all(len(t) == 3 and t[2] is None and t[0] <= 0 for t in meta["output_token_logprobs"])
        many = http.post(url + "/generate", json={"input_ids": PROMPTS[:2], "sampling_params": {
            "max_new_tokens": 4, "n": 2, "sampling_seed": 1, "ignore_eos": True}}).json()
        assert isinstance(many, list) and len(many) == 4  # prompt-major: p0 s0, p0 s1, p1 s0, p1 s1
        assert many[0]["meta_info"]["prompt_tokens"] == len(PROMPTS[0])
        assert many[2]["meta_info"]["prompt_tokens"] == len(PROMPTS[1])
        assert many[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
        text = http.post(url + "/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 3}}).json()
        assert isinstance(text["text"], str) and text["meta_info"]["prompt_tokens"] == 5
        info = http.get(url + "/get_model_info").json()
        assert info["model_path"] == str(hf_dir) and info["is_generation"] is True
        assert http.get(url + "/model_info").json() == info
        assert http.get(url + "/health").status_code == 200
        assert http.get(url + "/health_generate").status_code == 200
        assert http.post(url + "/flush_cache").status_code == 200
        bad = [
            (b"{not json", "JSON"),
            ({"input_ids": PROMPTS[0], "sampling_params": {"temperature": -1}}, "temperature"),
            ({"input_ids": PROMPTS[0], "sampling_params": {"top_p": 2.0}}, "top_p"),
            ({"input_ids": [1, 100000]}, "input_ids"),
            ({"sampling_params": {}}, "input_ids"),
            ({"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": "ten"}}, "max_new_tokens"),
            ({"input_ids": PROMPTS[0], "stream": "yes"}, "stream"),
        ]
        for body, field in bad:
            r = (http.post(url + "/generate", content=body, headers={"content-type": "application/json"})
                 if isinstance(body, bytes) else http.post(url + "/generate", json=body))
            assert r.status_code == 400, body
            assert field in r.json()["error"]["message"], (field, r.json())  # SGLang's /generate error body
        # Unknown fields are ignored, as SGLang ignores them (verl sends image_data, bench_serving more).
        ok = http.post(url + "/generate", json={"input_ids": PROMPTS[0], "image_data": None, "bogus_top": 1,
                                                "sampling_params": {"max_new_tokens": 2, "bogus": 1}})
        assert ok.status_code == 200 and len(ok.json()["output_ids"]) <= 2
        r = http.post(url + "/update_weights_from_disk", json={"model_path": "/nonexistent/dir"})
        assert r.status_code == 400 and r.json()["success"] is False
    with pytest.raises(RolloutError, match="HTTP 400"):
        SGLangClient([url]).generate([[1, 100000]], SamplingParams())


def test_weight_update_from_disk(servers, hf_dir, local, tmp_path):
    from megaent.model import load_hf
    from megaent.rollout.weight_sync import sync_weights_disk

    url = servers.urls[0]
    client = SGLangClient([url])
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0, seed=0)
    before = client.generate(PROMPTS, greedy)
    policy = load_hf(str(hf_dir), local.state)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    sync_weights_disk(policy, local.state, tmp_path / "perturbed", client, weight_version="v1")
    after = client.generate(PROMPTS, greedy)
    assert _ids(after) != _ids(before)
    perturbed = EmbeddedEngine(policy, local.state, eos_token_ids=local.eos_token_ids)
    assert _ids(after) == _ids(_expected(perturbed, PROMPTS, greedy))
    assert httpx.get(url + "/get_model_info").json()["weight_version"] == "v1"
    client.update_weights_from_disk(str(hf_dir))
    assert _ids(client.generate(PROMPTS, greedy)) == _ids(before)


def test_killed_server_loses_no_sample(servers, local):
    client = SGLangClient(servers.urls, max_concurrency=16, reprobe_s=60)
    prompts = [[3 + i, 20 + i, 7] for i in range(16)]
    # Long enough responses that the victim is still decoding when it is killed (the engine is fast).
    params = SamplingParams(n=2, max_new_tokens=96, temperature=1.0, seed=7, ignore_eos=True)
    result: dict = {}
    th = threading.Thread(target=lambda: result.setdefault("out", client.generate(prompts, params)))
    th.start()
    victim = servers.urls[1]
    deadline = time.monotonic() + 60
    busy = 0
    while time.monotonic() < deadline and busy == 0:  # wait until the victim is busy with our requests
        try:
            busy = httpx.get(victim + "/get_server_info", timeout=5).json()["in_flight"]
        except httpx.HTTPError:
            pass
        if busy == 0:
            time.sleep(0.01)
    servers.procs[1].kill()  # at once: asking again first could let the victim finish its requests
    th.join(timeout=240)
    out = result["out"]
    assert len(out) == len(prompts) and all(len(g) == 2 for g in out)
    assert servers.urls[0] in {s.meta["server"] for g in out for s in g}
    assert not client.servers[1].healthy, f"the victim was killed with {busy} requests in flight"
    # Every sample is the one the seed determines, whichever server finished it.
    want = _ids(_expected(local, prompts, params))
    bad = [(i, j) for i in range(len(prompts)) for j in range(2) if _ids(out)[i][j] != want[i][j]]
    assert not bad, f"samples differ from the seeded reference at {bad}"



def test_sglang_launcher_explains_missing_sglang(monkeypatch):
    import megaent.rollout.launcher as launcher

    monkeypatch.setattr(launcher, "sglang_available", lambda: False)  # the test extra installs sglang's clients
    with pytest.raises(RolloutError, match="pip install 'megaent\\[sglang\\]'"):
        launch_sglang("/some/model")
    assert "rollout.engine=embedded" in SGLANG_MISSING
