"""Prompt datasets: jsonl / parquet files and the synthetic task, one interface.

A dataset is a `Sequence[Prompt]`: `len(ds)`, `ds[i]`. Rows are read and
tokenized once at construction; rows whose prompt is longer than
`max_prompt_len` tokens are dropped and counted (`n_filtered`).

Field paths are dotted (`reward_model.ground_truth`), which covers the common
layouts:
- DAPO-Math: `prompt` = list of chat messages, answer at
  `reward_model.ground_truth` (`apply_chat_template=True`).
- MATH: `problem` + `solution` (the last `\\boxed{}` is the answer) or `answer`.
- plain: `prompt` string + `answer` string.

A malformed row raises `DataError` naming the file, the line (jsonl, 1-based)
or row (parquet, 0-based), the missing or bad field, and the fix.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from megaent.rewards.extract import ground_truth_answer
from megaent.rewards.synthetic import TASKS

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A prompt file or row cannot be used; the message names where and how to fix it."""


@dataclass(frozen=True)
class Prompt:
    """One prompt ready for rollout."""

    index: int
    """Stable id: row number in the source (after nothing; filtered rows keep their numbers)."""
    text: str
    """Prompt text as the policy sees it (chat template applied when asked)."""
    ids: tuple[int, ...]
    """Token ids of `text` [S] (bos included when the tokenizer adds one)."""
    answer: str
    """Ground-truth answer for the verifier."""


def get_field(row: Any, path: str, *, where: str) -> Any:
    """`row[a][b]...` for a dotted `path` 'a.b'; DataError naming `where` when a part is missing."""
    node = row
    for i, part in enumerate(path.split(".")):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            got = ".".join(path.split(".")[:i]) or "<row>"
            raise DataError(
                f"{where}: missing field {path!r} (no {part!r} in {got}; it has {have}); "
                "fix the row or set data.prompt_key / data.answer_key to the right dotted path"
            )
        node = node[part]
    return node


def read_rows(path: Union[str, Path]) -> Iterator[tuple[str, dict]]:
    """(location, row) for each row of a .jsonl or .parquet file; location = 'file:line N' / 'file row N'."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data.path={str(p)!r}: file not found; give a .jsonl or .parquet prompt file")
    if p.suffix == ".jsonl":
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{p}:line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
                yield where, row
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(p).to_pylist()):
            yield f"{p} row {n}", row
    else:
        raise DataError(f"data.path={str(p)!r}: unknown suffix {p.suffix!r}; use .jsonl or .parquet")


def _prompt_text(value: Any, *, tokenizer: Any, chat: bool, where: str, key: str) -> str:
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        messages = value
        if not chat:
            raise DataError(
                f"{where}: field {key!r} is a list of chat messages; set data.apply_chat_template=true"
            )
    else:
        raise DataError(
            f"{where}: field {key!r} must be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}: {str(value)[:60]!r}"
        )
    if not chat:
        return value
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("data.apply_chat_template=true but the tokenizer has no chat template; set it to false")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class PromptDataset(Sequence[Prompt]):
    """Prompts from a .jsonl or .parquet file.

    Args:
        path: prompt file.
        tokenizer: HF tokenizer (`__call__`, `apply_chat_template`).
        prompt_key / answer_key: dotted field paths.
        max_prompt_len: prompts with more tokens are dropped and counted.
        apply_chat_template: wrap with the tokenizer's chat template (required
            for message-list prompts; a string prompt becomes one user message).
    """

    def __init__(
        self,
        path: Union[str, Path],
        *,
        tokenizer: Any,
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        max_prompt_len: int = 512,
        apply_chat_template: bool = False,
    ) -> None:
        self.path = str(path)
        self._items: list[Prompt] = []
        self.n_rows = 0
        self.n_filtered = 0
        """Rows dropped because their prompt exceeds max_prompt_len tokens."""
        for where, row in read_rows(path):
            index = self.n_rows
            self.n_rows += 1
            value = get_field(row, prompt_key, where=where)
            answer = get_field(row, answer_key, where=where)
            if not isinstance(answer, (str, int, float)):
                raise DataError(f"{where}: field {answer_key!r} must be a string or number, got {type(answer).__name__}")
            text = _prompt_text(value, tokenizer=tokenizer, chat=apply_chat_template, where=where, key=prompt_key)
            # A chat template already writes the special tokens it wants.
            ids = tokenizer(text, add_special_tokens=not apply_chat_template).input_ids
            if len(ids) > max_prompt_len:
                self.n_filtered += 1
                continue
            self._items.append(Prompt(index, text, tuple(ids), ground_truth_answer(str(answer))))
        if self.n_filtered:
            log.info("%s: %d of %d prompts longer than %d tokens filtered out", self.path, self.n_filtered, self.n_rows, max_prompt_len)
        if not self._items:
            raise DataError(
                f"{self.path}: no usable prompts ({self.n_rows} rows, {self.n_filtered} longer than "
                f"max_prompt_len={max_prompt_len}); raise data.max_prompt_len or check the file"
            )

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Prompt:  # type: ignore[override]
        return self._items[i]


class SyntheticPrompts(Sequence[Prompt]):
    """The synthetic task as a dataset: prompt i is task.problem(i), tokenized lazily.

    Args:
        task: a task object with `problem(i) -> (prompt, answer)` (e.g. ArithTask).
        tokenizer: HF tokenizer (the task's own, `megaent.data.tokenizer`).
        size: number of prompts (problems are generated on demand, so size is cheap).
    """

    def __init__(self, task: Any, *, tokenizer: Any, size: int = 100_000) -> None:
        if size < 1:
            raise ValueError(f"SyntheticPrompts size={size}: must be >= 1")
        self.task = task
        self.tokenizer = tokenizer
        self.size = size
        self.n_rows = size
        self.n_filtered = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Prompt:  # type: ignore[override]
        if not 0 <= i < self.size:
            raise IndexError(i)
        text, answer = self.task.problem(i)
        return Prompt(i, text, tuple(self.tokenizer(text).input_ids), answer)


def build_prompts(cfg: Any, *, tokenizer: Any, seed: int = 0, size: Optional[int] = None) -> Sequence[Prompt]:
    """Dataset for a `DataConfig`: the file at cfg.path, or the synthetic task cfg.task with operands of up to
    cfg.task_max_digits digits (`seed` seeds its problem stream; a file ignores it)."""
    if cfg.path:
        return PromptDataset(
            cfg.path,
            tokenizer=tokenizer,
            prompt_key=cfg.prompt_key,
            answer_key=cfg.answer_key,
            max_prompt_len=cfg.max_prompt_len,
            apply_chat_template=cfg.apply_chat_template,
        )
    if cfg.task not in TASKS:
        raise DataError(f"data.task={cfg.task!r}: unknown synthetic task; choose one of {sorted(TASKS)} or set data.path")
    return SyntheticPrompts(TASKS[cfg.task](max_digits=cfg.task_max_digits, seed=seed), tokenizer=tokenizer,
                            size=size or 100_000)
