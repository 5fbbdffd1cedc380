"""Estimator accuracy (issue #11): `sizing.estimate_train`'s peak against the measured one.

    .venv/bin/python bench/estimator.py [--grid small|full] [--sizes tiny,0.5b,1.5b,7b]
        [--ranks 8,64] [--device auto|cuda|cpu] [--steps 3] [--max-seconds N]
        [--out results.json] [--resume earlier.json]

A cell is (model size x rank x max sequence length x micro-batch x quantization x gradient
checkpointing). Each size is a random-init Qwen2-shaped model written once from its config
(Qwen2.5-0.5B, -1.5B and -7B shapes; `tiny` for the CPU) with the tiny kit's tokenizer. Per cell
the train job itself builds the trainer (`loraforge.train.build_trainer`: settings validated as
in a pod, base loaded, nf4 through bitsandbytes, kbit preparation, checkpointing, LoRA on the
default q/k/v/o targets with dropout, AdamW), its data replaced by `micro-batch` sequences of
exactly `max_seq_len` random tokens with labels everywhere (the estimator's worst case), packed
into one row; then `--steps` real optimizer steps (`Trainer.train_step`) run.

Measured on CUDA, allocator reset and emptied before each cell: the peak of
`torch.cuda.max_memory_reserved()` over loading and the steps, plus the process's memory
outside the caching allocator (CUDA context, kernels; device used minus reserved, read after the
steps), since the estimate includes ~0.6 GiB for it. The table gives both; the criterion of the
issue ("within +-10%, never under by more than 5%") is judged on reserved + context, and also
shown for reserved alone. A cell that runs out of memory is reported as such; one whose
estimate exceeds the GPU by more than 25% is skipped. Results go to `--out` as JSON after every
cell, so a run stopped at its time limit still leaves what it measured, and `--resume` with that
file lets a later run (same GPU and software) measure only the cells still missing.

On a machine without CUDA every cell's settings are checked at the tiniest size (the tiny model,
`--cpu-seq-len` tokens per sequence): the trainer builds and one step runs; predicted values are
printed for the real shapes, with "measured: n/a (no CUDA)", and nothing is claimed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config

from loraforge import tiny, train
from loraforge.data import Example
from loraforge.runner import JobContext
from loraforge.settings import TrainSettings, load_settings
from loraforge.sizing import GiB, ModelShape, TrainEstimate, estimate_train

# Qwen2.5 shapes (config.json of Qwen/Qwen2.5-{0.5B,1.5B,7B}); weights are random.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                 tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               tie_word_embeddings=False),
}  # fmt: skip
GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "small": dict(size=("tiny", "0.5b"), rank=(8,), seq=(512, 2048), micro=(1, 4)),
    "full": dict(size=tuple(SHAPES), rank=(8, 64), seq=(512, 2048), micro=(1, 4)),
}
PASS_OVER, PASS_UNDER = 10.0, -5.0  # issue #11: within +-10%, never under by more than 5%
SKIP_OVER_GPU = 1.25  # skip a cell whose estimate exceeds the GPU by this factor


@dataclass(frozen=True)
class Cell:
    size: str
    rank: int
    seq: int
    micro: int
    quantization: str
    checkpointing: bool

    @property
    def name(self) -> str:
        ckpt = "ckpt" if self.checkpointing else "no-ckpt"
        return f"{self.size} r{self.rank} {self.micro}x{self.seq} {self.quantization} {ckpt}"


def cells(
    grid: str, sizes: Sequence[str], ranks: Sequence[int], quantizations: Sequence[str]
) -> list[Cell]:
    g = GRIDS[grid]
    axes = (sizes, ranks or g["rank"], g["seq"], g["micro"], quantizations, (False, True))
    return [Cell(*values) for values in itertools.product(*axes)]


def qwen2_config(size: str) -> Qwen2Config:
    return Qwen2Config(**SHAPES[size], max_position_embeddings=32768, use_sliding_window=False)


def predict(cell: Cell, precision: str) -> TrainEstimate:
    """The estimate for the cell's real shape, read from its config as the launcher reads it."""
    return estimate_train(
        ModelShape.from_config(qwen2_config(cell.size).to_dict()),
        quantization=cell.quantization,  # type: ignore[arg-type]
        rank=cell.rank,
        tokens_per_micro_batch=cell.micro * cell.seq,
        checkpointing=cell.checkpointing,
        precision=precision,
    )


# --- building and running a cell ----------------------------------------------------------------


def write_model(size: str, root: Path, device: torch.device) -> Path:
    """Random-init model + the tiny tokenizer, once per size (initialised on `device`: fast)."""
    out = root / size
    if (out / "config.json").exists():
        return out
    tmp = root / f".{size}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device(device):
        config = qwen2_config(size)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model.save_pretrained(tmp)
    tiny.save_tokenizer(tiny.build_tokenizer(), tmp)
    del model
    free_memory(device)
    tmp.rename(out)
    return out


