"""`megaent serve` (the installed `megaent` console script, on loopback) driven by real clients.

What it compares against: the clients themselves (each must run to completion) and the field names and
types SGLang 0.5.23 returns (python/sglang/srt/entrypoints/http_server.py, managers/tokenizer_manager.py,
entrypoints/openai/protocol.py), plus the in-process `EmbeddedEngine` for sample-exact checks:
- SGLang's `bench_serving` (sharegpt format, from a local dataset file) with the native and OpenAI backends;
- SGLang's frontend: `RuntimeEndpoint` + `sgl.gen` / `sgl.select` / streaming / `run_batch`;
- slime's `/generate` payload (slime/rollout/sglang_rollout.py) and its pause / flush / update / continue
  weight-sync handshake; verl's payload (verl/workers/rollout/sglang_rollout/http_server_engine.py);
- the `openai` client (completions and chat, plain and streaming).
The sglang clients run in subprocesses with import-only stand-ins for GPU-only packages (`write_stubs`:
triton, torchvision, tvm_ffi, sentencepiece, compressed_tensors, gguf) on PYTHONPATH; nothing is installed.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_serve_clients.py
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from hf_tiny import make_tiny_hf

from megaent.parallel.launch import free_port
from megaent.rollout.launcher import launch_megaent, megaent_command

pytestmark = pytest.mark.slow
STUBBED = ("triton", "torchvision", "tvm_ffi", "sentencepiece", "compressed_tensors", "gguf")
STUB = '''"""Import-only stand-in for {name} (GPU-only or absent here): every {name}.* module imports, every name is a
dummy class usable as a decorator, a base class or an empty container. Nothing can run on it."""
import importlib.abc, importlib.machinery, sys, types

__version__ = "0.0.0"


class _Meta(type):
    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Meta(attr, (), {{}})

    def __contains__(cls, item):
        return False

    def __iter__(cls):
        return iter(())

    def __call__(cls, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Meta("result", (), {{}})


def __getattr__(attr):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _Meta(attr, (), {{}})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("{name}."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__ = []
        m.__getattr__ = __getattr__
        return m

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
'''


def write_stubs(root: Path) -> Path:
    for name in STUBBED:
        (root / name).mkdir(parents=True, exist_ok=True)
        text = STUB.format(name=name)
        if name == "triton":  # torch reads triton.language.dtype at import
            text += '\nimport importlib\nlanguage = importlib.import_module("triton.language")\n'
        (root / name / "__init__.py").write_text(text)
    return root


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("clients") / "m", "qwen2", vocab_size=320, layers=2, seed=4)


@pytest.fixture(scope="module")
def server(hf_dir, tmp_path_factory):
    group = launch_megaent(str(hf_dir), ports=[free_port()], log_dir=tmp_path_factory.mktemp("logs"),
                           env={"OMP_NUM_THREADS": "1"}, timeout_s=240)
    yield group.urls[0]
    group.stop()


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return write_stubs(tmp_path_factory.mktemp("stubs"))


def run_python(code: str, *, stubs: Path, args: list[str] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(stubs), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *(["-c", code] if code else []), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_console_script_serve_help_explains_every_flag():
    from megaent.rollout.server import build_parser

    assert Path(megaent_command()[0]).name == "megaent"  # the fixtures run the console script, not the module
    out = subprocess.run([*megaent_command(), "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in out.stdout
        assert action.help, action.option_strings


@pytest.mark.parametrize("backend", ["sglang", "sglang-oai", "sglang-oai-chat"])
def test_bench_serving_runs_to_completion(server, hf_dir, stubs, tmp_path, backend):
    rng = random.Random(0)
    words = "the cat sat on a mat and then ran far away from home to find food".split()
    rows = [{"id": str(i), "conversations": [
        {"from": "human", "value": " ".join(rng.choices(words, k=rng.randint(4, 20)))},
        {"from": "gpt", "value": " ".join(rng.choices(words, k=rng.randint(4, 20)))}]} for i in range(30)]
    (tmp_path / "sharegpt.json").write_text(json.dumps(rows))
    out = tmp_path / "bench.jsonl"
    proc = run_python("", stubs=stubs, args=[
        "-m", "sglang.bench_serving", "--backend", backend, "--base-url", server, "--dataset-name", "sharegpt",
        "--dataset-path", str(tmp_path / "sharegpt.json"), "--num-prompts", "10", "--tokenizer", str(hf_dir),
        "--sharegpt-output-len", "12", "--output-file", str(out), "--seed", "1", "--disable-tqdm"])
    res = json.loads(out.read_text().splitlines()[-1])
    assert res["completed"] == 10, proc.stdout[-3000:]
    assert res["total_output_tokens"] == 10 * 12  # bench_serving sends ignore_eos: every request runs its length
    assert res["total_input_tokens"] > 0 and "Successful requests:                     10" in proc.stdout


FRONTEND = textwrap.dedent('''
    import json, sys
    import sglang as sgl

    sgl.set_default_backend(sgl.RuntimeEndpoint(sys.argv[1]))

    @sgl.function
    def qa(s, q):
        s += "Q: " + q + "\\nA:"
        s += sgl.gen("answer", max_tokens=8, temperature=0)
        s += "\\nPick one:" + sgl.select("pick", choices=["yes", "no"])

    st = qa.run(q="what is 2+2?")
    meta = st.get_meta_info("answer")
    batch = qa.run_batch([{"q": "a"}, {"q": "b"}], num_threads=2)
    streamed = "".join(qa.run(q="what is 2+2?", stream=True).text_iter("answer"))
    print(json.dumps({"answer": st["answer"], "pick": st["pick"], "meta": meta, "batch": [b["answer"] for b in batch],
                      "streamed": streamed}))
''')


def test_frontend_runtime_endpoint_gen_select_stream(server, stubs):
    proc = run_python(FRONTEND, stubs=stubs, args=[server])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(got["answer"], str) and got["pick"] in ("yes", "no")
    meta = got["meta"]
    assert meta["finish_reason"]["type"] in ("stop", "length") and meta["completion_tokens"] <= 8
    assert isinstance(meta["id"], str) and meta["prompt_tokens"] > 0
    assert got["streamed"] == got["answer"]  # greedy: the SSE stream spells the same answer
    assert len(got["batch"]) == 2 and all(isinstance(a, str) for a in got["batch"])


def _check_native(obj: dict, *, logprobs: bool) -> None:
    """SGLang's answer-object fields and types."""
    assert isinstance(obj["text"], str) and all(isinstance(t, int) for t in obj["output_ids"])
    m = obj["meta_info"]
    for key, typ in (("id", str), ("prompt_tokens", int), ("completion_tokens", int), ("cached_tokens", int),
                     ("weight_version", str), ("e2e_latency", float), ("finish_reason", dict)):
        assert isinstance(m[key], typ), (key, m[key])
    if logprobs:
        lps = m["output_token_logprobs"]
        assert [x[1] for x in lps] == obj["output_ids"] and all(isinstance(x[0], float) for x in lps)
        assert isinstance(m["input_token_logprobs"], list)


