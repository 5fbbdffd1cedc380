"""Peak memory of the eval job and the artifact store at two sizes: does it grow with the count?

    .venv/bin/python bench/load_rss.py [--eval 100x2,1000x10] [--files 200,2000]
        [--file-mib 16,256] [--s3] [--json]

Each measurement is one process (`loraforge-eval`, `loraforge publish`, `loraforge fetch`)
started by a fresh wrapper, whose `getrusage(RUSAGE_CHILDREN).ru_maxrss` is that process's
peak RSS. Eval scores N problems of the tiny kit with M LoRA adapters (0-shot, 8 new tokens);
the store publishes then fetches an artifact of F files, or of one file of S MiB, to a local
store (and to the S3 of AWS_ENDPOINT_URL with --s3). Prints each peak and the ratio of the
larger size's peak to the smaller's (1.0: no growth), one line each, or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
_WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'code': done.returncode, 'kib': peak, 'err': done.stderr[-2000:]}))\n"
)


def peak_rss(command: list[str], env: dict[str, str]) -> int:
    """Peak RSS of `command` in KiB (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *command],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=3600,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(f"{command[0]} exited {result['code']}: {result['err']}")
    return int(result["kib"])


def make_adapters(model_dir: Path, root: Path, count: int) -> list[str]:
    """`count` LoRA adapters with random B, published to a local store under `root`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraforge import store

    uris = []
    for index in range(count):
        torch.manual_seed(index)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(base, config)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        model.save_pretrained(root / "src" / f"a{index}")
        uri = str(root / "adapters" / f"a{index}" / "train")
        store.publish(root / "src" / f"a{index}", uri, job="train", run_id=f"a{index}")
        uris.append(uri)
    return uris


def eval_peak(kit: Any, adapters: list[str], problems: int, root: Path) -> int:
    env = {
        "LORAFORGE_BASE_MODEL": str(kit.model_dir),
        "LORAFORGE_ADAPTERS": ",".join(adapters),
        "LORAFORGE_EVAL_DATA": str(kit.test),
        "LORAFORGE_EVAL_LIMIT": str(problems),
        "LORAFORGE_NUM_FEWSHOT": "0",
        "LORAFORGE_MAX_NEW_TOKENS": "8",
        "LORAFORGE_BOOTSTRAP_SAMPLES": "200",
        "LORAFORGE_STORE": str(root / "store"),
        "LORAFORGE_RUN_ID": f"load-{problems}x{len(adapters)}",
        "LORAFORGE_DEVICE": "cpu",
        "LORAFORGE_LOG_FORMAT": "json",
    }
    return peak_rss([str(BIN / "loraforge-eval")], env)


def store_peaks(src: Path, root: str, work: Path) -> tuple[int, int]:
    """Peak RSS of publishing `src` to `root` and of fetching it back into `work`."""
    name = uuid.uuid4().hex[:8]
    uri = f"{root.rstrip('/')}/{name}"
    publish = peak_rss([str(BIN / "loraforge"), "publish", str(src), uri], {})
    fetch = peak_rss([str(BIN / "loraforge"), "fetch", uri, str(work / "copies" / name)], {})
    return publish, fetch


def write_files(root: Path, count: int, size: int) -> Path:
    root.mkdir(parents=True)
    for index in range(count):
        (root / f"d{index % 10}").mkdir(exist_ok=True)
        with (root / f"d{index % 10}" / f"f{index}.bin").open("wb") as fh:
            for _ in range(max(1, size // 2**20)):
                fh.write(os.urandom(min(size, 2**20)))
    return root


def measure(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from loraforge.tiny import make_tiny

    rows = []
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.eval.split(",") if s]
    if sizes:
        kit = make_tiny(work / "kit", n_train=400, n_val=20, n_test=max(n for n, _ in sizes))
        adapters = make_adapters(kit.model_dir, work, max(m for _, m in sizes) - 1)
        peaks = [eval_peak(kit, ["base", *adapters[: m - 1]], n, work) for n, m in sizes]
        rows.append({"what": "eval", "sizes": args.eval, "peak_kib": peaks})
    roots = [str(work / "store")] + ([f"{args.s3.rstrip('/')}/load"] if args.s3 else [])
    for root in roots:
        kind = "s3" if root.startswith("s3://") else "local"
        for label, shapes in (
            ("files", [(int(n), 64 * 2**10) for n in args.files.split(",")]),
            ("file MiB", [(1, int(s) * 2**20) for s in args.file_mib.split(",")]),
        ):
            peaks = []
            for count, size in shapes:
                src = write_files(work / f"src-{uuid.uuid4().hex[:6]}", count, size)
                peaks.append(store_peaks(src, root, work))
            sizes_text = args.files if label == "files" else args.file_mib
            for index, step in enumerate(("publish", "fetch")):
                rows.append(
                    {
                        "what": f"store {step} ({kind}), {label}",
                        "sizes": sizes_text,
                        "peak_kib": [p[index] for p in peaks],
                    }
                )
    for row in rows:
        row["ratio"] = round(row["peak_kib"][-1] / row["peak_kib"][0], 3)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", default="100x2,1000x10", help="problems x adapters (with base)")
    parser.add_argument("--files", default="200,2000", help="files of 64 KiB in one artifact")
    parser.add_argument("--file-mib", default="16,256", help="one file of this many MiB")
    parser.add_argument("--s3", default="", help="also an S3 store: s3://bucket (AWS_* env)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loraforge-load-") as tmp:
        rows = measure(args, Path(tmp))
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            peaks = " -> ".join(f"{p / 1024:.0f} MiB" for p in row["peak_kib"])
            print(f"{row['what']:<36} {row['sizes']:>14}: {peaks}  ratio {row['ratio']:.2f}")
    return rows


if __name__ == "__main__":
    main()
