"""BiDoRA vs DoRA on the tiny kit: held-out loss at equal steps (several seeds) and step time.

    .venv/bin/python bench/bidora.py [--steps 200] [--seeds 0 1 2] [--lower-steps 1]

Both train the same DoRA adapter (rank 16 on every linear module, same data order, same
learning rate and schedule) for the same number of direction steps; BiDoRA also trains the
magnitude on the validation split through the second-order hypergradient. The loss compared is
on the kit's *test* split, which neither saw: the validation split is BiDoRA's upper-level
training data, so its loss there would flatter it. Prints one line per seed and the mean step
time ratio bidora / dora. No claim is made beyond the printed figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from loraforge import data, packing, tiny, train
from loraforge.modeling import load_tokenizer
from loraforge.runner import JobContext
from loraforge.settings import TrainSettings, load_settings


@torch.no_grad()
def heldout_loss(trainer: train.Trainer, examples: list[data.Example]) -> float:
    trainer.model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), 16):
        batch = trainer.collate(examples[start : start + 16])
        loss_sum, n = packing.token_loss_sum(trainer.model, batch)
        total, count = total + float(loss_sum), count + n
    return total / count


def run(
    kit: tiny.TinyKit, store: Path, method: str, seed: int, steps: int, lower: int
) -> tuple[float, float]:
    """(held-out loss, seconds per step) after `steps` direction steps."""
    env = {
        "LORAFORGE_BASE_MODEL": str(kit.model_dir),
        "LORAFORGE_DATA": str(kit.train),
        "LORAFORGE_VAL_DATA": str(kit.val),
        "LORAFORGE_STORE": str(store),
        "LORAFORGE_RUN_ID": f"{method}-{seed}",
        "LORAFORGE_METHOD": method,
        "LORAFORGE_SEED": str(seed),
        "LORAFORGE_MAX_STEPS": str(steps),
        "LORAFORGE_MICRO_BATCH_SIZE": "16",
        "LORAFORGE_LEARNING_RATE": "3e-3",
        "LORAFORGE_RSLORA": "false",
        "LORAFORGE_TARGET_MODULES": "all-linear",
        "LORAFORGE_MAX_SEQ_LEN": "256",
        "LORAFORGE_EVAL_INTERVAL": "0",
        "LORAFORGE_CHECKPOINT_INTERVAL": "0",
        "LORAFORGE_CHECKPOINT_SECONDS": "0",
        "LORAFORGE_BIDORA_LOWER_STEPS": str(lower),
        "LORAFORGE_DEVICE": "cpu",
        "LORAFORGE_LOG_FORMAT": "json",
    }
    settings = load_settings(TrainSettings, env)
    trainer = train.build_trainer(settings, JobContext())
    tokenizer = load_tokenizer(str(kit.model_dir), settings)
    records = data.read_records(str(kit.test))
    test = data.tokenize(records, tokenizer, settings.max_seq_len, str(kit.test))
    start = time.perf_counter()
    trainer.fit()
    seconds = (time.perf_counter() - start) / steps
    return heldout_loss(trainer, test), seconds


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lower-steps", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=2000)
    args = parser.parse_args(argv)
    ratios, deltas = [], []
    with tempfile.TemporaryDirectory() as tmp:
        kit = tiny.make_tiny(Path(tmp) / "kit", n_train=args.n_train, n_val=200, n_test=200)
        for seed in args.seeds:
            dora_loss, dora_s = run(kit, Path(tmp) / "s", "dora", seed, args.steps, 1)
            bi_loss, bi_s = run(kit, Path(tmp) / "s", "bidora", seed, args.steps, args.lower_steps)
            ratios.append(bi_s / dora_s)
            deltas.append(bi_loss - dora_loss)
            print(
                f"seed {seed}: test loss after {args.steps} steps: dora {dora_loss:.4f}, "
                f"bidora {bi_loss:.4f} ({bi_loss - dora_loss:+.4f}); step time dora "
                f"{1e3 * dora_s:.0f} ms, bidora {1e3 * bi_s:.0f} ms ({bi_s / dora_s:.2f}x)"
            )
    mean_ratio, mean_delta = statistics.mean(ratios), statistics.mean(deltas)
    print(
        f"mean over {len(args.seeds)} seeds: bidora - dora test loss {mean_delta:+.4f}; "
        f"step time bidora / dora {mean_ratio:.2f}x (lower steps per upper step: "
        f"{args.lower_steps})"
    )
    return {"step_time_ratio": mean_ratio, "loss_delta": mean_delta}


if __name__ == "__main__":
    main()
