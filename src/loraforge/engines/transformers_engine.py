"""The transformers engine: one base loaded once, PEFT adapters switched in place, batched decoding.

Prompts are sorted by length (longest first, so a batch that does not fit shows at once) and
cut into batches that are left-padded: every row's last prompt token sits in the last column,
so one argmax (greedy) or one draw per row (sampling) per step serves the whole batch.
Generation runs on a KV cache; a row that stops (stop string, end token or its token budget)
leaves the batch and its cache rows are dropped, so a long answer does not keep finished rows
computing. A row's greedy continuation does not depend on its batch-mates: batched outputs
equal one-at-a-time outputs (asserted on the CPU in fp32 by tests/test_eval.py and
bench/eval_throughput.py; in bf16 on a GPU, padding can change rounding and so flip a near-tie).

Sampling (`Decoding` with a temperature) repeats each prompt `n` times as rows of its own. Each
row draws from a `torch.Generator` of its own, seeded from (seed, prompt position, sample), so
its completion does not depend on its batch-mates or the batch size either, and every adapter
sees the same draws. The nucleus is Hugging Face's `TopPLogitsWarper` (and vLLM's): the most
likely tokens whose probabilities add up to at least top-p, after dividing the logits by the
temperature.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from peft import PeftModel
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from loraforge.adapters import Adapter, check_fits
from loraforge.engines import GREEDY, Decoding, Finish, Generation, OnBatch
from loraforge.errors import PermanentError
from loraforge.gsm8k import STOP_STRINGS, cut_at_stop

log = logging.getLogger("loraforge.engines.transformers")


@dataclass(frozen=True)
class Stops:
    """When a row is done: an end token, or a stop string in the decoded tail."""

    tokenizer: Tokenizer
    eos_ids: frozenset[int]
    strings: tuple[str, ...] = STOP_STRINGS

    @property
    def window(self) -> int:
        # a token decodes to at least one character, bar partial UTF-8 bytes: twice is plenty
        return 2 * max((len(s) for s in self.strings), default=0) + 4

    def finish(self, ids: list[int], budget: int) -> Finish | None:
        if ids[-1] in self.eos_ids:
            return "eos"
        tail = self.tokenizer.decode(ids[-self.window :], skip_special_tokens=True)
        if any(s in tail for s in self.strings):
            return "stop"
        return "length" if len(ids) >= budget else None

    def text(self, ids: list[int]) -> str:
        return cut_at_stop(str(self.tokenizer.decode(ids, skip_special_tokens=True)), self.strings)


def left_pad(
    rows: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest), pads on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


# The next token of every active row: (logits (active, vocab), active row numbers) -> (active,)
Choose = Callable[[torch.Tensor, list[int]], torch.Tensor]


def greedy_batch(
    model: torch.nn.Module,
    rows: Sequence[list[int]],
    budgets: Sequence[int],
    stops: Stops,
    pad_id: int,
) -> list[tuple[list[int], Finish]]:
    """Greedy continuations of left-padded `rows` on a KV cache; finished rows leave the batch."""
    return decode_batch(model, rows, budgets, stops, pad_id, lambda logits, _: logits.argmax(-1))


def sample_batch(
    model: torch.nn.Module,
    rows: Sequence[list[int]],
    budgets: Sequence[int],
    stops: Stops,
    pad_id: int,
    decoding: Decoding,
    seeds: Sequence[int],
) -> list[tuple[list[int], Finish]]:
    """Sampled continuations; row i draws from a generator seeded with `seeds[i]`."""
    device = next(model.parameters()).device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def choose(logits: torch.Tensor, active: list[int]) -> torch.Tensor:
        return sample_tokens(logits, decoding, [generators[row] for row in active])

    return decode_batch(model, rows, budgets, stops, pad_id, choose)


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(rows, vocab) probabilities of softmax(logits / T) cut to the top-p nucleus, renormalised.

    As `TopPLogitsWarper`: sort ascending and drop the tokens whose cumulative probability stays
    at or below 1 - top_p (the most likely token always stays). Upcast: bf16 logits would round
    the cumulative sums.
    """
    probs = (logits.float() / temperature).softmax(-1)  # (rows, vocab)
    if top_p >= 1.0:
        return probs
    ascending, order = probs.sort(-1)
    drop_sorted = ascending.cumsum(-1) <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    kept = probs.masked_fill(drop, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def sample_tokens(
    logits: torch.Tensor, decoding: Decoding, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row, row i drawn with `generators[i]`: (rows,)."""
    probs = nucleus_probs(logits, decoding.temperature, decoding.top_p)
    draws = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)]
    return torch.cat(draws)


Row = tuple[int, int]  # (prompt position in the whole prompt list, sample)


def batch_plan(lengths: Sequence[int], n: int, batch_size: int) -> list[list[Row]]:
    """The engine's batches over every prompt (`lengths`: token counts): rows (prompt i, sample
    j) sorted by prompt length, longest first, ties in prompt order, cut every `batch_size`.
    A shard of the eval job runs a block of these batches, so every row is generated in the
    batch, with the batch-mates and padding, that it has in an unsharded run."""
    rows = [(i, j) for i in range(len(lengths)) for j in range(n)]
    rows.sort(key=lambda row: -lengths[row[0]])  # stable: ties keep prompt order
    return [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]


def row_seed(seed: int, prompt: int, sample: int) -> int:
    """A 63-bit seed per (seed, prompt position, sample), the same for every adapter; the
    position is in the whole prompt list, so a shard draws what an unsharded run draws."""
    digest = hashlib.sha256(f"loraforge-sample-{seed}-{prompt}-{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@torch.inference_mode()
def decode_batch(
    model: torch.nn.Module,
    rows: Sequence[list[int]],
    budgets: Sequence[int],
    stops: Stops,
    pad_id: int,
    choose: Choose,
) -> list[tuple[list[int], Finish]]:
    """Continuations of left-padded `rows` on a KV cache, each next token picked by `choose`;
    finished rows leave the batch."""
    device = next(model.parameters()).device
    input_ids, mask = left_pad(rows, pad_id, device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # pads get position 0; they are masked
    cache = DynamicCache(config=cast(PretrainedConfig, model.config))
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]  # (batch, vocab)
    generated: list[list[int]] = [[] for _ in rows]
    finished: list[Finish | None] = [None] * len(rows)
    active = list(range(len(rows)))  # row numbers of the batch's current members
    while True:
        next_ids = choose(logits, active)  # (active,)
        keep = []
        for slot, (row, token) in enumerate(zip(active, next_ids.tolist(), strict=True)):
            generated[row].append(int(token))
            finished[row] = stops.finish(generated[row], budgets[row])
            if finished[row] is None:
                keep.append(slot)
        if not keep:
            break
        if len(keep) < len(active):  # drop finished rows from the batch and the cache
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            next_ids, mask, position_ids = next_ids[index], mask[index], position_ids[index]
            active = [active[slot] for slot in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
        logits = model(
            input_ids=next_ids[:, None],
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
    return [(ids, finish or "length") for ids, finish in zip(generated, finished, strict=True)]


class TransformersEngine:
    """A base model (optionally wrapped by PeftModel holding every adapter) and a tokenizer."""

    name = "transformers"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        adapter_names: dict[str, str],
        batch_size: int,
        stops: Stops,
        decoding: Decoding = GREEDY,
    ) -> None:
        self.model, self.tokenizer, self.batch_size, self.stops = (
            model,
            tokenizer,
            batch_size,
            stops,
        )
        self.decoding = decoding
        self.adapter_names = adapter_names  # label -> PEFT adapter name
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops.eos_ids)
        self.pad_id = int(pad)

    @contextlib.contextmanager
    def active(self, adapter: Adapter) -> Iterator[None]:
        """The model as `adapter` sees it: `base` runs with every adapter disabled."""
        if not adapter.is_base:
            assert isinstance(self.model, PeftModel)
            self.model.set_adapter(self.adapter_names[adapter.label])
            yield
        elif isinstance(self.model, PeftModel):
            with self.model.disable_adapter():
                yield
        else:
            yield

    def generate(
        self,
        adapters: Sequence[Adapter],
        prompts: Sequence[list[int]],
        budgets: Sequence[int],
        on_batch: OnBatch,
    ) -> dict[str, list[Generation]]:
        results = {}
        for adapter in adapters:
            with self.active(adapter):
                results[adapter.label] = self.generate_all(prompts, budgets, on_batch)
        return results

    def generate_all(
        self, prompts: Sequence[list[int]], budgets: Sequence[int], on_batch: OnBatch
    ) -> list[Generation]:
        """Length-sorted batches (longest first); results back in prompt order, each prompt's
        `n` samples together."""
        plan = batch_plan([len(p) for p in prompts], self.decoding.n, self.batch_size)
        done = self.generate_batches(plan, prompts, budgets, on_batch)
        return [done[row] for row in sorted(done)]

    def generate_rows(
        self,
        adapters: Sequence[Adapter],
        batches: Sequence[Sequence[Row]],
        prompts: Sequence[list[int]],
        budgets: Sequence[int],
        on_batch: OnBatch,
    ) -> dict[str, dict[Row, Generation]]:
        """Some batches of `batch_plan` (a shard's) under every adapter: {label: {row: output}}."""
        results = {}
        for adapter in adapters:
            with self.active(adapter):
                results[adapter.label] = self.generate_batches(batches, prompts, budgets, on_batch)
        return results

    def generate_batches(
        self,
        batches: Sequence[Sequence[Row]],
        prompts: Sequence[list[int]],
        budgets: Sequence[int],
        on_batch: OnBatch,
    ) -> dict[Row, Generation]:
        results = {}
        for chunk in batches:
            outputs = self._batch(list(chunk), prompts, budgets)
            for row, (ids, finish) in zip(chunk, outputs, strict=True):
                results[row] = Generation(self.stops.text(ids), len(ids), finish)
            on_batch(len(chunk), sum(len(ids) for ids, _ in outputs))
        return results

    def _batch(
        self, rows: list[tuple[int, int]], prompts: Sequence[list[int]], budgets: Sequence[int]
    ) -> list[tuple[list[int], Finish]]:
        ids = [prompts[i] for i, _ in rows]
        limits = [budgets[i] for i, _ in rows]
        if self.decoding.greedy:
            return greedy_batch(self.model, ids, limits, self.stops, self.pad_id)
        seeds = [row_seed(self.decoding.seed, i, j) for i, j in rows]
        return sample_batch(self.model, ids, limits, self.stops, self.pad_id, self.decoding, seeds)


def attach_adapters(
    base: PreTrainedModel, adapters: Sequence[Adapter], base_name: str
) -> tuple[torch.nn.Module, dict[str, str]]:
    """The base wrapped in one PeftModel holding every adapter (checked to fit first)."""
    loras = [a for a in adapters if not a.is_base]
    for adapter in loras:
        check_fits(adapter, base, base_name)
        made_for = adapter.config.get("base_model_name_or_path")
        if made_for and made_for != base_name:
            log.warning(f"{adapter.label} was made for {made_for}; scoring it on {base_name}")
    if not loras:
        return base, {}
    names = {a.label: f"adapter_{i}" for i, a in enumerate(loras)}
    model: torch.nn.Module = base
    for adapter in loras:
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(adapter.path), adapter_name=names[adapter.label])
            else:
                model = PeftModel.from_pretrained(
                    base, str(adapter.path), adapter_name=names[adapter.label], is_trainable=False
                )
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise PermanentError(
                f"LORAFORGE_ADAPTERS: {adapter.uri} does not load onto LORAFORGE_BASE_MODEL="
                f"{base_name} ({first}): score it with the base it was trained on"
            ) from exc
    return model.eval(), names
