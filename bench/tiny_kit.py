"""Benchmark the tiny-model kit: build time (cold, warm), what the base knows, what a LoRA learns.

    .venv/bin/python bench/tiny_kit.py [--lora-steps 800] [--arch llama] [--steps N]

Prints measured figures from one run; nothing here asserts a threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
import time
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

FINAL = re.compile(r"#### (-?[0-9]+)")


def timed_build(root: Path, arch: tiny.Arch, steps: int) -> tuple[float, float, tiny.TinyKit]:
    """Cold (empty cache) and warm (cache filled) wall time of `make_tiny`."""
    os.environ["LORAFORGE_CACHE"] = str(root / "cache")
    start = time.perf_counter()
    tiny.make_tiny(root / "cold", arch=arch, pretrain_steps=steps)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    kit = tiny.make_tiny(root / "warm", arch=arch, pretrain_steps=steps)
    return cold, time.perf_counter() - start, kit


@torch.no_grad()
def exact_match(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, str]]
) -> float:
    """Greedy zero-shot `Question: ...\\nAnswer:`; the first `#### N` must equal the reference."""
    prompts = [f"Question: {row['question']}\nAnswer:" for row in rows]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=40, do_sample=False)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    hits = 0
    for row, text in zip(rows, texts, strict=True):
        found = FINAL.search(text.split("\n\n")[0])
        hits += found is not None and found.group(1) == FINAL.search(row["answer"]).group(1)
    return hits / len(rows)


def copy_rows(n: int) -> list[dict[str, str]]:
    rng = random.Random("bench-copy")
    return [
        tiny.render(
            rng.choice(tiny.COPY), "Tom", "apples", rng.randint(10, 99), rng.randint(10, 99)
        )
        for _ in range(n)
    ]


def train_lora(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, kit: tiny.TinyKit, steps: int
) -> float:
    """Rank-16 LoRA on every linear layer, loss on the answer only; returns seconds taken."""
    rows = [json.loads(line) for line in kit.train.read_text().splitlines()]
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    rng, start = random.Random(0), time.perf_counter()
    peft_model.train()
    for _ in range(steps):
        batch_rows = rng.sample(rows, 32)
        prompts = [f"Question: {r['question']}\nAnswer:" for r in batch_rows]
        full = [
            f"{p} {r['answer']}{tokenizer.eos_token}"
            for p, r in zip(prompts, batch_rows, strict=True)
        ]
        enc = tokenizer(full, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for i, p in enumerate(prompts):
            labels[i, : len(tokenizer(p)["input_ids"])] = -100
        peft_model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.train(False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    parser.add_argument("--steps", type=int, default=tiny.DEFAULT_PRETRAIN_STEPS)
    parser.add_argument("--lora-steps", type=int, default=0, help="0: skip the LoRA run")
    parser.add_argument("--n-eval", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cold, warm, kit = timed_build(Path(tmp), args.arch, args.steps)
        print(f"make_tiny cold {cold:.1f}s warm {warm:.2f}s (pretrain_steps={args.steps})")
        tokenizer = AutoTokenizer.from_pretrained(kit.model_dir)
        tokenizer.padding_side = "left"  # generation appends on the right
        model = AutoModelForCausalLM.from_pretrained(kit.model_dir)
        test = [json.loads(line) for line in kit.test.read_text().splitlines()][: args.n_eval]
        print(f"base addition exact-match {exact_match(model, tokenizer, test):.1%} on {len(test)}")
        copy_score = exact_match(model, tokenizer, copy_rows(args.n_eval))
        print(f"base copy-task exact-match {copy_score:.1%}")
        if args.lora_steps > 0:
            seconds = train_lora(model, tokenizer, kit, args.lora_steps)
            score = exact_match(model, tokenizer, test)
            print(f"LoRA r=16, {args.lora_steps} steps ({seconds:.0f}s): addition {score:.1%}")


if __name__ == "__main__":
    main()
