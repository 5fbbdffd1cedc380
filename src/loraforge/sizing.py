"""Peak-VRAM estimate of a LoRA training step, from a model's `config.json` alone (no torch).

Shared by the launcher (render-time sizing, issue #7) and the train job
(`LORAFORGE_QUANTIZATION=auto`), replacing the seeds' fixed VRAM thresholds. The terms:
weights at the chosen precision or quantization, adapter parameters with their gradients and
AdamW state (fp32), activations per token (with or without gradient checkpointing), logits in
fp32 for the loss, and CUDA context plus allocator overhead. Issue #11 calibrates the
coefficients against measured `torch.cuda.max_memory_reserved`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

GiB = 2**30
Quantization = Literal["none", "int8", "nf4"]
# Bytes per base weight: bf16; int8 with per-row scales; nf4 with double-quantised absmax.
WEIGHT_BYTES: dict[str, float] = {"none": 2.0, "int8": 1.03, "nf4": 0.53}
CUDA_CONTEXT = 0.6 * GiB
ALLOCATOR_SLACK = 1.10  # fragmentation and caching headroom of the CUDA allocator
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        heads = int(config["num_attention_heads"])
        return cls(
            hidden=int(config["hidden_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module of one decoder layer (Llama/Qwen2/Mistral layout)."""
        kv = self.hidden // self.heads * self.kv_heads
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def params(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden
        embed = self.vocab * self.hidden
        return self.layers * per_layer + embed * (1 if self.tied else 2) + self.hidden


def lora_params(shape: ModelShape, rank: int, targets: Sequence[str]) -> int:
    linears = shape.linear_shapes()
    names = list(linears) if "all-linear" in targets else [t for t in targets if t in linears]
    return shape.layers * sum(rank * (linears[n][0] + linears[n][1]) for n in names)


@dataclass(frozen=True)
class TrainEstimate:
    weights: float
    adapter: float
    activations: float
    logits: float
    overhead: float

    @property
    def peak(self) -> float:
        return (self.weights + self.adapter + self.activations + self.logits) * ALLOCATOR_SLACK + (
            self.overhead
        )


def estimate_train(
    shape: ModelShape,
    *,
    quantization: Quantization,
    rank: int,
    targets: Sequence[str] = DEFAULT_TARGETS,
    tokens_per_micro_batch: int,
    checkpointing: bool,
) -> TrainEstimate:
    """Peak bytes of one training step on a GPU."""
    weights = shape.params * WEIGHT_BYTES[quantization]
    adapter = lora_params(shape, rank, targets) * (4 + 4 + 8)  # fp32 weight, grad, AdamW m and v
    # bf16 activations kept for backward: ~34 hidden-sized and 3 intermediate-sized tensors per
    # layer per token (attention with SDPA, MLP). With checkpointing only each layer's input is
    # kept, plus one layer's full set while it is recomputed.
    full_layer = 2 * (34 * shape.hidden + 3 * shape.intermediate)
    if checkpointing:
        activations = tokens_per_micro_batch * (shape.layers * 2 * shape.hidden + full_layer)
    else:
        activations = tokens_per_micro_batch * shape.layers * full_layer
    logits = tokens_per_micro_batch * shape.vocab * (2 + 4 + 4)  # bf16 logits, fp32 upcast + grad
    return TrainEstimate(weights, adapter, activations, logits, CUDA_CONTEXT)


def choose_quantization(
    config: Mapping[str, Any],
    vram_bytes: float,
    *,
    rank: int,
    targets: Sequence[str],
    tokens_per_micro_batch: int,
    headroom: float = 0.90,
) -> Quantization:
    """The least lossy base precision whose estimated peak fits `headroom` of the GPU's memory."""
    shape = ModelShape.from_config(config)
    order: tuple[Quantization, ...] = ("none", "int8", "nf4")
    for quantization in order:
        for checkpointing in (False, True):
            estimate = estimate_train(
                shape,
                quantization=quantization,
                rank=rank,
                targets=targets,
                tokens_per_micro_batch=tokens_per_micro_batch,
                checkpointing=checkpointing,
            )
            if estimate.peak <= headroom * vram_bytes:
                return quantization
    need = estimate_train(
        shape,
        quantization="nf4",
        rank=rank,
        targets=targets,
        tokens_per_micro_batch=tokens_per_micro_batch,
        checkpointing=True,
    )
    raise ValueError(
        f"even nf4 with gradient checkpointing needs ~{need.peak / GiB:.1f} GiB, the GPU has "
        f"{vram_bytes / GiB:.1f} GiB: use a larger GPU or fewer tokens per micro-batch"
    )
