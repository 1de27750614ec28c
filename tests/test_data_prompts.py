"""Prompt datasets, batching/resume, tokenizer round trip, group filter.

References: fixture rows read back with pyarrow / json directly and the
tokenizer called directly (length filter); an uninterrupted loader (resume);
raw `tokenizers.Tokenizer` and `AutoTokenizer` on the saved folder with a
llama config.json (round trip); integer arithmetic (synthetic task); plain
Python counting (group filter).

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_data_prompts.py -q
"""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megaent.config.schema import DataConfig
from megaent.data import (
    DataError, PromptDataset, PromptLoader, SyntheticPrompts, build_prompts, build_task_tokenizer,
    fill_batch, filter_groups, save_task_tokenizer,
)
from megaent.data.tokenizer import build_raw_tokenizer
from megaent.rewards.synthetic import ArithTask, score_exact

FIX = Path(__file__).parent / "fixtures"
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.fixture(scope="module")
def tok():
    t = build_task_tokenizer()
    t.chat_template = CHAT
    return t


def test_parquet_dapo_layout_with_chat_template_and_length_filter(tok):
    rows = pq.read_table(FIX / "dapo_math.parquet").to_pylist()
    texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    lens = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
    limit = sorted(lens)[-2]  # drops exactly the rows longer than the second-longest
    ds = PromptDataset(FIX / "dapo_math.parquet", tokenizer=tok, prompt_key="prompt",
                       answer_key="reward_model.ground_truth", max_prompt_len=limit, apply_chat_template=True)
    keep = [i for i, n in enumerate(lens) if n <= limit]
    assert ds.n_rows == len(rows) and ds.n_filtered == len(rows) - len(keep) >= 1
    assert [p.index for p in ds] == keep
    assert [p.answer for p in ds] == [rows[i]["reward_model"]["ground_truth"] for i in keep]
    assert [p.text for p in ds] == [texts[i] for i in keep]
    assert ds[0].text.startswith("<|user|>What is $1+1$?") and ds[0].text.endswith("<|assistant|>")
    with pytest.raises(DataError, match="apply_chat_template=true"):
        PromptDataset(FIX / "dapo_math.parquet", tokenizer=tok, answer_key="reward_model.ground_truth")


def test_jsonl_math_layout_boxed_solution(tok):
    rows = [json.loads(line) for line in (FIX / "math.jsonl").read_text().splitlines()]
    ds = PromptDataset(FIX / "math.jsonl", tokenizer=tok, prompt_key="problem", answer_key="solution")
    assert len(ds) == len(rows) and ds.n_filtered == 0
    assert [p.text for p in ds] == [r["problem"] for r in rows]
    assert [p.answer for p in ds] == ["5", "\\frac{1}{2}", "(-1,1)", "\\{1,2\\}", "3\\text{ cm}", "56"]
    assert list(ds[0].ids) == tok(rows[0]["problem"]).input_ids  # bos added without a chat template


def test_malformed_rows_name_file_line_and_field(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2="}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:line 3: missing field 'answer'"):
        PromptDataset(bad, tokenizer=tok)
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:line 2: not valid JSON"):
        PromptDataset(bad, tokenizer=tok)
    bad.write_text('{"prompt": 5, "answer": "2"}\n')
    with pytest.raises(DataError, match=r"line 1: field 'prompt' must be a string"):
        PromptDataset(bad, tokenizer=tok)
    pbad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "1+1=", "reward_model": {"ground_truth": "2"}},
        {"prompt": "2+2=", "reward_model": {"ground_truth": None}},
    ]), pbad)
    with pytest.raises(DataError, match=r"bad.parquet row 1: missing field 'reward_model.ground_truth'"):
        PromptDataset(pbad, tokenizer=tok, answer_key="reward_model.ground_truth")
    with pytest.raises(DataError, match="unknown suffix"):
        PromptDataset(tmp_path / "x.csv", tokenizer=tok) if (tmp_path / "x.csv").write_text("a") else None
    with pytest.raises(DataError, match="no usable prompts"):
        PromptDataset(FIX / "math.jsonl", tokenizer=tok, prompt_key="problem", answer_key="solution", max_prompt_len=1)


def _ids(batch):
    return [p.index for p in batch]


