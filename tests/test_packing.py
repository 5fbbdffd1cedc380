"""Packed and padded micro-batches give the same per-token losses, logits and LoRA gradients as
running each sequence alone; position_ids alone are not enough under sdpa/eager."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

from loraforge import tiny
from loraforge.errors import PermanentError
from loraforge.packing import (
    IGNORE_INDEX,
    VARLEN_SDPA,
    Batch,
    block_causal_mask,
    collate_packed,
    collate_padded,
    micro_batches,
    packed_lengths,
    shifted_token_losses,
    token_loss_sum,
)

VOCAB, PAD = 96, 0
ATOL = 1e-5
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}  # qwen2: q/k/v biases


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def make_examples(lengths: list[int], prompt: int = 3, seed: int = 0) -> list[Example]:
    """Random token sequences whose first `prompt` tokens take no loss."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def build_model(arch: str, attn: str) -> PreTrainedModel:
    config = CONFIGS[arch](vocab_size=VOCAB, pad_token_id=PAD, **tiny.MODEL_SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.train(False)


@pytest.fixture(
    scope="module",
    params=[(a, i) for a in CONFIGS for i in ("sdpa", "eager", VARLEN_SDPA)],
    ids=lambda p: "-".join(p),
)
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return build_model(*request.param)


EXAMPLES = make_examples([9, 17, 5, 12])


@torch.no_grad()
def alone(model: PreTrainedModel, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (T, V) and per-token losses (T,) of one sequence run by itself, unpadded."""
    ids = torch.tensor([example.input_ids])
    logits = model(input_ids=ids).logits
    return logits[0], shifted_token_losses(logits, torch.tensor([example.labels]))[0]


@torch.no_grad()
def run(
    model: PreTrainedModel, batch: Batch, use_cache: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**{**batch.model_inputs(), "use_cache": use_cache}).logits
    return logits, shifted_token_losses(logits, batch.labels)


@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "cache"])
def test_packed_logits_and_losses_equal_one_at_a_time(
    model: PreTrainedModel, use_cache: bool
) -> None:
    """With a cache transformers ignores position_ids for masking: the 4D mask alone isolates."""
    batch = collate_packed(EXAMPLES, model.config._attn_implementation, torch.float32)
    logits, losses = run(model, batch, use_cache)
    for k, part in enumerate(torch.split(torch.arange(batch.n_tokens), batch.seq_lengths)):
        ref_logits, ref_losses = alone(model, EXAMPLES[k])
        torch.testing.assert_close(logits[0, part], ref_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(losses[0, part], ref_losses, atol=ATOL, rtol=0)


def test_padded_logits_and_losses_equal_one_at_a_time(model: PreTrainedModel) -> None:
    batch = collate_padded(EXAMPLES, PAD)
    logits, losses = run(model, batch)
    for k, n in enumerate(batch.seq_lengths):
        ref_logits, ref_losses = alone(model, EXAMPLES[k])
        torch.testing.assert_close(logits[k, :n], ref_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(losses[k, :n], ref_losses, atol=ATOL, rtol=0)
        assert (batch.labels[k, n:] == IGNORE_INDEX).all()


def test_loss_sums_and_label_counts_agree_across_modes(model: PreTrainedModel) -> None:
    packed = collate_packed(EXAMPLES, model.config._attn_implementation, torch.float32)
    padded = collate_padded(EXAMPLES, PAD)
    # every label after the prompt takes loss, and none crosses a sequence boundary
    expected = sum(sum(lab != IGNORE_INDEX for lab in e.labels[1:]) for e in EXAMPLES)
    assert packed.n_label_tokens == padded.n_label_tokens == expected
    assert packed.n_tokens == padded.n_tokens == sum(len(e.input_ids) for e in EXAMPLES)
    with torch.no_grad():
        packed_sum, _ = token_loss_sum(model, packed)
        padded_sum, _ = token_loss_sum(model, padded)
        # HF's own loss with num_items_in_batch is the same sum, normalised
        hf = model(**padded.model_inputs(), labels=padded.labels, num_items_in_batch=expected)
    torch.testing.assert_close(packed_sum, padded_sum, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(hf.loss * expected, padded_sum, atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_position_ids_alone_do_not_isolate_packed_sequences(attn: str) -> None:
    """Why the 4D mask exists: with a 2D mask or the default KV cache, sequence 2 sees the 1st."""
    model = build_model("llama", attn)
    batch = collate_packed(EXAMPLES[:2], attn, torch.float32)
    ref, _ = alone(model, EXAMPLES[1])
    second = slice(batch.seq_lengths[0], batch.n_tokens)
    ones = torch.ones_like(batch.input_ids)
    with torch.no_grad():
        with_2d_mask = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                             attention_mask=ones, use_cache=False).logits  # fmt: skip
        default_cache = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        # transformers infers packing from position_ids only without a mask and without a cache
        no_cache = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
        ).logits
    assert (with_2d_mask[0, second] - ref).abs().max() > 1e-2
    assert (default_cache[0, second] - ref).abs().max() > 1e-2
    torch.testing.assert_close(no_cache[0, second], ref, atol=ATOL, rtol=0)


def lora_grads(model: PreTrainedModel, batches: list[Batch]) -> dict[str, torch.Tensor]:
    """LoRA gradients of one optimizer step: loss sums over micro-batches / all label tokens."""
    n_total = sum(b.n_label_tokens for b in batches)
    model.zero_grad(set_to_none=True)
    for batch in batches:
        loss_sum, _ = token_loss_sum(model, batch)
        (loss_sum / n_total).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", VARLEN_SDPA])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_lora_gradients_equal_packed_and_padded(arch: str, attn: str) -> None:
    # init_lora_weights=False: B != 0, so A gets a gradient too
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(build_model(arch, attn).train(), config)
    examples = make_examples([9, 17, 5, 12, 20, 7], seed=1)
    chunks = micro_batches(examples, 4, seed=0, epoch=0)  # two micro-batches: 4 + 2
    packed = [collate_packed([examples[i] for i in c], attn, torch.float32) for c in chunks]
    padded = [collate_padded([examples[i] for i in c], PAD) for c in chunks]
    grads_packed, grads_padded = lora_grads(peft_model, packed), lora_grads(peft_model, padded)
    assert len(grads_packed) == 2 * 2 * 2  # lora_A and lora_B of q and v in 2 layers
    assert grads_packed.keys() == grads_padded.keys()
    for name, grad in grads_packed.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads_padded[name], atol=ATOL, rtol=1e-4, msg=name)


def test_packed_batch_layout() -> None:
    examples = [Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [-100, 9])]
    batch = collate_packed(examples, "sdpa", torch.float32)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.labels.tolist() == [[-100, 6, 7, -100, 9]]  # no loss across the boundary
    assert (batch.n_tokens, batch.n_label_tokens) == (5, 3)
    assert batch.attention_mask is not None and batch.attention_mask.dtype == torch.bool
    assert batch.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    padded = collate_padded(examples, pad_token_id=0)
    assert padded.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded.labels.tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert padded.attention_mask is not None
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_mask_format_follows_attn_implementation() -> None:
    eager = block_causal_mask([2, 1], "eager", torch.bfloat16)
    assert eager is not None and eager.dtype == torch.bfloat16 and eager.shape == (1, 1, 3, 3)
    assert eager[0, 0, 2, 2] == 0 and eager[0, 0, 2, 0] == torch.finfo(torch.bfloat16).min
    assert block_causal_mask([2, 1], "flash_attention_2", torch.bfloat16) is None
    with pytest.raises(PermanentError, match="flex_attention"):
        block_causal_mask([2, 1], "flex_attention", torch.float32)
    with pytest.raises(ValueError, match="equal length"):
        collate_padded([Example([1, 2], [1])], 0)


def test_collates_the_data_module_examples() -> None:
    from loraforge.data import Example as DataExample

    examples = [DataExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), DataExample([8, 9], [8, 9])]
    assert collate_packed(examples, VARLEN_SDPA, torch.float32).n_label_tokens == 3
    assert collate_padded(examples, PAD).n_label_tokens == 3


def test_packed_lengths_read_sequence_starts_from_position_ids() -> None:
    assert packed_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [3, 2, 1]
    assert packed_lengths(torch.tensor([[0, 1, 2, 3]])) is None  # one sequence: plain causal
    assert packed_lengths(torch.tensor([[0, 1, 0], [0, 1, 2]])) is None  # padded rows
    assert packed_lengths(None) is None


def test_varlen_sdpa_refuses_sliding_window() -> None:
    config = Qwen2Config(
        vocab_size=VOCAB, use_sliding_window=True, sliding_window=4, max_window_layers=0,
        **tiny.MODEL_SHAPE,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation=VARLEN_SDPA)
    batch = collate_packed(EXAMPLES[:2], VARLEN_SDPA, torch.float32)
    with pytest.raises(PermanentError, match="sliding-window"):
        model(**batch.model_inputs())


def test_micro_batches_are_deterministic_and_cover_each_example_once() -> None:
    examples = range(23)
    first = micro_batches(examples, 5, seed=3, epoch=0)
    assert first == micro_batches(examples, 5, seed=3, epoch=0)
    assert [len(c) for c in first] == [5, 5, 5, 5, 3]  # the remainder is kept
    assert sorted(i for c in first for i in c) == list(range(23))
    assert first != micro_batches(examples, 5, seed=3, epoch=1)
    assert first != micro_batches(examples, 5, seed=4, epoch=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        micro_batches(examples, 0, seed=0, epoch=0)


def test_throughput_bench_runs_with_tiny_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    path = Path(__file__).parents[1] / "bench" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    argv = ["--steps", "1", "--warmup", "0", "--micro-batch-size", "2", "--pretrain-steps", "0"]
    result = bench.main(argv)
    assert set(result.tokens_per_s) == {"padded", "packed", "packed_4d_mask"}
    assert result.ratio > 0 and 0 <= result.padding_fraction < 1
