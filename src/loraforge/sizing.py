"""Peak-VRAM estimates of the three jobs from a model's `config.json` alone, and the sizing that
picks settings to fit a GPU (no torch).

Shared by the launcher (`loraforge estimate`, `render`; issue #7) and the train job
(`LORAFORGE_QUANTIZATION=auto`), replacing the seeds' fixed VRAM thresholds.

The coefficients are UNCALIBRATED: they are derived from what the code keeps alive, not measured.
Issue #11 compares them with `torch.cuda.max_memory_reserved` on a GPU. Where each comes from:

- weights: dtype sizes; int8 is bitsandbytes' 1 byte per weight plus an fp32 scale per output
  row; nf4 is 4 bits plus an absmax per 64-weight block, itself quantised to 8 bits with an fp32
  constant per 256 blocks (QLoRA paper, section 2: 4.127 bits). Only decoder linears are
  quantised; PEFT's `prepare_model_for_kbit_training` (train.py) upcasts the rest (embeddings,
  lm_head, norms) to fp32.
- adapter: PEFT keeps adapter weights in fp32 (`autocast_adapter_dtype`); each trained parameter
  has a weight, a gradient and AdamW's two moments: 16 bytes. DoRA adds a magnitude vector (one
  value per output feature) per adapted module.
- activations, per token and decoder layer, for a Llama/Qwen2/Mistral layer under SDPA: RMSNorm
  keeps its fp32 upcast input (2 x 4h); SDPA keeps q, k, v (repeated to every head) and its
  output (4 q_dim); SwiGLU keeps the activation's input and output and the up projection (3i).
  A frozen nn.Linear keeps nothing (the input gradient needs only the weight), but a
  bitsandbytes matmul keeps its input. Each LoRA module keeps its fp32 dropout output and bool
  mask (5 bytes per input feature) and A's output. DoRA also keeps the base and LoRA outputs.
  With gradient checkpointing (one checkpoint per decoder layer) only each layer's input is
  kept, plus one layer's full set while it is recomputed.
- logits (`packing.token_loss_sum`): the model's logits, and for the label tokens an fp32 copy,
  the log-softmax output and its gradient: 12 bytes + one logit per vocabulary entry per token,
  counted for every token of the micro-batch (the worst case: labels everywhere).
- overhead: ~0.6 GiB of CUDA context and cuBLAS workspace, and 10% allocator slack on every
  tensor term (caching allocator fragmentation).

Training is sized for its worst micro-batch: `micro_batch_size` sequences of `max_seq_len`
tokens each.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from loraforge.errors import PermanentError
from loraforge.launcher import gpus
from loraforge.launcher.gpus import HEADROOM, Gpu

if TYPE_CHECKING:
    from loraforge.settings import EditSettings, EvalSettings, TrainSettings

GiB = 2**30
Quantization = Literal["none", "int8", "nf4"]
Precision = Literal["bf16", "fp16", "fp32"]
PRECISION_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANT_BYTES: dict[str, float] = {"int8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
ADAPTER_BYTES = 4 + 4 + 8  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq
CUDA_CONTEXT = 0.6 * GiB
ALLOCATOR_SLACK = 1.10
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# `auto` checkpointing keeps it off while a micro-batch still holds this many tokens: halving
# below that costs more throughput than recomputing activations (judgement; issue #11 measures).
MIN_TOKENS_WITHOUT_CHECKPOINTING = 4096
# Edit: the adapter's own config is in the store, not read at render time; assume rank 64 on
# every linear module, an upper bound for common adapters.
EDIT_ASSUMED_RANK = 64
# Eval: GSM8K question + worked answer in tokens (assumed upper bound for Llama/Qwen tokenizers).
GSM8K_EXAMPLE_TOKENS = 256
VLLM_PROFILE_TOKENS = 8192  # vLLM's startup profiling batch (max_num_batched_tokens)
VLLM_OVERHEAD = 1.0 * GiB  # CUDA graphs and sampler buffers (assumed)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v
    max_positions: int = 0  # max_position_embeddings (0: unknown)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]  # multimodal wrappers nest the language model
        try:
            heads = int(config["num_attention_heads"])
            return cls(
                hidden=int(config["hidden_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
                head_dim=int(config.get("head_dim") or 0),
                qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias")),
                max_positions=int(config.get("max_position_embeddings") or 0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PermanentError(
                f"config.json lacks {exc} or has a bad value: sizing reads Llama, Qwen2, Mistral "
                "and Gemma-style configs (hidden_size, num_hidden_layers, num_attention_heads, "
                "intermediate_size, vocab_size)"
            ) from exc

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module of one decoder layer (Llama/Qwen2/Mistral layout)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        """Weights of every decoder linear (what bitsandbytes quantises)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def params(self) -> int:
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        other = self.layers * (2 * self.hidden + bias) + self.hidden  # norms, biases, final norm
        return self.linear_params + self.vocab * self.hidden * (1 if self.tied else 2) + other


