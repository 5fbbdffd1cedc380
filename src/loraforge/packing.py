"""Micro-batch collation for the train job: packed (one row, sequences isolated) or right-padded.

Both modes see the same examples per micro-batch (`micro_batches`) and give the same per-token
losses, so switching `LORAFORGE_PACKING` changes speed, not the maths.

Labels follow the Hugging Face convention: aligned with `input_ids` (the loss shifts them), -100
where no loss is taken. The first token of every sequence is -100 in both modes: in a packed row
the logit before it belongs to the *previous* sequence, and unpacked it has no logit before it at
all, so masking it makes packed == padded == one-at-a-time, token for token.

Isolation of packed sequences (measured with transformers 5.23, torch 2.13 CPU):
- reset `position_ids` alone do not isolate them under `sdpa`/`eager` when a 2D mask is passed or
  a KV cache is built (`use_cache` defaults to True, also in train mode): transformers only infers
  packing from `position_ids` when `attention_mask is None` and there is no cache;
- an explicit 4D block-diagonal causal mask does, whatever `use_cache` says: transformers passes a
  4D mask to the attention function unchanged. `sdpa` takes a bool mask (True = attend); `eager`
  *adds* the mask to the scores, so it gets an additive float mask (0 / dtype min);
- flash-attention's varlen path isolates them from `position_ids` natively: no mask is passed.

A T-long row under one (T, T) mask costs T² attention, more than the padded batch's B·max(len)²:
on CPU, mask-packed training ran at 0.72-0.78x the padded speed (bench/train_throughput.py, tiny
kit, 37% padding). `VARLEN_SDPA` is an attention implementation registered here that does on any
device what flash's varlen path does on GPU: causal sdpa per packed sequence (sum of len² work),
boundaries read from `position_ids`; it ran at 1.50-1.75x. Load the model with
`attn_implementation=VARLEN_SDPA` to use it; padded batches get sdpa's mask under it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from loraforge.errors import PermanentError

IGNORE_INDEX = -100  # the label of a token that takes no loss (HF and torch convention)
MASKED_BACKENDS = ("sdpa", "eager")
VARLEN_SDPA = "loraforge_sdpa_varlen"


class TokenizedExample(Protocol):
    """What collation needs from `loraforge.data.Example`: token ids and aligned labels."""

    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def labels(self) -> Sequence[int]: ...


@dataclass
class Batch:
    """One micro-batch, ready for `model(**batch.model_inputs())`.

    `attention_mask` is a 2D padding mask (B, T) for padded batches; for packed ones a 4D
    block-diagonal causal mask (1, 1, T, T) (bool for sdpa, additive float for eager) or None
    when the backend isolates sequences from `position_ids` (`VARLEN_SDPA`, flash_attention_*).
    """

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, -100: prompt, padding, first token of each sequence
    position_ids: torch.Tensor  # (B, T) long, 0 at each sequence start
    attention_mask: torch.Tensor | None
    n_tokens: int  # real (non-padding) tokens
    n_label_tokens: int  # tokens that take loss
    seq_lengths: tuple[int, ...]  # per example, in micro-batch order

    def model_inputs(self) -> dict[str, Any]:
        """Forward kwargs; `use_cache=False` since a training forward never needs a cache."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": self.attention_mask,
            "use_cache": False,
        }

    def to(self, device: torch.device | str) -> Batch:
        """A copy on `device` (non-blocking where it can be)."""
        mask = self.attention_mask
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True),
            None if mask is None else mask.to(device, non_blocking=True),
            self.n_tokens,
            self.n_label_tokens,
            self.seq_lengths,
        )


