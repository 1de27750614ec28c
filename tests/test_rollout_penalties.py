"""Logit penalties, logit_bias and min_p of the embedded sampling path against independent references.

- `apply_penalties` / `PenaltyRows` against a plain per-row, per-token Python reimplementation of SGLang
  0.5.23's penalizers (penaltylib/frequency_penalty.py, presence_penalty.py, repetition_penalty.py: output
  tokens only; additive penalties, then the repetition scaling, then logit_bias), and against closed-form
  values on hand-written logits;
- the repetition penalty against HF `transformers`' `RepetitionPenaltyLogitsProcessor` fed the output tokens
  (its `input_ids`; SGLang does not count the prompt, so we pass none);
- min_p: the set of tokens `sample_next` can draw against HF's `MinPLogitsWarper` on logits / T, and the
  sampled frequencies against the renormalised distribution on that set (float64, plain Python);
- the embedded engine's decode loop (once SamplingParams carries the fields: `protocol.ENGINE_PENALTIES`)
  against a per-row greedy loop over a tiny random HF model's logits with the reference penalties, and
  sampled rows' tokens / log-probs against min_p and log softmax of the penalised logits of an HF forward.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_rollout_penalties.py
"""
import math

import pytest
import torch

from megaent.rollout.penalties import PenaltyRows, apply_penalties, dense_bias
from megaent.rollout.protocol import ENGINE_PENALTIES
from megaent.rollout.sampling import counter_uniform, row_keys, sample_next
from megaent.rollout.types import SamplingParams


def _ref_row(logits: list[float], output: list[int], *, rep: float, freq: float, pres: float,
             bias: dict) -> list[float]:
    """SGLang's penalizers for one row, one token at a time."""
    out = list(logits)
    for v in range(len(out)):
        c = output.count(v)
        if c:
            out[v] = out[v] - freq * c - pres
            out[v] = out[v] * rep if out[v] < 0 else out[v] / rep
        out[v] += bias.get(v, 0.0)
    return out


def test_closed_form_values():
    logits = torch.tensor([[2.0, -2.0, 0.5, 3.0]])
    counts = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
    out = apply_penalties(logits, counts, repetition=torch.tensor([2.0]), frequency=torch.tensor([0.5]),
                          presence=torch.tensor([0.25]))
    # token 0: (2 - 0.5 - 0.25) / 2; token 1: (-2 - 1 - 0.25) * 2; token 2 unseen; token 3: (3 - 1.5 - .25) / 2
    torch.testing.assert_close(out, torch.tensor([[0.625, -6.5, 0.5, 0.625]]), rtol=0, atol=1e-7)
    # An additive penalty that turns a positive logit negative makes the repetition penalty multiply.
    out = apply_penalties(torch.tensor([[0.4]]), torch.tensor([[1.0]]), repetition=torch.tensor([1.5]),
                          frequency=torch.tensor([1.0]), presence=torch.tensor([0.0]))
    torch.testing.assert_close(out, torch.tensor([[-0.9]]), rtol=0, atol=1e-6)


def test_penalty_rows_over_a_decode_match_per_row_reference():
    g = torch.Generator().manual_seed(0)
    b, v, steps = 5, 23, 9
    rep = [1.0, 1.3, 0.7, 2.0, 1.0]
    freq = [0.0, 0.5, -0.4, 1.2, 0.0]
    pres = [0.0, -1.0, 0.3, 2.0, 0.0]
    bias = [None, {3: 5.0, 0: -100.0}, {}, {22: 1.5}, {7: -0.25}]
    state = PenaltyRows.build(repetition=rep, frequency=freq, presence=pres, logit_bias=bias, vocab_size=v,
                              device=torch.device("cpu"))
    outputs: list[list[int]] = [[] for _ in range(b)]
    live = torch.tensor([True, True, True, False, True])  # row 3 finished at once: its counts must not move
    rows = torch.arange(b)
    for t in range(steps):
        logits = torch.randn(rows.numel(), v, generator=g) * 3
        got = state.apply(logits)
        for k, r in enumerate(rows.tolist()):
            ref = _ref_row(logits[k].tolist(), outputs[r], rep=rep[r], freq=freq[r], pres=pres[r], bias=bias[r] or {})
            torch.testing.assert_close(got[k], torch.tensor(ref), rtol=1e-6, atol=1e-5)
        tok = torch.randint(0, 6, (rows.numel(),), generator=g)  # a small range, so tokens repeat
        state.update(tok, live)
        for k, r in enumerate(rows.tolist()):
            if live[k]:
                outputs[r].append(int(tok[k]))
        if t == 4:  # batch compaction keeps rows 1, 2, 4 (the engine's `select`)
            idx = torch.tensor([1, 2, 4])
            state, rows, live = state.select(idx), rows[idx], live[idx]
    assert state.counts.shape == (3, v)