def adapted(shape: ModelShape, targets: Sequence[str]) -> list[tuple[int, int]]:
    """(in, out) of the adapted modules of one layer; `all-linear` adapts every linear."""
    linears = shape.linear_shapes()
    if "all-linear" in targets:
        return list(linears.values())
    return [linears[t] for t in targets if t in linears]


def lora_params(shape: ModelShape, rank: int, targets: Sequence[str]) -> int:
    return shape.layers * sum(rank * (d_in + d_out) for d_in, d_out in adapted(shape, targets))


def dora_magnitudes(shape: ModelShape, targets: Sequence[str]) -> int:
    return shape.layers * sum(d_out for _, d_out in adapted(shape, targets))


def weight_bytes(
    shape: ModelShape, quantization: str, precision: str, *, kbit_upcast: bool = True
) -> float:
    """`kbit_upcast`: the train job's prepare_model_for_kbit_training upcasts what is not
    quantised (embeddings, lm_head, norms) to fp32."""
    p = PRECISION_BYTES[precision]
    if quantization == "none":
        return shape.params * p
    rest = shape.params - shape.linear_params
    return shape.linear_params * QUANT_BYTES[quantization] + rest * (4 if kbit_upcast else p)


def layer_activation_bytes(
    shape: ModelShape,
    *,
    precision: str,
    quantization: str,
    targets: Sequence[str],
    rank: int,
    method: str = "lora",
    lora_input_bytes: int = 5,
) -> float:
    """Bytes one decoder layer keeps per token for the backward pass (no checkpointing)."""
    p = PRECISION_BYTES[precision]
    h, i, q = shape.hidden, shape.intermediate, shape.q_dim
    kept = 2 * 4 * h + 4 * q * p + 3 * i * p  # norms (fp32), SDPA q/k/v/out, SwiGLU
    if quantization != "none":  # bitsandbytes keeps the input of every frozen matmul
        kept += (2 * h + q + i) * p
    for d_in, d_out in adapted(shape, targets):
        kept += lora_input_bytes * d_in + 4 * rank  # fp32 dropout output + mask; A's output
        if method != "lora":
            kept += (p + 4) * d_out  # DoRA: base output and fp32 LoRA output
    return kept


@dataclass(frozen=True)
class TrainEstimate:
    weights: float
    adapter: float
    activations: float
    logits: float
    overhead: float
    transient: float = 0.0  # dequantised weight, DoRA's dense ΔW for its norm

    @property
    def tensors(self) -> float:
        return self.weights + self.adapter + self.activations + self.logits + self.transient

    @property
    def peak(self) -> float:
        return self.tensors * ALLOCATOR_SLACK + self.overhead

    def breakdown(self) -> dict[str, float]:
        """GiB per term; they add up to the peak."""
        terms = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        terms["allocator_slack"] = self.tensors * (ALLOCATOR_SLACK - 1)
        return {name: round(value / GiB, 3) for name, value in terms.items()}