def _checked(examples: Sequence[TokenizedExample]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, with the first label masked (see the module docstring)."""
    if not examples:
        raise ValueError("cannot collate an empty micro-batch")
    out = []
    for i, example in enumerate(examples):
        ids, labels = list(example.input_ids), list(example.labels)
        if not ids or len(ids) != len(labels):
            raise ValueError(
                f"example {i}: input_ids ({len(ids)}) and labels ({len(labels)}) must be "
                "non-empty and of equal length"
            )
        out.append((ids, [IGNORE_INDEX, *labels[1:]]))
    return out


def _count_labels(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def block_causal_mask(
    seq_lengths: Sequence[int], attn_implementation: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """The (1, 1, T, T) mask isolating packed sequences, in the format `attn_implementation` takes.

    T² entries: 1 byte each for sdpa (bool), `dtype`'s size for eager (additive).
    """
    if "flash" in attn_implementation or attn_implementation == VARLEN_SDPA:
        return None  # varlen kernels read the sequence starts from position_ids
    if attn_implementation not in MASKED_BACKENDS:
        raise PermanentError(
            f"packing supports attn_implementation {VARLEN_SDPA}, sdpa, eager or "
            f"flash_attention_*, got {attn_implementation!r}: load the model with one of them "
            "or disable packing"
        )
    segment = torch.repeat_interleave(torch.arange(len(seq_lengths)), torch.tensor(seq_lengths))
    T = len(segment)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = (segment[:, None] == segment[None, :]) & causal  # (T, T), True = attend
    if attn_implementation == "sdpa":
        return allowed[None, None]
    # eager adds the mask to the attention scores: 0 where allowed, the dtype's min elsewhere
    additive = torch.zeros(T, T, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return additive[None, None]


def collate_packed(
    examples: Sequence[TokenizedExample], attn_implementation: str, dtype: torch.dtype
) -> Batch:
    """Concatenate `examples` into one row (B=1); positions restart at 0 for every sequence.

    Pass `model.config._attn_implementation` and the model's compute dtype.
    """
    rows = _checked(examples)
    lengths = tuple(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([[t for ids, _ in rows for t in ids]])  # (1, T)
    labels = torch.tensor([[t for _, lab in rows for t in lab]])  # (1, T)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, T)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        attention_mask=block_causal_mask(lengths, attn_implementation, dtype),
        n_tokens=sum(lengths),
        n_label_tokens=_count_labels(labels),
        seq_lengths=lengths,
    )


def collate_padded(examples: Sequence[TokenizedExample], pad_token_id: int) -> Batch:
    """Right-pad `examples` to the longest; a 2D mask marks real tokens, padding takes no loss."""
    rows = _checked(examples)
    lengths = tuple(len(ids) for ids, _ in rows)
    B, T = len(rows), max(lengths)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return Batch(
        input_ids=input_ids,
        labels=labels,
        position_ids=torch.arange(T).expand(B, T).clone(),
        attention_mask=attention_mask,
        n_tokens=sum(lengths),
        n_label_tokens=_count_labels(labels),
        seq_lengths=lengths,
    )


def micro_batches(examples: Sized, micro_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices into `examples` for one epoch: shuffled by `(seed, epoch)`, in chunks.

    Every example appears exactly once; the last chunk keeps the remainder (it may be smaller),
    which is harmless since the loss is normalised by label tokens, not by examples.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    order = list(range(len(examples)))
    random.Random(f"loraforge-micro-batches-{seed}-{epoch}").shuffle(order)  # seeded by sha512
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def shifted_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each label from the logits one position before it, in fp32.

    Returns (B, T) aligned with `labels`: entry t is -log p(labels[t] | logits[t-1]), 0 where
    the label is -100 and at t = 0. For tests and diagnostics; training uses `token_loss_sum`.
    """
    B, T, V = logits.shape
    losses = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, V),  # upcast: bf16 log-softmax loses the small terms
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(B, T - 1)
    return F.pad(losses, (1, 0))


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Forward `batch`; the summed per-token cross-entropy over its label tokens, and their count.

    Divide the sum over all micro-batches of an optimizer step by the summed count (HF's
    `num_items_in_batch` semantics), so every label token weighs the same in either mode.
    """
    logits = model(**batch.model_inputs()).logits  # (B, T, V)
    targets = batch.labels[:, 1:]  # (B, T-1): the logit at t predicts the label at t+1
    keep = targets != IGNORE_INDEX
    # upcast only the logits that take loss: prompts are most of a GSM8K micro-batch
    selected = logits[:, :-1][keep]  # (n_label_tokens, V), at least fp32 (fp64 stays fp64)
    selected = selected.to(torch.promote_types(selected.dtype, torch.float32))
    loss_sum = F.cross_entropy(selected, targets[keep], reduction="sum")
    return loss_sum, batch.n_label_tokens


# --- varlen sdpa: packed sequences without a T² mask ----------------------------------------


def packed_lengths(position_ids: torch.Tensor | None) -> list[int] | None:
    """Lengths of the sequences packed in a single row (a new one wherever the position does not
    go up by one), or None when there is no single row of two or more sequences."""
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] < 2:
        return None
    row = position_ids[0]
    starts = torch.cat([row.new_zeros(1), ((row[1:] - row[:-1]) != 1).nonzero()[:, 0] + 1])
    if len(starts) == 1:
        return None
    ends = torch.cat([starts[1:], row.new_tensor([len(row)])])
    return (ends - starts).tolist()


def varlen_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, T, D)
    key: torch.Tensor,  # (1, Hkv, T, D)
    value: torch.Tensor,  # (1, Hkv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal sdpa per packed sequence; anything else (a mask, a cache, one sequence): sdpa."""
    lengths = packed_lengths(kwargs.get("position_ids"))
    if attention_mask is not None or lengths is None or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("sliding_window") is not None:
        raise PermanentError(
            f"{VARLEN_SDPA} does not implement sliding-window attention: load the model with "
            "attn_implementation sdpa, eager or flash_attention_2 to pack it"
        )
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (1, H, T, D)
    outputs, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        # contiguous copies: measured ~15% faster than strided slices in the CPU kernels
        q, k, v = (x[:, :, part].contiguous() for x in (query, key, value))
        outputs.append(
            F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scaling, is_causal=True
            )
        )
        start += n
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # (1, T, H, D)


def _varlen_sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """sdpa's mask when there is padding; none without (packed rows are split by position_ids)."""
    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention_forward)
AttentionMaskInterface.register(VARLEN_SDPA, _varlen_sdpa_mask)
