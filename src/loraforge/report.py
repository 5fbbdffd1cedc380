"""What the eval job publishes: predictions, metrics, a Markdown report and a bar chart.

`metrics` (GSM8K; `humaneval.metrics` for code) is a pure function of the prediction rows (plus
the bootstrap's samples and seed), so `metrics.json` can be recomputed from `predictions.jsonl`.
Every adapter is compared with the first one listed, on the same problems: paired difference,
paired-bootstrap 95% interval, a paired test's p. The verdict says in words what those numbers
allow one to conclude.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraforge.stats import PairedDifference, paired_bootstrap, wilson_interval

MATCHES = ("strict", "flexible")
ALPHA = 0.05  # significance level of the verdict
_UNLIKELY = "A difference this large is unlikely to be chance."
MATCH_NAMES = {"strict": "strict-match", "flexible": "flexible-extract"}  # lm-eval's filter names


@dataclass(frozen=True)
class Prediction:
    """One problem under one adapter: a line of predictions.jsonl."""

    problem_id: int  # index of the problem in the eval data
    adapter: str  # the adapter's label
    output: str  # generated text, cut before the first stop string
    target: str  # reference answer, normalised
    strict: str | None  # `#### N` extraction; null where lm-eval says [invalid]
    flexible: str | None  # last-number extraction
    strict_correct: bool
    flexible_correct: bool
    output_tokens: int
    finish: str  # stop | eos | length
    shots: list[int]  # indices of the few-shot examples in the few-shot data

    def correct(self, match: str) -> bool:
        return self.strict_correct if match == "strict" else self.flexible_correct


@dataclass(frozen=True)
class CodePrediction:
    """One sample of one HumanEval problem under one adapter: a line of predictions.jsonl."""

    problem_id: int  # index of the problem in the eval data
    task_id: str
    adapter: str  # the adapter's label
    sample: int  # 0 .. n-1
    output: str  # the completion, cut before the first stop sequence
    passed: bool  # the program (prompt + completion + tests) ran to its end
    status: str  # passed | failed | timeout | killed
    detail: str  # the exception line, the limit hit or the signal
    exec_s: float  # wall seconds the program ran (shared by identical completions)
    output_tokens: int
    finish: str  # stop | eos | length


def write_predictions(path: Path, predictions: Sequence[Prediction | CodePrediction]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")


def read_predictions(path: Path) -> list[Prediction]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Prediction(**json.loads(line)) for line in lines if line.strip()]


def read_code_predictions(path: Path) -> list[CodePrediction]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [CodePrediction(**json.loads(line)) for line in lines if line.strip()]


# --- metrics ------------------------------------------------------------------------------------


def metrics(
    predictions: Sequence[Prediction],
    adapters: Sequence[tuple[str, str]],
    samples: int,
    seed: int,
) -> dict[str, Any]:
    """Per adapter accuracy with Wilson intervals; each adapter against the first.

    `adapters`: (label, uri) in the order given. Rows are paired by problem id.
    """
    by_adapter = {
        label: sorted((p for p in predictions if p.adapter == label), key=_pid)
        for label, _ in adapters
    }
    ids = [p.problem_id for p in by_adapter[adapters[0][0]]]
    for label, rows in by_adapter.items():
        if [p.problem_id for p in rows] != ids:
            raise ValueError(f"{label} was not scored on the same problems as {adapters[0][0]}")
    result: dict[str, Any] = {
        "problems": len(ids),
        "adapters": [_accuracy(label, uri, by_adapter[label]) for label, uri in adapters],
        "comparisons": [],
        "bootstrap": {"samples": samples, "seed": seed, "level": 0.95},
    }
    reference = adapters[0][0]
    for label, _ in adapters[1:]:
        row: dict[str, Any] = {"adapter": label, "reference": reference}
        for match in MATCHES:
            diff = paired_bootstrap(
                [p.correct(match) for p in by_adapter[reference]],
                [p.correct(match) for p in by_adapter[label]],
                samples,
                seed,
            )
            row[match] = _difference(diff)
        result["comparisons"].append(row)
    return result


def _pid(p: Prediction) -> int:
    return p.problem_id


def _accuracy(label: str, uri: str, rows: Sequence[Prediction]) -> dict[str, Any]:
    n = len(rows)
    out: dict[str, Any] = {"label": label, "uri": uri, "n": n}
    for match in MATCHES:
        k = sum(p.correct(match) for p in rows)
        low, high = wilson_interval(k, n)
        out[match] = {"correct": k, "accuracy": k / n, "ci95": [low, high]}
    out["mean_output_tokens"] = sum(p.output_tokens for p in rows) / n
    out["stopped_by_length"] = sum(p.finish == "length" for p in rows)
    return out


def _difference(d: PairedDifference) -> dict[str, Any]:
    return {
        "difference": d.difference,
        "ci95": [d.low, d.high],
        "only_reference_correct": d.only_reference,
        "only_adapter_correct": d.only_other,
        "mcnemar_p": d.p_value,
    }


# --- words --------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def verdict(m: dict[str, Any], match: str) -> list[str]:
    """One plain-language sentence per comparison (or about the single adapter)."""
    return _sentences(m, match, MATCH_NAMES[match], "accuracy", "mcnemar_p")


def code_verdict(m: dict[str, Any]) -> list[str]:
    """The same sentences about HumanEval's smallest pass@k (pass@1 unless LORAFORGE_PASS_K)."""
    key = f"pass@{m['k'][0]}"
    return _sentences(m, key, key, "estimate", "p_value")


