"""`loraforge submit|wait|status|logs|cancel`: send a rendered Job to the cluster and follow it.

`submit` prints the Job name alone on stdout (`NAME=$(loraforge submit ...)`) and the commands
to follow it on stderr. `wait` exits 0 when the Job completes; when it fails, with the exit code
of its last pod where that code means something to the Job (2 bad input, 75 transient,
143 SIGTERM), else 1. Imports no torch; the Kubernetes client is imported when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from typing import Any

from loraforge.errors import (
    EXIT_OK,
    EXIT_PERMANENT,
    EXIT_TERMINATED,
    EXIT_TRANSIENT,
    EXIT_UNEXPECTED,
)
from loraforge.launcher.client import Cluster, JobStatus

EXIT_INTERRUPTED = 130  # 128 + SIGINT

NAME_HELP = "the Job's name, as `loraforge submit` printed it"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|m|h)?\s*$")


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `30m` or `2h` (argparse type)."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90, 90s, 30m or 2h")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2] or "s"]


def wait_exit_code(status: JobStatus) -> int:
    """0 for Complete; for Failed the last pod's exit code if it is 2, 75 or 143, else 1."""
    if status.phase == "Complete":
        return EXIT_OK
    if status.exit_code in (EXIT_PERMANENT, EXIT_TRANSIENT, EXIT_TERMINATED):
        return int(status.exit_code)
    return EXIT_UNEXPECTED


def _connect(args: argparse.Namespace) -> Cluster:
    return Cluster.connect(args.namespace, args.kubeconfig, args.context)


def _follow_flags(args: argparse.Namespace, namespace: str, default_namespace: str) -> str:
    """The cluster flags a follow-up command needs to find the same Job."""
    flags = ""
    if args.kubeconfig:
        flags += f" --kubeconfig {args.kubeconfig}"
    if args.context:
        flags += f" --context {args.context}"
    if namespace != default_namespace:
        flags += f" --namespace {namespace}"
    return flags


def cmd_submit(args: argparse.Namespace) -> int:
    from loraforge.launcher.render import render_from_args
    from loraforge.launcher.scale import items

    # a Job, or the objects of a multi-node run in creation order (Service, ..., Job last)
    objects = items(render_from_args(args.job, args))  # validates the spec first
    manifest = objects[-1]
    # the Job goes to its manifest's namespace; the connection's default namespace is the one
    # the follow-up commands will use without a --namespace flag
    with Cluster.connect(None, args.kubeconfig, args.context) as cluster:
        name = [cluster.create(obj) for obj in objects][-1]
        namespace = manifest["metadata"].get("namespace") or cluster.namespace
        flags = _follow_flags(args, namespace, cluster.namespace)
    print(name)
    kind = manifest["kind"]
    print(f"submitted {kind} {name} to namespace {namespace}; follow it with:", file=sys.stderr)
    if kind != "Job":  # the follow-up commands read Jobs
        print(f"  kubectl get {kind.lower()} -n {namespace} {name}", file=sys.stderr)
        return EXIT_OK
    for verb in ("logs -f", "wait", "status", "cancel"):
        print(f"  loraforge {verb}{flags} {name}", file=sys.stderr)
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    with _connect(args) as cluster:
        status = cluster.wait(args.name, timeout_s=args.timeout, poll_s=args.poll)
    if status.phase == "Complete":
        print(status.describe())
        return EXIT_OK
    print(f"loraforge wait: {status.describe()}", file=sys.stderr)
    return wait_exit_code(status)


def cmd_status(args: argparse.Namespace) -> int:
    with _connect(args) as cluster:
        status = cluster.status(args.name)
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
        return EXIT_OK
    print(status.describe())
    for pod in status.pods:
        ended = "" if pod.exit_code is None else f" exit {pod.exit_code}"
        print(f"  pod {pod.name} {pod.phase}{ended} {pod.reason or ''}".rstrip())
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    try:
        with _connect(args) as cluster:
            cluster.logs(args.name, args.follow, sys.stdout, pod_timeout_s=args.pod_timeout)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `loraforge logs NAME | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _connect(args) as cluster:
        cluster.cancel(args.name)
    print(
        f"deleted Job {args.name} in namespace {cluster.namespace}: its pods get SIGTERM and "
        "terminationGracePeriodSeconds to publish a checkpoint, then go"
    )
    return EXIT_OK


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    flags: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("--namespace", "-n"), {"help": "default: the kubeconfig context's, else loraforge"}),
        (("--kubeconfig",), {"help": "default: $KUBECONFIG, else ~/.kube/config, else in-cluster"}),
        (("--context",), {"help": "kubeconfig context (default: the current one)"}),
    ]
    for names, options in flags:
        # `submit` has the render flags too, which may already hold one of these
        with contextlib.suppress(argparse.ArgumentError):
            parser.add_argument(*names, default=None, **options)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register submit, wait, status, logs and cancel on the `loraforge` parser."""
    from loraforge.launcher.render import add_render_arguments

    submit = sub.add_parser("submit", help="render a job spec and create the Job in the cluster")
    submit.add_argument("job", choices=["train", "edit", "eval"])
    add_render_arguments(submit)
    _add_cluster_flags(submit)
    submit.set_defaults(func=cmd_submit)

    wait = sub.add_parser("wait", help="wait for a Job to end; exit non-zero if it failed")
    wait.add_argument("name", help=NAME_HELP)
    wait.add_argument(
        "--timeout", type=duration, default=None, metavar="DURATION", help="e.g. 90s, 30m, 2h"
    )
    wait.add_argument("--poll", type=duration, default=2.0, metavar="DURATION", help="default: 2s")
    _add_cluster_flags(wait)
    wait.set_defaults(func=cmd_wait)

    status = sub.add_parser("status", help="a Job's phase, failure reason and pods")
    status.add_argument("name", help=NAME_HELP)
    status.add_argument("--json", action="store_true", help="the full status as JSON")
    _add_cluster_flags(status)
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="the log of a Job's newest pod")
    logs.add_argument("name", help=NAME_HELP)
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the pod ends")
    logs.add_argument(
        "--pod-timeout",
        type=duration,
        default=300.0,
        metavar="DURATION",
        help="wait this long for the pod to start (default: 5m)",
    )
    _add_cluster_flags(logs)
    logs.set_defaults(func=cmd_logs)

    cancel = sub.add_parser("cancel", help="delete a Job and its pods")
    cancel.add_argument("name", help=NAME_HELP)
    _add_cluster_flags(cancel)
    cancel.set_defaults(func=cmd_cancel)
