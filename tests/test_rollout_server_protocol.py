"""SGLang's native `/generate` contract on `megaent serve` (console script, loopback), feature by feature.

References: the in-process `EmbeddedEngine` with the same seeds (a seeded sample does not depend on stop
settings or batch company, so the expected answer of a stop string / regex / min_new_tokens request is the
unconstrained sample cut where SGLang's scheduler would cut it: managers/schedule_batch.py
`_check_str_based_finish`, text trimmed as detokenizer_manager.py `trim_matched_stop`); the server's own
output log-probs for the input-token log-probs (teacher forcing the sampled tokens must give their sampling
log-probs back); SGLang's SSE framing and field names (entrypoints/http_server.py, tokenizer_manager.py).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_rollout_server_protocol.py
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

from hf_tiny import make_tiny_hf

from megaent.parallel.launch import free_port
from megaent.rollout.launcher import launch_megaent
from megaent.rollout.types import SamplingParams

pytestmark = pytest.mark.slow
PROMPT = [5, 17, 33, 8]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("proto") / "m", "qwen2", vocab_size=320, layers=2, seed=4)


@pytest.fixture(scope="module")
def url(hf_dir, tmp_path_factory):
    group = launch_megaent(str(hf_dir), ports=[free_port()], log_dir=tmp_path_factory.mktemp("logs"),
                           env={"OMP_NUM_THREADS": "1"}, timeout_s=240)
    yield group.urls[0]
    group.stop()


@pytest.fixture(scope="module")
def local(hf_dir):
    from megaent.parallel import init_parallel
    from megaent.rollout.embedded import EmbeddedEngine

    return EmbeddedEngine.from_hf(hf_dir, init_parallel(1, 1))


@pytest.fixture(scope="module")
def tok(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture()
def http():
    with httpx.Client(timeout=120) as c:
        yield c


def _sample(local, prompt=PROMPT, **kw):
    return local.generate([prompt], SamplingParams(**kw))[0][0]


def _ascii_stop(tok, ids):
    """(index, character) of the first output token that decodes to a printable ASCII character seen first there."""
    seen = ""
    for j, t in enumerate(ids):
        s = tok.decode([t])
        if len(s) == 1 and s.isascii() and s.isprintable() and s not in tok.decode(ids[:j]) and j >= 2:
            return j, s
        seen += s
    pytest.skip("the seeded sample has no usable ASCII token")  # pragma: no cover - seed chosen to have one


def test_stop_strings_and_regex_cut_and_trim_like_sglang(url, http, local, tok):
    ref = _sample(local, max_new_tokens=40, seed=11, ignore_eos=True).output_ids
    j, ch = _ascii_stop(tok, ref)
    base = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 40, "sampling_seed": 11, "ignore_eos": True}}
    for extra, matched in (({"stop": ["\x00never", ch]}, ch), ({"stop_regex": [f"[{ch}]"]}, f"[{ch}]")):
        for trim in (False, True):
            body = {**base, "sampling_params": {**base["sampling_params"], **extra, "no_stop_trim": trim}}
            out = http.post(url + "/generate", json=body).json()
            assert out["output_ids"] == ref[:j + 1], extra
            assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": matched}
            full = tok.decode(ref[:j + 1])
            if "stop" in extra:
                assert out["text"] == (full if trim else full[:full.find(ch)])
            else:  # SGLang trims text.find(pattern): a regex pattern is not found in the text, nothing is cut
                assert out["text"] == full


def test_min_new_tokens_and_stop_token_ids(url, http, local):
    ref = _sample(local, max_new_tokens=30, seed=12, ignore_eos=True).output_ids
    stop = ref[3]
    later = [k for k in range(8, len(ref)) if ref[k] in (stop, *local.eos_token_ids)]
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 30, "sampling_seed": 12,
                                                     "stop_token_ids": [stop], "min_new_tokens": 8}}
    out = http.post(url + "/generate", json=body).json()
    cut = later[0] + 1 if later else 30
    assert out["output_ids"] == ref[:cut]
    plain = http.post(url + "/generate", json={**body, "sampling_params": {
        **body["sampling_params"], "min_new_tokens": 0, "ignore_eos": True}}).json()
    assert plain["output_ids"] == ref[:4] and plain["meta_info"]["finish_reason"] == {"type": "stop",
                                                                                      "matched": stop}


def test_per_prompt_sampling_params_zero_tokens_and_rids(url, http, local):
    prompts = [PROMPT, [40, 41], [7, 7, 9]]
    sps = [{"max_new_tokens": 5, "sampling_seed": 1, "ignore_eos": True},
           {"max_new_tokens": 0},
           {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}]
    out = http.post(url + "/generate", json={"input_ids": prompts, "sampling_params": sps, "rid": "r"}).json()
    assert [o["meta_info"]["id"] for o in out] == ["r_0", "r_1", "r_2"]
    assert out[0]["output_ids"] == _sample(local, max_new_tokens=5, seed=1, ignore_eos=True).output_ids
    assert out[1]["output_ids"] == [] and out[1]["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert out[2]["output_ids"] == _sample(local, prompts[2], max_new_tokens=3, temperature=0.0,
                                           ignore_eos=True).output_ids
    one = http.post(url + "/generate", json={"input_ids": PROMPT, "rid": "solo",
                                             "sampling_params": {"max_new_tokens": 2}}).json()
    assert one["meta_info"]["id"] == "solo"
    r = http.post(url + "/generate", json={"input_ids": prompts, "sampling_params": sps[:2]})
    assert r.status_code == 400 and "one per prompt" in r.json()["error"]["message"]


def test_input_token_logprobs_give_back_the_sampling_logprobs(url, http):
    gen = http.post(url + "/generate", json={"input_ids": PROMPT, "return_logprob": True, "sampling_params": {
        "max_new_tokens": 10, "sampling_seed": 2, "ignore_eos": True}}).json()
    meta = gen["meta_info"]
    assert meta["input_token_logprobs"] == []  # logprob_start_len = -1: output tokens only (SGLang's default)
    ids = PROMPT + gen["output_ids"]
    score = http.post(url + "/generate", json={
        "input_ids": ids, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3,
        "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 0}}).json()["meta_info"]
    inp = score["input_token_logprobs"]
    assert [x[1] for x in inp] == ids and inp[0][0] is None and all(isinstance(x[2], str) for x in inp)
    torch.testing.assert_close(torch.tensor([x[0] for x in inp[len(PROMPT):]]),
                               torch.tensor([x[0] for x in meta["output_token_logprobs"]]), rtol=0, atol=1e-4)
    tops = score["input_top_logprobs"]
    assert tops[0] is None and all(len(t) == 3 for t in tops[1:])
    for (lp, _, _), top in zip(inp[1:], tops[1:]):
        assert top[0][0] >= lp - 1e-5 and [t[0] for t in top] == sorted((t[0] for t in top), reverse=True)
    start = http.post(url + "/generate", json={"input_ids": ids, "return_logprob": True, "logprob_start_len": 2,
                                               "sampling_params": {"max_new_tokens": 0}}).json()["meta_info"]
    assert [x[1] for x in start["input_token_logprobs"]] == ids[2:]


def _sse(resp_text: str) -> list:
    frames = [f for f in resp_text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames) and frames[-1] == "data: [DONE]"
    return [json.loads(f[len("data: "):]) for f in frames[:-1]]


def test_stream_is_sglang_sse_and_ends_with_the_plain_answer(url, http):
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 8, "sampling_seed": 4, "ignore_eos": True}}
    plain = http.post(url + "/generate", json=body).json()
    r = http.post(url + "/generate", json={**body, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert len(events) == 8 and events[-1]["output_ids"] == plain["output_ids"]
    assert events[-1]["text"] == plain["text"] and events[-1]["meta_info"]["finish_reason"] is not None
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert all(plain["text"].startswith(e["text"]) for e in events)  # cumulative, never taken back
    batch = _sse(http.post(url + "/generate", json={**body, "input_ids": [PROMPT, [40, 41]], "stream": True}).text)
    assert {e["index"] for e in batch} == {0, 1}


def test_stream_sends_each_token_while_the_answer_decodes(url, http):
    """Real streaming, not a replay of the finished answer: the first chunk leaves the server after one decode
    step (its e2e_latency a small part of the whole answer's), one chunk per token, and the stream's last object
    is the non-streamed answer (same seed)."""
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 160, "sampling_seed": 6, "ignore_eos": True}}
    plain = http.post(url + "/generate", json=body).json()
    events = _sse(http.post(url + "/generate", json={**body, "stream": True}).text)
    lat = [e["meta_info"]["e2e_latency"] for e in events]
    assert len(events) == 160 and [e["meta_info"]["completion_tokens"] for e in events] == list(range(1, 161))
    assert lat == sorted(lat) and lat[0] < 0.25 * lat[-1], lat[::20]
    assert events[-1]["output_ids"] == plain["output_ids"] and events[-1]["text"] == plain["text"]
    assert all(events[k]["output_ids"] == plain["output_ids"][:k + 1] for k in range(160))


def test_stream_never_shows_a_stop_string_it_then_cuts(url, http, local, tok):
    """With a stop string, partial texts are prefixes of the final (trimmed) text and never hold the stop string;
    the partial chunks end where the stop is met and the last object is the cut answer."""
    ref = _sample(local, max_new_tokens=40, seed=11, ignore_eos=True).output_ids
    j, ch = _ascii_stop(tok, ref)
    body = {"input_ids": PROMPT, "stream": True, "sampling_params": {"max_new_tokens": 40, "sampling_seed": 11,
                                                                       "ignore_eos": True, "stop": [ch]}}
    events = _sse(http.post(url + "/generate", json=body).text)
    final = events[-1]
    assert final["output_ids"] == ref[:j + 1] and final["meta_info"]["finish_reason"]["matched"] == ch
    assert len(events) == j + 1  # tokens 1..j as partials, then the final object
    assert all(final["text"].startswith(e["text"]) and ch not in e["text"] for e in events)


def test_penalties_and_logit_bias_reach_the_engine(url, http, local):
    """repetition / frequency / presence penalties and logit_bias through /generate decode what the in-process
    engine decodes with the same SamplingParams (whose penalties tests/test_rollout_penalties.py checks against
    HF's processors), and they change the answer (else the check would prove nothing)."""
    kw = dict(max_new_tokens=24, seed=7, ignore_eos=True)
    pen = dict(repetition_penalty=1.6, frequency_penalty=0.7, presence_penalty=0.4)
    base = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 24, "sampling_seed": 7, "ignore_eos": True}}
    plain = http.post(url + "/generate", json=base).json()["output_ids"]
    first = plain[0]
    body = {**base, "sampling_params": {**base["sampling_params"], **pen, "logit_bias": {str(first): -100.0}}}
    got = http.post(url + "/generate", json=body).json()["output_ids"]
    want = _sample(local, **kw, **pen, logit_bias={first: -100.0}).output_ids
    assert got == want and got != plain and first not in got