def _sentences(m: dict[str, Any], match: str, name: str, value: str, p_key: str) -> list[str]:
    accuracy = {a["label"]: a[match][value] for a in m["adapters"]}
    if not m["comparisons"]:
        only = m["adapters"][0]
        return [
            f"**{only['label']}** solves {_pct(accuracy[only['label']])} of {m['problems']} "
            f"problems ({name}; 95% CI {_pct(only[match]['ci95'][0])} to "
            f"{_pct(only[match]['ci95'][1])}). List a second adapter to compare."
        ]
    lines = []
    for c in m["comparisons"]:
        d, ref, other = c[match], c["reference"], c["adapter"]
        numbers = (
            f"{_pct(accuracy[other])} vs {_pct(accuracy[ref])} ({name}), "
            f"{_pts(d['difference'])} points, 95% CI {_pts(d['ci95'][0])} to {_pts(d['ci95'][1])}, "
            f"{'McNemar ' if p_key == 'mcnemar_p' else ''}p = {d[p_key]:.3g}"
        )
        if d[p_key] < ALPHA and d["difference"] > 0:
            lines.append(f"**{other}** is better than **{ref}**: {numbers}. {_UNLIKELY}")
        elif d[p_key] < ALPHA and d["difference"] < 0:
            lines.append(f"**{other}** is worse than **{ref}**: {numbers}. {_UNLIKELY}")
        else:
            half = (d["ci95"][1] - d["ci95"][0]) / 2
            lines.append(
                f"**{other}** and **{ref}** cannot be told apart on these {m['problems']} "
                f"problems: {numbers}. Differences smaller than about {100 * half:.0f} points "
                "need more problems to show."
            )
    return lines


