"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): problems,
prompts, programs, pass@k and its statistics.

A problem is a function signature with its docstring (`prompt`), unit tests defining
`check(candidate)` (`test`) and the function's name (`entry_point`). The model continues the
prompt; the completion is cut before the first stop sequence (`\\ndef `, `\\nclass `,
`\\nif __name__`, `\\nprint(`, `\\n#`: a new top-level statement), and the program
`prompt + completion + test + check(entry_point)` passes when it runs to its end in the sandbox
(`loraforge.sandbox`). Prompts are the raw `prompt` text, with the tokenizer's default special
tokens as for GSM8K; no chat template.

pass@k is the unbiased estimator of the paper: with n samples of which c pass,
pass@k = 1 - C(n - c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i) (no huge
binomials), averaged over problems. Intervals: Wilson for n = 1 (pass@1 is then a plain
proportion, as GSM8K accuracy), else a percentile bootstrap over problems. Each adapter is
compared with the first on the same problems: the paired bootstrap interval of the difference,
and the exact McNemar test for n = 1, else a paired sign-flip permutation test of the mean
per-problem difference (as many random sign patterns as bootstrap resamples).

For the eval job (`loraforge.eval`), `execute` runs each distinct (problem, completion) program
once in the sandbox, however many samples or adapters produced it, and `write_outputs` writes
`predictions.jsonl` (one row per sample), `metrics.json`, `report.md` and `pass_at_k.png`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loraforge import report, sandbox
from loraforge.data import read_located
from loraforge.errors import PermanentError
from loraforge.report import CodePrediction
from loraforge.settings import EvalSettings
from loraforge.stats import mcnemar_exact, wilson_interval

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from loraforge.adapters import Adapter
    from loraforge.engines import Generation

log = logging.getLogger("loraforge.humaneval")
CHART = "pass_at_k.png"
STOP_STRINGS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
FIELDS = ("task_id", "prompt", "test", "entry_point")
_MAX_REPORTED = 3  # bad records named in one error message
_DRAWS_PER_CHUNK = 2**22  # resampled indices held at once, as stats.bootstrap_differences


@dataclass(frozen=True)
class Problem:
    """One HumanEval task: `index` is its position in the eval data (stable under a subset)."""

    index: int
    task_id: str
    prompt: str
    test: str
    entry_point: str
    where: str  # `humaneval.jsonl:3`, for messages


# --- data ---------------------------------------------------------------------------------------


def load_problems(uri: str, *, limit: int | None, seed: int) -> list[Problem]:
    """Every record checked (the four fields as non-empty strings, a Python name as entry
    point, a `check` function in the test, distinct task ids); then the subset."""
    records, locations = read_located(uri, "LORAFORGE_EVAL_DATA")
    problems, bad = [], []
    seen: dict[str, str] = {}
    for index, (record, where) in enumerate(zip(records, locations, strict=True)):
        problem = _problem(index, record, where)
        if isinstance(problem, str):
            bad.append(problem)
        elif problem.task_id in seen:
            bad.append(f"{where}: task_id {problem.task_id!r} also at {seen[problem.task_id]}")
        else:
            seen[problem.task_id] = where
            problems.append(problem)
    if bad:
        more = f" (and {len(bad) - _MAX_REPORTED} more)" if len(bad) > _MAX_REPORTED else ""
        raise PermanentError("; ".join(bad[:_MAX_REPORTED]) + more)
    if limit is None or limit >= len(problems):
        return problems
    # the same draw as the GSM8K subset (gsm8k.subset)
    chosen = random.Random(f"loraforge-eval-subset-{seed}").sample(range(len(problems)), limit)
    return [problems[i] for i in sorted(chosen)]


def _problem(index: int, record: dict[str, Any], where: str) -> Problem | str:
    """A Problem, or the one-line reason the record cannot be scored."""
    missing = [k for k in FIELDS if not (isinstance(record.get(k), str) and record[k].strip())]
    if missing:
        return (
            f"{where}: no {' or '.join(missing)} (keys: {', '.join(sorted(record))}): HumanEval "
            "records need task_id, prompt, test and entry_point strings"
        )
    entry = record["entry_point"].strip()
    if not entry.isidentifier():
        return f"{where}: entry_point {entry!r} is not a Python function name"
    if "def check(" not in record["test"]:
        return f"{where}: the test defines no `check(candidate)` function: HumanEval tests do"
    return Problem(index, record["task_id"], record["prompt"], record["test"], entry, where)


