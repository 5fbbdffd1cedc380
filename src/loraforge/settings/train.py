"""Settings of the train job (`loraforge-train`). Names pinned by the design: LORAFORGE_DATA,
_VAL_DATA, _METHOD, _RANK, _QUANTIZATION, _PACKING, _MAX_STEPS; the rest follow PEFT/HF names."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from loraforge.settings.base import JobSettings

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _parse_pattern(value: object) -> object:
    """`name=value,name=value` (PEFT rank_pattern/alpha_pattern keys: regex on module names)."""
    if not isinstance(value, str):
        return value
    pattern: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        key, sep, number = item.partition("=")
        if not sep or not key.strip() or not number.strip():
            raise ValueError(f"expected name=number pairs separated by commas, got {item!r}")
        pattern[key.strip()] = number.strip()
    return pattern


class TrainSettings(JobSettings):
    job: ClassVar[str] = "train"

    data: str = Field(min_length=1)
    """Training data: a JSONL path, `s3://` URI or `hf://dataset[:config]/split`. Records are
    instruction/input/output, prompt/completion, question/answer, messages (chat), code or text."""

    val_data: str | None = None
    """Validation data (same forms as LORAFORGE_DATA); default: a LORAFORGE_VAL_FRACTION split."""

    val_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Fraction of the training data held out for validation when LORAFORGE_VAL_DATA is unset."""

    method: Literal["lora", "dora", "bidora"] = "lora"
    """Adapter method: `lora`, `dora` (weight-decomposed), or bi-level `bidora`."""

    rank: int = Field(default=16, ge=1, le=1024)
    """LoRA rank r of every adapted module (LORAFORGE_RANK_PATTERN overrides per module)."""

    alpha: float = Field(default=32.0, gt=0)
    """LoRA alpha: the update is scaled by alpha/r, or alpha/sqrt(r) with rsLoRA."""

    rslora: bool = True
    """Rank-stabilised scaling alpha/sqrt(r) (the seed's default)."""

    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""

    target_modules: Annotated[list[str], NoDecode] = Field(default_factory=lambda: DEFAULT_TARGETS)
    """Comma-separated module names to adapt (e.g. q_proj,v_proj), or `all-linear`."""

    rank_pattern: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    """Per-module ranks as `regex=rank,...` on full module names (PEFT rank_pattern)."""

    alpha_pattern: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    """Per-module alphas as `regex=alpha,...` on full module names (PEFT alpha_pattern)."""

    quantization: Literal["auto", "none", "nf4", "int8"] = "auto"
    """Base weights: `none`, bitsandbytes `nf4` (QLoRA, double quant) or `int8`; `auto` picks
    through the VRAM estimator on a GPU and `none` on the CPU."""

    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype of the base: `auto` is bf16 on GPUs that support it, fp16 on older GPUs,
    fp32 on the CPU."""

    packing: bool = True
    """Padding-free packing: the micro-batch's sequences are concatenated into one row with
    attention kept within each sequence. `false` pads them to the longest instead."""

    max_seq_len: int = Field(default=2048, ge=8)
    """Longest tokenized example (prompt + response); longer ones are an error, not truncated."""

    micro_batch_size: int = Field(default=8, ge=1)
    """Sequences per forward/backward pass."""

    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (effective batch = micro_batch_size x grad_accum)."""

    max_steps: int = Field(default=1000, ge=1)
    """Optimizer steps to train for (the data is cycled in reshuffled epochs)."""

    learning_rate: float = Field(default=2e-4, gt=0)
    """Peak AdamW learning rate."""

    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""

    warmup_steps: int = Field(default=-1, ge=-1)
    """Linear warmup steps before the cosine decay; -1 means 3% of LORAFORGE_MAX_STEPS."""

    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping by global norm; 0 disables."""

    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """Recompute activations in the backward pass; `auto` turns it on when sizing needs it."""

    seed: int = 0
    """Seed for initialisation, data order and dropout (runs are bit-for-bit repeatable on the
    CPU with one thread, OMP_NUM_THREADS=1)."""

    eval_interval: int = Field(default=100, ge=0)
    """Steps between validation-loss evaluations; 0: only at the end."""

    checkpoint_interval: int = Field(default=100, ge=0)
    """Steps between checkpoints; 0 disables step-based checkpoints."""

    checkpoint_seconds: float = Field(default=900.0, ge=0)
    """Seconds between checkpoints; 0 disables time-based checkpoints."""

    checkpoints: str | None = None
    """Where checkpoints are published; default `<LORAFORGE_OUTPUT>-checkpoints`."""

    bidora_lower_steps: int = Field(default=1, ge=1)
    """BiDoRA: direction (LoRA A, B) steps on the training split per round."""

    bidora_upper_steps: int = 1
    """BiDoRA: magnitude steps on the validation split per round (at least 1)."""

    bidora_upper_lr_mult: float = Field(default=1.0, gt=0)
    """BiDoRA: the magnitude's learning rate as a multiple of LORAFORGE_LEARNING_RATE."""

    bidora_hypergradient: Literal["second_order", "first_order"] = "second_order"
    """BiDoRA: `second_order` (DARTS-style unrolled step with a finite-difference Hessian-vector
    product) or `first_order` (the direct gradient of the validation loss)."""

    bidora_xi: float | None = Field(default=None, gt=0)
    """BiDoRA: step size of the unrolled direction step in the hypergradient; default the
    learning rate."""

    bidora_orth_reg: float = Field(default=0.0, ge=0)
    """BiDoRA: weight of the direction orthogonality regulariser ||AAᵀ-I||² + ||BᵀB-I||²."""

    bidora_final_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """BiDoRA: fraction of LORAFORGE_MAX_STEPS trained at the end on the direction alone, with the
    magnitude fixed."""

    gpus: int = Field(default=1, ge=1, le=64)
    """Training processes (GPUs) per node. Above 1 the pod runs the job under `torchrun`
    (`loraforge-torchrun`): data parallel, each process taking LORAFORGE_GRAD_ACCUM/world-size
    of every step's micro-batches, so the effective batch and the result stay those of one
    process. LORAFORGE_GRAD_ACCUM must be a multiple of LORAFORGE_GPUS x LORAFORGE_NODES."""

    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How several processes share the work: `ddp` (each holds the whole model; data parallel)
    or `fsdp` (FSDP2: base and adapter sharded across the processes, for a base that does not
    fit one GPU; not with a quantized base). Checkpoints are interchangeable between the two."""

    nodes: int = Field(default=1, ge=1, le=256)
    """Nodes (pods) training together; above 1 `loraforge render train --engine` chooses the
    multi-node form (Indexed Job + headless Service, Kubeflow TrainJob or PyTorchJob)."""

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, value: object) -> object:
        value = _split_list(value)
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module (e.g. q_proj,v_proj) or all-linear")
        return value

    @field_validator("val_data", "checkpoints", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _pattern(cls, value: object) -> object:
        return _parse_pattern(value)

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        problems = self._scale_problems() + self._method_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _scale_problems(self) -> list[str]:
        world, problems = self.gpus * self.nodes, []
        if self.grad_accum % world:
            problems.append(
                f"LORAFORGE_GRAD_ACCUM={self.grad_accum} is not a multiple of the "
                f"{world} training processes (LORAFORGE_GPUS={self.gpus} x LORAFORGE_NODES="
                f"{self.nodes}): each process takes an equal share of a step's micro-batches; "
                f"set LORAFORGE_GRAD_ACCUM to a multiple of {world}"
            )
        if self.parallel == "fsdp" and self.quantization in ("nf4", "int8"):
            problems.append(
                f"LORAFORGE_PARALLEL=fsdp with LORAFORGE_QUANTIZATION={self.quantization}: "
                "FSDP shards full-precision weights; use quantization none (or auto) with fsdp, "
                "or ddp with the quantized base"
            )
        if world > 1 and self.method == "bidora":
            problems.append(
                "LORAFORGE_METHOD=bidora runs in one process (its hypergradient is not data "
                "parallel): set LORAFORGE_GPUS=1 and LORAFORGE_NODES=1, or train dora"
            )
        return problems

    def _method_problems(self) -> list[str]:
        problems = []
        if any(r < 1 for r in self.rank_pattern.values()):
            problems.append("LORAFORGE_RANK_PATTERN: every rank must be >= 1")
        if self.method == "bidora" and self.bidora_upper_steps < 1:
            problems.append(
                f"LORAFORGE_BIDORA_UPPER_STEPS={self.bidora_upper_steps}: bidora needs at "
                "least 1 magnitude step per round (or train LORAFORGE_METHOD=dora)"
            )
        if self.method == "bidora" and self.val_data is None and self.val_fraction == 0:
            problems.append(
                "LORAFORGE_METHOD=bidora trains the magnitude on a validation split: set "
                "LORAFORGE_VAL_DATA or LORAFORGE_VAL_FRACTION above 0"
            )
        return problems

    @property
    def checkpoints_uri(self) -> str:
        return self.checkpoints or f"{self.output_uri.rstrip('/')}-checkpoints"

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps >= 0 else round(0.03 * self.max_steps)
