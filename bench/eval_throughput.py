"""Eval generation throughput: the transformers engine batched vs one prompt at a time.

    .venv/bin/python bench/eval_throughput.py [--problems 128] [--batch-size 32] [--shots 5]
        [--max-new-tokens 64] [--threads N]

The tiny kit's base answers its test problems in the eval job's lm-eval layout (5-shot
`Question: ...\\nAnswer:` prompts, greedy, stop at `Question:` or an end token) twice: once in
length-sorted left-padded batches on a KV cache (finished rows leave the batch), once one prompt
at a time through the same code. Asserts the outputs are identical, prints generated tokens per
second of each and their ratio. One untimed warm-up batch first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge import gsm8k, tiny
from loraforge.engines import Generation, end_token_ids
from loraforge.engines.transformers_engine import Stops, TransformersEngine


def timed(
    engine: TransformersEngine, prompts: list[list[int]], budgets: list[int]
) -> tuple[float, list[Generation]]:
    start = time.perf_counter()
    out = engine.generate_all(prompts, budgets, lambda n, t: None)
    return time.perf_counter() - start, out


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)  # the job's default
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        kit = tiny.make_tiny(Path(tmp) / "kit", n_train=400, n_val=20, n_test=args.problems)
        tokenizer = AutoTokenizer.from_pretrained(kit.model_dir)
        model = AutoModelForCausalLM.from_pretrained(kit.model_dir, dtype=torch.float32).eval()
        problems = gsm8k.load_problems(str(kit.test), limit=None, seed=args.seed)
        pool = gsm8k.load_shots(str(kit.train))
        sampler = gsm8k.ShotSampler(pool, args.shots, args.seed)
        prompts = [
            gsm8k.encode_prompt(p, [pool[i] for i in sampler.draw(p)], tokenizer, chat=False)
            for p in problems
        ]
    budgets = [args.max_new_tokens] * len(prompts)
    stops = Stops(tokenizer, end_token_ids(tokenizer, model.generation_config.eos_token_id))
    batched = TransformersEngine(model, tokenizer, {}, args.batch_size, stops)
    single = TransformersEngine(model, tokenizer, {}, 1, stops)
    batched.generate_all(prompts[:4], budgets[:4], lambda n, t: None)  # warm-up
    t_batched, out_batched = timed(batched, prompts, budgets)
    t_single, out_single = timed(single, prompts, budgets)
    assert out_batched == out_single, "batched and one-at-a-time outputs differ"
    tokens = sum(g.tokens for g in out_batched)
    lengths = [len(p) for p in prompts]
    print(
        f"{len(prompts)} problems, {args.shots}-shot prompts of {min(lengths)}-{max(lengths)} "
        f"tokens, {tokens} tokens generated, torch threads {torch.get_num_threads()}"
    )
    print(f"batched (batch {args.batch_size}): {t_batched:.2f} s, {tokens / t_batched:,.0f} tok/s")
    print(f"one at a time:     {t_single:.2f} s, {tokens / t_single:,.0f} tok/s")
    ratio = t_single / t_batched
    print(f"outputs identical; batched / one-at-a-time throughput: {ratio:.1f}x")
    return ratio


if __name__ == "__main__":
    main()
