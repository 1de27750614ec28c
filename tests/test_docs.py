"""docs/howto-cluster.md's dataset sections, run on the fixtures of the same layout: each `# data: ...`
YAML block of the page is loaded with megaent's config loader (data.path pointed at
tests/fixtures/dapo_math.parquet or math.jsonl) and read with megaent's PromptDataset; the prompts and answers
must be those read from the fixture directly (pyarrow / json). Also: docs link only to files that exist.

    OMP_NUM_THREADS=1 python -m pytest tests/test_docs.py -q
"""
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from megaent.config import load_config
from megaent.data import PromptDataset, build_task_tokenizer

REPO = Path(__file__).resolve().parents[1]
HOWTO = REPO / "docs" / "howto-cluster.md"
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def yaml_block(title: str) -> dict:
    blocks = re.findall(r"```yaml\n(.*?)```", HOWTO.read_text(), flags=re.S)
    (block,) = [b for b in blocks if b.startswith(f"# data: {title}")]
    return yaml.safe_load(block)


def dataset(section: dict, fixture: Path, tmp_path: Path) -> PromptDataset:
    section = {**section, "data": {**section["data"], "path": str(fixture)}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(section))
    cfg = load_config(tmp_path / "c.yaml").data
    assert load_config(tmp_path / "c.yaml").reward.kind == "math"
    tok = build_task_tokenizer()
    tok.chat_template = CHAT
    return PromptDataset(cfg.path, tokenizer=tok, prompt_key=cfg.prompt_key, answer_key=cfg.answer_key,
                         max_prompt_len=cfg.max_prompt_len, apply_chat_template=cfg.apply_chat_template)


def test_dapo_math_section_reads_the_dapo_layout(tmp_path: Path) -> None:
    fixture = REPO / "tests" / "fixtures" / "dapo_math.parquet"
    ds = dataset(yaml_block("DAPO-Math layout"), fixture, tmp_path)
    rows = pq.read_table(fixture).to_pylist()
    assert len(ds) == len(rows)
    assert [p.answer for p in ds] == [r["reward_model"]["ground_truth"] for r in rows]
    assert ds[0].text.startswith("<|user|>" + rows[0]["prompt"][0]["content"])


def test_math_section_reads_the_math_layout(tmp_path: Path) -> None:
    fixture = REPO / "tests" / "fixtures" / "math.jsonl"
    ds = dataset(yaml_block("MATH layout"), fixture, tmp_path)
    rows = [json.loads(line) for line in fixture.read_text().splitlines()]
    assert [p.text for p in ds] == [r["problem"] for r in rows]
    assert ds[0].answer == "5"  # the worked example's comment


@pytest.mark.parametrize("page", sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"], ids=lambda p: p.name)
def test_links_resolve_and_no_machine_paths(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
    assert "../shared" not in text and "/work/" not in text