def estimate_train(
    shape: ModelShape,
    *,
    quantization: Quantization,
    rank: int,
    targets: Sequence[str] = DEFAULT_TARGETS,
    tokens_per_micro_batch: int,
    checkpointing: bool,
    method: str = "lora",
    precision: str = "bf16",
) -> TrainEstimate:
    """Peak bytes of one training step on a GPU."""
    p = PRECISION_BYTES[precision]
    p_out = 4 if quantization != "none" else p  # the fp32 residual stream and lm_head of k-bit
    trained = lora_params(shape, rank, targets)
    if method != "lora":
        trained += dora_magnitudes(shape, targets)
    layer = layer_activation_bytes(
        shape,
        precision=precision,
        quantization=quantization,
        targets=targets,
        rank=rank,
        method=method,
    )
    if checkpointing:  # each layer's input, plus one layer while it is recomputed
        per_token = shape.layers * p_out * shape.hidden + layer
    else:
        per_token = shape.layers * layer
    per_token += 4 * shape.hidden  # final norm
    if method == "bidora":  # the hypergradient's validation pass keeps a second set (issue #8)
        per_token *= 2
    transient = 0.0
    if quantization != "none":  # one weight dequantised for its matmul
        transient += max(a * b for a, b in shape.linear_shapes().values()) * p
    if method != "lora" and adapted(shape, targets):  # DoRA norm: eye(in), B·A and W + s·B·A
        transient += max(4 * (a * a + 2 * a * b) for a, b in adapted(shape, targets))
    return TrainEstimate(
        weights=weight_bytes(shape, quantization, precision),
        adapter=trained * ADAPTER_BYTES,
        activations=tokens_per_micro_batch * per_token,
        logits=tokens_per_micro_batch * shape.vocab * (p_out + 12),
        overhead=CUDA_CONTEXT,
        transient=transient,
    )


def estimate_edit(
    shape: ModelShape,
    *,
    quantization: Quantization,
    precision: str,
    tokens_per_batch: int,
    rank: int = EDIT_ASSUMED_RANK,
) -> TrainEstimate:
    """Calibration forward/backward: only σ needs a gradient, so a LoRA module keeps just A's
    output; the adapter and its SVD factors stay in fp32. No k-bit upcast here."""
    p = PRECISION_BYTES[precision]
    targets = ("all-linear",)
    layer = layer_activation_bytes(
        shape,
        precision=precision,
        quantization=quantization,
        targets=targets,
        rank=rank,
        lora_input_bytes=0,
    )
    return TrainEstimate(
        weights=weight_bytes(shape, quantization, precision, kbit_upcast=False),
        adapter=lora_params(shape, rank, targets) * 4 * 2,  # A, B and U, Vh
        activations=tokens_per_batch * (shape.layers * layer + 4 * shape.hidden),
        logits=tokens_per_batch * shape.vocab * (p + 12),
        overhead=CUDA_CONTEXT,
    )


@dataclass(frozen=True)
class EvalEstimate:
    weights: float
    kv_cache: float
    activations: float
    overhead: float

    @property
    def peak(self) -> float:
        return (self.weights + self.kv_cache + self.activations) * ALLOCATOR_SLACK + self.overhead

    def breakdown(self) -> dict[str, float]:
        terms = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        terms["allocator_slack"] = self.peak - sum(terms.values())
        return {name: round(value / GiB, 3) for name, value in terms.items()}


def kv_bytes_per_token(shape: ModelShape, precision: str) -> int:
    return shape.layers * 2 * shape.kv_dim * PRECISION_BYTES[precision]


