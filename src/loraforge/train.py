"""The train job (`loraforge-train`): settings -> data and model -> fit -> publish the adapter.

Checkpoints (adapter, AdamW state, RNG, step) are published every LORAFORGE_CHECKPOINT_INTERVAL
steps or LORAFORGE_CHECKPOINT_SECONDS, and on SIGTERM before exiting 143. A restarted job resumes
from the newest checkpoint that verifies; the data order is a function of (seed, epoch), so the
step alone says which micro-batches come next, and a resumed run ends with the same weights as
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from loraforge import checkpoint, data, distributed, packing, store
from loraforge.checkpoint import TrainState
from loraforge.distributed import World
from loraforge.errors import ArtifactExistsError, PermanentError
from loraforge.logs import Progress
from loraforge.manifest import input_record
from loraforge.modeling import (
    attach_adapter,
    attention_backend,
    base_model_path,
    load_base_model,
    load_tokenizer,
    model_config,
    resolve_checkpointing,
    resolve_device,
    resolve_dtype,
    resolve_quantization,
)
from loraforge.runner import JobContext, job_main
from loraforge.settings import TrainSettings

log = logging.getLogger("loraforge.train")
# Steps the reported train_loss averages; kept in checkpoints, so that a resumed run reports
# what the uninterrupted one does.
LOSS_WINDOW = 20


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total` (step counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Trainer:
    settings: TrainSettings
    model: PeftModel
    train_set: list[data.Example]
    val_set: list[data.Example]
    device: torch.device
    dtype: torch.dtype
    pad_token_id: int
    ctx: JobContext
    world: World = field(default_factory=World)
    state: TrainState = field(default_factory=TrainState)

    def __post_init__(self) -> None:
        self.optimizer = self.make_optimizer()
        self.attn = getattr(self.model.config, "_attn_implementation", "sdpa")
        self.state.fingerprint = checkpoint.fingerprint(self.settings)
        self._last_checkpoint = time.monotonic()
        # What the steps run through: DDP's wrapper when data parallel (`parallelize`).
        self.forward_model: torch.nn.Module = self.model
        self.fsdp = self.world.distributed and self.settings.parallel == "fsdp"

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.param_groups(),
            lr=self.settings.learning_rate,
            weight_decay=self.settings.weight_decay,
        )

    def parallelize(self) -> None:
        """Spread over the processes (after `resume`): DDP's wrapper, or FSDP shards with the
        optimizer rebuilt around them, carrying a resumed state over."""
        if not self.world.distributed:
            return
        if not self.fsdp:
            self.forward_model = distributed.wrap(self.model, self.world, self.device)
            return
        resumed = self.optimizer.state_dict() if self.optimizer.state else None
        distributed.shard(self.model)
        self.optimizer = self.make_optimizer()
        if resumed is not None:
            distributed.scatter_optimizer(self.model, self.optimizer, resumed)

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW's parameter groups; a group's `lr_mult` scales the scheduled learning rate."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def set_learning_rate(self, step: int) -> None:
        factor = lr_factor(step, self.settings.warmup, self.settings.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.learning_rate * factor * group.get("lr_mult", 1.0)

    def progress_metrics(self) -> dict[str, float]:
        """Extra figures for the progress line (BiDoRA adds its upper-level loss)."""
        return {}

    # --- data ---------------------------------------------------------------------------------

    def step_batches(self, step: int, device: bool = True) -> list[packing.Batch]:
        """The micro-batches of optimizer step `step` (a pure function of seed and step); on the
        CPU with `device=False`."""
        s = self.settings
        per_epoch = len(packing.micro_batches(self.train_set, s.micro_batch_size, s.seed, 0))
        batches = []
        for k in range(s.grad_accum):
            index = step * s.grad_accum + k
            epoch, position = divmod(index, per_epoch)
            chunk = packing.micro_batches(self.train_set, s.micro_batch_size, s.seed, epoch)
            batches.append(self.collate([self.train_set[i] for i in chunk[position]], device))
        return batches

    def collate(self, examples: list[data.Example], device: bool = True) -> packing.Batch:
        if self.settings.packing:
            batch = packing.collate_packed(examples, self.attn, self.dtype)
        else:
            batch = packing.collate_padded(examples, self.pad_token_id)
        return batch.to(self.device) if device else batch

    # --- steps --------------------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step over `grad_accum` micro-batches; loss normalised by label tokens.

        Data parallel: this process runs every W-th micro-batch and DDP averages the gradients
        over the W processes, hence the loss times W (see loraforge.distributed)."""
        self.model.train()
        w = self.world
        if w.distributed:
            distributed.seed_step(self.settings.seed, step, w.rank)
        batches = self.step_batches(step, device=False)
        n_labels = sum(b.n_label_tokens for b in batches)
        mine = batches[w.rank :: w.size]
        total = 0.0
        for k, batch in enumerate(mine):
            with self.gradient_sync(last=k == len(mine) - 1):
                loss_sum, _ = packing.token_loss_sum(self.forward_model, batch.to(self.device))
                loss = loss_sum / n_labels
                (loss * w.size if w.distributed else loss).backward()
            total += float(loss_sum.detach())
        total = distributed.sum_values(w, [total])[0]
        self.clip_and_step(step)
        return total / n_labels, sum(b.n_tokens for b in batches)

    def gradient_sync(self, last: bool) -> Any:
        """DDP and FSDP reduce gradients in the last micro-batch's backward only."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        elif self.world.distributed and not last:
            return self.forward_model.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def clip_and_step(self, step: int) -> None:
        if self.settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad],
                self.settings.max_grad_norm,
            )
        self.set_learning_rate(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        if not self.val_set:
            return None
        self.model.eval()
        loss, labels = 0.0, 0.0
        size = self.settings.micro_batch_size
        starts = range(0, len(self.val_set), size)
        w = self.world
        for k in range(math.ceil(len(starts) / w.size)):
            index = k * w.size + w.rank
            if index >= len(starts) and not self.fsdp:
                break
            # FSDP: every process runs as many forwards (each gathers shards); spares discarded
            start = starts[min(index, len(starts) - 1)]
            batch = self.collate(self.val_set[start : start + size])
            loss_sum, n = packing.token_loss_sum(self.model, batch)
            if index < len(starts):
                loss, labels = loss + float(loss_sum), labels + n
        loss, labels = distributed.sum_values(w, [loss, labels])
        return loss / max(labels, 1)

    # --- loop ---------------------------------------------------------------------------------

    def fit(self) -> None:
        s = self.settings
        progress = Progress(log, total=s.max_steps, start_step=self.state.step)
        start = self.state.step
        while self.state.step < s.max_steps:
            self.stop_if_asked(start)
            loss, tokens = self.train_step(self.state.step)
            self.state.step += 1
            self.state.tokens_seen += tokens
            step = self.state.step
            lr = self.optimizer.param_groups[0]["lr"]
            self.check_finite(loss, step, lr)
            self.state.recent_losses = [*self.state.recent_losses, loss][-LOSS_WINDOW:]
            progress.update(
                step, tokens, force=step == s.max_steps, loss=loss, lr=lr, **self.progress_metrics()
            )
            if s.eval_interval and step % s.eval_interval == 0 and step < s.max_steps:
                self.state.val_loss = self.validation_loss()
                log.info(
                    f"step {step}: val_loss {self.state.val_loss}",
                    extra={"event": "eval", "step": step, "val_loss": self.state.val_loss},
                )
            self.state.train_loss = sum(self.state.recent_losses) / len(self.state.recent_losses)
            if self.checkpoint_due(step):
                self.publish_checkpoint()
        self.stop_if_asked(start)
        self.state.val_loss = self.validation_loss()

    def stop_if_asked(self, start: int) -> None:
        """After SIGTERM: publish the steps done since `start` (none: nothing to save), exit 143.

        Checked between steps, so a SIGTERM during a periodic checkpoint's upload or during
        model loading costs no further step of the grace period. Data parallel: the processes
        agree, so that all stop after the same step."""
        if not distributed.any_true(self.world, self.ctx.stop.is_set()):
            return
        if self.state.step > start:
            self.publish_checkpoint()  # returns at once when this step's is already published
        self.ctx.stop.set()
        self.ctx.check_stop()  # raises Terminated -> exit 143

    def check_finite(self, loss: float, step: int, lr: float) -> None:
        if not math.isfinite(loss):
            raise PermanentError(
                f"training diverged: loss {loss} at step {step} (learning rate {lr:.3g}); nothing "
                "more is published: lower LORAFORGE_LEARNING_RATE or LORAFORGE_MAX_GRAD_NORM, or "
                "check the data, and start a new run (LORAFORGE_RUN_ID)"
            )

    def checkpoint_due(self, step: int) -> bool:
        s = self.settings
        if step >= s.max_steps:
            return False  # the final adapter is published instead
        by_step = s.checkpoint_interval > 0 and step % s.checkpoint_interval == 0
        by_time = 0 < s.checkpoint_seconds <= time.monotonic() - self._last_checkpoint
        if self.world.distributed and s.checkpoint_seconds > 0:
            by_time = distributed.from_main(self.world, by_time)  # rank 0's clock decides
        return by_step or by_time

    def publish_checkpoint(self) -> None:
        """Rank 0 publishes; the other processes wait for it (under FSDP they first send it
        their shards)."""
        full = distributed.gather(self.model, self.optimizer) if self.fsdp else None
        if self.world.main:
            self._publish_checkpoint(full)
        self._last_checkpoint = time.monotonic()
        distributed.barrier(self.world)

    def _publish_checkpoint(self, full: tuple[dict[str, Any], dict[str, Any]] | None) -> None:
        uri = checkpoint.checkpoint_uri(self.settings.checkpoints_uri, self.state.step)
        if store.exists(uri):  # reached again after resuming from an older one
            return
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="loraforge-ckpt-") as tmp:
            checkpoint.save(Path(tmp), self.model, self.optimizer, self.state, full)
            try:
                store.publish(
                    tmp,
                    uri,
                    job="train-checkpoint",
                    run_id=self.settings.run_id,
                    settings=self.settings.redacted(),
                    metrics=self.metrics(),
                )
            except ArtifactExistsError:  # a replica of this run (same settings) got there first
                log.warning(f"checkpoint {uri} was published by another writer; continuing")
                return
        log.info(
            f"checkpoint {uri} published in {time.monotonic() - started:.1f}s",
            extra={"event": "checkpoint", "step": self.state.step, "uri": uri},
        )

    def resume(self) -> None:
        """Continue from the newest checkpoint that verifies (rank 0 chooses; the others fetch
        the same one from the cache it filled)."""
        artifact = None
        if self.world.main:
            artifact = checkpoint.newest_verified(self.settings.checkpoints_uri, self.settings)
        uri = distributed.from_main(self.world, artifact.uri if artifact else None)
        if uri is None:
            return
        if artifact is None:
            artifact = store.fetch(uri)
        self.state = checkpoint.restore(artifact.path, self.model, self.optimizer)
        log.info(
            f"resumed from {artifact.uri} at step {self.state.step}",
            extra={"event": "resume", "step": self.state.step, "uri": artifact.uri},
        )

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name; under FSDP gathered (every process calls, rank 0 gets)."""
        if self.fsdp:
            return distributed.gather(self.model, None)[0]
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def metrics(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "train_loss": self.state.train_loss,
            "val_loss": self.state.val_loss,
            "train_examples": len(self.train_set),
            "val_examples": len(self.val_set),
        }