def test_slime_rollout_payload_and_weight_sync_handshake(server, hf_dir):
    from megaent.rollout.client import SGLangClient

    # slime's GenerateState.sampling_params + generate() payload (rollout_stop / stop_token_ids unset: None).
    sampling = {"temperature": 1.0, "top_p": 0.9, "top_k": -1, "max_new_tokens": 12, "stop": None,
                "stop_token_ids": None, "skip_special_tokens": False, "no_stop_trim": True,
                "spaces_between_special_tokens": False, "custom_params": {"return_top_p_token_ids": True},
                "sampling_seed": 3}
    payload = {"sampling_params": sampling, "return_logprob": True, "return_routed_experts": True,
               "input_ids": [5, 17, 33, 8]}
    with httpx.Client(timeout=60) as http:
        out = http.post(server + "/generate", json=payload).json()
        _check_native(out, logprobs=True)
        assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")
        # slime around a weight sync: pause, flush, update, continue (here through megaent's own client).
        assert http.post(server + "/pause_generation", json={"mode": "retract"}).json()["status"] == "ok"
        SGLangClient([server]).sync_weights_from_disk(str(hf_dir), weight_version="v7")
        assert http.get(server + "/model_info").json()["weight_version"] == "v7"
        again = http.post(server + "/generate", json=payload).json()
        assert again["output_ids"] == out["output_ids"] and again["meta_info"]["weight_version"] == "v7"
        assert http.post(server + "/abort_request", json={"abort_all": True}).status_code == 200


def test_verl_rollout_payload(server):
    # verl's HttpServerAdapter.generate: None values dropped; its rollout sampling params; abort_request(rid="").
    payload = {"sampling_params": {"n": 1, "max_new_tokens": 10, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                   "repetition_penalty": 1.0, "ignore_eos": False},
               "input_ids": [40, 41, 42], "return_logprob": True, "image_data": None, "rid": "verl-req-1"}
    with httpx.Client(timeout=60) as http:
        out = http.post(server + "/generate", json=payload).json()
        _check_native(out, logprobs=True)
        assert out["meta_info"]["id"] == "verl-req-1"
        assert http.get(server + "/flush_cache").status_code == 200
        assert http.post(server + "/abort_request", json={"rid": "", "abort_all": False}).status_code == 200


def test_openai_client_completions_and_chat(server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    name = models.data[0].id
    c = client.completions.create(model=name, prompt=["hello", "world"], max_tokens=6, n=2, seed=1, logprobs=2,
                                  temperature=0.8)
    assert len(c.choices) == 4 and c.usage.completion_tokens == sum(len(ch.logprobs.tokens) for ch in c.choices)
    assert all(ch.finish_reason in ("stop", "length") for ch in c.choices)
    assert all(len(ch.logprobs.top_logprobs[0]) <= 2 for ch in c.choices if ch.logprobs.tokens)
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    msg = chat.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert chat.usage.prompt_tokens > 0 and len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    streamed = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                              temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == msg.content and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    s = client.completions.create(model=name, prompt="hello", max_tokens=6, temperature=0, stream=True)
    plain = client.completions.create(model=name, prompt="hello", max_tokens=6, temperature=0)
    assert "".join(ch.choices[0].text for ch in s) == plain.choices[0].text
    # n = 2 with a seed: the chunks of both answers interleave while they decode; each index spells its answer
    kw = dict(model=name, prompt="hello", max_tokens=12, n=2, seed=3, temperature=0.9)
    plain2 = client.completions.create(**kw)
    per: dict = {0: "", 1: ""}
    for ch in client.completions.create(**kw, stream=True):
        for c in ch.choices:
            per[c.index] += c.text
    assert [per[0], per[1]] == [c.text for c in sorted(plain2.choices, key=lambda c: c.index)]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=name, prompt="hello", max_tokens=10**6)
