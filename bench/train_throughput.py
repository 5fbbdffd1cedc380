"""Training throughput with packed vs right-padded micro-batches of the same examples.

    .venv/bin/python bench/train_throughput.py [--steps 20] [--micro-batch-size 8] [--arch llama]

One LoRA (r=16 on q/k/v/o) per mode, identical at the start, trained on the tiny kit's GSM8K-style
data; each step runs the same micro-batch through every mode, rotating which goes first. Modes:
padded (sdpa + padding mask), packed (one row, `VARLEN_SDPA`: causal sdpa per sequence) and
packed_4d_mask (one row, sdpa under a (T, T) block-diagonal mask). Timed per step: collation +
forward + backward + AdamW step. Prints real (non-pad) tokens per second of each mode, the ratios
to padded and the padding fraction of the padded batches; asserts nothing.

Examples concatenate 1-4 train records as a few-shot prompt (loss on the last answer only), so
lengths vary about as much as GSM8K 0- to 3-shot prompts do.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loraforge import tiny
from loraforge.packing import (
    IGNORE_INDEX,
    VARLEN_SDPA,
    Batch,
    collate_packed,
    collate_padded,
    micro_batches,
    token_loss_sum,
)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def make_examples(
    kit: tiny.TinyKit, tokenizer: PreTrainedTokenizerBase, n: int, seed: int
) -> list[Example]:
    """`n` prompts of 1-4 records: earlier records as shots, loss on the last answer + eos."""
    rows = [json.loads(line) for line in kit.train.read_text().splitlines()]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        records = rng.sample(rows, rng.randint(1, 4))
        shots = "".join(tiny.qa_text(r) + "\n\n" for r in records[:-1])
        prompt = f"{shots}Question: {records[-1]['question']}\nAnswer:"
        completion = f" {records[-1]['answer']}{tokenizer.eos_token}"
        p, c = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt, completion))
        out.append(Example(p + c, [IGNORE_INDEX] * len(p) + c))
    return out


def lora_model(model_dir: Path, attn: str) -> tuple[PreTrainedModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    model = get_peft_model(base, config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def timed_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    collate: Callable[[Sequence[Example]], Batch],
    group: Sequence[Example],
) -> float:
    """Seconds for collation + forward + backward + optimizer step of one micro-batch."""
    start = time.perf_counter()
    batch = collate(group)
    loss_sum, n_label_tokens = token_loss_sum(model, batch)
    (loss_sum / n_label_tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


# mode -> attention implementation; padded batches run sdpa with its padding mask
MODES = {"padded": "sdpa", "packed": VARLEN_SDPA, "packed_4d_mask": "sdpa"}


@dataclass
class Result:
    tokens_per_s: dict[str, float]  # real (non-pad) tokens per second, per mode
    padding_fraction: float  # of the padded batches' B x T slots

    @property
    def ratio(self) -> float:
        return self.tokens_per_s["packed"] / self.tokens_per_s["padded"]


def measure(kit: tiny.TinyKit, steps: int, warmup: int, micro_batch_size: int, seed: int) -> Result:
    tokenizer = AutoTokenizer.from_pretrained(kit.model_dir)
    examples = make_examples(kit, tokenizer, (steps + warmup) * micro_batch_size, seed)
    models = {mode: lora_model(kit.model_dir, attn) for mode, attn in MODES.items()}
    collate: dict[str, Callable[[Sequence[Example]], Batch]] = {
        "padded": lambda g: collate_padded(g, tokenizer.pad_token_id),
        "packed": lambda g: collate_packed(g, VARLEN_SDPA, torch.float32),
        "packed_4d_mask": lambda g: collate_packed(g, "sdpa", torch.float32),
    }
    seconds = dict.fromkeys(MODES, 0.0)
    real = padded_slots = 0
    chunks = micro_batches(examples, micro_batch_size, seed=seed, epoch=0)
    for step, chunk in enumerate(chunks):
        group = [examples[i] for i in chunk]
        order = list(MODES)[step % len(MODES) :] + list(MODES)[: step % len(MODES)]  # rotate
        elapsed = {m: timed_step(*models[m], collate[m], group) for m in order}
        if step < warmup:
            continue
        for mode, t in elapsed.items():
            seconds[mode] += t
        lengths = [len(e.input_ids) for e in group]
        real += sum(lengths)
        padded_slots += len(lengths) * max(lengths)
    return Result({m: real / t for m, t in seconds.items()}, 1 - real / padded_slots)


def main(argv: Sequence[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=tiny.DEFAULT_PRETRAIN_STEPS,
        help="tiny base pretraining (cached); 0 = random init, same speed, builds in ~1 s",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0 = torch's default). 1 by default: on a shared 2-core box "
        "two OpenMP threads that lose their core made steps 10-100x slower at random",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        kit = tiny.make_tiny(Path(tmp) / "kit", arch=args.arch, pretrain_steps=args.pretrain_steps)
        result = measure(kit, args.steps, args.warmup, args.micro_batch_size, args.seed)
    speed = result.tokens_per_s
    print(f"{args.arch}, micro-batch {args.micro_batch_size}, {args.steps} timed steps per mode")
    for mode, attn in MODES.items():
        print(f"  {mode:<15} {attn:<22} {speed[mode]:>9,.0f} tok/s (real tokens)")
    print(f"packed/padded = {result.ratio:.2f}x, padding fraction {result.padding_fraction:.1%}")
    print(f"packed_4d_mask/padded = {speed['packed_4d_mask'] / speed['padded']:.2f}x")
    return result


if __name__ == "__main__":
    main()
