"""`loraforge gpus`, `estimate`, `info` and `list-models`: the GPU catalog and what sizing would
choose (issue #7). Imports no torch: local hardware is read through `nvidia-smi`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from loraforge import __version__, sizing
from loraforge.errors import EXIT_OK, LoraforgeError, PermanentError
from loraforge.launcher import gpus, models

JOBS = ("train", "edit", "eval")
TRAIN_SPEC = "jobs/train.env"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def cmd_gpus(args: argparse.Namespace) -> int:
    catalog: list[dict[str, Any]] = [
        {
            "name": g.name,
            "vram_gib": g.vram_gib,
            "bf16": g.bf16,
            "mig": g.mig,
            "products": list(g.products),
        }
        for g in gpus.CATALOG
    ]
    if args.json:
        print(json.dumps(catalog, indent=2))
        return EXIT_OK
    rows = [
        [c["name"], f"{c['vram_gib']:g}", "yes" if c["bf16"] else "no", ", ".join(c["products"])]
        for c in catalog
    ]
    print(_table(["GPU", "VRAM GiB", "bf16", "GFD products (nvidia.com/gpu.product)"], rows))
    return EXIT_OK


def job_of(env_file: str, job: str | None) -> str:
    """The job named on the command line, else the spec's name before its first '.'."""
    if job is not None:
        return job
    stem = Path(env_file).name.split(".")[0]
    if stem not in JOBS:
        raise PermanentError(
            f"{env_file}: cannot tell the job from the file name: name it "
            f"(loraforge estimate train|edit|eval --env-file {env_file})"
        )
    return stem


def plan_for(job: str, env_file: str, gpu: gpus.Gpu) -> tuple[sizing.Plan, dict[str, Any]]:
    """The spec's plan on `gpu`, and the model's description."""
    from loraforge.settings import JOB_SETTINGS, load_settings, read_env_file

    settings: Any = load_settings(JOB_SETTINGS[job], read_env_file(env_file))
    config = models.read_config(settings.base_model, settings.base_revision)
    shape = sizing.ModelShape.from_config(config)
    planner: dict[str, Any] = {
        "train": sizing.plan_train,
        "edit": sizing.plan_edit,
        "eval": sizing.plan_eval,
    }
    plan: sizing.Plan = planner[job](config, gpu, settings)
    return plan, {"base_model": settings.base_model, "params": shape.params}


def cmd_estimate(args: argparse.Namespace) -> int:
    job = job_of(args.env_file, args.job)
    plan, model = plan_for(job, args.env_file, gpus.get(args.gpu))
    print(json.dumps(model | plan.as_dict(), indent=2))
    return EXIT_OK


def local_gpus() -> list[dict[str, Any]]:
    """GPUs `nvidia-smi` reports (name and memory in MiB); none without a driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in done.stdout.splitlines():
        name, _, memory = line.rpartition(",")
        mib = memory.strip().split(" ")[0]
        if name.strip() and mib.isdigit():
            found.append({"name": name.strip(), "memory_mib": int(mib)})
    return found


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / gpus.GiB, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _local_sizing(found: list[dict[str, Any]], env_file: str) -> dict[str, Any] | str:
    if not found:
        return "none: no GPU here"
    if not Path(env_file).is_file():
        return f"none: {env_file} not found"
    labels = {
        gpus.PRODUCT_LABEL: found[0]["name"].replace(" ", "-"),
        gpus.MEMORY_LABEL: str(found[0]["memory_mib"]),
    }
    node = gpus.from_node_labels("localhost", labels)
    if node is None:
        return "none: unknown GPU"
    try:
        plan, model = plan_for(job_of(env_file, None), env_file, node.gpu)
    except LoraforgeError as exc:
        return f"none: {exc}"
    return model | plan.as_dict()


def cmd_info(args: argparse.Namespace) -> int:
    from loraforge.manifest import library_versions  # reads versions without importing them

    found = local_gpus()
    info = {
        "loraforge": __version__,
        "versions": library_versions(),
        "hardware": {
            "gpus": found or "no GPU",
            "cpus": os.cpu_count(),
            "ram_gib": _ram_gib(),
        },
        "sizing": _local_sizing(found, args.env_file),
    }
    print(json.dumps(info, indent=2))
    return EXIT_OK


def model_fit(ref: str, gpu: gpus.Gpu) -> dict[str, Any]:
    """LoRA training at the default settings: fits as is, needs int8/nf4, or does not fit."""
    from loraforge.settings import TrainSettings, load_settings

    settings = load_settings(TrainSettings, {"LORAFORGE_BASE_MODEL": ref, "LORAFORGE_DATA": "-"})
    try:
        plan = sizing.plan_train(models.RECOMMENDED[ref], gpu, settings)
    except PermanentError:
        return {"fit": "does not fit", "peak_gib": None}
    quantization = plan.env["LORAFORGE_QUANTIZATION"]
    fit = "fits" if quantization == "none" else f"needs {quantization}"
    return {"fit": fit, "peak_gib": round(plan.peak_bytes / gpus.GiB, 1), "settings": plan.env}


def cmd_list_models(args: argparse.Namespace) -> int:
    chosen = [g for g in gpus.CATALOG if args.mig or not g.mig]
    result: list[dict[str, Any]] = []
    for ref, config in models.RECOMMENDED.items():
        params = sizing.ModelShape.from_config(config).params
        fits = {g.name: model_fit(ref, g) for g in chosen}
        result.append({"model": ref, "params": params, "train_lora": fits})
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    short = {"fits": "ok", "needs int8": "int8", "needs nf4": "nf4", "does not fit": "-"}
    rows = [
        [r["model"], f"{r['params'] / 1e9:.2f}B"]
        + [
            f"{short[c['fit']]} {c['peak_gib']:.1f}" if c["peak_gib"] else "-"
            for c in r["train_lora"].values()
        ]
        for r in result
    ]
    print(_table(["model", "params", *(g.name for g in chosen)], rows))
    print(
        "\nLoRA training at the default settings (rank 16, q/k/v/o, 8 x 2048 tokens per "
        "micro-batch, shrunk with accumulation to fit): estimated peak GiB; ok = bf16/fp16 "
        "weights, int8/nf4 = needs that quantization, - = does not fit. Estimates are "
        "uncalibrated (issue #11)."
    )
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register this module's subcommands on the `loraforge` parser."""
    gpu_list = sub.add_parser("gpus", help="the GPU catalog sizing knows")
    gpu_list.add_argument("--json", action="store_true")
    gpu_list.set_defaults(func=cmd_gpus)

    estimate = sub.add_parser(
        "estimate", help="predicted peak VRAM of a job spec on a GPU and the settings chosen"
    )
    estimate.add_argument(
        "job",
        nargs="?",
        choices=JOBS,
        default=None,
        help="default: the spec's file name before its first '.' (jobs/edit.demo.env: edit)",
    )
    estimate.add_argument("--env-file", required=True)
    estimate.add_argument("--gpu", required=True, help="a catalog name (see `loraforge gpus`)")
    estimate.set_defaults(func=cmd_estimate)

    info = sub.add_parser("info", help="versions, local hardware and what sizing would choose")
    info.add_argument("--env-file", default=TRAIN_SPEC, help=f"spec to size (default {TRAIN_SPEC})")
    info.set_defaults(func=cmd_info)

    listing = sub.add_parser(
        "list-models", help="recommended base models and whether LoRA training fits each GPU"
    )
    listing.add_argument("--mig", action="store_true", help="include MIG slices")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list_models)
