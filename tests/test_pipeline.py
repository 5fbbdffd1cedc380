"""The demo flow at reduced size through the real entrypoints, and `loraforge pipeline --local`.

The demo specs (`jobs/*.demo*.env`) are used as shipped, with `.loraforge/demo` moved under a
temporary directory and the eval cut to 100 test problems: train a LoRA on the tiny kit, edit
it (abs_select and the random_index control), score base, trained, edited and control. Then the
pipeline edits the trained adapter and gates on the paired difference, once with the demo's edit
(passes) and once with an edit made harmful on purpose (fails).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraforge.errors import PermanentError
from loraforge.launcher.pipeline import Gate, gate_from_metrics

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


@dataclass
class Demo:
    root: Path
    specs: dict[str, Path]

    @property
    def store(self) -> Path:
        return self.root / "store"


def loraforge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFORGE_")}
    return subprocess.run(
        [str(BIN / "loraforge"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    root = tmp_path_factory.mktemp("demo")
    specs = {}
    for name in ("train.demo", "edit.demo", "edit.demo-control", "eval.demo"):
        text = (ROOT / "jobs" / f"{name}.env").read_text().replace(".loraforge/demo", str(root))
        if name == "eval.demo":
            text += "\nLORAFORGE_EVAL_LIMIT=100\n"
        specs[name] = root / f"{name}.env"
        specs[name].write_text(text)
    done = loraforge("make-tiny", str(root / "tiny"), cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in specs:
        job = name.split(".")[0]
        done = loraforge("run", job, "--env-file", str(specs[name]), cwd=root)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    return Demo(root, specs)


def test_the_demo_flow_teaches_something_measurable(demo: Demo) -> None:
    out = demo.store / "demo" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    labels = [a["label"] for a in metrics["adapters"]]
    assert labels == ["base", "train", "edit", "edit-control"]
    assert metrics["problems"] == 100
    trained = metrics["comparisons"][0]
    assert trained["adapter"] == "train" and trained["reference"] == "base"
    assert trained["strict"]["ci95"][0] > 0  # the trained adapter beats the base, CI excludes 0
    assert metrics["adapters"][1]["strict"]["accuracy"] >= 0.15
    report = (out / "report.md").read_text()
    assert "| `train` |" in report and "![accuracy with 95% intervals](accuracy.png)" in report
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    edit_meta = json.loads((demo.store / "demo" / "edit" / "spectral_edit_meta.json").read_text())
    assert edit_meta["params"]["mode"] == "abs_select"
    assert edit_meta["input_adapter"]["uri"] == str(demo.store / "demo" / "train")


def pipeline(
    demo: Demo, edit_spec: Path, run_id: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    adapter = str(demo.store / "demo" / "train")
    return loraforge(
        "pipeline",
        "--local",
        "--adapter",
        adapter,
        "--edit-env",
        str(edit_spec),
        "--eval-env",
        str(demo.specs["eval.demo"]),
        "--run-id",
        run_id,
        "--report",
        str(demo.root / f"{run_id}.md"),
        *extra,
        cwd=demo.root,
    )


def test_pipeline_passes_the_gate_for_the_demo_edit(demo: Demo) -> None:
    done = pipeline(demo, demo.specs["edit.demo"], "pipe-ok")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith("PASS: edited - input = ")
    metrics = json.loads((demo.store / "pipe-ok" / "eval" / "metrics.json").read_text())
    assert [a["uri"] for a in metrics["adapters"]] == [
        str(demo.store / "demo" / "train"),
        str(demo.store / "pipe-ok" / "edit"),
    ]
    assert (demo.root / "pipe-ok.md").read_text().startswith("#")


def test_pipeline_fails_the_gate_for_a_harmful_edit(demo: Demo) -> None:
    harmful = demo.root / "harmful.env"
    # every singular value above the core amplified 4x, the rest zeroed, no energy rescaling
    harmful.write_text(
        demo.specs["edit.demo"].read_text()
        + "\nLORAFORGE_AMP=4.0\nLORAFORGE_SUP=0.0\nLORAFORGE_PRESERVE_ENERGY=none\n"
    )
    done = pipeline(demo, harmful, "pipe-harm")
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    last = done.stdout.splitlines()[-1]
    assert last.startswith("FAIL: the edit is significantly worse than its input"), last


def test_pipeline_with_a_missing_adapter_exits_2(demo: Demo) -> None:
    adapter = str(demo.store / "nope" / "train")
    done = loraforge(
        "pipeline",
        "--local",
        "--adapter",
        adapter,
        "--edit-env",
        str(demo.specs["edit.demo"]),
        "--eval-env",
        str(demo.specs["eval.demo"]),
        cwd=demo.root,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "loraforge pipeline: the edit job failed (exit 2)" in done.stderr
    assert "nope" in done.stderr


def metrics_of(diff: float, low: float, high: float) -> dict[str, object]:
    def acc(a: float) -> dict[str, object]:
        return {"strict": {"accuracy": a}, "flexible": {"accuracy": a}}

    comparison = {"difference": diff, "ci95": [low, high], "mcnemar_p": 0.5}
    return {
        "adapters": [acc(0.5), acc(0.5 + diff)],
        "comparisons": [{"strict": comparison, "flexible": comparison}],
    }


@pytest.mark.parametrize(
    ("diff", "low", "high", "min_gain", "passed"),
    [
        (0.0, -0.03, 0.03, None, True),  # not significantly different: passes
        (-0.05, -0.09, -0.01, None, False),  # significantly worse
        (-0.02, -0.05, 0.0, None, True),  # the interval touches 0: not significantly worse
        (0.01, -0.02, 0.04, 0.02, False),  # below the required gain
        (0.03, 0.0, 0.06, 0.02, True),
    ],
)
def test_gate_rules(
    diff: float, low: float, high: float, min_gain: float | None, passed: bool
) -> None:
    gate = gate_from_metrics(metrics_of(diff, low, high), "strict", min_gain)
    assert isinstance(gate, Gate) and gate.passed is passed
    assert gate.verdict().startswith("PASS" if passed else "FAIL")


def test_gate_needs_exactly_input_and_edited() -> None:
    metrics = metrics_of(0.0, -0.1, 0.1)
    metrics["adapters"] = metrics["adapters"][:1]  # type: ignore[index]
    with pytest.raises(PermanentError, match="expects \\[input, edited\\]"):
        gate_from_metrics(metrics, "strict", None)