def test_repetition_penalty_matches_hf_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 40, generator=g) * 2
    outputs = [[1, 5, 5, 9], [0], [39, 2, 2, 2, 17], [3, 4]]
    penalties = [1.2, 0.8, 2.0, 1.0]
    counts = torch.zeros(4, 40)
    for r, ids in enumerate(outputs):
        for t in ids:
            counts[r, t] += 1
    ours = apply_penalties(logits, counts, repetition=torch.tensor(penalties), frequency=torch.zeros(4),
                           presence=torch.zeros(4))
    for r, (ids, p) in enumerate(zip(outputs, penalties)):
        ref = RepetitionPenaltyLogitsProcessor(penalty=p)(torch.tensor([ids]), logits[r:r + 1].clone())
        torch.testing.assert_close(ours[r:r + 1], ref, rtol=0, atol=0)  # the same two float ops: bit-equal


def test_penalty_rows_none_when_neutral_and_bias_only():
    dev = torch.device("cpu")
    assert PenaltyRows.build(repetition=[1.0, 1.0], frequency=[0.0, 0.0], presence=[0.0, 0.0],
                             logit_bias=[None, {}], vocab_size=8, device=dev) is None
    st = PenaltyRows.build(repetition=[1.0], frequency=[0.0], presence=[0.0], logit_bias=[{2: 3.0}],
                           vocab_size=4, device=dev)
    assert st is not None and not st.penalise
    st.update(torch.tensor([2]), torch.tensor([True]))  # no counts kept without a penalty
    torch.testing.assert_close(st.apply(torch.zeros(1, 4)), torch.tensor([[0.0, 0.0, 3.0, 0.0]]))
    assert dense_bias([None, {1: -2.0}], 3, dev).tolist() == [[0.0, 0.0, 0.0], [0.0, -2.0, 0.0]]


def _ref_min_p(logits: list[float], temperature: float, min_p: float) -> list[float]:
    z = [x / temperature for x in logits]
    m = max(z)
    p = [math.exp(x - m) for x in z]
    s = sum(p)
    p = [x / s for x in p]
    q = [x if x >= min_p * max(p) else 0.0 for x in p]
    s = sum(q)
    return [x / s for x in q]


@pytest.mark.parametrize("temperature,min_p", [(1.0, 0.05), (0.7, 0.2), (1.5, 0.5), (1.0, 1.0)])
def test_min_p_matches_hf_warper_and_reference_distribution(temperature, min_p):
    from transformers import MinPLogitsWarper

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(16, generator=g) * 1.5
    hf = MinPLogitsWarper(min_p=min_p)(torch.zeros(1, 1, dtype=torch.long), (logits / temperature)[None])[0]
    allowed = torch.isfinite(hf)
    n = 40000
    keys = row_keys(torch.full((n,), 1), torch.arange(n), torch.zeros(n, dtype=torch.long))
    tok, lp = sample_next(logits.expand(n, -1), temperature=torch.full((n,), temperature),
                          top_p=torch.ones(n), top_k=torch.full((n,), -1, dtype=torch.long),
                          uniform=counter_uniform(keys, 0), min_p=torch.full((n,), min_p))
    drawn = torch.zeros(16, dtype=torch.bool)
    drawn[tok] = True
    assert bool((drawn <= allowed).all()), "drew a token MinPLogitsWarper removes"
    freq = torch.bincount(tok, minlength=16).double() / n
    ref = torch.tensor(_ref_min_p(logits.tolist(), temperature, min_p), dtype=torch.float64)
    assert torch.equal(ref > 0, allowed), "the reference and HF disagree on the kept set"
    assert (freq - ref).abs().max() < 0.012, (freq, ref)  # 40k draws: > 4.5 standard errors
    # The returned log-prob is the untruncated log softmax(logits / T), as for top-p / top-k.
    torch.testing.assert_close(lp, torch.log_softmax(logits / temperature, -1)[tok], rtol=0, atol=1e-6)


def test_min_p_mixed_batch_and_off_rows():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 30, generator=g) * 2
    u = torch.rand(4, generator=g)
    kw = dict(temperature=torch.tensor([1.0, 0.8, 0.0, 1.0]), top_p=torch.tensor([1.0, 0.9, 1.0, 1.0]),
              top_k=torch.tensor([-1, -1, -1, 5]), uniform=u)
    tok0, lp0 = sample_next(logits, **kw)
    tok, lp = sample_next(logits, min_p=torch.tensor([0.0, 0.0, 0.3, 0.0]), **kw)
    # min_p = 0 rows (and the greedy row) draw exactly what they draw without min_p.
    assert torch.equal(tok, tok0) and torch.equal(lp, lp0)
    tok1, _ = sample_next(logits, min_p=torch.tensor([0.9, 0.0, 0.0, 0.0]), **kw)
    p = torch.softmax(logits[0], -1)
    assert float(p[tok1[0]]) >= 0.9 * float(p.max())