def estimate_eval(
    shape: ModelShape, *, precision: str, batch_size: int, prompt_tokens: int, new_tokens: int
) -> EvalEstimate:
    """Batched greedy generation: weights + KV cache of every token in flight + the prefill."""
    p = PRECISION_BYTES[precision]
    prefill = batch_size * prompt_tokens * (shape.hidden + 2 * shape.intermediate) * p
    next_logits = batch_size * shape.vocab * 4  # fp32 logits of the last position only
    return EvalEstimate(
        weights=shape.params * p,
        kv_cache=batch_size * (prompt_tokens + new_tokens) * kv_bytes_per_token(shape, precision),
        activations=prefill + next_logits,
        overhead=CUDA_CONTEXT,
    )


# --- planning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What sizing chose for a job on a GPU: the env overrides for the pod and the estimate."""

    job: str
    gpu: Gpu
    env: dict[str, str]  # LORAFORGE_* overrides to set in the pod
    peak_bytes: float
    vram_bytes: int
    breakdown: dict[str, float]  # GiB per term, adding up to the peak
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "gpu": self.gpu.name,
            "vram_gib": round(self.vram_bytes / GiB, 2),
            "headroom": HEADROOM,
            "predicted_peak_gib": round(self.peak_bytes / GiB, 2),
            "settings": self.env,
            "breakdown_gib": self.breakdown,
            "notes": list(self.notes),
            "calibrated": False,  # issue #11
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def resolve_precision(setting: str, gpu: Gpu) -> Precision:
    if setting == "auto":
        return "bf16" if gpu.bf16 else "fp16"
    if setting == "bf16" and not gpu.bf16:
        raise PermanentError(f"LORAFORGE_PRECISION=bf16: {gpu.name} has no bf16: use auto or fp16")
    return "fp32" if setting == "fp32" else "fp16" if setting == "fp16" else "bf16"


def _divisors(n: int) -> list[int]:
    """Micro-batch sizes that keep micro-batch x accumulation exactly equal, largest first."""
    return [m for m in range(n, 0, -1) if n % m == 0]


def _halvings(n: int) -> list[int]:
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    return sizes


S = TypeVar("S", "TrainSettings", "EditSettings", "EvalSettings")
Search = Callable[[S, Gpu], "Plan | None"]
Tweaks = list[list[tuple[str, dict[str, Any]]]]  # groups of alternatives, best first


def _fits_with(search: Search[S], settings: S, gpu: Gpu) -> bool:
    try:
        return search(settings, gpu) is not None
    except PermanentError:  # e.g. bf16 asked of a GPU without it
        return False


def _refusal(
    search: Search[S], settings: S, gpu: Gpu, need: float, lean: str, tweaks: Tweaks
) -> PermanentError:
    """Name what would fit instead: other settings on this GPU, or the smallest larger GPU."""
    options: list[str] = []
    earlier: list[tuple[str, dict[str, Any]]] = []  # each earlier group's first tweak
    for group in tweaks:
        found = _first_fit(search, settings, gpu, group)
        if found is None and earlier:  # combined with the earlier tweaks: nf4 and shorter
            update = {k: v for _, u in earlier for k, v in u.items()}
            prefix = " with ".join(text for text, _ in earlier)
            found = _first_fit(
                search, settings, gpu, [(f"{prefix} with {t}", update | u) for t, u in group]
            )
        if found is not None:
            options.append(found)
        earlier.append(group[0])
    larger = [g for g in gpus.CATALOG if g.vram_gib > gpu.vram_gib and (gpu.mig or not g.mig)]
    for other in sorted(larger, key=lambda g: g.vram_gib):
        if _fits_with(search, settings, other):
            options.append(f"--gpu {other.name}")
            break
    fix = " or ".join(options) if options else "a smaller base model (no catalog GPU fits)"
    return PermanentError(
        f"{settings.job} does not fit {gpu.name}: estimated peak {need / GiB:.1f} GiB even with "
        f"{lean}, over {HEADROOM:.0%} of its {gpu.vram_gib:g} GiB: use {fix}"
    )


def _first_fit(
    search: Search[S], settings: S, gpu: Gpu, group: list[tuple[str, dict[str, Any]]]
) -> str | None:
    fitting = (t for t, u in group if _fits_with(search, settings.model_copy(update=u), gpu))
    return next(fitting, None)


