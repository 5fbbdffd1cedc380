"""The tiny-model kit: loads offline, takes a LoRA, is deterministic, and its data is right."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loraforge import tiny
from loraforge.errors import PermanentError

FINAL = re.compile(r"#### (-?[0-9]+)$")
SMALL = {"n_train": 200, "n_val": 20, "n_test": 20}
STEPS = 3  # enough to exercise pretraining and the cache; the base's skill is a slow test


def build(root: Path, cache: Path, **kwargs: object) -> tiny.TinyKit:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFORGE_CACHE", str(cache))
        return tiny.make_tiny(root, **{"pretrain_steps": STEPS, **SMALL, **kwargs})


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> tiny.TinyKit:
    root = tmp_path_factory.mktemp("tiny")
    return build(root / "kit", root / "cache")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield


def rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def operands(question: str) -> tuple[int, int]:
    a, b = (int(x) for x in re.findall(r"[0-9]+", question))
    return a, b


def test_kit_loads_offline_and_logits_span_the_tokenizer(kit: tiny.TinyKit, offline: None) -> None:
    tokenizer = AutoTokenizer.from_pretrained(kit.model_dir)
    model = AutoModelForCausalLM.from_pretrained(kit.model_dir)
    batch = tokenizer(
        ["Question: Tom has 23 apples.", "Answer: 68"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (
        model.config.bos_token_id,
        model.config.eos_token_id,
        model.config.pad_token_id,
    ) == special
    assert len(set(special)) == 3


def test_kit_writes_exactly_these_files_and_no_pickles(kit: tiny.TinyKit) -> None:
    assert sorted(p.name for p in kit.root.iterdir()) == [
        "model", "test.jsonl", "tiny.json", "train.jsonl", "val.jsonl",
    ]  # fmt: skip
    assert sorted(p.name for p in kit.model_dir.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert not [p for p in kit.root.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_lora_attaches_with_hand_counted_params_and_round_trips(
    kit: tiny.TinyKit, offline: None, tmp_path: Path
) -> None:
    config = AutoConfig.from_pretrained(kit.model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(kit.model_dir),
        LoraConfig(target_modules=["q_proj", "v_proj"], r=4),
    )
    head_dim = config.hidden_size // config.num_attention_heads
    q_out, v_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    # A: (r, in), B: (out, r) per adapted projection
    per_layer = 4 * (config.hidden_size + q_out) + 4 * (config.hidden_size + v_out)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == config.num_hidden_layers * per_layer == 3584
    with torch.no_grad():  # B starts at zero: make the adapter change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(kit.model_dir), tmp_path / "adapter"
    )
    input_ids = torch.tensor([[5, 40, 41, 42, 43]])
    with torch.no_grad():
        expected, got = model(input_ids=input_ids).logits, loaded(input_ids=input_ids).logits
        with loaded.disable_adapter():
            base = loaded(input_ids=input_ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base)


def test_same_seed_gives_identical_bytes_cold_or_warm_and_another_seed_differs(
    kit: tiny.TinyKit, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="loraforge.tiny"):
        cold = build(tmp_path / "cold", tmp_path / "fresh-cache")
    assert any(f"pretrain step {STEPS}/{STEPS} loss" in r.getMessage() for r in caplog.records)
    warm = build(tmp_path / "warm", tmp_path / "fresh-cache")
    other = build(tmp_path / "other", tmp_path / "fresh-cache", seed=1)
    assert file_hashes(cold.root) == file_hashes(warm.root) == file_hashes(kit.root)
    differs = {k for k, v in file_hashes(other.root).items() if file_hashes(kit.root)[k] != v}
    assert {"model/model.safetensors", "train.jsonl", "test.jsonl"} <= differs
    assert "model/tokenizer.json" not in differs  # the vocabulary does not depend on the seed


def test_warm_build_reuses_the_cache_without_pretraining(
    kit: tiny.TinyKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pretraining(*args: object) -> None:
        raise AssertionError("pretrained although the cache holds this base")

    monkeypatch.setattr(tiny, "pretrain", no_pretraining)
    warm = build(tmp_path / "warm", kit.root.parent / "cache")
    assert file_hashes(warm.root) == file_hashes(kit.root)


def test_answers_end_with_the_sum_of_the_numbers_in_the_question(kit: tiny.TinyKit) -> None:
    examples = [row for path in (kit.train, kit.val, kit.test) for row in rows(path)]
    examples += [row for split in tiny.addition_splits(7, (2000, 200, 200)) for row in split]
    for row in examples:
        a, b = operands(row["question"])
        found = FINAL.search(row["answer"])
        assert found is not None and int(found.group(1)) == a + b, row
        assert f"{a} + {b} = {a + b}" in row["answer"]


def test_splits_are_disjoint_even_with_operands_swapped() -> None:
    train, val, test = tiny.addition_splits(0, (2000, 200, 200))
    assert (len(train), len(val), len(test)) == (2000, 200, 200)
    pairs = [
        {frozenset(operands(row["question"])) for row in split} for split in (train, val, test)
    ]
    assert len(pairs[0]) == 2000 and len(pairs[1]) == 200 and len(pairs[2]) == 200
    assert not pairs[0] & pairs[1] and not pairs[0] & pairs[2] and not pairs[1] & pairs[2]


def test_tokenizer_round_trips_and_gives_every_digit_its_own_token(
    kit: tiny.TinyKit, offline: None
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(kit.model_dir)
    for row in rows(kit.test):
        for text in (row["question"], tiny.qa_text(row)):
            assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(" 1234 + 506")["input_ids"])
    assert pieces == ["Ġ", "1", "2", "3", "4", "Ġ+", "Ġ", "5", "0", "6"]
    chat = [{"role": "user", "content": "Hi 23"}, {"role": "assistant", "content": "68"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == "<|im_start|>user\nHi 23<|im_end|>\n<|im_start|>assistant\n68<|im_end|>\n"
    ids = tokenizer(text)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2


def test_qwen2_kit_loads_and_tokenizes_exactly_like_the_llama_kit(
    kit: tiny.TinyKit, tmp_path: Path, offline: None
) -> None:
    """transformers 5 rebuilds a qwen2 model's tokenizer as Qwen2Tokenizer; ids must not change."""
    qwen = build(tmp_path / "qwen", tmp_path / "cache", arch="qwen2", pretrain_steps=0)
    model = AutoModelForCausalLM.from_pretrained(qwen.model_dir)
    assert model.config.model_type == "qwen2"
    llama_tok, qwen_tok = (AutoTokenizer.from_pretrained(k.model_dir) for k in (kit, qwen))
    chat = [{"role": "user", "content": rows(kit.test)[0]["question"]}]
    texts = [tiny.qa_text(row) for row in rows(kit.test)]
    texts += [qwen_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)]
    assert [qwen_tok(t)["input_ids"] for t in texts] == [llama_tok(t)["input_ids"] for t in texts]
    assert len(qwen_tok) == len(llama_tok) == model.config.vocab_size
    with torch.no_grad():
        logits = model(**qwen_tok(texts[:1], return_tensors="pt")).logits
    assert logits.shape[-1] == len(qwen_tok)
    assert not (tmp_path / "cache").exists()  # random init is not cached