# ---------------------------------------------------------------- the embedded engine's decode loop
engine_ready = pytest.mark.skipif(not ENGINE_PENALTIES, reason="megaent.rollout.types.SamplingParams has no "
                                  "penalty fields yet (the embedded decode loop does not apply them)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hf_tiny import make_tiny_hf
    from transformers import AutoModelForCausalLM

    from megaent.parallel import init_parallel
    from megaent.rollout.embedded import EmbeddedEngine

    hf_dir = make_tiny_hf(tmp_path_factory.mktemp("pen") / "m", "qwen2", vocab_size=320, layers=2, seed=4)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return EmbeddedEngine.from_hf(hf_dir, init_parallel(1, 1)), model


def _hf_reference(model, prompt, n_new, *, temperature=0.0, **pen):
    """Greedy decode (or, given output ids, teacher forcing) with the per-row reference penalties on HF logits."""
    out, lps = [], []
    bias = dict(pen.pop("logit_bias", ()))
    for _ in range(n_new):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1].double()
        z = torch.tensor(_ref_row(logits.tolist(), out, rep=pen.get("repetition_penalty", 1.0),
                                  freq=pen.get("frequency_penalty", 0.0), pres=pen.get("presence_penalty", 0.0),
                                  bias=bias), dtype=torch.float64)
        t = int(z.argmax())
        out.append(t)
        lps.append(float(torch.log_softmax(z, -1)[t]))
    return out, lps


CASES = [  # (prompt, penalty options); greedy, 10 tokens, EOS ignored
    ([5, 17, 33, 8], dict(repetition_penalty=1.8)),
    ([40, 41], dict(frequency_penalty=1.5, presence_penalty=0.5)),
    ([7, 7, 9, 60, 61], dict(repetition_penalty=0.6, presence_penalty=-0.3)),
    ([99], dict(logit_bias=((3, 4.0), (17, -50.0)), repetition_penalty=1.3)),
    ([5, 17, 33, 8], dict()),
]


@engine_ready
def test_engine_greedy_with_penalties_matches_hf_reference(tiny):
    """One mixed batch (neutral and penalised rows, rows of different lengths, so compaction runs) against a
    per-row HF greedy loop with the Python reference penalties; log-probs are log softmax of the penalised
    logits (SGLang's)."""
    engine, model = tiny
    jobs = [([p], SamplingParams(max_new_tokens=10 - 3 * (k % 2), temperature=0.0, ignore_eos=True, **pen))
            for k, (p, pen) in enumerate(CASES)]
    got = engine.generate_many(jobs)
    plain = engine.generate([CASES[0][0]], SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True))
    for k, ((p, pen), out) in enumerate(zip(CASES, got)):
        s = out[0][0]
        ref_ids, ref_lps = _hf_reference(model, p, 10 - 3 * (k % 2), **pen)
        assert s.output_ids == ref_ids, (k, pen)
        # fp32 engine vs an fp64 softmax of HF's fp32 logits: forward summation order, ~1e-6
        torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64),
                                   torch.tensor(ref_lps, dtype=torch.float64), rtol=0, atol=2e-5)
    assert plain[0][0].output_ids != got[0][0][0].output_ids, "repetition_penalty=1.8 changed nothing"


@engine_ready
def test_engine_sampled_rows_with_min_p_and_penalties(tiny):
    """Sampled rows: each token is allowed by min_p on the penalised softmax(z / T) of an HF forward, and its
    log-prob is log softmax(z / T) there; the same seed gives the same samples alone or in a batch."""
    engine, model = tiny
    pen = dict(frequency_penalty=0.7, repetition_penalty=1.2, logit_bias=((9, 2.0),))
    params = SamplingParams(n=3, max_new_tokens=8, temperature=0.8, min_p=0.1, ignore_eos=True, seed=11, **pen)
    prompt = [5, 17, 33, 8]
    alone = engine.generate([prompt], params)[0]
    batched = engine.generate_many([([[40, 41]], SamplingParams(max_new_tokens=3)), ([prompt], params)])[1][0]
    assert [s.output_ids for s in alone] == [s.output_ids for s in batched]
    for s in alone:
        out = []
        for t, lp in zip(s.output_ids, s.logprobs):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + out])).logits[0, -1].double()
            z = torch.tensor(_ref_row(logits.tolist(), out, rep=1.2, freq=0.7, pres=0.0, bias={9: 2.0}),
                             dtype=torch.float64) / 0.8
            p = torch.softmax(z, -1)
            assert float(p[t]) >= 0.1 * float(p.max()) * (1 - 1e-5), "drew a token min_p removes"
            assert abs(float(torch.log_softmax(z, -1)[t]) - lp) < 2e-5
            out.append(t)