def _shorter(max_seq_len: int) -> list[tuple[str, dict[str, Any]]]:
    lengths = [max_seq_len // 2**k for k in range(1, 5) if max_seq_len // 2**k >= 128]
    return [(f"LORAFORGE_MAX_SEQ_LEN={n}", {"max_seq_len": n}) for n in lengths]


def fsdp_shards(s: TrainSettings) -> int:
    """Processes the weights are sharded over (1 unless LORAFORGE_PARALLEL=fsdp)."""
    return s.gpus * s.nodes if s.parallel == "fsdp" else 1


def sharded(estimate: TrainEstimate, shape: ModelShape, shards: int) -> TrainEstimate:
    """FSDP: a GPU keeps 1/W of the weights, adapter and optimizer state, plus two decoder
    layers gathered whole (the one computing and the one prefetched)."""
    if shards == 1:
        return estimate
    gathered = 2 * estimate.weights / max(shape.layers, 1)
    return dataclasses.replace(
        estimate,
        weights=estimate.weights / shards + gathered,
        adapter=estimate.adapter / shards,
    )


def _estimate_for(
    shape: ModelShape, s: TrainSettings, gpu: Gpu, quantization: str, micro: int, ckpt: bool
) -> TrainEstimate:
    return sharded(_whole_estimate(shape, s, gpu, quantization, micro, ckpt), shape, fsdp_shards(s))


def _whole_estimate(
    shape: ModelShape, s: TrainSettings, gpu: Gpu, quantization: str, micro: int, ckpt: bool
) -> TrainEstimate:
    return estimate_train(
        shape,
        quantization=quantization,  # type: ignore[arg-type]
        rank=max([s.rank, *s.rank_pattern.values()]),
        targets=s.target_modules,
        tokens_per_micro_batch=micro * s.max_seq_len,
        checkpointing=ckpt,
        method=s.method,
        precision=resolve_precision(s.precision, gpu),
    )


def _train_search(shape: ModelShape, s: TrainSettings, gpu: Gpu) -> Plan | None:
    """Least lossy quantization first; then the largest micro-batch, without checkpointing while
    a micro-batch keeps enough tokens; accumulation grows as the micro-batch shrinks."""
    quantizations: tuple[str, ...] = (
        ("none", "int8", "nf4") if s.quantization == "auto" else (s.quantization,)
    )
    if fsdp_shards(s) > 1:  # FSDP shards full-precision weights only
        quantizations = tuple(q for q in quantizations if q == "none")
    sizes = _divisors(s.micro_batch_size)
    if s.gradient_checkpointing == "auto":
        big = [m for m in sizes if m * s.max_seq_len >= MIN_TOKENS_WITHOUT_CHECKPOINTING]
        candidates = [(False, m) for m in big or sizes[:1]] + [(True, m) for m in sizes]
    else:
        candidates = [(s.gradient_checkpointing == "on", m) for m in sizes]
    for quantization in quantizations:
        for ckpt, micro in candidates:
            estimate = _estimate_for(shape, s, gpu, quantization, micro, ckpt)
            if gpus.fits(gpu, estimate.peak):
                env = {
                    "LORAFORGE_QUANTIZATION": quantization,
                    "LORAFORGE_PRECISION": resolve_precision(s.precision, gpu),
                    "LORAFORGE_MICRO_BATCH_SIZE": str(micro),
                    "LORAFORGE_GRAD_ACCUM": str(s.grad_accum * (s.micro_batch_size // micro)),
                    "LORAFORGE_GRADIENT_CHECKPOINTING": "on" if ckpt else "off",
                }
                return Plan("train", gpu, env, estimate.peak, gpu.vram_bytes, estimate.breakdown())
    return None


def plan_train(config: Mapping[str, Any], gpu: Gpu, settings: TrainSettings) -> Plan:
    """Quantization (when `auto`), micro-batch, accumulation and checkpointing (when `auto`) so
    the estimated peak fits HEADROOM of the GPU, keeping micro_batch_size x grad_accum."""
    shape = ModelShape.from_config(config)
    search = functools.partial(_train_search, shape)
    plan = search(settings, gpu)
    if plan is not None:
        return plan
    quantization = "nf4" if settings.quantization == "auto" else settings.quantization
    ckpt = settings.gradient_checkpointing != "off"
    need = _estimate_for(shape, settings, gpu, quantization, 1, ckpt).peak
    lean = f"micro-batch 1, checkpointing {'on' if ckpt else 'off'}, quantization {quantization}"
    tweaks: Tweaks = []
    if not ckpt:
        tweaks.append(
            [("LORAFORGE_GRADIENT_CHECKPOINTING=auto", {"gradient_checkpointing": "auto"})]
        )
    if quantization in ("none", "int8"):
        tweaks.append([("LORAFORGE_QUANTIZATION=nf4", {"quantization": "nf4"})])
    tweaks.append(_shorter(settings.max_seq_len))
    if not gpu.mig and settings.method != "bidora" and settings.quantization in ("auto", "none"):
        tweaks.append(_fsdp(settings))  # (NCCL does not span MIG slices)
    raise _refusal(search, settings, gpu, need, lean, tweaks)


def _fsdp(s: TrainSettings) -> list[tuple[str, dict[str, Any]]]:
    """More GPUs sharing the weights (LORAFORGE_GRAD_ACCUM must then be a multiple of them)."""
    options = []
    for n in (2, 4, 8):
        accum = s.grad_accum if s.grad_accum % n == 0 else math.lcm(s.grad_accum, n)
        text = f"LORAFORGE_PARALLEL=fsdp LORAFORGE_GPUS={n} LORAFORGE_GRAD_ACCUM={accum}"
        options.append((text, {"parallel": "fsdp", "gpus": n, "nodes": 1, "grad_accum": accum}))
    return options


def _edit_search(shape: ModelShape, s: EditSettings, gpu: Gpu) -> Plan | None:
    precision = resolve_precision(s.precision, gpu)
    for size in _halvings(s.calib_batch_size):  # g sums over tokens: any batch size is exact
        estimate = estimate_edit(
            shape,
            quantization=s.quantization,
            precision=precision,
            tokens_per_batch=size * s.max_seq_len,
        )
        if gpus.fits(gpu, estimate.peak):
            env = {
                "LORAFORGE_QUANTIZATION": s.quantization,
                "LORAFORGE_PRECISION": precision,
                "LORAFORGE_CALIB_BATCH_SIZE": str(size),
            }
            notes = (f"adapter assumed rank {EDIT_ASSUMED_RANK} on every linear module",)
            return Plan(
                "edit", gpu, env, estimate.peak, gpu.vram_bytes, estimate.breakdown(), notes
            )
    return None


def plan_edit(config: Mapping[str, Any], gpu: Gpu, settings: EditSettings) -> Plan:
    """Calibration batch size (halved until the forward/backward fits) and precision."""
    shape = ModelShape.from_config(config)
    search = functools.partial(_edit_search, shape)
    plan = search(settings, gpu)
    if plan is not None:
        return plan
    precision = resolve_precision(settings.precision, gpu)
    need = estimate_edit(
        shape,
        quantization=settings.quantization,
        precision=precision,
        tokens_per_batch=settings.max_seq_len,
    ).peak
    tweaks: Tweaks = []
    if settings.quantization != "nf4":
        tweaks.append([("LORAFORGE_QUANTIZATION=nf4", {"quantization": "nf4"})])
    tweaks.append(_shorter(settings.max_seq_len))
    lean = f"calibration batch 1, quantization {settings.quantization}"
    raise _refusal(search, settings, gpu, need, lean, tweaks)


def estimate_vllm(shape: ModelShape, precision: str, max_model_len: int) -> EvalEstimate:
    """What vLLM needs at start: weights, KV cache for one sequence of `max_model_len` tokens
    (it refuses to start otherwise), its profiling batch, CUDA graphs and sampler."""
    p = PRECISION_BYTES[precision]
    profile = VLLM_PROFILE_TOKENS * (shape.hidden + 2 * shape.intermediate) * p
    return EvalEstimate(
        weights=shape.params * p,
        kv_cache=max_model_len * kv_bytes_per_token(shape, precision),
        activations=profile,
        overhead=CUDA_CONTEXT + VLLM_OVERHEAD,
    )


def _eval_search(shape: ModelShape, s: EvalSettings, gpu: Gpu) -> Plan | None:
    precision = resolve_precision(s.precision, gpu)
    env: dict[str, str] = {"LORAFORGE_PRECISION": precision}
    prompt = (s.shots + 1) * GSM8K_EXAMPLE_TOKENS
    model_len = shape.max_positions or prompt + s.new_tokens  # vLLM's default max_model_len
    vllm = estimate_vllm(shape, precision, model_len)
    vllm_fits = vllm.peak <= s.gpu_memory_utilization * gpu.vram_bytes
    if s.engine == "vllm":
        if not vllm_fits:
            return None
        reserve = f"vLLM reserves gpu_memory_utilization={s.gpu_memory_utilization:g} of the GPU"
        return Plan("eval", gpu, env, vllm.peak, gpu.vram_bytes, vllm.breakdown(), (reserve,))
    for size in _halvings(s.batch_size):
        estimate = estimate_eval(
            shape,
            precision=precision,
            batch_size=size,
            prompt_tokens=prompt,
            new_tokens=s.new_tokens,
        )
        if not gpus.fits(gpu, estimate.peak):
            continue
        env["LORAFORGE_BATCH_SIZE"] = str(size)
        notes = [f"prompts assumed {prompt} tokens ({s.shots}-shot GSM8K)"]
        peak = estimate.peak
        if s.engine == "auto" and vllm_fits:
            peak = max(peak, vllm.peak)
            notes.append(f"vLLM needs {vllm.peak / GiB:.1f} GiB for max_model_len {model_len}")
        elif s.engine == "auto":
            env["LORAFORGE_ENGINE"] = "transformers"
            notes.append(
                f"vLLM would need {vllm.peak / GiB:.1f} GiB (KV cache for max_model_len "
                f"{model_len}): transformers engine"
            )
        return Plan("eval", gpu, env, peak, gpu.vram_bytes, estimate.breakdown(), tuple(notes))
    return None


def plan_eval(config: Mapping[str, Any], gpu: Gpu, settings: EvalSettings) -> Plan:
    """Generation batch size (halved until weights + KV cache fit) and precision; with engine
    `auto`, the transformers engine where vLLM's KV cache for the model's context cannot fit."""
    shape = ModelShape.from_config(config)
    search = functools.partial(_eval_search, shape)
    plan = search(settings, gpu)
    if plan is not None:
        return plan
    precision = resolve_precision(settings.precision, gpu)
    prompt = (settings.shots + 1) * GSM8K_EXAMPLE_TOKENS
    need = estimate_eval(
        shape,
        precision=precision,
        batch_size=1,
        prompt_tokens=prompt,
        new_tokens=settings.new_tokens,
    ).peak
    tweaks: Tweaks = []
    if settings.engine == "vllm":
        tweaks.append([("LORAFORGE_ENGINE=transformers", {"engine": "transformers"})])
    raise _refusal(search, settings, gpu, need, "batch size 1", tweaks)


def choose_quantization(
    config: Mapping[str, Any],
    vram_bytes: float,
    *,
    rank: int,
    targets: Sequence[str],
    tokens_per_micro_batch: int,
    headroom: float = HEADROOM,
) -> Quantization:
    """The least lossy base precision whose estimated peak fits `headroom` of the GPU's memory
    (the train job's `auto` in the pod, where the micro-batch is already fixed)."""
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
