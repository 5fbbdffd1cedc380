"""The train job on the tiny model, CPU: methods, artifact, resume after kill/SIGTERM, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loraforge import store, train
from loraforge.errors import EXIT_PERMANENT, EXIT_TERMINATED, PermanentError
from loraforge.runner import JobContext, run_job
from loraforge.settings import TrainSettings, load_settings

FAST = {
    "LORAFORGE_MICRO_BATCH_SIZE": "8",
    "LORAFORGE_EVAL_INTERVAL": "0",
    "LORAFORGE_CHECKPOINT_INTERVAL": "0",
    "LORAFORGE_CHECKPOINT_SECONDS": "0",
    "LORAFORGE_LEARNING_RATE": "3e-3",
    "LORAFORGE_DEVICE": "cpu",
    "LORAFORGE_LOG_FORMAT": "json",
    "LORAFORGE_MAX_SEQ_LEN": "256",
}


# Bit-identical weights across processes need one intra-op thread: with torch's default two,
# 2 of 50 identical BiDoRA runs differed (first at aten.cos in the rotary embedding; RELIABILITY.md)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def spec(kit, tmp_path: Path, **overrides: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    env = {
        "LORAFORGE_BASE_MODEL": str(kit.model_dir),
        "LORAFORGE_DATA": str(kit.train),
        "LORAFORGE_VAL_DATA": str(kit.val),
        "LORAFORGE_STORE": str(tmp_path / "store"),
        "LORAFORGE_RUN_ID": "t1",
        "LORAFORGE_MAX_STEPS": "12",
        **FAST,
    }
    return {**env, **overrides}


def adapter_tensors(uri: str) -> dict[str, torch.Tensor]:
    return load_file(str(store.fetch(uri).path / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "method",
    [{"LORAFORGE_RSLORA": "false"}, {"LORAFORGE_RSLORA": "true"}, {"LORAFORGE_METHOD": "dora"}],
    ids=["lora", "rslora", "dora"],
)
def test_method_trains_and_the_adapter_reproduces_the_model(
    tiny_kit,
    tmp_path: Path,
    method: dict[str, str],  # type: ignore[no-untyped-def]
) -> None:
    settings = load_settings(TrainSettings, spec(tiny_kit, tmp_path, **method))
    trainer = train.build_trainer(settings, JobContext())
    before = trainer.validation_loss()
    trainer.fit()
    assert trainer.state.val_loss is not None and before is not None
    assert trainer.state.val_loss < before - 0.1  # it learned something held out
    train.publish_adapter(trainer)

    artifact = store.fetch(settings.output_uri)
    config = json.loads((artifact.path / "adapter_config.json").read_text())
    assert config["use_dora"] == (method.get("LORAFORGE_METHOD") == "dora")
    assert config["use_rslora"] == (method.get("LORAFORGE_RSLORA", "true") == "true")
    assert config["base_model_name_or_path"] == str(tiny_kit.model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_kit.model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, artifact.path).eval()
    ids = torch.tensor([trainer.val_set[0].input_ids])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids).logits, trainer.model(ids).logits, rtol=1e-5, atol=1e-5
        )


def test_entrypoint_publishes_exactly_a_peft_adapter(tiny_kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, **spec(tiny_kit, tmp_path, LORAFORGE_MAX_STEPS="4")}
    done = subprocess.run(
        [Path(sys.executable).parent / "loraforge-train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "store" / "t1" / "train"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "loraforge.json",
    ]
    manifest = json.loads((out / "loraforge.json").read_text())
    assert manifest["job"] == "train" and manifest["metrics"]["step"] == 4
    assert manifest["settings"]["rank"] == 16
    progress = [
        json.loads(line)
        for line in done.stderr.splitlines()
        if line.startswith("{") and '"progress"' in line
    ]
    assert progress[-1]["step"] == 4 and {"loss", "lr", "tokens_per_s", "eta_s"} <= set(
        progress[-1]
    )


def _start(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [Path(sys.executable).parent / "loraforge-train"],
        env={**os.environ, **ONE_THREAD, **env},
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(path_glob: Path, pattern: str, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not list(path_glob.glob(pattern)):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"no {pattern} after {timeout}s"
        time.sleep(0.05)


def test_killed_and_terminated_runs_resume_to_the_same_weights(tiny_kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    common = {
        "LORAFORGE_MAX_STEPS": "16",
        "LORAFORGE_CHECKPOINT_INTERVAL": "4",
        "LORAFORGE_DROPOUT": "0.1",
    }
    reference = spec(tiny_kit, tmp_path, LORAFORGE_RUN_ID="ref", **common)
    assert run_job_subprocess(reference) == 0

    killed = spec(tiny_kit, tmp_path, LORAFORGE_RUN_ID="killed", **common)
    proc = _start(killed)
    ckpts = tmp_path / "store" / "killed"
    _wait_for(ckpts, "train-checkpoints/step-00000008/loraforge.json", proc, 240)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_job_subprocess(killed) == 0

    termed = spec(tiny_kit, tmp_path, LORAFORGE_RUN_ID="termed", **common)
    proc = _start(termed)
    _wait_for(
        tmp_path / "store" / "termed", "train-checkpoints/step-00000004/loraforge.json", proc, 240
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_TERMINATED, err[-2000:]
    steps = sorted(p.name for p in (tmp_path / "store/termed/train-checkpoints").iterdir())
    # the periodic one, and the step it stopped at (the same one when SIGTERM came between)
    assert steps[0] == "step-00000004" and steps[-1] >= "step-00000004"
    assert not (tmp_path / "store/termed/train").exists()
    assert run_job_subprocess(termed) == 0

    want = adapter_tensors(str(tmp_path / "store/ref/train"))
    for run in ("killed", "termed"):
        got = adapter_tensors(str(tmp_path / f"store/{run}/train"))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def run_job_subprocess(env: dict[str, str]) -> int:
    done = subprocess.run(
        [Path(sys.executable).parent / "loraforge-train"],
        env={**os.environ, **ONE_THREAD, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode


def _bad_jsonl(tmp_path: Path) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\nnot json\n'
    )
    return str(path)


def _empty(tmp_path: Path) -> str:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    return str(path)


BAD_INPUTS = {
    "missing data file": (lambda t: {"LORAFORGE_DATA": str(t / "nope.jsonl")}, "nope.jsonl"),
    "malformed line": (lambda t: {"LORAFORGE_DATA": _bad_jsonl(t)}, "bad.jsonl:3"),
    "empty dataset": (lambda t: {"LORAFORGE_DATA": _empty(t)}, "empty.jsonl"),
    "rank 0": (lambda t: {"LORAFORGE_RANK": "0"}, "LORAFORGE_RANK=0"),
    "unknown target": (
        lambda t: {"LORAFORGE_TARGET_MODULES": "q_proj,qkv"},
        "qkv not in the model; its linear modules are down_proj, gate_proj",
    ),
    "seq len above max": (
        lambda t: {"LORAFORGE_MAX_SEQ_LEN": "100000"},
        "LORAFORGE_MAX_SEQ_LEN=100000 is above the model's maximum",
    ),
    "bidora without a validation split": (
        lambda t: {
            "LORAFORGE_METHOD": "bidora",
            "LORAFORGE_VAL_DATA": "",
            "LORAFORGE_VAL_FRACTION": "0",
        },
        "LORAFORGE_METHOD=bidora trains the magnitude on a validation split",
    ),
    "bidora upper steps 0": (
        lambda t: {"LORAFORGE_METHOD": "bidora", "LORAFORGE_BIDORA_UPPER_STEPS": "0"},
        "LORAFORGE_BIDORA_UPPER_STEPS=0",
    ),
    "bidora on int8": (
        lambda t: {"LORAFORGE_METHOD": "bidora", "LORAFORGE_QUANTIZATION": "int8"},
        "LORAFORGE_QUANTIZATION=int8 with LORAFORGE_METHOD=bidora",
    ),
    "dora on int8": (
        lambda t: {"LORAFORGE_METHOD": "dora", "LORAFORGE_QUANTIZATION": "int8"},
        "LORAFORGE_QUANTIZATION=int8 with LORAFORGE_METHOD=dora",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_publishes_nothing(
    tiny_kit,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    make, expected = BAD_INPUTS[case]
    for name, value in spec(tiny_kit, tmp_path, **make(tmp_path)).items():
        monkeypatch.setenv(name, value)
    assert run_job(TrainSettings, train.run) == EXIT_PERMANENT
    errors = [
        json.loads(line)
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("{") and '"error"' in line
    ]
    assert len(errors) == 1 and expected in errors[0]["msg"], errors
    assert store.list_artifacts(str(tmp_path / "store")) == []


def test_nf4_without_bitsandbytes_exits_2(tiny_kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import sys; sys.modules['bitsandbytes'] = None; from loraforge.train import main; main()"
    )
    env = {**os.environ, **spec(tiny_kit, tmp_path, LORAFORGE_QUANTIZATION="nf4")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == EXIT_PERMANENT
    assert "LORAFORGE_QUANTIZATION=nf4 needs bitsandbytes" in done.stderr


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_trains_on_cpu(tiny_kit, tmp_path: Path, quantization: str) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings(
        TrainSettings,
        spec(tiny_kit, tmp_path, LORAFORGE_QUANTIZATION=quantization, LORAFORGE_MAX_STEPS="2"),
    )
    trainer = train.build_trainer(settings, JobContext())
    first = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.fit()
    changed = [
        n
        for n, p in trainer.model.named_parameters()
        if p.requires_grad and not torch.equal(p, first[n])
    ]
    assert changed and all(torch.isfinite(p).all() for p in first.values())
    kinds = {type(m).__name__ for m in trainer.model.modules()}
    assert ("Linear4bit" if quantization == "nf4" else "Linear8bitLt") in kinds


def test_resume_with_other_settings_is_refused(tiny_kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = spec(tiny_kit, tmp_path, LORAFORGE_MAX_STEPS="4", LORAFORGE_CHECKPOINT_INTERVAL="2")
    train.build_trainer(load_settings(TrainSettings, env), JobContext()).fit()
    changed = load_settings(TrainSettings, {**env, "LORAFORGE_RANK": "8"})
    with pytest.raises(
        PermanentError, match=r"step-00000002 was made with other settings \(rank\)"
    ):
        train.build_trainer(changed, JobContext()).resume()


def test_gradient_checkpointing_gives_the_same_step(tiny_kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    adapters = []
    for mode in ("off", "on"):
        env = spec(
            tiny_kit,
            tmp_path,
            LORAFORGE_MAX_STEPS="2",
            LORAFORGE_DROPOUT="0",
            LORAFORGE_GRADIENT_CHECKPOINTING=mode,
            LORAFORGE_RUN_ID=f"gc-{mode}",
        )
        trainer = train.build_trainer(load_settings(TrainSettings, env), JobContext())
        trainer.fit()
        adapters.append(
            {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
        )
    for name, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_trains_on_cuda(tiny_kit, tmp_path: Path, quantization: str) -> None:  # type: ignore[no-untyped-def]
    env = spec(
        tiny_kit,
        tmp_path,
        LORAFORGE_DEVICE="cuda",
        LORAFORGE_MAX_STEPS="20",
        LORAFORGE_QUANTIZATION=quantization,
        LORAFORGE_RUN_ID=f"cuda-{quantization}",
    )
    settings = load_settings(TrainSettings, env)
    trainer = train.build_trainer(settings, JobContext())
    before = trainer.validation_loss()
    trainer.fit()
    assert before is not None and trainer.state.val_loss is not None
    assert trainer.state.val_loss < before
    train.publish_adapter(trainer)
    assert store.exists(settings.output_uri)