def settings_for(cell: Cell, model_dir: Path, work: Path, device: torch.device) -> TrainSettings:
    """The train job's settings for the cell, validated as the job validates its env."""
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{n} {n + 1}"}) + "\n" for n in range(4)))
    env = {
        "LORAFORGE_BASE_MODEL": str(model_dir),
        "LORAFORGE_DATA": str(data),
        "LORAFORGE_VAL_FRACTION": "0",
        "LORAFORGE_STORE": str(work / "store"),
        "LORAFORGE_DEVICE": device.type,
        "LORAFORGE_RANK": str(cell.rank),
        "LORAFORGE_MAX_SEQ_LEN": str(cell.seq),
        "LORAFORGE_MICRO_BATCH_SIZE": str(cell.micro),
        "LORAFORGE_QUANTIZATION": cell.quantization,
        "LORAFORGE_GRADIENT_CHECKPOINTING": "on" if cell.checkpointing else "off",
        "LORAFORGE_EVAL_INTERVAL": "0",
        "LORAFORGE_CHECKPOINT_INTERVAL": "0",
        "LORAFORGE_CHECKPOINT_SECONDS": "0",
    }
    return load_settings(TrainSettings, env)


def full_length(cell: Cell, vocab: int) -> list[Example]:
    """`micro` sequences of exactly `seq` random tokens, every token a label (worst case)."""
    generator = torch.Generator().manual_seed(0)
    rows = [
        torch.randint(vocab, (cell.seq,), generator=generator).tolist() for _ in range(cell.micro)
    ]
    return [Example(input_ids=ids, labels=list(ids)) for ids in rows]


def run_steps(settings: TrainSettings, cell: Cell, vocab: int, steps: int) -> float:
    """Build the trainer as the job does, run `steps` optimizer steps; the memory peak of the
    build (reserved bytes; 0 on the CPU), after which the step peak is measured afresh."""
    trainer = train.build_trainer(settings, JobContext())
    cuda = trainer.device.type == "cuda"
    load_peak = torch.cuda.max_memory_reserved() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train_set, trainer.val_set = full_length(cell, vocab), []
    for step in range(steps):
        trainer.train_step(step)
    if cuda:
        torch.cuda.synchronize()
    return float(load_peak)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(settings: TrainSettings, cell: Cell, vocab: int, steps: int) -> dict[str, Any]:
    """Reserved peak (load and steps) and the memory outside the allocator, in GiB; or OOM."""
    free_memory(torch.device("cuda"))
    leftover = torch.cuda.memory_allocated()
    try:
        load_peak = run_steps(settings, cell, vocab, steps)
    except torch.OutOfMemoryError:
        oom = True
    else:
        oom = False
    step_peak = torch.cuda.max_memory_reserved()
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    free_memory(torch.device("cuda"))
    if oom:
        return {"status": "oom", "gpu_gib": total / GiB}
    reserved = max(load_peak, step_peak)
    return {
        "status": "ok",
        "reserved_gib": reserved / GiB,
        "load_reserved_gib": load_peak / GiB,
        "context_gib": context / GiB,
        "measured_gib": (reserved + context) / GiB,
        "leftover_before_gib": leftover / GiB,
    }


def cpu_check(settings: TrainSettings, cell: Cell, vocab: int) -> dict[str, Any]:
    run_steps(settings, cell, vocab, 1)
    free_memory(torch.device("cpu"))
    return {"status": "cpu-check", "checked_at": f"tiny, {cell.micro}x{cell.seq} tokens"}


# --- the grid -----------------------------------------------------------------------------------


@dataclass
class Run:
    device: torch.device
    steps: int
    models: Path
    work: Path
    cpu_seq_len: int
    deadline: float
    gpu_bytes: int = 0
    checked: dict[Cell, dict[str, Any]] = field(default_factory=dict)  # CPU checks done
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # cells of --resume


def run_cell(run: Run, cell: Cell, predicted: float) -> dict[str, Any]:
    if time.monotonic() > run.deadline:
        return {"status": "not-run", "reason": "--max-seconds reached"}
    if run.device.type == "cpu":
        return check_on_cpu(run, cell)
    if predicted > SKIP_OVER_GPU * run.gpu_bytes:
        gpu = run.gpu_bytes / GiB
        return {"status": "skipped", "reason": f"estimate over {SKIP_OVER_GPU:g} x {gpu:.0f}G"}
    model_dir = write_model(cell.size, run.models, run.device)
    settings = settings_for(cell, model_dir, run.work, run.device)
    return measure(settings, cell, vocab_of(cell), run.steps)


