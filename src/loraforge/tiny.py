"""Tiny-model kit behind `loraforge make-tiny DIR`: a small base model, its tokenizer and data.

DIR/model/ holds a 2-layer Llama- or Qwen2-shaped causal LM (safetensors) and its tokenizer;
DIR/{train,val,test}.jsonl hold synthetic GSM8K-format two-digit additions
(`{"question": ..., "answer": "... = 68 apples.\\n#### 68"}`) and DIR/tiny.json how they were made.
Everything is built offline and is a pure function of `(arch, seed, sizes, pretrain_steps)`.

Why the base is pretrained: LoRA on a random-init tiny model learns almost nothing held-out
(0-3%). 250 steps (~25 s on 2 idle cores) of full-parameter pretraining on questions of the same
shape whose answer *copies* one of the numbers asked about (plus random-token repeats, see
`PretrainSettings`) teach the format and copying, not addition. Measured with bench/tiny_kit.py
(llama, seed 0): the base answers 0% of 100 test additions and 56% of copy questions; a rank-16
LoRA then reaches 28% after 800 steps. The pretrained weights are cached, keyed by everything
that makes them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import tokenizers
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

import loraforge
from loraforge.errors import PermanentError

log = logging.getLogger("loraforge.tiny")

Arch = Literal["llama", "qwen2"]
CONFIG_CLASSES: dict[str, Callable[..., PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
}
# Small enough to pretrain in ~25 s on 2 CPU cores, big enough to learn copying numbers.
MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IM_START, IM_END)  # ids 0..5, in this order
N_SPECIAL = len(SPECIAL_TOKENS)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BPE_VOCAB_SIZE = 512
# Qwen2's pre-tokenizer (one token per digit). transformers 5 rebuilds any qwen2 model's tokenizer
# with it whatever tokenizer.json says, so the kit uses it for every arch: same ids everywhere.
PRE_TOKEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEFAULT_PRETRAIN_STEPS = 250
# Unordered pairs {a, b} of two-digit numbers: the most examples the splits can hold disjointly.
MAX_EXAMPLES = 90 * 91 // 2

NAMES = ("Tom", "Ana", "Ravi", "Mia", "Omar", "Lena", "Kofi", "Yuki")
OBJECTS = ("apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards")


@dataclass(frozen=True)
class Template:
    """One question shape. `n` in `reasoning` is the answer; `target` says which number it is."""

    question: str
    reasoning: str
    target: Literal["a", "b", "sum"]


_BUYS = "{name} has {a} {obj} and buys {b} more."
_PICKS = "{name} picked {a} {obj} in the morning and {b} in the afternoon."
_BOX = "A box holds {a} {obj}. {name} puts in {b} more."
ADDITION = (
    Template(
        _BUYS + " How many {obj} does {name} have now?",
        "{name} has {a} + {b} = {n} {obj}.",
        "sum",
    ),
    Template(
        _PICKS + " How many {obj} did {name} pick in total?",
        "{name} picked {a} + {b} = {n} {obj}.",
        "sum",
    ),
    Template(
        _BOX + " How many {obj} are in the box now?",
        "The box holds {a} + {b} = {n} {obj}.",
        "sum",
    ),
)
# Same preambles, but the answer is one of the numbers asked about: format and copying without
# arithmetic. The reasoning restates both numbers first, as the addition answers do: dense copy
# signal, which is what lets a 2-layer model learn to copy within a few hundred steps.
_HAD_BOUGHT = "{name} had {a} {obj} and bought {b} more, so "
_PICKED = "{name} picked {a} {obj} and then {b} more, so "
_HELD = "The box held {a} {obj} and got {b} more, so "
COPY = (
    Template(_BUYS + " How many {obj} did {name} buy?", _HAD_BOUGHT + "{name} bought {n}.", "b"),
    Template(
        _BUYS + " How many {obj} did {name} have at first?",
        _HAD_BOUGHT + "{name} had {n} at first.",
        "a",
    ),
    Template(
        _PICKS + " How many {obj} did {name} pick in the afternoon?",
        _PICKED + "{name} picked {n} in the afternoon.",
        "b",
    ),
    Template(
        _PICKS + " How many {obj} did {name} pick in the morning?",
        _PICKED + "{name} picked {n} in the morning.",
        "a",
    ),
    Template(_BOX + " How many {obj} did {name} put in?", _HELD + "{name} put in {n}.", "b"),
    Template(_BOX + " How many {obj} did the box hold before?", _HELD + "it held {n} before.", "a"),
)


@dataclass(frozen=True)
class PretrainSettings:
    """Full-parameter AdamW pretraining; every field is part of the cache key.

    Each step sees `batch_size` copy-task rows of `seq_len` tokens and `repeat_rows` rows of
    `repeat_len` random tokens written twice. The repeats form copy (induction) heads within ~75
    steps whatever the seed; the copy task alone often plateaus. Measured after 250 steps with
    this digit split, copy questions answered: llama seed 0, 8% without the repeats and 60% with
    them; qwen2 seed 0, 70% with them.
    """

    steps: int
    batch_size: int = 12
    seq_len: int = 192
    repeat_rows: int = 16
    repeat_len: int = 32
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01


@dataclass(frozen=True)
class TinyKit:
    """Paths written by `make_tiny`. `model_dir` holds model and tokenizer (`from_pretrained`)."""

    root: Path
    model_dir: Path
    train: Path
    val: Path
    test: Path


def make_tiny(
    out_dir: Path,
    *,
    arch: Arch = "llama",
    seed: int = 0,
    pretrain_steps: int | None = None,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 200,
    force: bool = False,
) -> TinyKit:
    """Write the kit into `out_dir`, atomically: it is built in a sibling and renamed into place.

    `pretrain_steps=None` means `DEFAULT_PRETRAIN_STEPS`; 0 gives the random-init model.
    """
    steps = DEFAULT_PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
    sizes = (n_train, n_val, n_test)
    _check_arguments(arch, steps, sizes)
    out_dir = Path(out_dir).absolute()
    _check_target(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _build(kit_paths(tmp), arch, seed, PretrainSettings(steps), sizes)
        _publish(tmp, out_dir, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny kit written to %s", out_dir)
    return kit_paths(out_dir)


def kit_paths(root: Path) -> TinyKit:
    return TinyKit(
        root, root / "model", root / "train.jsonl", root / "val.jsonl", root / "test.jsonl"
    )


def _build(
    kit: TinyKit, arch: Arch, seed: int, settings: PretrainSettings, sizes: tuple[int, int, int]
) -> None:
    for path, rows in zip(
        (kit.train, kit.val, kit.test), addition_splits(seed, sizes), strict=True
    ):
        _write_jsonl(path, rows)
    tokenizer = build_tokenizer()
    save_tokenizer(tokenizer, kit.model_dir)
    write_model(kit.model_dir, arch, seed, settings, tokenizer)
    provenance = {"arch": arch, "seed": seed, "pretrain": asdict(settings), "sizes": sizes}
    (kit.root / "tiny.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _check_arguments(arch: str, pretrain_steps: int, sizes: tuple[int, int, int]) -> None:
    if arch not in CONFIG_CLASSES:
        raise PermanentError(f"arch must be one of {sorted(CONFIG_CLASSES)}, got {arch!r}")
    if pretrain_steps < 0:
        raise PermanentError(f"pretrain_steps must be >= 0, got {pretrain_steps}")
    if min(sizes) < 1 or sum(sizes) > MAX_EXAMPLES:
        raise PermanentError(
            f"split sizes {sizes} must each be >= 1 and sum to at most {MAX_EXAMPLES} "
            "(the number of distinct unordered pairs of two-digit numbers)"
        )


# --- data ---------------------------------------------------------------------------------------


def render(template: Template, name: str, obj: str, a: int, b: int) -> dict[str, str]:
    """One GSM8K-format example: short worked reasoning, then `#### n` on the last line."""
    n = {"a": a, "b": b, "sum": a + b}[template.target]
    fields = {"name": name, "obj": obj, "a": a, "b": b, "n": n}
    return {
        "question": template.question.format(**fields),
        "answer": template.reasoning.format(**fields) + f"\n#### {n}",
    }


def _sample(rng: random.Random, templates: tuple[Template, ...], a: int, b: int) -> dict[str, str]:
    return render(rng.choice(templates), rng.choice(NAMES), rng.choice(OBJECTS), a, b)


def addition_splits(seed: int, sizes: tuple[int, ...]) -> list[list[dict[str, str]]]:
    """Train/val/test addition examples with disjoint unordered pairs {a, b}.

    Unordered, so no test question is a train question with the operands swapped.
    """
    rng = random.Random(f"loraforge-tiny-data-{seed}")
    pairs = [(a, b) for a in range(10, 100) for b in range(a, 100)]
    chosen = rng.sample(pairs, sum(sizes))
    examples = [_sample(rng, ADDITION, *(rng.sample(pair, 2))) for pair in chosen]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [examples[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def qa_text(example: dict[str, str]) -> str:
    """The lm-eval GSM8K layout the eval job prompts with (shots separated by a blank line)."""
    return f"Question: {example['question']}\nAnswer: {example['answer']}"


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --- tokenizer ----------------------------------------------------------------------------------


def _tokenizer_corpus() -> list[str]:
    """Every template with every name and object, shots joined as in few-shot prompts, and the
    chat markers: the vocabulary, independent of the seed. Digits are single bytes already."""
    chat = f"{IM_START}system\n{IM_END}\n{IM_START}user\n{IM_END}\n{IM_START}assistant\n" * 2
    shots = [
        qa_text(render(template, name, obj, 12, 34))
        for template in ADDITION + COPY
        for name in NAMES
        for obj in OBJECTS
    ]
    pairs = zip(shots[::2], shots[1::2], strict=True)
    return [chat, *("\n\n".join(pair) for pair in pairs)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (every string round-trips, no unknowns) with one token per digit.

    Normalizer, pre-tokenizer and decoder are Qwen2's, which transformers 5 imposes on qwen2
    models; the llama kit loads this tokenizer.json as is. Both archs thus see the same ids.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.normalizer = normalizers.NFC()
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, model_dir: Path) -> None:
    """`save_pretrained`, naming the class every transformers release knows.

    transformers 5 writes `TokenizersBackend`, which 4.x (vLLM's pin) cannot load; both
    read `PreTrainedTokenizerFast`.
    """
    tokenizer.save_pretrained(model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- model --------------------------------------------------------------------------------------


def tiny_config(arch: Arch, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """Vocabulary and special ids come from the tokenizer, so they always agree."""
    return CONFIG_CLASSES[arch](
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )


def init_model(config: PretrainedConfig, seed: int, eos_ids: list[int]) -> PreTrainedModel:
    """Random init, a pure function of `seed`; generation stops at any of `eos_ids`."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream where it was
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def stop_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """A chat turn ends at <|im_end|>, a plain completion at </s>."""
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]


