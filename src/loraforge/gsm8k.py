r"""GSM8K the way lm-eval-harness scores it (task `gsm8k`, version 3): problems, prompts, answers.

Prompt: `num_fewshot` worked examples `Question: {q}\nAnswer: {a}` separated by a blank line,
then `Question: {q}\nAnswer:`; generation is greedy and stops at `Question:` or an end token.
Two extractions from the generated text, exactly lm-eval's filters:

- strict: the first match of `#### (\-?[0-9\.\,]+)`;
- flexible: the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`.

An extraction is correct when it equals the reference after both pass lm-eval's
`regexes_to_ignore` (`,`, `\$`, `(?s).*#### `, `\.$`) and lower-casing: so `$1,000.` matches
`1000` but `72.0` does not match `72`. The reference is the text after the last `#### `.

Few-shot examples are drawn per problem from a seeded generator keyed by the problem's index
(lm-eval draws a fresh random set per problem too, rather than always the first k), so a
problem's prompt does not depend on which other problems are scored; a problem whose question
is in the few-shot pool never sees itself.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraforge.data import QA_PROMPT, read_located
from loraforge.errors import PermanentError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE_PATTERNS = (",", r"\$", r"(?s).*#### ", r"\.$")
STOP_STRINGS = ("Question:",)
SHOT_SEPARATOR = "\n\n"
_STRICT = re.compile(STRICT_PATTERN)
_FLEXIBLE = re.compile(FLEXIBLE_PATTERN)
_IGNORE = tuple(re.compile(p) for p in IGNORE_PATTERNS)
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_MAX_REPORTED = 3  # bad records named in one error message


@dataclass(frozen=True)
class Problem:
    """One scored question: `index` is its position in the eval data (stable under a subset)."""

    index: int
    question: str
    answer: str
    target: str  # normalised reference number
    where: str  # `test.jsonl:3`, for messages


@dataclass(frozen=True)
class Shot:
    question: str
    answer: str


# --- extraction and scoring ---------------------------------------------------------------------


def extract_strict(text: str) -> str | None:
    """lm-eval `strict-match`: the first `#### N`; None where lm-eval says `[invalid]`."""
    found = _STRICT.findall(text)
    return str(found[0]).strip() if found else None


def extract_flexible(text: str) -> str | None:
    """lm-eval `flexible-extract`: the last number-like run (group_select -1)."""
    found = _FLEXIBLE.findall(text)
    if not found:
        return None
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else None


def normalize(text: str) -> str:
    """lm-eval's exact_match preprocessing: drop `,`, `$`, everything up to the last `#### `
    and one trailing `.`, then lower-case."""
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def is_correct(extracted: str | None, target: str) -> bool:
    return extracted is not None and normalize(extracted) == normalize(target)


def cut_at_stop(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """The generation up to (not including) the first stop string, as lm-eval's `until`."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def reference_number(answer: str) -> str | None:
    """The normalised number after the last `#### `, or None when there is none."""
    if "#### " not in answer:
        return None
    target = normalize(answer).strip()
    return target if _NUMBER.fullmatch(target) else None


# --- data ---------------------------------------------------------------------------------------


def load_problems(uri: str, *, limit: int | None, seed: int) -> list[Problem]:
    """Every record checked (question and answer strings, a `#### N` answer); then the subset."""
    records, locations = read_located(uri, "LORAFORGE_EVAL_DATA")
    problems, bad = [], []
    for index, (record, where) in enumerate(zip(records, locations, strict=True)):
        problem = _problem(index, record, where)
        if isinstance(problem, str):
            bad.append(problem)
        else:
            problems.append(problem)
    if bad:
        more = f" (and {len(bad) - _MAX_REPORTED} more)" if len(bad) > _MAX_REPORTED else ""
        raise PermanentError("; ".join(bad[:_MAX_REPORTED]) + more)
    return subset(problems, limit, seed)


def _problem(index: int, record: dict[str, Any], where: str) -> Problem | str:
    """A Problem, or the one-line reason the record cannot be scored."""
    missing = [k for k in ("question", "answer") if not isinstance(record.get(k), str)]
    if missing:
        return (
            f"{where}: no string {' or '.join(missing)} (keys: {', '.join(sorted(record))}): "
            "eval records need question and answer"
        )
    target = reference_number(record["answer"])
    if target is None:
        tail = record["answer"].strip().splitlines()[-1:] or [""]
        return (
            f"{where}: the answer has no final `#### N` number (ends {tail[0][-40:]!r}): end "
            "each answer with a line like `#### 42`"
        )
    return Problem(index, record["question"], record["answer"], target, where)


