"""The launcher never imports torch; its commands validate specs and use the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "


def run_cli(*args: str, block_torch: bool = True) -> subprocess.CompletedProcess[str]:
    code = (NO_TORCH if block_torch else "") + (
        "from loraforge.launcher.cli import main; main(sys.argv[1:])"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_launcher_imports_without_torch() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_TORCH + "import loraforge.launcher.cli, loraforge.settings, "
            "loraforge.store, loraforge.s3, loraforge.manifest; print('ok')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_check_validates_a_shipped_spec_without_torch() -> None:
    done = run_cli("check", "train", "--env-file", "jobs/train.env")
    assert done.returncode == 0, done.stderr
    assert (
        json.loads(done.stdout)["output"] == "s3://loraforge-artifacts/runs/qwen05-gsm8k-lora/train"
    )


def test_check_refuses_a_typo_with_exit_2(tmp_path: Path) -> None:
    spec = tmp_path / "t.env"
    spec.write_text("LORAFORGE_BASE_MODEL=m\nLORAFORGE_DATA=d\nLORAFORGE_RNAK=8\n")
    done = run_cli("check", "train", "--env-file", str(spec))
    assert done.returncode == 2
    assert done.stderr.strip().endswith("did you mean LORAFORGE_RANK?)")
    assert "Traceback" not in done.stderr


def test_publish_ls_fetch_round_trip_without_torch(tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    uri = str(tmp_path / "store" / "r1" / "train")
    assert run_cli("publish", str(src), uri).returncode == 0
    assert run_cli("ls", str(tmp_path / "store")).stdout.split() == [uri]
    again = run_cli("publish", str(src), uri)
    assert again.returncode == 2 and "already published" in again.stderr
    fetched = run_cli("fetch", uri, str(tmp_path / "copy"))
    assert fetched.returncode == 0 and (tmp_path / "copy" / "adapter_config.json").exists()