def check_on_cpu(run: Run, cell: Cell) -> dict[str, Any]:
    """The cell's settings at the tiniest size (once for the cells that share them)."""
    seq = min(cell.seq, run.cpu_seq_len)
    small = Cell("tiny", cell.rank, seq, cell.micro, cell.quantization, cell.checkpointing)
    if small not in run.checked:
        model_dir = write_model("tiny", run.models, run.device)
        settings = settings_for(small, model_dir, run.work, run.device)
        run.checked[small] = cpu_check(settings, small, vocab_of(small))
    return run.checked[small]


def vocab_of(cell: Cell) -> int:
    return int(SHAPES[cell.size]["vocab_size"])


def error_pct(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured


def judge(row: dict[str, Any], predicted_gib: float) -> None:
    """Error of the estimate against reserved + context and against reserved alone."""
    if row["status"] == "ok":
        row["error_pct"] = error_pct(predicted_gib, row["measured_gib"])
        row["error_reserved_pct"] = error_pct(predicted_gib, row["reserved_gib"])
        row["passes"] = PASS_UNDER <= row["error_pct"] <= PASS_OVER
    elif row["status"] == "oom":  # needed more than the GPU: at best this far under
        row["error_pct_at_most"] = error_pct(predicted_gib, row["gpu_gib"])
        row["passes"] = None if row["error_pct_at_most"] >= PASS_UNDER else False


def sweep(
    run: Run, grid: list[Cell], out: Path | None, meta: dict[str, Any]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    precision = meta["precision"]
    print(f"{'cell':<34} {'predicted':>9} {'measured':>9} {'error':>8}  reserved + context")
    for cell in grid:
        if cell.name in run.done:  # measured by an earlier call (--resume)
            rows.append(run.done[cell.name])
            print(table_line(rows[-1]) + "  (resumed)", flush=True)
            continue
        estimate = predict(cell, precision)
        predicted = estimate.peak / GiB
        started = time.monotonic()
        try:
            row = run_cell(run, cell, estimate.peak)
        except Exception as exc:  # reported and counted; the sweep goes on
            row = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500]}
        row = {
            "cell": cell.name,
            **asdict(cell),
            "predicted_gib": predicted,
            "breakdown_gib": estimate.breakdown(),
            **row,
            "seconds": round(time.monotonic() - started, 1),
        }
        judge(row, predicted)
        rows.append(row)
        print(table_line(row), flush=True)
        if out is not None:
            write_json(out, meta, rows)
    return rows


def table_line(row: dict[str, Any]) -> str:
    head = f"{row['cell']:<34} {row['predicted_gib']:>8.2f}G"
    status = row["status"]
    if status == "ok":
        flag = "" if row["passes"] else "  FAIL"
        return (
            f"{head} {row['measured_gib']:>8.2f}G {row['error_pct']:>+7.1f}%  "
            f"{row['reserved_gib']:.2f} + {row['context_gib']:.2f}{flag}"
        )
    if status == "cpu-check":
        return f"{head}  measured: n/a (no CUDA); step ok at {row['checked_at']}"
    if status == "oom":
        return f"{head}  OOM (> {row['gpu_gib']:.1f}G; error <= {row['error_pct_at_most']:+.1f}%)"
    return f"{head}  {status}: {row.get('reason') or row.get('error')}"


def summarize(rows: list[dict[str, Any]], measured: bool) -> dict[str, Any]:
    if not measured:
        return {"measured": False, "reason": "no CUDA: builds and one step checked on the CPU"}
    ok = [r for r in rows if r["status"] == "ok"]
    summary: dict[str, Any] = {
        "measured": True,
        "cells": len(rows),
        "measured_cells": len(ok),
        "statuses": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
    }
    for key, label in (("error_pct", "reserved_plus_context"), ("error_reserved_pct", "reserved")):
        passing = [r for r in ok if PASS_UNDER <= r[key] <= PASS_OVER]
        over = max(ok, key=lambda r: r[key], default=None)
        under = min(ok, key=lambda r: r[key], default=None)
        summary[label] = {
            "passing": len(passing),
            "worst_over": over and {"cell": over["cell"], "error_pct": over[key]},
            "worst_under": under and {"cell": under["cell"], "error_pct": under[key]},
        }
    summary["oom_under_estimates"] = [
        r["cell"] for r in rows if r["status"] == "oom" and r["passes"] is False
    ]
    return summary


def worst(entry: dict[str, Any] | None) -> str:
    return "-" if entry is None else f"{entry['error_pct']:+.1f}% ({entry['cell']})"


