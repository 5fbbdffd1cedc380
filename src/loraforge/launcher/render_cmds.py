"""`loraforge render {train|edit|eval}`: the Job for a spec as YAML on stdout. Imports no torch."""

from __future__ import annotations

import argparse

from loraforge.errors import EXIT_OK
from loraforge.launcher.render import JOBS, add_render_arguments, render_from_args, to_yaml


def cmd_render(args: argparse.Namespace) -> int:
    # stdout holds the YAML and nothing else (`loraforge render ... | kubectl apply -f -`);
    # warnings and errors go to stderr
    print(to_yaml(render_from_args(args.job, args)), end="")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register this module's subcommands on the `loraforge` parser."""
    render = sub.add_parser(
        "render",
        help="render a job spec as a Kubernetes Job (YAML on stdout)",
        description="Validate a job spec with the job's settings class, size it for the GPU and "
        "print the Kubernetes Job. Exit 2 with one line on stderr for a bad spec or flag.",
    )
    render.add_argument("job", choices=JOBS)
    add_render_arguments(render)
    render.set_defaults(func=cmd_render)