def test_pause_continue_abort_and_weight_version(url, http):
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4}, "rid": "held"}
    assert http.post(url + "/pause_generation", json={"mode": "in_place"}).json() == {
        "message": "Generation paused successfully.", "status": "ok"}
    got: dict = {}
    th = threading.Thread(target=lambda: got.setdefault("r", http.post(url + "/generate", json=body).json()))
    th.start()
    time.sleep(0.5)
    assert th.is_alive()  # held while paused
    assert http.get(url + "/health_generate").status_code == 200  # a paused server is healthy
    assert http.post(url + "/abort_request", json={"rid": "held"}).status_code == 200
    th.join(timeout=30)
    assert got["r"]["meta_info"]["finish_reason"]["type"] == "abort" and got["r"]["output_ids"] == []
    assert http.post(url + "/continue_generation", json={}).json()["status"] == "ok"
    assert len(http.post(url + "/generate", json=body).json()["output_ids"]) <= 4
    v = http.post(url + "/update_weight_version", json={"new_version": "step-9"}).json()
    assert v == {"success": True, "message": "Weight version updated to step-9", "new_version": "step-9"}
    assert http.get(url + "/model_info").json()["weight_version"] == "step-9"
    info = http.get(url + "/server_info").json()
    assert info == http.get(url + "/get_server_info").json()  # the deprecated alias
    assert isinstance(info["internal_states"], list) and info["tp_size"] == 1
    assert http.post(url + "/pause_generation", json={"mode": "later"}).status_code == 400