def print_summary(summary: dict[str, Any]) -> None:
    if not summary["measured"]:
        print(f"summary: nothing measured ({summary['reason']}); no accuracy claimed")
        return
    print(
        f"criterion (issue #11): within +-{PASS_OVER:g}%, never under by more than "
        f"{-PASS_UNDER:g}%; cells by status {summary['statuses']}"
    )
    for label in ("reserved_plus_context", "reserved"):
        s = summary[label]
        print(
            f"  vs {label.replace('_', ' ')}: {s['passing']}/{summary['measured_cells']} measured "
            f"cells pass; worst over {worst(s['worst_over'])}; "
            f"worst under {worst(s['worst_under'])}"
        )
    if summary["oom_under_estimates"]:
        print(f"  out of memory though estimated to fit: {summary['oom_under_estimates']}")


def resumable(path: Path | None, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Cells an earlier run on the same kind of GPU finished (ok, oom or skipped), by name."""
    if path is None or not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    same = ("device", "gpu", "steps", "versions", "alloc_conf")
    if any(earlier.get(key) != meta.get(key) for key in same):
        print(f"--resume {path}: measured on another device or software; not resumed")
        return {}
    finished = ("ok", "oom", "skipped")
    return {row["cell"]: row for row in earlier["cells"] if row["status"] in finished}


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    measured = meta["device"] == "cuda"
    body = {**meta, "cells": rows, "summary": summarize(rows, measured)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(path)


# --- entry point --------------------------------------------------------------------------------


def bnb_importable() -> bool:
    try:
        importlib.import_module("bitsandbytes")
    except Exception:  # ImportError, or a CUDA library it cannot load
        return False
    return True


def describe(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    versions = {
        m: importlib.import_module(m).__version__ for m in ("torch", "transformers", "peft")
    }
    meta: dict[str, Any] = {
        "device": device.type,
        "grid": args.grid,
        "steps": args.steps,
        "versions": versions,
        "bitsandbytes": bnb_importable(),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    if meta["bitsandbytes"]:
        versions["bitsandbytes"] = importlib.import_module("bitsandbytes").__version__
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["gpu_gib"] = torch.cuda.get_device_properties(device).total_memory / GiB
        meta["precision"] = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        meta["precision"] = "bf16"  # predicted for what a GPU run would use
    return meta


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="small")
    parser.add_argument("--sizes", help=f"comma-separated subset of {', '.join(SHAPES)}")
    parser.add_argument("--ranks", help="comma-separated ranks instead of the grid's")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per cell (CUDA)")
    parser.add_argument(
        "--max-seconds", type=float, default=0, help="start no cell after (0: no limit)"
    )
    parser.add_argument(
        "--cpu-seq-len", type=int, default=64, help="tokens per sequence on the CPU"
    )
    parser.add_argument("--models-dir", type=Path, help="where the random-init models are kept")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--resume", type=Path, help="an earlier --out: its finished cells are kept, not rerun"
    )
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",") if args.sizes else list(GRIDS[args.grid]["size"])
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; known: {', '.join(SHAPES)}")
    args.sizes = sizes
    args.ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else []
    return args


def resolve(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    cuda = setting == "cuda" or (setting == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


@dataclass
class Result:
    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def main(argv: Sequence[str] | None = None) -> Result:
    args = parse(argv)
    device = resolve(args.device)
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    meta = describe(device, args)
    quantizations = ("none", "nf4") if meta["bitsandbytes"] else ("none",)
    grid = cells(args.grid, args.sizes, args.ranks, quantizations)
    print(f"{len(grid)} cells on {meta.get('gpu', 'cpu')}; {meta['versions']}")
    if not meta["bitsandbytes"]:
        print("bitsandbytes is not importable: nf4 cells left out")
    deadline = time.monotonic() + (args.max_seconds or float("inf"))
    with scratch(args.models_dir) as (models, work):
        run = Run(device, args.steps, models, work, args.cpu_seq_len, deadline)
        run.gpu_bytes = int(meta.get("gpu_gib", 0) * GiB)
        run.done = resumable(args.resume, meta)
        rows = sweep(run, grid, args.out, meta)
    summary = summarize(rows, device.type == "cuda")
    print_summary(summary)
    return Result(meta, rows, summary)


@contextlib.contextmanager
def scratch(models_dir: Path | None) -> Iterator[tuple[Path, Path]]:
    """(models, work) directories; the models are kept when `models_dir` is given."""
    with tempfile.TemporaryDirectory(prefix="loraforge-estimator-") as tmp:
        models = models_dir or Path(tmp) / "models"
        models.mkdir(parents=True, exist_ok=True)
        work = Path(tmp) / "work"
        work.mkdir()
        yield models, work


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(r["status"] == "error" for r in result.rows) else 0)