def markdown(m: dict[str, Any], setup: dict[str, Any], match: str, chart: str | None) -> str:
    lines = [f"# GSM8K evaluation ({m['problems']} problems)", "", *verdict(m, match), ""]
    lines += [
        "| adapter | strict-match | 95% CI | flexible-extract | 95% CI | cut by length |",
        "|---|---|---|---|---|---|",
    ]
    for a in m["adapters"]:
        cells = [f"`{a['label']}`"]
        for key in MATCHES:
            lo, hi = a[key]["ci95"]
            cells += [
                f"{_pct(a[key]['accuracy'])} ({a[key]['correct']}/{a['n']})",
                f"{_pct(lo)} - {_pct(hi)}",
            ]
        cells.append(str(a["stopped_by_length"]))
        lines.append("| " + " | ".join(cells) + " |")
    if m["comparisons"]:
        ref = m["comparisons"][0]["reference"]
        lines += ["", f"## Against `{ref}` (paired, same problems)", ""]
        lines += [
            "| adapter | match | difference (points) | 95% CI (paired bootstrap) | only "
            f"`{ref}` right | only adapter right | McNemar p |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in m["comparisons"]:
            for key in MATCHES:
                d = c[key]
                lines.append(
                    f"| `{c['adapter']}` | {MATCH_NAMES[key]} | {_pts(d['difference'])} | "
                    f"{_pts(d['ci95'][0])} to {_pts(d['ci95'][1])} | "
                    f"{d['only_reference_correct']} | {d['only_adapter_correct']} | "
                    f"{d['mcnemar_p']:.3g} |"
                )
    boot = m["bootstrap"]
    lines += [
        "",
        "## Setup",
        "",
        *(f"- {key}: `{value}`" for key, value in setup.items()),
        f"- intervals: Wilson score (accuracy); percentile paired bootstrap, {boot['samples']} "
        f"resamples, seed {boot['seed']} (difference); exact two-sided McNemar test",
        "- adapters: " + ", ".join(f"`{a['label']}` = `{a['uri']}`" for a in m["adapters"]),
    ]
    if chart:
        lines += ["", f"![accuracy with 95% intervals]({chart})"]
    return "\n".join(lines) + "\n"


def code_markdown(m: dict[str, Any], setup: dict[str, Any], chart: str | None) -> str:
    """The HumanEval report: verdict, pass@k table, paired comparisons, setup."""
    n = m["samples_per_problem"]
    head = f"# HumanEval evaluation ({m['problems']} problems, {n} sample{'s' * (n > 1)} each)"
    keys = [f"pass@{k}" for k in m["k"]]
    lines = [head, "", *code_verdict(m), ""]
    lines.append(
        "| adapter | "
        + " | ".join(f"{key} | 95% CI" for key in keys)
        + " | problems solved | samples passed | timed out / killed | cut by length |"
    )
    lines.append("|---|" + "---|---|" * len(keys) + "---|---|---|---|")
    for a in m["adapters"]:
        cells = [f"`{a['label']}`"]
        for key in keys:
            lo, hi = a[key]["ci95"]
            cells += [_pct(a[key]["estimate"]), f"{_pct(lo)} - {_pct(hi)}"]
        out = a["outcomes"]
        cells += [
            f"{a['problems_solved']}/{a['n']}",
            f"{out['passed']}/{a['samples']}",
            f"{out['timeout']} / {out['killed']}",
            str(a["stopped_by_length"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if m["comparisons"]:
        ref = m["comparisons"][0]["reference"]
        lines += ["", f"## Against `{ref}` (paired, same problems)", ""]
        lines += [
            "| adapter | metric | difference (points) | 95% CI (paired bootstrap) | problems "
            f"`{ref}` better | problems adapter better | p | test |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in m["comparisons"]:
            for key in keys:
                d = c[key]
                lines.append(
                    f"| `{c['adapter']}` | {key} | {_pts(d['difference'])} | "
                    f"{_pts(d['ci95'][0])} to {_pts(d['ci95'][1])} | {d['reference_better']} | "
                    f"{d['adapter_better']} | {d['p_value']:.3g} | {d['test']} |"
                )
    boot = m["bootstrap"]
    interval = "Wilson score" if n == 1 else "percentile bootstrap over problems"
    lines += [
        "",
        "## Setup",
        "",
        *(f"- {key}: `{value}`" for key, value in setup.items()),
        f"- pass@k: the unbiased estimator of Chen et al. (2021) from {n} sample"
        f"{'s' * (n > 1)} per problem; intervals: {interval} (pass@k), percentile paired "
        f"bootstrap (difference), {boot['samples']} resamples, seed {boot['seed']}",
        "- adapters: " + ", ".join(f"`{a['label']}` = `{a['uri']}`" for a in m["adapters"]),
    ]
    if chart:
        lines += ["", f"![pass@k with 95% intervals]({chart})"]
    return "\n".join(lines) + "\n"


# --- chart --------------------------------------------------------------------------------------


def bar_chart(m: dict[str, Any], path: Path) -> None:
    """Grouped bars (strict, flexible) per adapter with 95% Wilson error bars, as a PNG."""
    series = [(key, MATCH_NAMES[key], "accuracy") for key in MATCHES]
    title = f"GSM8K, {m['problems']} problems (95% Wilson intervals)"
    _grouped_bars(m, series, "accuracy (%)", title, path)


def pass_chart(m: dict[str, Any], path: Path) -> None:
    """Grouped bars (one per k) of pass@k per adapter with their 95% intervals, as a PNG."""
    series = [(f"pass@{k}", f"pass@{k}", "estimate") for k in m["k"]]
    title = f"HumanEval, {m['problems']} problems, n={m['samples_per_problem']} (95% intervals)"
    _grouped_bars(m, series, "pass@k (%)", title, path)


def _grouped_bars(
    m: dict[str, Any], series: Sequence[tuple[str, str, str]], ylabel: str, title: str, path: Path
) -> None:
    """One group of bars per adapter, one bar per (key, legend, value field) with error bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod
    import matplotlib.pyplot as plt

    labels = [a["label"] for a in m["adapters"]]
    width = 0.76 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(labels) + 1.5), 3.6), dpi=120)
    for number, (key, legend, field) in enumerate(series):
        offset = (number - (len(series) - 1) / 2) * width
        values = [100 * a[key][field] for a in m["adapters"]]
        err = [
            [100 * max(0.0, a[key][field] - a[key]["ci95"][0]) for a in m["adapters"]],
            [100 * max(0.0, a[key]["ci95"][1] - a[key][field]) for a in m["adapters"]],
        ]
        xs = [i + offset for i in range(len(labels))]
        bars = ax.bar(xs, values, width, yerr=err, capsize=4, label=legend)
        ax.bar_label(bars, fmt="%.1f", label_type="center", fontsize="small", color="white")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=len(series), frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
