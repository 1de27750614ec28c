"""Final-answer extraction from a model response (pure string functions).

Three answer forms are recognised, in this order of preference:
1. the LAST `\\boxed{...}` (or `\\fbox{...}`), braces matched so nested groups
   such as `\\boxed{\\frac{1}{2}}` come out whole;
2. the last `Answer: ...` line (case-insensitive; the rest of that line);
3. the last `#### ...` line (GSM8K style).

The idea of scanning for the last box with a brace counter follows the MATH
benchmark's `last_boxed_only_string` (Hendrycks et al. 2021); written here.
"""
from __future__ import annotations

import re
from typing import Optional

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_LINE = re.compile(r"(?im)^[ \t*]*(?:final\s+)?answer\s*[:：][ \t]*(.+?)[ \t]*$")
_HASH_LINE = re.compile(r"(?m)^[ \t]*####[ \t]*(.+?)[ \t]*$")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, or None.

    Braces are counted so nested groups survive; an unclosed box returns None.
    `\\boxed 5` (no braces, one token) is accepted as "5".
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    if i < len(text) and text[i] == " ":  # "\boxed 5"
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{" and text[j - 1] != "\\":
            depth += 1
        elif ch == "}" and text[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def extract_answer(text: str) -> Optional[str]:
    """The final answer in a response, or None when no answer form is present.

    Preference: last box, then last `Answer:` line, then last `####` line.
    Surrounding `$` and a trailing period are removed from line answers.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_ANSWER_LINE, _HASH_LINE):
        found = pattern.findall(text)
        if found:
            ans = found[-1].strip()
            ans = ans.rstrip(".").strip()
            if len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$":
                ans = ans.strip("$").strip()
            inner = last_boxed(ans)
            return inner if inner is not None else (ans or None)
    return None


def ground_truth_answer(text: str) -> str:
    """The answer in a ground-truth field: the last box if it has one, else the text itself.

    Lets MATH `solution` fields (a worked solution ending in a box) and plain
    answers (DAPO `reward_model.ground_truth`, MATH `answer`) share one path.
    """
    boxed = last_boxed(text)
    return boxed if boxed is not None else text.strip()
