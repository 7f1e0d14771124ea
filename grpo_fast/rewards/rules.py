"""Reward functions.

Every reward has TRL's signature::

    f(prompts, completions, completion_ids, **columns) -> list[float | None]

`prompts` and `completions` are strings (or chat message lists for conversational data),
`completion_ids` lists of token ids, and every other dataset column arrives as a keyword
list aligned with the completions. `None` means "no reward for this sample": the trainer
leaves it out of the group statistics and gives it advantage 0.

Ready-made rule rewards in the style of DeepSeekMath / DeepSeek-R1:
    accuracy_reward  -- 1.0 when the final answer (\\boxed{...}, <answer>...</answer>, or the
                        last number) equals the `answer` / `solution` column, compared numerically
    format_reward    -- 1.0 when the completion has the <think>...</think><answer>...</answer> shape
    boxed_format_reward -- 1.0 when the completion has a \\boxed{...} answer
    soft_overlong_punishment(L_max, L_cache) -- DAPO's soft length penalty (0 down to -1)
(rewards/model.py holds RewardModel, a sequence-classification model used as a reward function.)
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, List, Optional, Sequence

__all__ = [
    "accuracy_reward", "format_reward", "boxed_format_reward", "make_format_reward",
    "extract_boxed", "extract_final_number", "extract_answer", "parse_number", "answers_match",
    "soft_overlong_punishment",
]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _text(x: Any) -> str:
    """Completion text: a string, or the content of the last message of a chat completion."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        return str(x.get("content", ""))
    if isinstance(x, (list, tuple)) and x:
        return _text(x[-1])
    return "" if x is None else str(x)


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (nested braces allowed), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = text.find("{", start)
        if i == -1:
            return None
        depth, j = 0, i
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
            j += 1
        start = text.rfind("\\boxed", 0, start)  # unbalanced: try an earlier one
    return None


def extract_final_number(text: str) -> Optional[str]:
    """The last number in `text` ("1,234", "-3.5", "3/4" count), or None."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def extract_answer(text: str) -> Optional[str]:
    """The final answer: \\boxed{} first, then <answer></answer>, then the last number."""
    text = _text(text)
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    return extract_final_number(text)


def parse_number(s: Any) -> Optional[float]:
    """A float from "42", "1,000", "-3.5", "3/4", "\\frac{3}{4}", "$5", "50\\%"; None if not a number."""
    if s is None:
        return None
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    t = str(s).strip()
    t = _FRAC.sub(r"(\1)/(\2)", t)
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,", " ", "{", "}", "\\text"):
        t = t.replace(junk, "")
    t = t.replace(",", "").strip().rstrip(".")
    t = t.replace("(", "").replace(")", "")
    if not t:
        return None
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            return float(Fraction(num) / Fraction(den))
        return float(t)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: Optional[str], reference: Any, *, rel_tol: float = 1e-6) -> bool:
    """Numeric comparison when both parse as numbers, else a whitespace-insensitive string match."""
    if predicted is None or reference is None:
        return False
    ref = str(reference)
    if predicted == ref:
        return True
    ref_boxed = extract_boxed(ref)
    if ref_boxed is not None:
        ref = ref_boxed
    a, b = parse_number(predicted), parse_number(ref)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)
    if b is not None and a is None:
        # the reference is a number but the prediction is an expression: use its final number
        a = parse_number(extract_final_number(predicted))
        return a is not None and math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)
    norm = lambda x: re.sub(r"\s+", "", x).lower()  # noqa: E731
    return norm(predicted) == norm(ref)


def accuracy_reward(prompts: Sequence[Any], completions: Sequence[Any], completion_ids=None, *,
                    answer: Optional[Sequence[Any]] = None, solution: Optional[Sequence[Any]] = None,
                    **columns) -> List[Optional[float]]:
    """1.0 when the completion's final answer equals the reference answer, else 0.0.

    The reference comes from the `answer` column (or `solution`, TRL's name); a sample whose
    reference is missing gets None (no reward).
    """
    refs = answer if answer is not None else solution
    if refs is None:
        raise ValueError("accuracy_reward needs an 'answer' (or 'solution') column in the dataset")
    out: List[Optional[float]] = []
    for completion, ref in zip(completions, refs):
        if ref is None or (isinstance(ref, float) and math.isnan(ref)):
            out.append(None)
            continue
        out.append(1.0 if answers_match(extract_answer(completion), ref) else 0.0)
    return out


THINK_ANSWER = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


def make_format_reward(pattern: str = THINK_ANSWER, name: str = "format_reward"):
    """A reward that is 1.0 when the whole completion matches `pattern` (re.DOTALL), else 0.0."""
    regex = re.compile(pattern, re.DOTALL)

    def reward(prompts, completions, completion_ids=None, **columns) -> List[float]:
        return [1.0 if regex.match(_text(c)) else 0.0 for c in completions]

    reward.__name__ = name
    reward.__qualname__ = name
    return reward


format_reward = make_format_reward(THINK_ANSWER, "format_reward")
format_reward.__doc__ = "1.0 when the completion is <think>...</think><answer>...</answer> (DeepSeek-R1's format)."


def boxed_format_reward(prompts, completions, completion_ids=None, **columns) -> List[float]:
    """1.0 when the completion states its answer in \\boxed{...}, else 0.0."""
    return [1.0 if extract_boxed(_text(c)) is not None else 0.0 for c in completions]


class _SoftOverlongPunishment:
    """Callable object (not a closure) so it pickles; see soft_overlong_punishment."""

    __name__ = "soft_overlong_punishment"

    def __init__(self, max_completion_length: int, soft_punish_cache: int):
        self.max_completion_length = int(max_completion_length)
        self.soft_punish_cache = int(soft_punish_cache)

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> List[float]:
        if completion_ids is None:
            raise ValueError("soft_overlong_punishment needs completion_ids (the token ids of each completion)")
        start = self.max_completion_length - self.soft_punish_cache  # lengths up to here are not punished
        out = []
        for ids in completion_ids:
            n = len(ids)
            if n <= start:
                out.append(0.0)
            elif n <= self.max_completion_length:
                out.append((start - n) / self.soft_punish_cache)  # linear from 0 to -1 over the cache
            else:
                out.append(-1.0)
        return out

    def __repr__(self) -> str:
        return f"soft_overlong_punishment({self.max_completion_length}, {self.soft_punish_cache})"


def soft_overlong_punishment(max_completion_length: int, soft_punish_cache: int):
    """DAPO's soft overlong punishment (eq. 13), as TRL's get_soft_overlong_punishment.

    A reward function of the completion length |y| in tokens (len(completion_ids[i]), EOS
    included): 0 for |y| <= L_max - L_cache, (L_max - L_cache - |y|) / L_cache inside the last
    L_cache tokens (0 down to -1), -1 above L_max. It only punishes; add it to a task reward.
    Use max_completion_length = the config's, soft_punish_cache = 0 for a hard -1 above L_max.
    """
    if isinstance(max_completion_length, bool) or int(max_completion_length) != max_completion_length \
            or max_completion_length <= 0:
        raise ValueError(f"max_completion_length={max_completion_length!r}: expected an integer > 0")
    if isinstance(soft_punish_cache, bool) or int(soft_punish_cache) != soft_punish_cache \
            or not 0 <= soft_punish_cache <= max_completion_length:
        raise ValueError(f"soft_punish_cache={soft_punish_cache!r}: expected an integer in [0, max_completion_length]")
    return _SoftOverlongPunishment(max_completion_length, soft_punish_cache)
