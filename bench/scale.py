"""Scale-out on the CPU: data-parallel training and sharded eval against one process, one run.

    .venv/bin/python bench/scale.py [--steps 40] [--problems 200]

Train: the tiny kit's train job, the same global batch (micro-batch 8 x accumulation 4), run as
1 process with 1 thread (the per-process baseline), 1 process with 2 threads (the machine's
cores in one process), and 2 processes of 1 thread under `loraforge-torchrun` (gloo) with DDP and
with FSDP. Prints each run's training tokens/s (the job's own progress figure: fit only, model
loading excluded) and the ratios; checks every run ended with the 1-process adapter (to 1e-4).

Eval: base model, greedy, the test split: one job with 2 threads against 2 shards of 1 thread
run side by side (the last one merges). Prints the wall times (process start to publish,
model loading included: what a pod pays) and checks the merged metrics equal the one job's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from loraforge import store, tiny

BIN = Path(sys.executable).parent


def run(argv: list[str], env: dict[str, str], threads: int) -> tuple[float, str]:
    """(wall seconds, stdout+stderr) of one job; raises when it fails."""
    start = time.perf_counter()
    done = subprocess.run(
        argv,
        env={**os.environ, **env, "OMP_NUM_THREADS": str(threads)},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, done.stdout + done.stderr


def tokens_per_s(log: str) -> float:
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{") and "progress" in x]
    return float([x for x in lines if x.get("event") == "progress"][-1]["tokens_per_s"])


def train_env(kit: tiny.TinyKit, root: Path, run_id: str, steps: int) -> dict[str, str]:
    return {
        "LORAFORGE_BASE_MODEL": str(kit.model_dir),
        "LORAFORGE_DATA": str(kit.train),
        "LORAFORGE_VAL_DATA": str(kit.val),
        "LORAFORGE_STORE": str(root / "store"),
        "LORAFORGE_RUN_ID": run_id,
        "LORAFORGE_MAX_STEPS": str(steps),
        "LORAFORGE_MAX_SEQ_LEN": "256",
        "LORAFORGE_MICRO_BATCH_SIZE": "8",
        "LORAFORGE_GRAD_ACCUM": "4",
        "LORAFORGE_DROPOUT": "0",
        "LORAFORGE_EVAL_INTERVAL": "0",
        "LORAFORGE_CHECKPOINT_INTERVAL": "0",
        "LORAFORGE_CHECKPOINT_SECONDS": "0",
        "LORAFORGE_DEVICE": "cpu",
        "LORAFORGE_LOG_FORMAT": "json",
        "LORAFORGE_TARGET_MODULES": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    }


def torchrun(port: int) -> list[str]:
    launcher = str(BIN / "loraforge-torchrun")
    return [launcher, "--nproc-per-node=2", f"--master-port={port}", "-m", "loraforge.train"]


def bench_train(kit: tiny.TinyKit, root: Path, steps: int) -> dict[str, float]:
    runs = {
        "1 process x 1 thread": ([str(BIN / "loraforge-train")], 1, {}),
        "1 process x 2 threads": ([str(BIN / "loraforge-train")], 2, {}),
        "2 processes x 1 thread, DDP": (torchrun(29611), 1, {}),
        "2 processes x 1 thread, FSDP": (torchrun(29612), 1, {"LORAFORGE_PARALLEL": "fsdp"}),
    }
    rates: dict[str, float] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for i, (name, (argv, threads, extra)) in enumerate(runs.items()):
        env = train_env(kit, root, f"t{i}", steps) | extra
        _, log = run(argv, env, threads)
        rates[name] = tokens_per_s(log)
        path = store.fetch(str(root / "store" / f"t{i}" / "train")).path
        adapters[name] = load_file(str(path / "adapter_model.safetensors"))
        print(f"train  {name:30s} {rates[name]:9,.0f} tokens/s")
    first = next(iter(adapters.values()))
    for name, tensors in adapters.items():
        worst = max(float((tensors[k] - first[k]).abs().max()) for k in first)
        assert worst < 1e-4, f"{name}: adapter differs from one process by {worst}"
    return rates


def eval_env(kit: tiny.TinyKit, root: Path, run_id: str, problems: int) -> dict[str, str]:
    return {
        "LORAFORGE_BASE_MODEL": str(kit.model_dir),
        "LORAFORGE_STORE": str(root / "store"),
        "LORAFORGE_RUN_ID": run_id,
        "LORAFORGE_DEVICE": "cpu",
        "LORAFORGE_LOG_FORMAT": "json",
        "LORAFORGE_ADAPTERS": "base",
        "LORAFORGE_EVAL_DATA": str(kit.test),
        "LORAFORGE_FEWSHOT_DATA": str(kit.train),
        "LORAFORGE_ENGINE": "transformers",
        "LORAFORGE_PROFILE": "greedy_math",
        "LORAFORGE_MAX_NEW_TOKENS": "48",
        "LORAFORGE_EVAL_LIMIT": str(problems),
        "LORAFORGE_BATCH_SIZE": "25",
    }


def metrics(root: Path, run_id: str) -> Any:
    path = store.fetch(str(root / "store" / run_id / "eval")).path
    return json.loads((path / "metrics.json").read_text())["adapters"]


def bench_eval(kit: tiny.TinyKit, root: Path, problems: int) -> tuple[float, float]:
    argv = [str(BIN / "loraforge-eval")]
    one, _ = run(argv, eval_env(kit, root, "e1", problems), 2)
    start = time.perf_counter()
    env = {**os.environ, **eval_env(kit, root, "e2", problems), "OMP_NUM_THREADS": "1"}
    shards = [
        subprocess.Popen(
            argv,
            env={**env, "LORAFORGE_SHARDS": "2", "LORAFORGE_SHARD": str(i)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for shard in shards:
        _, err = shard.communicate(timeout=1800)
        if shard.returncode != 0:
            raise SystemExit(f"shard failed ({shard.returncode}):\n{err[-3000:]}")
    two = time.perf_counter() - start
    assert metrics(root, "e2") == metrics(root, "e1"), "sharded metrics differ from one job's"
    print(f"eval   1 job x 2 threads          {one:7.1f} s wall")
    print(f"eval   2 shards x 1 thread        {two:7.1f} s wall (side by side, merge included)")
    return one, two


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--problems", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kit = tiny.make_tiny(root / "kit", n_train=400, n_val=20, n_test=args.problems)
        rates = bench_train(kit, root, args.steps)
        one, two = bench_eval(kit, root, args.problems)
    base = rates["1 process x 1 thread"]
    both = rates["1 process x 2 threads"]
    ratios = {
        "ddp_vs_1_thread": rates["2 processes x 1 thread, DDP"] / base,
        "ddp_vs_2_threads": rates["2 processes x 1 thread, DDP"] / both,
        "fsdp_vs_1_thread": rates["2 processes x 1 thread, FSDP"] / base,
        "sharded_eval_speedup": one / two,
    }
    for name, value in ratios.items():
        print(f"ratio  {name:30s} {value:6.2f}x")
    return ratios


if __name__ == "__main__":
    main()