def test_loader_resume_is_exact_and_epochs_reshuffle(tok):
    ds = SyntheticPrompts(ArithTask(seed=3), tokenizer=tok, size=10)
    ref = PromptLoader(ds, batch_size=4, seed=5)
    full = [_ids(ref.next_batch()) for _ in range(7)]  # 2 batches per epoch (tail of 2 skipped)
    for epoch in range(3):
        seen = full[2 * epoch] + full[2 * epoch + 1]
        assert len(set(seen)) == 8  # no repeats inside an epoch
    assert full[0] + full[1] != full[2] + full[3]  # a new permutation each epoch
    for k in range(6):
        a = PromptLoader(ds, batch_size=4, seed=5)
        for _ in range(k):
            a.next_batch()
        state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint as JSON
        b = PromptLoader(ds, batch_size=4, seed=5)
        b.load_state_dict(state)
        assert _ids(b.next_batch()) == full[k]
    with pytest.raises(ValueError, match="seed=5 but this loader has seed=6"):
        PromptLoader(ds, batch_size=4, seed=6).load_state_dict(state)
    plain = PromptLoader(ds, batch_size=5, shuffle=False)
    assert _ids(plain.next_batch()) == [0, 1, 2, 3, 4]


def test_synthetic_task_dataset_and_reward(tok):
    cfg = DataConfig()
    ds = build_prompts(cfg, tokenizer=tok, seed=1, size=50)
    again = build_prompts(cfg, tokenizer=tok, seed=1, size=50)
    other = build_prompts(cfg, tokenizer=tok, seed=2, size=50)
    assert [p.text for p in ds] == [p.text for p in again] != [p.text for p in other]
    for p in ds:
        a, b = p.text.rstrip("=").split("+")
        assert int(p.answer) == int(a) + int(b) and len(p.answer) == len(a) + 1
        assert list(p.ids) == tok(p.text).input_ids
        assert score_exact(p.answer, p.answer) == (1.0, True)
        assert score_exact(str(int(p.answer) + 1), p.answer)[0] == 0.0
    natural = ArithTask(max_digits=3, fixed_width=False, seed=0)
    for i in range(50):
        prompt, ans = natural.problem(i)
        a, b = prompt.rstrip("=").split("+")
        assert ans == str(int(a) + int(b)) and not (len(a) > 1 and a[0] == "0")
    with pytest.raises(DataError, match="data.task='nope'"):
        build_prompts(DataConfig(task="nope"), tokenizer=tok)


def test_tokenizer_round_trip_under_autotokenizer(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig

    ours = save_task_tokenizer(tmp_path)
    LlamaConfig(vocab_size=len(ours), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, bos_token_id=ours.bos_token_id, eos_token_id=ours.eos_token_id,
                pad_token_id=ours.pad_token_id).save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    raw = build_raw_tokenizer()
    texts = ["12+345=", "07+24=031", "1 2\n3", "(8-1)*2/7=", "", "x+1=?"]
    for t in texts:
        ids = raw.encode(t).ids
        assert auto(t).input_ids == ours(t).input_ids == ids
        assert ids[0] == auto.bos_token_id
        if set(t) <= set("0123456789+-*/=() \n"):
            assert auto.decode(ids, skip_special_tokens=True) == t  # round trip
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id)
    assert auto.decode([auto.eos_token_id]) == "</s>"
    assert auto(["1=", "12+3="], padding=True).input_ids[0][:3] == [auto.pad_token_id] * 3  # left padding


def test_group_filter_and_fill_batch():
    groups = ["a", "b", "c", "d"]
    rewards = [[1, 1, 1], [0, 1, 0], [0.0, 0.0], [0.5]]
    assert filter_groups(groups, rewards) == ["b"]

    calls = []
    stream = iter(range(1000))

    def sample_more(n_missing, rnd):
        calls.append((n_missing, rnd))
        ids = [next(stream) for _ in range(4)]
        return ids, [[0, 1] if i % 3 == 0 else [1, 1] for i in ids]  # every third group informative

    res = fill_batch(sample_more, target=3, max_tries=10)
    expect = [i for i in range(1000) if i % 3 == 0][:3]
    assert res.groups == expect and res.full
    # round 0 samples 0..3 (keeps 0, 3), round 1 samples 4..7 (keeps 6): full after 2 rounds
    assert calls == [(3, 0), (1, 1)] and res.rounds == 2 and res.sampled == 8 and res.kept == 3
    trim = fill_batch(lambda n, r: ([10, 11, 12], [[0, 1], [1, 0], [1, 1]]), target=1, max_tries=3)
    assert trim.groups == [10] and trim.kept == 2 and trim.rounds == 1 and trim.full
    dry = fill_batch(lambda n, r: ([r], [[1, 1]]), target=2, max_tries=4)
    assert dry.groups == [] and dry.rounds == 4 and not dry.full and dry.metrics()["group_filter/batch_full"] == 0.0
    # Filter off: uninformative groups are kept too and one round fills the batch.
    off = fill_batch(lambda n, r: ([20, 21, 22], [[1, 1], [0, 1], [1]]), target=3, max_tries=1, drop_uninformative=False)
    assert off.groups == [20, 21, 22] and off.full and off.rounds == 1 and off.metrics()["group_filter/kept_frac"] == 1.0