def test_weight_sync_runs_sglangs_pause_flush_update_continue_sequence(tmp_path):
    """SGLangClient.sync_weights_from_disk against a recording stand-in server: the order SGLang expects, the
    Bearer key on every call, and /continue_generation even when the update fails."""
    import http.server

    from megaent.rollout.client import SGLangClient
    from megaent.rollout.types import RolloutError

    calls: list = []
    fail = {"update": False}

    class Rec(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            calls.append((self.path, json.loads(body) if body else None, self.headers.get("Authorization")))
            bad = self.path == "/update_weights_from_disk" and fail["update"]
            out = {"success": not bad, "message": "x", "num_paused_requests": 0, "status": "ok"}
            self.send_response(400 if bad else 200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(out).encode())

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Rec)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = SGLangClient([f"http://127.0.0.1:{srv.server_address[1]}"], api_key="k")
        client.sync_weights_from_disk(str(tmp_path), weight_version="v2")
        assert [c[0] for c in calls] == ["/pause_generation", "/flush_cache", "/update_weights_from_disk",
                                         "/continue_generation"]
        assert calls[0][1] == {"mode": "retract"} and calls[2][1] == {"model_path": str(tmp_path),
                                                                      "weight_version": "v2"}
        assert {c[2] for c in calls} == {"Bearer k"}
        calls.clear()
        client.update_weights_from_disk(str(tmp_path))  # what the trainer's rollout phase calls
        assert [c[0] for c in calls][1:3] == ["/flush_cache", "/update_weights_from_disk"]
        calls.clear()
        fail["update"] = True
        with pytest.raises(RolloutError, match="update_weights_from_disk"):
            client.sync_weights_from_disk(str(tmp_path))
        assert calls[-1][0] == "/continue_generation"
    finally:
        srv.shutdown()
        srv.server_close()
