"""Reusable reward functions (TRL's calling convention, see rlhf_fast/trainers/rewards.py); no dependencies.

- ``answer_match``: 1.0 when a completion's answer equals the dataset's ``answer`` column (numerically when the
  answer is a number, else as normalised text), 0.0 otherwise, None where the row has no answer.
- ``regex_format(pattern)``: builds a function giving 1.0 when the whole completion matches ``pattern``.

From YAML: ``reward_funcs: ["rlhf_fast.rewards:answer_match"]``; a format check with your own pattern is one line
in a ``.py`` file (``my_format = regex_format(r"...")``) named as ``"my_rewards.py:my_format"``.
"""
from __future__ import annotations

import math
import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _as_number(value):
    """``value`` as a float when it is a number or a string holding exactly one number, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(",", "")
        if NUMBER.fullmatch(text):
            return float(text)
    return None


def _normalise(text: str) -> str:
    return " ".join(str(text).lower().split()).rstrip(" .")


def answer_match(completions: list[str], answer: list, **kwargs) -> list:
    """Exact-match / numeric answer check against the ``answer`` column.

    Numeric answers (numbers, or strings holding one number) compare with the **last** number in the completion
    (``"3 + 4 = 7"`` answers 7), equal within ``1e-6`` relative; other answers compare as text, case and spacing
    ignored and a final period dropped. A row whose answer is None gets None (no score from this function).
    """
    scores = []
    for completion, expected in zip(completions, answer):
        if expected is None:
            scores.append(None)
            continue
        target = _as_number(expected)
        if target is None:
            scores.append(float(_normalise(completion) == _normalise(expected)))
            continue
        found = NUMBER.findall(completion.replace(",", ""))
        value = float(found[-1]) if found else None
        scores.append(float(value is not None and math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-9)))
    return scores


def regex_format(pattern: str, *, flags: int = re.DOTALL, name: str = "format"):
    """A reward function giving 1.0 to completions that match ``pattern`` as a whole (after stripping outer
    whitespace), else 0.0; named ``name`` in the logs."""
    compiled = re.compile(pattern, flags)

    def reward(completions: list[str], **kwargs) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    reward.__name__ = name
    reward.__qualname__ = name
    return reward
