"""`loraforge`: the command line of the launcher and the artifact store.

Commands so far: `make-tiny` (tiny model + data kit), `check` (validate a job spec with the
job's own settings class), `run` (a job as a local process with a spec's env vars),
`publish`/`fetch`/`ls` (the artifact store), `info`. Rendering and
submitting Jobs arrive with issue #7. This module never imports torch; `make-tiny` imports the
kit lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from loraforge import __version__
from loraforge.errors import EXIT_OK, LoraforgeError
from loraforge.logs import scrub, setup_logging

log = logging.getLogger("loraforge.cli")


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from loraforge.tiny import make_tiny  # torch, only here

    kit = make_tiny(
        Path(args.dir),
        arch=args.arch,
        seed=args.seed,
        pretrain_steps=args.pretrain_steps,
        force=args.force,
    )
    print(json.dumps({k: str(v) for k, v in vars(kit).items()}, indent=2))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from loraforge.settings import JOB_SETTINGS, load_settings, read_env_file

    settings = load_settings(JOB_SETTINGS[args.job], read_env_file(args.env_file))
    print(json.dumps(settings.redacted(), indent=2))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Run a job as a local process with the spec's env vars: the laptop backend of the launcher."""
    import os
    import subprocess

    from loraforge.settings import JOB_SETTINGS, load_settings, read_env_file

    spec = read_env_file(args.env_file)
    settings = load_settings(JOB_SETTINGS[args.job], spec)  # fail here, before any compute
    script = Path(sys.executable).parent / f"loraforge-{args.job}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFORGE_")} | spec
    code = subprocess.run([str(script)], env=env, check=False).returncode
    if code == EXIT_OK:
        _print_artifact(settings.output_uri)
    return code


def _print_artifact(uri: str) -> None:
    from loraforge.store import read_manifest

    manifest, _ = read_manifest(uri)
    metrics = {k: v for k, v in manifest.metrics.items() if v is not None}
    print(f"published {uri}")
    print(json.dumps(metrics, indent=2))


def cmd_publish(args: argparse.Namespace) -> int:
    from loraforge.store import publish

    manifest = publish(args.dir, args.uri, job=args.job, run_id=args.run_id)
    print(f"published {args.uri}: {len(manifest.files)} files, {manifest.total_bytes:,} bytes")
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    from loraforge.store import fetch

    artifact = fetch(args.uri, args.dest)
    print(artifact.path)
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    from loraforge.store import list_artifacts

    for uri in list_artifacts(args.prefix):
        print(uri)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"loraforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser(
        "make-tiny", help="write a tiny causal LM, tokenizer and GSM8K-style data"
    )
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="full-parameter warm-up steps of the base (0: random init)",
    )
    tiny.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    tiny.set_defaults(func=cmd_make_tiny)

    check = sub.add_parser("check", help="validate a job spec with the job's settings class")
    check.add_argument("job", choices=["train", "edit", "eval"])
    check.add_argument("--env-file", required=True)
    check.set_defaults(func=cmd_check)

    run = sub.add_parser("run", help="run a job locally with a spec's env vars")
    run.add_argument("job", choices=["train", "edit", "eval"])
    run.add_argument("--env-file", required=True)
    run.set_defaults(func=cmd_run)

    pub = sub.add_parser("publish", help="publish a directory as an artifact (create-only)")
    pub.add_argument("dir")
    pub.add_argument("uri")
    pub.add_argument("--job", default="upload")
    pub.add_argument("--run-id", default="manual")
    pub.set_defaults(func=cmd_publish)

    fet = sub.add_parser("fetch", help="download and verify an artifact")
    fet.add_argument("uri")
    fet.add_argument("dest", nargs="?", default=None)
    fet.set_defaults(func=cmd_fetch)

    ls = sub.add_parser("ls", help="list published artifacts under a prefix")
    ls.add_argument("prefix")
    ls.set_defaults(func=cmd_ls)

    from loraforge.launcher import client_cmds, pipeline, render_cmds, sizing_cmds

    sizing_cmds.add_commands(sub)  # gpus, estimate, info, list-models
    render_cmds.add_commands(sub)  # render
    client_cmds.add_commands(sub)  # submit, wait, status, logs, cancel
    pipeline.add_commands(sub)  # pipeline
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging("text" if sys.stderr.isatty() else "auto")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
    except LoraforgeError as exc:
        print(scrub(f"loraforge {args.command}: {exc}"), file=sys.stderr)
        code = exc.exit_code
    except BrokenPipeError:  # `loraforge gpus | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code)