def _copy_batch(
    rng: random.Random, tokenizer: PreTrainedTokenizerFast, settings: PretrainSettings
) -> torch.Tensor:
    """Rows of few-shot copy-task documents, each starting at a question, cut to `seq_len`.

    Several shots per row so the base also reads the eval job's 5-shot prompts in distribution.
    """
    shots = 2 + settings.seq_len // 32  # a shot is >= 40 tokens: rows always reach seq_len
    docs = [
        "\n\n".join(
            qa_text(_sample(rng, COPY, rng.randint(10, 99), rng.randint(10, 99)))
            for _ in range(shots)
        )
        for _ in range(settings.batch_size)
    ]
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return torch.tensor([row[: settings.seq_len] for row in ids])


def _lr_factor(step: int, settings: PretrainSettings) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _repeat_batch(
    generator: torch.Generator, vocab_size: int, settings: PretrainSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ordinary tokens written twice; only the second copy is scored (the first is noise)."""
    first = torch.randint(
        N_SPECIAL, vocab_size, (settings.repeat_rows, settings.repeat_len), generator=generator
    )
    input_ids = torch.cat([first, first], dim=1)  # (rows, 2 * repeat_len)
    labels = input_ids.clone()
    labels[:, : settings.repeat_len + 1] = -100  # the shift: position t predicts token t + 1
    return input_ids, labels


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    settings: PretrainSettings,
    seed: int,
) -> None:
    """Full-parameter causal-LM training on copying (no addition is ever shown)."""
    rng = random.Random(f"loraforge-tiny-pretrain-{seed}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    model.train()
    start, every = time.monotonic(), max(1, settings.steps // 10)
    for step in range(1, settings.steps + 1):
        copy_ids = _copy_batch(rng, tokenizer, settings)  # (batch_size, seq_len)
        copy_loss = model(input_ids=copy_ids, labels=copy_ids).loss
        repeat_ids, repeat_labels = _repeat_batch(generator, len(tokenizer), settings)
        repeat_loss = model(input_ids=repeat_ids, labels=repeat_labels).loss
        (copy_loss + repeat_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % every == 0 or step == settings.steps:
            eta = (time.monotonic() - start) / step * (settings.steps - step)
            log.info(
                "pretrain step %d/%d loss %.4f (copy task) %.4f (repeats) eta %.0fs",
                *(step, settings.steps, copy_loss.item(), repeat_loss.item(), eta),
            )
    model.train(False)


# --- cache --------------------------------------------------------------------------------------


def cache_root() -> Path:
    """`$LORAFORGE_CACHE/tiny`, else `~/.cache/loraforge/tiny`."""
    base = os.environ.get("LORAFORGE_CACHE") or Path.home() / ".cache" / "loraforge"
    return Path(base).expanduser() / "tiny"


def _cache_key(
    config: PretrainedConfig, seed: int, settings: PretrainSettings, tokenizer_json: str
) -> str:
    """Hash of everything the pretrained weights depend on.

    The config carries the architecture and shape; this module's source carries the templates,
    the data stream and the schedule, so editing any of them invalidates the entry.
    """
    inputs = {
        "seed": seed,
        "config": config.to_dict(),
        "pretrain": asdict(settings),
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
        "source_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "versions": [
            loraforge.__version__,
            torch.__version__,
            transformers.__version__,
            tokenizers.__version__,
        ],
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def write_model(
    model_dir: Path,
    arch: Arch,
    seed: int,
    settings: PretrainSettings,
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    """Save the base into `model_dir`: random init when `settings.steps == 0`, else pretrained."""
    config = tiny_config(arch, tokenizer)
    if settings.steps == 0:  # random init costs well under a second: not worth caching
        init_model(config, seed, stop_ids(tokenizer)).save_pretrained(model_dir)
        return
    cached = _pretrained_in_cache(config, seed, settings, tokenizer)
    for file in sorted(cached.iterdir()):
        shutil.copyfile(file, model_dir / file.name)


def _pretrained_in_cache(
    config: PretrainedConfig,
    seed: int,
    settings: PretrainSettings,
    tokenizer: PreTrainedTokenizerFast,
) -> Path:
    """The cache entry holding the pretrained model's files, built (atomically) on a miss."""
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    cached = cache_root() / _cache_key(config, seed, settings, tokenizer_json)
    if cached.is_dir():
        log.info("pretrained base from cache %s", cached)
        return cached
    log.info("pretraining the base for %d steps (cached afterwards in %s)", settings.steps, cached)
    model = init_model(config, seed, stop_ids(tokenizer))
    pretrain(model, tokenizer, settings, seed)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.tmp-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(tmp)
    try:
        tmp.rename(cached)
    except OSError:  # a concurrent build published the same key first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return cached


# --- publishing ---------------------------------------------------------------------------------


def _occupied(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _check_target(out_dir: Path, force: bool) -> None:
    if _occupied(out_dir) and not force:
        raise PermanentError(
            f"{out_dir} exists and is not empty: choose another directory, or pass "
            "force=True (`loraforge make-tiny --force`) to replace it"
        )


def _publish(tmp: Path, out_dir: Path, force: bool) -> None:
    """Rename `tmp` to `out_dir`; with `force`, the old one moves aside first and then goes."""
    old = None
    if force and _occupied(out_dir):
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
    tmp.replace(out_dir)  # POSIX rename also replaces an empty directory
    if old is not None and old.is_dir():
        shutil.rmtree(old)
    elif old is not None:
        old.unlink()
