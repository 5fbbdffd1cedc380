"""The benchmarks stay runnable: each runs at a small size on the CPU and returns its ratios.

The figures themselves are measured at full size and reported in BENCHMARKS.md, never asserted
here (a timed test would be flaky on a shared machine); these tests only check that each
benchmark completes, compares like with like (the eval benchmark asserts identical outputs) and
returns positive, finite ratios.
"""

from __future__ import annotations

import importlib.util
import json
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


def test_estimator_bench_checks_every_cell_on_the_cpu_and_claims_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bench = load("estimator", monkeypatch)
    out = tmp_path / "estimator.json"
    argv = ["--grid", "small", "--device", "cpu", "--cpu-seq-len", "32", "--out", str(out)]
    result = bench.main(argv)
    # every cell's settings built a trainer and ran a step at the tiny size; predictions are
    # for the real shapes; without CUDA nothing is measured and no accuracy is claimed
    saved = json.loads(out.read_text())
    assert saved["cells"] == result.rows and saved["summary"] == result.summary
    quantizations = 2 if result.meta["bitsandbytes"] else 1
    assert len(result.rows) == 16 * quantizations
    assert {row["status"] for row in result.rows} == {"cpu-check"}
    assert all(math.isfinite(r["predicted_gib"]) and r["predicted_gib"] > 0 for r in result.rows)
    assert not any("measured_gib" in row for row in result.rows)
    assert result.summary["measured"] is False


def test_train_vs_hf_bench_runs_small(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load("train_vs_hf", monkeypatch)
    # main asserts that loraforge's and HF's first-step losses agree and that both saw the same
    # tokens; each path trains in a child process
    argv = "--vocab 1024 --steps 1 --warmup 1 --micro-batch-size 2 --grad-accum 2 --device cpu"
    ratios = bench.main(argv.split())
    assert set(ratios) == {"loraforge_over_hf_tokens_per_s", "loraforge_over_hf_peak_memory"}
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
