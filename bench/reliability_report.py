"""RELIABILITY.md's tables from the figures the fault suite recorded.

    RELIABILITY_DIR=.loraforge/reliability make test-faults
    .venv/bin/python bench/reliability_report.py .loraforge/reliability

The suite (tests/test_faults.py, test_store_faults.py, test_bad_inputs.py, test_secrets.py,
test_load.py) appends one JSON line per case to `$RELIABILITY_DIR/<topic>.jsonl`; this prints
them as markdown: bad input -> exit code -> message; the kill-and-resume matrix per method and
store (points, lost steps, SIGTERM to exit); edit/eval restarts; store faults; the secrets scan;
peak RSS at two sizes and their ratio.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def rows(root: Path, topic: str) -> list[dict[str, Any]]:
    path = root / f"{topic}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_TMP = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/")


def cell(text: object) -> str:
    """Table-safe text; pytest's temporary directories shortened to `…/`."""
    return _TMP.sub("…/", str(text)).replace("|", "\\|").replace("\n", " ")


def bad_inputs(root: Path) -> list[str]:
    out = ["| # | job | case | exit | message (the one error line) |", "|---|---|---|---|---|"]
    for number, row in enumerate(rows(root, "bad_inputs"), start=1):
        message = cell(row["message"])
        out.append(f"| {number} | {row['job']} | {cell(row['case'])} | {row['code']} | {message} |")
    return out


def kill_resume(root: Path) -> list[str]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows(root, "kill_resume"):
        groups[(row["method"], row["store"])].append(row)
    out = [
        "| method | store | faults | SIGKILL | SIGTERM | steps redone | SIGTERM -> exit |",
        "|---|---|---|---|---|---|---|",
    ]
    everything: list[dict[str, Any]] = []
    for (method, store), group in sorted(groups.items()):
        everything += group
        out.append(_kill_line(method, "S3" if store == "s3" else "local", group))
    out.append(_kill_line("**all**", "", everything))
    return out


def _kill_line(method: str, store: str, group: list[dict[str, Any]]) -> str:
    kills = sum(r["fault"].startswith("kill") for r in group)
    terms = [r for r in group if r["fault"].startswith("term")]
    lost = max((r.get("lost_steps", 0) for r in group), default=0)
    grace = [r["grace_s"] for r in terms if "grace_s" in r]
    grace_text = f"{max(grace):.2f} s (median {statistics.median(grace):.2f})" if grace else "-"
    return f"| {method} | {store} | {len(group)} | {kills} | {len(terms)} | {lost} | {grace_text} |"


def job_restarts(root: Path) -> list[str]:
    out = ["| job | fault | exit |", "|---|---|---|"]
    out += [f"| {r['job']} | `{r['fault']}` | {r['code']} |" for r in rows(root, "job_restart")]
    return out


def store_faults(root: Path) -> list[str]:
    out = ["| fault | outcome |", "|---|---|"]
    out += [f"| {cell(r['case'])} | {cell(r['outcome'])} |" for r in rows(root, "store_faults")]
    return out


def secrets(root: Path) -> list[str]:
    out = ["| scan | runs | S3 objects | files | canaries found |", "|---|---|---|---|---|"]
    for r in rows(root, "secrets"):
        out.append(
            f"| {r['scan']} | {r['runs']} | {r.get('objects', '-')} | {r.get('files', '-')} | 0 |"
        )
    return out


def load(root: Path) -> list[str]:
    out = ["| scale | what | sizes | peak RSS (MiB) | ratio |", "|---|---|---|---|---|"]
    for r in rows(root, "load"):
        peaks = " -> ".join(f"{p / 1024:.0f}" for p in r["peak_kib"])
        out.append(f"| {r['scale']} | {r['what']} | {r['sizes']} | {peaks} | {r['ratio']:.2f} |")
    return out


SECTIONS = {
    "Bad inputs": bad_inputs,
    "Kill-and-resume matrix (train)": kill_resume,
    "Edit and eval killed and restarted": job_restarts,
    "Store faults": store_faults,
    "Secrets scan": secrets,
    "Load": load,
}


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    root = Path(args[0] if args else ".loraforge/reliability")
    for title, render in SECTIONS.items():
        print(f"### {title}\n")
        print("\n".join(render(root)) + "\n")


if __name__ == "__main__":
    main()