def subset(problems: list[Problem], limit: int | None, seed: int) -> list[Problem]:
    """`limit` problems drawn with `seed`, in their original order; all when `limit` is None."""
    if limit is None or limit >= len(problems):
        return problems
    chosen = sorted(
        random.Random(f"loraforge-eval-subset-{seed}").sample(range(len(problems)), limit)
    )
    return [problems[i] for i in chosen]


def load_shots(uri: str) -> list[Shot]:
    records, locations = read_located(uri, "LORAFORGE_FEWSHOT_DATA")
    shots = []
    for record, where in zip(records, locations, strict=True):
        if not (isinstance(record.get("question"), str) and isinstance(record.get("answer"), str)):
            raise PermanentError(
                f"{where}: few-shot records need question and answer strings "
                f"(keys: {', '.join(sorted(record))})"
            )
        shots.append(Shot(record["question"], record["answer"]))
    return shots


def default_fewshot_uri(eval_data: str) -> str:
    """The `train` split beside an `hf://` eval split (lm-eval's fewshot_split), else the eval
    data itself."""
    if not eval_data.startswith("hf://"):
        return eval_data
    dataset, _, _ = eval_data.removeprefix("hf://").rpartition("/")
    return f"hf://{dataset}/train"


class ShotSampler:
    """Draws `k` pool examples per problem, seeded by (seed, problem index), never one with the
    problem's own question (the pool may be the eval data itself)."""

    def __init__(self, pool: Sequence[Shot], k: int, seed: int) -> None:
        self.pool, self.k, self.seed = pool, k, seed
        self._by_question: dict[str, list[int]] = {}
        for i, shot in enumerate(pool):
            self._by_question.setdefault(shot.question.strip(), []).append(i)

    def draw(self, problem: Problem) -> list[int]:
        if self.k == 0:
            return []
        own = set(self._by_question.get(problem.question.strip(), ()))
        if len(self.pool) - len(own) < self.k:
            raise PermanentError(
                f"LORAFORGE_NUM_FEWSHOT={self.k}: the few-shot pool has only "
                f"{len(self.pool) - len(own)} examples besides {problem.where}: lower it or give "
                "a larger LORAFORGE_FEWSHOT_DATA"
            )
        rng = random.Random(f"loraforge-eval-shots-{self.seed}-{problem.index}")
        # k + |own| distinct draws always leave k that are not the problem itself
        drawn = rng.sample(range(len(self.pool)), self.k + len(own))
        return [i for i in drawn if i not in own][: self.k]


# --- prompts ------------------------------------------------------------------------------------


def shot_text(shot: Shot) -> str:
    """One worked example, as lm-eval renders it (target delimiter: one space)."""
    return QA_PROMPT.format(question=shot.question) + " " + shot.answer


def plain_prompt(problem: Problem, shots: Sequence[Shot]) -> str:
    parts = [shot_text(s) for s in shots] + [QA_PROMPT.format(question=problem.question)]
    return SHOT_SEPARATOR.join(parts)


def chat_messages(problem: Problem, shots: Sequence[Shot]) -> list[dict[str, str]]:
    """lm-eval's `--apply_chat_template --fewshot_as_multiturn`: each example a user turn and
    its answer the assistant's reply."""
    messages = []
    for shot in shots:
        messages.append({"role": "user", "content": QA_PROMPT.format(question=shot.question)})
        messages.append({"role": "assistant", "content": shot.answer})
    messages.append({"role": "user", "content": QA_PROMPT.format(question=problem.question)})
    return messages


def encode_prompt(
    problem: Problem,
    shots: Sequence[Shot],
    tokenizer: PreTrainedTokenizerBase,
    chat: bool,
) -> list[int]:
    """Token ids the engines generate from (both engines get the same ids).

    Plain text takes the tokenizer's default special tokens (BOS for Llama), as lm-eval's HF
    model and the train job do; a chat template places its own.
    """
    if not chat:
        return list(tokenizer(plain_prompt(problem, shots))["input_ids"])
    text = tokenizer.apply_chat_template(
        chat_messages(problem, shots), tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
