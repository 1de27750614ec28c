"""EmbeddedEngine against HuggingFace `transformers` on a tiny random checkpoint (tests/hf_tiny.py).

- greedy tokens equal `model.generate(do_sample=False)` run per prompt without padding;
- sampled log-probs equal log_softmax(logits / T) of a full HF forward over prompt + output (<= 1e-5 fp32),
  also with top-k / top-p on (the engine returns the untruncated full-vocabulary log-prob);
- stop tokens end a sample at their first occurrence ("stop"), others end by length;
- n > 1 gives distinct samples, the same seed gives the same samples, a different seed different ones,
  and the samples do not depend on how rows are batched (chunk size, compaction);
- TP = 2 (2 gloo ranks) gives the same tokens as TP = 1 and log-probs within 1e-5;
- the consistency helper against a direct computation.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_rollout_engine.py
"""
import pytest
import torch

from dist import run_ranks
from hf_tiny import make_tiny_hf

from megaent.rollout.embedded import EmbeddedEngine, read_eos_ids
from megaent.rollout.engine import logprob_consistency
from megaent.rollout.types import SamplingParams

PROMPTS = [[5, 17, 33, 8], [40, 41], [7, 7, 9, 60, 61, 62, 63, 11, 12], [99]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny") / "m", "qwen2", vocab_size=320, layers=2, seed=3)


@pytest.fixture(scope="module")
def engine(hf_dir):
    from megaent.parallel import init_parallel

    return EmbeddedEngine.from_hf(hf_dir, init_parallel(1, 1))


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _hf_logprobs(model, prompt, out, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1:-1] / temperature, dim=-1)
    return lp.gather(-1, torch.tensor(out)[:, None])[:, 0]


def test_greedy_matches_transformers(engine, hf_model, hf_dir):
    eos = read_eos_ids(hf_dir)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0.0))
    for p, (s,) in zip(PROMPTS, out):
        with torch.no_grad():
            g = hf_model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                                  pad_token_id=0)[0, len(p):].tolist()
        assert s.output_ids == g
        assert s.finish_reason == ("stop" if g[-1] in eos else "length")
        assert s.prompt_ids == p


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.9, 20)])
def test_sampled_logprobs_match_full_forward(engine, hf_model, temperature, top_p, top_k):
    params = SamplingParams(n=2, max_new_tokens=12, temperature=temperature, top_p=top_p, top_k=top_k, seed=11)
    out = engine.generate(PROMPTS, params)
    for p, group in zip(PROMPTS, out):
        assert len(group) == 2
        for s in group:
            ref = _hf_logprobs(hf_model, p, s.output_ids, temperature)
            torch.testing.assert_close(torch.tensor(s.logprobs), ref, rtol=0, atol=1e-5)
    # consistency helper: same numbers as a direct max |a - b|
    ref_lp = [_hf_logprobs(hf_model, p, s.output_ids, temperature).tolist() for p, g in zip(PROMPTS, out) for s in g]
    got = [s.logprobs for g in out for s in g]
    m = logprob_consistency(ref_lp, got)
    direct = max(abs(a - b) for x, y in zip(ref_lp, got) for a, b in zip(x, y))
    assert m["rollout/logprob_abs_diff_max"] == pytest.approx(direct) and m["rollout/logprob_abs_diff_max"] < 1e-5


def test_stop_tokens_n_and_seeds(engine, hf_dir):
    base = SamplingParams(n=3, max_new_tokens=20, seed=5, ignore_eos=True)
    free = engine.generate(PROMPTS, base)
    # n > 1: samples of one prompt differ; same seed: same samples; other seed: different samples.
    assert len({tuple(s.output_ids) for s in free[0]}) > 1
    again = engine.generate(PROMPTS, base)
    assert [[s.output_ids for s in g] for g in again] == [[s.output_ids for s in g] for g in free]
    other = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=20, seed=6, ignore_eos=True))
    assert [[s.output_ids for s in g] for g in other] != [[s.output_ids for s in g] for g in free]
    assert all(s.finish_reason == "length" and len(s.output_ids) == 20 for g in free for s in g)
    # Stop on a token that occurs mid-way in the first sample: same prefix, ends at its first occurrence.
    stop = free[0][0].output_ids[7]
    stopped = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=20, seed=5, ignore_eos=True,
                                                      stop_token_ids=(stop,)))
    for g_free, g_stop in zip(free, stopped):
        for a, b in zip(g_free, g_stop):
            if stop in a.output_ids:
                k = a.output_ids.index(stop)
                assert b.output_ids == a.output_ids[:k + 1] and b.finish_reason == "stop" and b.matched_stop == stop
                assert b.logprobs == pytest.approx(a.logprobs[:k + 1], abs=1e-6)
            else:
                assert b.output_ids == a.output_ids and b.finish_reason == "length"
    # Batching does not change samples: tiny chunks (different padding) and mixed requests in one decode.
    small = EmbeddedEngine(engine.policy, engine.state, eos_token_ids=engine.eos_token_ids, max_batch_rows=2)
    assert [[s.output_ids for s in g] for g in small.generate(PROMPTS, base)] == \
        [[s.output_ids for s in g] for g in free]
    mixed = engine.generate_many([(PROMPTS, base), (PROMPTS[:2], SamplingParams(max_new_tokens=3, temperature=0.0))])
    assert [[s.output_ids for s in g] for g in mixed[0]] == [[s.output_ids for s in g] for g in free]
    greedy = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3, temperature=0.0))
    assert [[s.output_ids for s in g] for g in mixed[1]] == [[s.output_ids for s in g] for g in greedy]


def _tp_worker(rank, world, hf_dir):
    from megaent.parallel import init_parallel

    state = init_parallel(world, 1)
    eng = EmbeddedEngine.from_hf(hf_dir, state)
    greedy = eng.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0))
    sampled = eng.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, temperature=0.9, top_k=30, seed=2))
    return [[(s.output_ids, s.logprobs) for s in g] for g in greedy + sampled]


@pytest.mark.slow
def test_tensor_parallel_matches_single_rank(engine, hf_dir):
    results = run_ranks(_tp_worker, 2, str(hf_dir))
    assert results[0] == results[1], "TP ranks must draw identical samples in lockstep"
    ref = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0)) + \
        engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, temperature=0.9, top_k=30, seed=2))
    for g_tp, g_ref in zip(results[0], ref):
        for (ids, lps), s in zip(g_tp, g_ref):
            assert ids == s.output_ids
            torch.testing.assert_close(torch.tensor(lps), torch.tensor(s.logprobs), rtol=0, atol=1e-5)
