"""The benchmarks stay runnable: each runs at a small size on the CPU and returns its ratios.

The figures themselves are measured at full size and reported in BENCHMARKS.md, never asserted
here (a timed test would be flaky on a shared machine); these tests only check that each
benchmark completes, compares like with like (the eval benchmark asserts identical outputs) and
returns positive, finite ratios.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).parents[1] / "bench"


def load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_calibration_bench_runs_small(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load("calibration", monkeypatch)
    argv = "--hidden 64 --layers 2 --rank 4 --batches 2 --seq 32 --repeats 1"
    ratios = bench.main((argv + " --svd-size 256 --svd-rank 8").split())
    assert set(ratios) == {
        "calibration_over_plain",
        "seed_over_calibration",
        "dense_over_compact_svd",
    }
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())


def test_eval_bench_runs_small(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load("eval_throughput", monkeypatch)
    # main asserts that batched and one-at-a-time outputs are identical
    argv = "--problems 6 --batch-size 3 --shots 1 --max-new-tokens 8"
    ratio = bench.main(argv.split())
    assert math.isfinite(ratio) and ratio > 0


def test_bidora_bench_runs_small(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load("bidora", monkeypatch)
    result = bench.main(["--steps", "4", "--seeds", "0", "--n-train", "100"])
    assert math.isfinite(result["step_time_ratio"]) and result["step_time_ratio"] > 0
    assert math.isfinite(result["loss_delta"])


def test_scale_bench_runs_small(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load("scale", monkeypatch)
    # main asserts every data-parallel adapter equals the one-process one, and the merged
    # sharded metrics equal the one job's
    ratios = bench.main(["--steps", "2", "--problems", "10"])
    assert set(ratios) == {
        "ddp_vs_1_thread",
        "ddp_vs_2_threads",
        "fsdp_vs_1_thread",
        "sharded_eval_speedup",
    }
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