def build_trainer(settings: TrainSettings, ctx: JobContext, world: World | None = None) -> Trainer:
    world = world or World()
    device = resolve_device(settings.device)
    if world.distributed:
        device = distributed.start(world, device, settings.grad_accum)
    with distributed.main_first(world):  # rank 0 fills the download cache first
        trainer = _build_trainer(settings, ctx, world, device)
    return trainer


def _build_trainer(
    settings: TrainSettings, ctx: JobContext, world: World, device: torch.device
) -> Trainer:
    dtype = resolve_dtype(settings.precision, device)
    path = base_model_path(settings)
    tokenizer = load_tokenizer(path, settings)
    train_set, val_set = data.load_datasets(settings, tokenizer)
    _check_lengths(settings, path, train_set + val_set)
    quantization = resolve_quantization(settings, device, path)
    _check_dora_quantization(settings, quantization)
    attention = attention_backend(settings.packing, device, model_config(path))
    fsdp = world.distributed and settings.parallel == "fsdp"
    if fsdp and quantization != "none":
        raise PermanentError(
            f"LORAFORGE_PARALLEL=fsdp: LORAFORGE_QUANTIZATION=auto chose {quantization}, which "
            "FSDP cannot shard: set LORAFORGE_QUANTIZATION=none, or LORAFORGE_PARALLEL=ddp"
        )
    # FSDP loads on the CPU and moves each process's shards to its GPU (parallelize)
    load_on = torch.device("cpu") if fsdp else device
    model = load_base_model(path, settings, load_on, dtype, quantization, attention)
    checkpointing = resolve_checkpointing(settings, device, path, quantization)
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = attach_adapter(model, settings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    log.info(
        f"training {peft_model.get_nb_trainable_parameters()[0]:,} adapter parameters on "
        f"{len(train_set)} examples ({len(val_set)} for validation), {device}, {dtype}, "
        f"quantization {quantization}, attention {attention}"
    )
    if settings.method == "bidora":
        from loraforge.bidora import BiDoRATrainer

        if world.distributed:
            raise PermanentError(
                f"LORAFORGE_METHOD=bidora runs in one process, not {world.size}: start it "
                "without torchrun (LORAFORGE_GPUS=1, LORAFORGE_NODES=1), or train dora"
            )
        return BiDoRATrainer(settings, peft_model, train_set, val_set, device, dtype, int(pad), ctx)
    return Trainer(settings, peft_model, train_set, val_set, device, dtype, int(pad), ctx, world)


def _check_dora_quantization(settings: TrainSettings, quantization: str) -> None:
    """PEFT's DoRA on a bitsandbytes int8 base fails from the second forward pass: DoRA
    dequantizes the weight for its norm and the layer's int8 state is gone afterwards (measured
    with peft 0.21.2, bitsandbytes 0.50.2 on the CPU; LoRA on int8 is unaffected)."""
    if quantization == "int8" and settings.method in ("dora", "bidora"):
        raise PermanentError(
            f"LORAFORGE_QUANTIZATION=int8 with LORAFORGE_METHOD={settings.method}: PEFT's DoRA "
            "breaks a bitsandbytes int8 base after its first forward pass; use nf4 or none"
        )


def _check_lengths(settings: TrainSettings, path: str, examples: list[data.Example]) -> None:
    limit = model_config(path).get("max_position_embeddings")
    longest = max((len(e.input_ids) for e in examples), default=0)
    if limit and settings.max_seq_len > limit:
        raise PermanentError(
            f"LORAFORGE_MAX_SEQ_LEN={settings.max_seq_len} is above the model's maximum "
            f"({limit} positions): set it to {limit} or less"
        )
    if limit and longest > limit:
        raise PermanentError(f"an example has {longest} tokens, the model takes {limit}")


def publish_adapter(trainer: Trainer) -> None:
    """Rank 0 publishes the adapter (the others only send their shards under FSDP)."""
    s = trainer.settings
    weights = trainer.adapter_state()
    if not trainer.world.main:
        return
    bad = [name for name, tensor in weights.items() if not tensor.isfinite().all()]
    if bad:
        raise PermanentError(
            f"training diverged: {bad[0]} holds NaN or infinite values; nothing is published: "
            "lower LORAFORGE_LEARNING_RATE and start a new run (LORAFORGE_RUN_ID)"
        )
    inputs = [
        dict(input_record(s.base_model, None), revision=s.base_revision),
        dict(input_record(s.data, None)),
    ]
    if s.val_data:
        inputs.append(dict(input_record(s.val_data, None)))
    with tempfile.TemporaryDirectory(prefix="loraforge-adapter-") as tmp:
        trainer.model.save_pretrained(
            tmp, safe_serialization=True, state_dict=weights if trainer.fsdp else None
        )
        store.publish(
            tmp,
            s.output_uri,
            job="train",
            run_id=s.run_id,
            settings=s.redacted(),
            inputs=inputs,
            metrics=trainer.metrics(),
        )
    log.info(
        f"adapter published: {s.output_uri}",
        extra={"event": "published", "uri": s.output_uri, **trainer.metrics()},
    )


def run(settings: TrainSettings, ctx: JobContext) -> None:
    ctx.cooperative()  # SIGTERM: finish the step, publish a checkpoint, then exit 143
    if store.exists(settings.output_uri):
        log.info(f"{settings.output_uri} is already published: nothing to do")
        return
    world = World.from_env()
    try:
        trainer = build_trainer(settings, ctx, world)
        trainer.resume()
        trainer.parallelize()
        trainer.fit()
        publish_adapter(trainer)
        distributed.barrier(world)
    finally:
        distributed.stop()


def main() -> None:
    job_main(TrainSettings, run)


if __name__ == "__main__":  # `torchrun -m loraforge.train`
    main()
