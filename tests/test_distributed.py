"""Data-parallel training: 2 processes under `loraforge-torchrun` (gloo, CPU) against one.

The same global batch (LORAFORGE_MICRO_BATCH_SIZE x LORAFORGE_GRAD_ACCUM) gives the same loss
curve and adapter to summation-order tolerance; a checkpoint made by 2 processes resumes in 1;
worker exit codes (2, 143) come out of the launcher unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loraforge import checkpoint, distributed, store
from loraforge.errors import EXIT_PERMANENT, EXIT_TERMINATED, PermanentError
from tests.conftest import free_port
from tests.test_train import FAST, adapter_tensors, spec

BIN = Path(sys.executable).parent
# 8 steps of 4 micro-batches of 4: 2 processes take 2 micro-batches each per step. Dropout 0:
# a data-parallel run draws its dropout masks per process (loraforge.distributed.seed_step).
STEPS = 8
COMMON = {
    "LORAFORGE_MAX_STEPS": str(STEPS),
    "LORAFORGE_MICRO_BATCH_SIZE": "4",
    "LORAFORGE_GRAD_ACCUM": "4",
    "LORAFORGE_DROPOUT": "0",
    "LORAFORGE_CHECKPOINT_INTERVAL": "4",
    "OMP_NUM_THREADS": "1",
}


def _job_env(kit, tmp_path: Path, run_id: str, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    assert FAST["LORAFORGE_DEVICE"] == "cpu"
    return {**os.environ, **spec(kit, tmp_path, LORAFORGE_RUN_ID=run_id, **{**COMMON, **extra})}


def _one(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "loraforge-train")], env=env, capture_output=True, text=True, timeout=300
    )


def _torchrun(env: dict[str, str], nproc: int = 2) -> subprocess.Popen[str]:
    argv = [
        str(BIN / "loraforge-torchrun"),
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        "--shutdown-timeout=60",
        "-m",
        "loraforge.train",
    ]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def _losses(tmp_path: Path, run_id: str, step: int) -> list[float]:
    root = f"{tmp_path / 'store' / run_id / 'train'}-checkpoints"
    path = store.fetch(checkpoint.checkpoint_uri(root, step)).path / checkpoint.STATE
    return json.loads(path.read_text())["state"]["recent_losses"]


def _manifest_metrics(uri: str) -> dict[str, float]:
    manifest, _ = store.read_manifest(uri)
    return manifest.metrics


@pytest.fixture(scope="module")
def single(tiny_kit, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """The one-process reference run."""
    root = tmp_path_factory.mktemp("single")
    done = _one(_job_env(tiny_kit, root, "one"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_two_processes_follow_the_one_process_loss_curve_and_adapter(
    tiny_kit, single: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    code, out = _finish(_torchrun(_job_env(tiny_kit, tmp_path, "two")))
    assert code == 0, out[-3000:]
    one_curve, two_curve = _losses(single, "one", 4), _losses(tmp_path, "two", 4)
    assert len(one_curve) == 4
    assert two_curve == pytest.approx(one_curve, rel=1e-5)
    one = adapter_tensors(str(single / "store" / "one" / "train"))
    two = adapter_tensors(str(tmp_path / "store" / "two" / "train"))
    assert one.keys() == two.keys()
    assert any(t.abs().max() > 0 for name, t in one.items() if "lora_B" in name)  # it trained
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    m1 = _manifest_metrics(str(single / "store" / "one" / "train"))
    m2 = _manifest_metrics(str(tmp_path / "store" / "two" / "train"))
    assert m2["tokens_seen"] == m1["tokens_seen"]  # the same examples, all of them, once
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-5)
    # one voice: only rank 0 logs progress
    assert sum('"event": "progress"' in line for line in out.splitlines()) >= 1
    assert len([line for line in out.splitlines() if "train job finished" in line]) == 1


def test_sigterm_checkpoints_at_two_processes_and_one_process_finishes_the_run(
    tiny_kit, single: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    env = _job_env(tiny_kit, tmp_path, "moved")
    first = tmp_path / "store" / "moved" / "train-checkpoints" / "step-00000004" / "loraforge.json"
    proc = _torchrun(env)
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to torchrun's agent, which forwards it to both workers
    code, out = _finish(proc)
    assert code == EXIT_TERMINATED, out[-3000:]
    steps = store.list_artifacts(str(tmp_path / "store" / "moved" / "train-checkpoints"))
    assert steps, out[-3000:]
    assert not store.exists(str(tmp_path / "store" / "moved" / "train"))
    done = _one(env)  # the same run id, now one process
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"event": "resume"' in done.stderr + done.stdout
    one = adapter_tensors(str(single / "store" / "one" / "train"))
    moved = adapter_tensors(str(tmp_path / "store" / "moved" / "train"))
    for name in one:
        torch.testing.assert_close(moved[name], one[name], rtol=1e-4, atol=1e-5)


def test_a_worker_exit_code_is_the_launcher_exit_code(tiny_kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = _job_env(tiny_kit, tmp_path, "odd", LORAFORGE_GRAD_ACCUM="3")
    code, out = _finish(_torchrun(env))
    assert code == EXIT_PERMANENT, out[-3000:]
    assert "LORAFORGE_GRAD_ACCUM=3 is not a multiple of the 2 training processes" in out
    assert not (tmp_path / "store" / "odd").exists()


def test_bidora_refuses_more_than_one_process(tiny_kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = _job_env(tiny_kit, tmp_path, "bi", LORAFORGE_METHOD="bidora", LORAFORGE_GPUS="2")
    done = _one(env)
    assert done.returncode == EXIT_PERMANENT
    assert "LORAFORGE_METHOD=bidora runs in one process" in done.stderr + done.stdout


def test_launcher_exit_codes_map_signals_and_keep_worker_codes() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    assert distributed.exit_code(SignalException("x", sigval=signal.SIGTERM)) == 143
    assert distributed.exit_code(RuntimeError("x")) == 1


def test_step_seeds_depend_on_step_and_rank_only() -> None:
    def draw(step: int, rank: int) -> torch.Tensor:
        distributed.seed_step(7, step, rank)
        return torch.rand(4)

    assert torch.equal(draw(3, 1), draw(3, 1))
    assert not torch.equal(draw(3, 0), draw(3, 1))
    assert not torch.equal(draw(3, 0), draw(4, 0))


def test_fsdp_two_processes_follow_the_one_process_run(
    tiny_kit, single: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    env = _job_env(tiny_kit, tmp_path, "fsdp", LORAFORGE_PARALLEL="fsdp")
    code, out = _finish(_torchrun(env))
    assert code == 0, out[-3000:]
    assert re.search(r"FSDP: \d+ LlamaDecoderLayer units and the root, sharded over 2", out)
    assert _losses(tmp_path, "fsdp", 4) == pytest.approx(_losses(single, "one", 4), rel=1e-5)
    one = adapter_tensors(str(single / "store" / "one" / "train"))
    sharded = adapter_tensors(str(tmp_path / "store" / "fsdp" / "train"))
    assert one.keys() == sharded.keys()  # a plain PEFT adapter, whole, not shards
    for name in one:
        torch.testing.assert_close(sharded[name], one[name], rtol=1e-4, atol=1e-5)
    # its checkpoint holds the whole optimizer state, keyed as one process keys it
    root = f"{tmp_path / 'store' / 'fsdp' / 'train'}-checkpoints"
    state = json.loads(
        (store.fetch(checkpoint.checkpoint_uri(root, 4)).path / checkpoint.STATE).read_text()
    )
    assert state["param_groups"][0]["params"] == list(range(len(one)))


def test_fsdp_trains_dora_as_one_process_does(tiny_kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dora = {"LORAFORGE_METHOD": "dora", "LORAFORGE_CHECKPOINT_INTERVAL": "0"}
    done = _one(_job_env(tiny_kit, tmp_path, "one-dora", **dora))
    assert done.returncode == 0, done.stderr[-3000:]
    code, out = _finish(
        _torchrun(_job_env(tiny_kit, tmp_path, "fsdp-dora", LORAFORGE_PARALLEL="fsdp", **dora))
    )
    assert code == 0, out[-3000:]
    one = adapter_tensors(str(tmp_path / "store" / "one-dora" / "train"))
    sharded = adapter_tensors(str(tmp_path / "store" / "fsdp-dora" / "train"))
    assert any("lora_magnitude_vector" in name for name in one)  # DoRA's magnitude, gathered
    assert one.keys() == sharded.keys()
    for name in one:
        torch.testing.assert_close(sharded[name], one[name], rtol=1e-4, atol=1e-5)


def test_fsdp_resumes_a_one_process_checkpoint(tiny_kit, single: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = single / "store" / "one" / "train-checkpoints" / "step-00000004"
    target = tmp_path / "store" / "moved" / "train-checkpoints" / "step-00000004"
    shutil.copytree(source, target)  # the artifact as published, manifest and all
    env = _job_env(tiny_kit, tmp_path, "moved", LORAFORGE_PARALLEL="fsdp")
    code, out = _finish(_torchrun(env))
    assert code == 0, out[-3000:]
    assert '"event": "resume"' in out
    one = adapter_tensors(str(single / "store" / "one" / "train"))
    moved = adapter_tensors(str(tmp_path / "store" / "moved" / "train"))
    for name in one:
        torch.testing.assert_close(moved[name], one[name], rtol=1e-4, atol=1e-5)


def test_scale_settings_report_every_problem_at_once() -> None:
    from loraforge.settings import TrainSettings, load_settings

    env = {
        "LORAFORGE_BASE_MODEL": "m",
        "LORAFORGE_DATA": "d.jsonl",
        "LORAFORGE_GPUS": "4",
        "LORAFORGE_PARALLEL": "fsdp",
        "LORAFORGE_QUANTIZATION": "nf4",
        "LORAFORGE_METHOD": "bidora",
    }
    with pytest.raises(PermanentError) as refused:
        load_settings(TrainSettings, env)
    message = str(refused.value)
    assert "LORAFORGE_GRAD_ACCUM=1 is not a multiple of the 4 training processes" in message
    assert "LORAFORGE_PARALLEL=fsdp with LORAFORGE_QUANTIZATION=nf4" in message
    assert "LORAFORGE_METHOD=bidora runs in one process" in message
    assert "\n" not in message
    settings = load_settings(
        TrainSettings,
        {**env, "LORAFORGE_GRAD_ACCUM": "8"}
        | {"LORAFORGE_QUANTIZATION": "none", "LORAFORGE_METHOD": "dora"},
    )
    assert (settings.gpus, settings.parallel, settings.grad_accum) == (4, "fsdp", 8)