def test_non_empty_dir_is_refused_without_force_and_replaced_with_it(tmp_path: Path) -> None:
    out = tmp_path / "kit"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(PermanentError, match=r"exists and is not empty.*force"):
        build(out, tmp_path / "cache", pretrain_steps=0)
    assert (out / "mine.txt").read_text() == "keep me"
    build(out, tmp_path / "cache", pretrain_steps=0, force=True)
    assert not (out / "mine.txt").exists() and (out / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit"]  # no temp or old dirs left


def test_interrupted_build_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "write_model", crash)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "kit", tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_permanent_errors(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="arch must be one of"):
        build(tmp_path / "a", tmp_path / "cache", arch="gpt2")
    with pytest.raises(PermanentError, match="sum to at most 4095"):
        build(tmp_path / "b", tmp_path / "cache", n_train=4000, n_val=100)
    assert list(tmp_path.iterdir()) == []


@torch.no_grad()
def exact_match(model_dir: Path, examples: list[dict[str, str]]) -> float:
    """Greedy zero-shot `Question: ...\\nAnswer:`; the first `#### N` must be the reference."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = tokenizer(
        [f"Question: {e['question']}\nAnswer:" for e in examples], return_tensors="pt", padding=True
    )
    out = model.generate(**batch, max_new_tokens=40, do_sample=False)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    final = [re.search(r"#### (-?[0-9]+)", t.split("\n\n")[0]) for t in texts]
    hits = [
        f is not None and f.group(1) == FINAL.search(e["answer"]).group(1)
        for f, e in zip(final, examples, strict=True)
    ]
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_default_base_copies_numbers_but_cannot_add(tmp_path: Path, offline: None) -> None:
    kit = build(
        tmp_path / "kit",
        tmp_path / "cache",
        pretrain_steps=None,
        n_train=2000,
        n_val=200,
        n_test=200,
    )
    rng = random.Random(0)
    copies = [
        tiny.render(
            rng.choice(tiny.COPY), "Tom", "apples", rng.randint(10, 99), rng.randint(10, 99)
        )
        for _ in range(50)
    ]
    assert exact_match(kit.model_dir, copies) >= 0.3
    assert exact_match(kit.model_dir, rows(kit.test)[:50]) <= 0.04