# --- prompts and programs -----------------------------------------------------------------------


def encode_prompt(problem: Problem, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The prompt's token ids, with the tokenizer's default special tokens (BOS for Llama)."""
    return list(tokenizer(problem.prompt)["input_ids"])


def program(problem: Problem, completion: str) -> str:
    """What runs in the sandbox, as human-eval's `check_correctness` builds it."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


# --- pass@k -------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: n samples, c of them pass (Chen et al. 2021, Fig. 3)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k holds a passing sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i): a product of numbers in (0, 1]
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def resampled_means(values: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """`samples` means of `values` (problems,) resampled with replacement, as
    `stats.bootstrap_differences` draws them (same generator, same order): for 0/1 values and
    their differences the two agree exactly."""
    n = len(values)
    rng = np.random.default_rng(seed)
    out = np.empty(samples, dtype=np.float64)
    per_chunk = max(1, _DRAWS_PER_CHUNK // n)
    for start in range(0, samples, per_chunk):
        rows = min(per_chunk, samples - start)
        index = rng.integers(0, n, size=(rows, n))  # (rows, n)
        out[start : start + rows] = values[index].sum(axis=1) / n
    return out


def sign_flip_p(differences: np.ndarray, samples: int, seed: int) -> float:
    """Two-sided paired permutation p of mean(differences) = 0: under the null each problem's
    difference is as likely negated, so flip signs at random and count means at least as far
    from 0; (1 + count) / (1 + samples) keeps it a valid p."""
    observed = abs(differences.mean())
    if not np.any(differences):
        return 1.0
    rng = np.random.default_rng([seed, 1])
    n = len(differences)
    extreme = 0
    per_chunk = max(1, _DRAWS_PER_CHUNK // n)
    for start in range(0, samples, per_chunk):
        rows = min(per_chunk, samples - start)
        signs = rng.integers(0, 2, size=(rows, n)) * 2 - 1  # (rows, n) in {-1, 1}
        means = np.abs((signs * differences).sum(axis=1) / n)
        extreme += int(np.sum(means >= observed - 1e-12))
    return (1 + extreme) / (1 + samples)


def _interval(values: np.ndarray, binary: bool, samples: int, seed: int) -> list[float]:
    if binary:
        return list(wilson_interval(int(values.sum()), len(values)))
    low, high = np.quantile(resampled_means(values, samples, seed), [0.025, 0.975])
    return [float(low), float(high)]


# --- metrics ------------------------------------------------------------------------------------


def passes_by_problem(
    predictions: Sequence[CodePrediction], adapters: Sequence[tuple[str, str]]
) -> tuple[list[int], dict[str, np.ndarray], int]:
    """(problem ids, {label: passing samples per problem (problems,)}, samples per problem),
    checking that every adapter has the same problems and samples."""
    counts: dict[str, dict[int, list[bool]]] = {label: {} for label, _ in adapters}
    for p in predictions:
        counts[p.adapter].setdefault(p.problem_id, []).append(bool(p.passed))
    reference = adapters[0][0]
    ids = sorted(counts[reference])
    n = len(counts[reference][ids[0]]) if ids else 0
    for label, by_problem in counts.items():
        if sorted(by_problem) != ids or any(len(v) != n for v in by_problem.values()):
            raise ValueError(f"{label} was not scored on the same problems and samples")
    passed = {
        label: np.array([sum(by_problem[i]) for i in ids], dtype=np.int64)
        for label, by_problem in counts.items()
    }
    return ids, passed, n


def metrics(
    predictions: Sequence[CodePrediction],
    adapters: Sequence[tuple[str, str]],
    ks: Sequence[int],
    samples: int,
    seed: int,
) -> dict[str, Any]:
    """pass@k per adapter with 95% intervals, each adapter against the first: a pure function of
    the prediction rows (`report.CodePrediction`), so metrics.json can be recomputed."""
    ids, passed, n = passes_by_problem(predictions, adapters)
    per_problem = {
        label: {k: np.array([pass_at_k(n, int(c), k) for c in counts]) for k in ks}
        for label, counts in passed.items()
    }
    binary = n == 1
    result: dict[str, Any] = {
        "task": "humaneval",
        "problems": len(ids),
        "samples_per_problem": n,
        "k": list(ks),
        "adapters": [],
        "comparisons": [],
        "bootstrap": {"samples": samples, "seed": seed, "level": 0.95},
    }
    for label, uri in adapters:
        mine = [p for p in predictions if p.adapter == label]
        entry: dict[str, Any] = {"label": label, "uri": uri, "n": len(ids), "samples": len(mine)}
        for k in ks:
            values = per_problem[label][k]
            entry[f"pass@{k}"] = {
                "estimate": float(values.mean()),
                "ci95": _interval(values, binary, samples, seed),
            }
        entry["problems_solved"] = int(np.sum(passed[label] > 0))
        entry["outcomes"] = {
            s: sum(p.status == s for p in mine) for s in ("passed", "failed", "timeout", "killed")
        }
        entry["mean_output_tokens"] = sum(p.output_tokens for p in mine) / max(1, len(mine))
        entry["stopped_by_length"] = sum(p.finish == "length" for p in mine)
        result["adapters"].append(entry)
    reference = adapters[0][0]
    for label, _ in adapters[1:]:
        row: dict[str, Any] = {"adapter": label, "reference": reference}
        for k in ks:
            ref, other = per_problem[reference][k], per_problem[label][k]
            row[f"pass@{k}"] = _compare(ref, other, binary, samples, seed)
        result["comparisons"].append(row)
    return result


def _compare(
    ref: np.ndarray, other: np.ndarray, binary: bool, samples: int, seed: int
) -> dict[str, Any]:
    d = other - ref  # (problems,)
    low, high = np.quantile(resampled_means(d, samples, seed), [0.025, 0.975])
    b, c = int(np.sum(ref > other)), int(np.sum(other > ref))
    return {
        "difference": float(d.mean()),
        "ci95": [float(low), float(high)],
        "reference_better": b,  # problems; for n = 1 McNemar's b and c
        "adapter_better": c,
        "p_value": mcnemar_exact(b, c) if binary else sign_flip_p(d, samples, seed),
        "test": "exact McNemar" if binary else "paired sign-flip permutation",
    }


# --- scoring ------------------------------------------------------------------------------------


def score(
    problems: Sequence[Problem],
    adapters: Sequence[Adapter],
    generations: dict[str, list[Generation]],
    n: int,
    limits: sandbox.Limits,
    workers: int | None,
    on_done: Callable[[int, int], None] | None = None,
    rows: Sequence[tuple[int, int]] | None = None,
) -> list[CodePrediction]:
    """Run every completion's program in the sandbox and make one row per sample.

    `generations[label]` holds the completions of `rows` ((problem position, sample), in that
    order; default: every problem's n samples, as the engines return them). A program is run
    once however often it was generated (greedy runs under several adapters, repeated samples
    at a low temperature): its row records the same outcome each time.
    `on_done(finished, total)` reports the executions.
    """
    if rows is None:
        rows = [(i, j) for i in range(len(problems)) for j in range(n)]
    index: dict[tuple[int, str], int] = {}  # (problem position, completion) -> program
    sources: list[str] = []
    for adapter in adapters:
        for (i, _), gen in zip(rows, generations[adapter.label], strict=True):
            if (i, gen.text) not in index:
                index[i, gen.text] = len(sources)
                sources.append(program(problems[i], gen.text))
    total = len(sources)
    results = sandbox.run_many(
        sources, limits, workers, None if on_done is None else lambda done: on_done(done, total)
    )
    scored = []
    for adapter in adapters:
        for (i, j), gen in zip(rows, generations[adapter.label], strict=True):
            result = results[index[i, gen.text]]
            scored.append(
                CodePrediction(
                    problem_id=problems[i].index,
                    task_id=problems[i].task_id,
                    adapter=adapter.label,
                    sample=j,
                    output=gen.text,
                    passed=result.passed,
                    status=result.status,
                    detail=result.detail,
                    exec_s=round(result.wall_s, 3),
                    output_tokens=gen.tokens,
                    finish=gen.finish,
                )
            )
    return scored


# --- the eval job's part ------------------------------------------------------------------


def execute(
    settings: EvalSettings,
    problems: Sequence[Problem],
    adapters: Sequence[Adapter],
    generations: dict[str, list[Generation]],
    isolation: sandbox.Isolation,
    rows: Sequence[tuple[int, int]] | None = None,
) -> tuple[list[CodePrediction], dict[str, Any]]:
    """Run every distinct completion's program in the sandbox; (rows, what ran and how).
    `rows`: as `score` (a shard's part of the problems and samples)."""
    limits = sandbox.Limits(settings.sandbox_timeout, settings.sandbox_memory_mb)
    workers = settings.sandbox_workers or sandbox.default_workers()
    started = last = time.monotonic()

    def on_done(finished: int, total: int) -> None:
        nonlocal last
        if finished == total or time.monotonic() - last >= 10.0:
            last = time.monotonic()
            log.info(
                f"executed {finished}/{total} programs",
                extra={"event": "execution", "step": finished},
            )

    log.info(f"running the completions' programs in the sandbox, {workers} at a time")
    n = settings.samples
    scored = score(problems, adapters, generations, n, limits, workers, on_done, rows)
    programs = len({(r.problem_id, r.output) for r in scored})
    ran = {
        "isolation": isolation.description,
        "timeout_s": limits.timeout,
        "cpu_s": limits.cpu_seconds,
        "memory_mb": limits.memory_mb,
        "processes": limits.processes,
        "workers": workers,
        "programs": programs,
        "samples": len(scored),
        "wall_s": round(time.monotonic() - started, 1),
    }
    return scored, ran


def write_outputs(
    out: Path,
    settings: EvalSettings,
    problems: int,
    labels: Sequence[tuple[str, str]],
    rows: Sequence[CodePrediction],
    ran: dict[str, Any],
    engine: str,
) -> dict[str, Any]:
    """predictions.jsonl, metrics.json, report.md and pass_at_k.png in `out`; the metrics.
    `problems`: how many were scored; `labels`: (label, URI) per adapter, in order."""
    m = metrics(rows, labels, settings.ks, settings.bootstrap_samples, settings.seed)
    m |= {
        "profile": settings.profile_name,
        "temperature": settings.sampling_temperature,
        "top_p": settings.sampling_top_p,
        "max_new_tokens": settings.new_tokens,
        "engine": engine,
        "sandbox": ran,
    }
    report.write_predictions(out / "predictions.jsonl", rows)
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    report.pass_chart(m, out / CHART)
    setup = setup_summary(settings, problems, ran, engine)
    markdown = report.code_markdown(m, setup, CHART)
    (out / "report.md").write_text(markdown)
    return m


def setup_summary(
    settings: EvalSettings, problems: int, ran: dict[str, Any], engine: str
) -> dict[str, Any]:
    """The report's Setup list: what was asked, generated and run, and how."""
    limit = settings.eval_limit
    temperature = settings.sampling_temperature
    decoding = (
        "greedy"
        if temperature == 0
        else f"{settings.samples} samples per problem at temperature {temperature:g}, top-p "
        f"{settings.sampling_top_p:g}, seed {settings.seed}"
    )
    return {
        "base model": settings.base_model,
        "eval data": settings.data,
        "problems": f"{problems}"
        + (f" (LORAFORGE_EVAL_LIMIT={limit}, seed {settings.seed})" if limit else ""),
        "profile": settings.profile_name,
        "decoding": decoding,
        "stop": ", ".join(repr(s) for s in STOP_STRINGS) + ", or an end token",
        "max new tokens": settings.new_tokens,
        "engine": engine,
        "sandbox": f"{ran['isolation']}; {ran['timeout_s']:g} s wall, {ran['cpu_s']} s CPU, "
        f"{ran['memory_mb']} MiB, {ran['processes']} processes per program; {ran['programs']} "
        f"distinct programs for {ran['samples']} samples, {ran['workers']} at a time, "
        f"{ran['wall_s']:g} s",
    }
