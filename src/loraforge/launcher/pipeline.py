"""`loraforge pipeline --adapter URI`: edit an adapter, score it against the edited one, gate.

The two jobs are the ones users run by hand: the edit spec (default `jobs/edit.env`) with
LORAFORGE_ADAPTER set to the adapter, then the eval spec (default `jobs/eval.env`) with
LORAFORGE_ADAPTERS set to `<adapter>,<edited adapter>`, both under one run id. In a cluster
(the default) each is rendered, submitted and waited for like `loraforge submit` + `wait`;
with `--local` each runs as a local process with the same env vars (the laptop backend, as
Kubeflow's SDK has one). Then the eval's `metrics.json` is read back from the store and the gate
applied to the paired difference edited - input on the eval's metric:

- it fails when the edited adapter is significantly worse: the 95% paired-bootstrap interval of
  the difference lies wholly below zero;
- with `--min-gain G` (accuracy points, e.g. 0.02) it also fails when the difference is below G.

Exit codes: 0 gate passed, 1 gate failed, 2 bad input, else the failing job's exit code.
Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import EXIT_OK, PermanentError
from loraforge.settings import JOB_SETTINGS, load_settings, read_env_file
from loraforge.settings.base import new_run_id

log = logging.getLogger("loraforge.pipeline")

EXIT_GATE_FAILED = 1


@dataclass(frozen=True)
class Gate:
    """The comparison of the edited adapter with its input, and whether it passes."""

    metric: str
    input_accuracy: float
    edited_accuracy: float
    difference: float
    ci95: tuple[float, float]
    mcnemar_p: float
    min_gain: float | None

    @property
    def significantly_worse(self) -> bool:
        return self.ci95[1] < 0

    @property
    def passed(self) -> bool:
        if self.significantly_worse:
            return False
        return self.min_gain is None or self.difference >= self.min_gain

    def verdict(self) -> str:
        diff = f"{100 * self.difference:+.1f} points (95% CI {100 * self.ci95[0]:+.1f} to "
        diff += f"{100 * self.ci95[1]:+.1f}, McNemar p={self.mcnemar_p:.3g})"
        if self.significantly_worse:
            return f"FAIL: the edit is significantly worse than its input: {diff}"
        if not self.passed:
            return f"FAIL: the edit gains {diff}, below the required {100 * self.min_gain:+.1f}"  # type: ignore[operator]
        return f"PASS: edited - input = {diff}"


def gate_from_metrics(metrics: dict[str, Any], metric: str, min_gain: float | None) -> Gate:
    """The gate on `metrics.json` of an eval of [input, edited] (edited compared with input)."""
    adapters, comparisons = metrics.get("adapters", []), metrics.get("comparisons", [])
    if len(adapters) != 2 or len(comparisons) != 1:
        raise PermanentError(
            f"the eval scored {len(adapters)} adapters; the pipeline expects [input, edited]"
        )
    diff = comparisons[0][metric]
    return Gate(
        metric=metric,
        input_accuracy=adapters[0][metric]["accuracy"],
        edited_accuracy=adapters[1][metric]["accuracy"],
        difference=diff["difference"],
        ci95=(diff["ci95"][0], diff["ci95"][1]),
        mcnemar_p=diff["mcnemar_p"],
        min_gain=min_gain,
    )


def job_specs(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str], str, str]:
    """(edit spec, eval spec, edited adapter URI, eval output URI), validated."""
    run_id = args.run_id or new_run_id()
    edit = read_env_file(args.edit_env)
    edit = {k: v for k, v in edit.items() if k != "LORAFORGE_OUTPUT"}
    edit |= {"LORAFORGE_ADAPTER": args.adapter, "LORAFORGE_RUN_ID": run_id}
    edit_settings = load_settings(JOB_SETTINGS["edit"], edit)
    edited = edit_settings.output_uri
    evaluation = read_env_file(args.eval_env)
    evaluation = {k: v for k, v in evaluation.items() if k != "LORAFORGE_OUTPUT"}
    evaluation |= {"LORAFORGE_ADAPTERS": f"{args.adapter},{edited}", "LORAFORGE_RUN_ID": run_id}
    eval_settings = load_settings(JOB_SETTINGS["eval"], evaluation)
    return edit, evaluation, edited, eval_settings.output_uri


def run_local(job: str, spec: dict[str, str]) -> int:
    """The job's console script as a process with the spec's env vars (like `loraforge run`)."""
    script = Path(sys.executable).parent / f"loraforge-{job}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFORGE_")} | spec
    log.info(f"pipeline: running {job} locally")
    return subprocess.run([str(script)], env=env, check=False).returncode


def run_in_cluster(job: str, spec: dict[str, str], args: argparse.Namespace) -> int:
    """Render and submit the job's Job, then wait for it (like `loraforge submit` + `wait`)."""
    from loraforge.launcher.client import Cluster
    from loraforge.launcher.client_cmds import wait_exit_code
    from loraforge.launcher.render import render_from_args

    with tempfile.TemporaryDirectory(prefix="loraforge-pipeline-") as tmp:
        spec_file = Path(tmp) / f"{job}.env"
        spec_file.write_text("".join(f"{k}={v}\n" for k, v in spec.items()))
        manifest = render_from_args(
            job, argparse.Namespace(**{**vars(args), "env_file": spec_file})
        )
    with Cluster.connect(manifest["metadata"].get("namespace"), args.kubeconfig, args.context) as c:
        name = c.submit(manifest)
        log.info(f"pipeline: submitted Job {name}; waiting")
        status = c.wait(name, timeout_s=args.timeout)
    print(status.describe(), file=sys.stderr)
    return wait_exit_code(status)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from loraforge.store import fetch

    edit, evaluation, edited, eval_uri = job_specs(args)
    for job, spec in (("edit", edit), ("eval", evaluation)):
        code = run_local(job, spec) if args.local else run_in_cluster(job, spec, args)
        if code != EXIT_OK:
            print(f"loraforge pipeline: the {job} job failed (exit {code})", file=sys.stderr)
            return code
    artifact = fetch(eval_uri)
    metrics = json.loads((artifact.path / "metrics.json").read_text())
    metric = load_settings(JOB_SETTINGS["eval"], evaluation).metric  # type: ignore[attr-defined]
    gate = gate_from_metrics(metrics, metric, args.min_gain)
    if args.report:
        shutil.copyfile(artifact.path / "report.md", args.report)
    print(f"input   {args.adapter}: {100 * gate.input_accuracy:.1f}% ({metric})")
    print(f"edited  {edited}: {100 * gate.edited_accuracy:.1f}%")
    print(f"report  {eval_uri}/report.md")
    print(gate.verdict())
    return EXIT_OK if gate.passed else EXIT_GATE_FAILED


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `pipeline` on the `loraforge` parser."""
    from loraforge.launcher.client_cmds import _add_cluster_flags, duration
    from loraforge.launcher.render import add_render_arguments

    p = sub.add_parser(
        "pipeline",
        help="edit an adapter, evaluate input vs edited, exit non-zero if the gate fails",
    )
    p.add_argument("--adapter", required=True, help="the adapter artifact URI to edit")
    p.add_argument("--local", action="store_true", help="run the jobs as local processes")
    p.add_argument("--edit-env", default="jobs/edit.env", help="edit spec (default: %(default)s)")
    p.add_argument("--eval-env", default="jobs/eval.env", help="eval spec (default: %(default)s)")
    p.add_argument("--run-id", default=None, help="run id of both jobs (default: a new one)")
    p.add_argument(
        "--min-gain",
        type=float,
        default=None,
        help="also require edited - input >= this many accuracy points (0.02 = 2 points)",
    )
    p.add_argument("--report", default=None, help="copy the eval's report.md to this path")
    p.add_argument("--timeout", type=duration, default=None, help="per job, e.g. 2h (cluster)")
    add_render_arguments(p)
    for action in p._actions:  # the pipeline names its two specs itself
        if action.dest == "env_file":
            action.required, action.default, action.help = False, None, argparse.SUPPRESS
    _add_cluster_flags(p)
    p.set_defaults(func=cmd_pipeline)
