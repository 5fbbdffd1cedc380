"""The eval job (`loraforge-eval`): settings -> problems and adapters -> generate -> score ->
publish `predictions.jsonl`, `metrics.json`, `report.md` and a chart as one artifact.

Two tasks: `gsm8k` (`loraforge.gsm8k`: exact match of the final number, `accuracy.png`) and
`humaneval` (`loraforge.humaneval`: n completions per problem run against their tests in the
sandbox, `loraforge.sandbox`, pass@k, `pass_at_k.png`). Every input is checked before the model
loads (data, few-shot pool, adapters, engine, the sandbox), and all problems found are reported
in one line. The base loads once; every problem is generated once per adapter and sample, from
the same token ids for every adapter and engine. Nothing is published unless everything
succeeded.

Sharded (LORAFORGE_SHARDS > 1, `loraforge.shards`): each job generates and scores its block of
the engine's units over the whole problem set and publishes it as a partial artifact; the last
shard to finish (or a LORAFORGE_SHARD=merge job) merges the partials and publishes through
`write_and_publish`, the same code an unsharded run ends in.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from loraforge import adapters as adapters_mod
from loraforge import engines, gsm8k, humaneval, report, sandbox, shards, store
from loraforge.adapters import Adapter
from loraforge.engines import Decoding, Engine, Generation, OnBatch, end_token_ids
from loraforge.errors import PermanentError
from loraforge.logs import Progress
from loraforge.manifest import input_record
from loraforge.modeling import (
    base_model_path,
    load_base_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from loraforge.runner import JobContext, job_main
from loraforge.settings import EvalSettings
from loraforge.shards import Role, Row, Scope

log = logging.getLogger("loraforge.eval")
T = TypeVar("T")
CHARTS = {"gsm8k": "accuracy.png", "humaneval": humaneval.CHART}
Problem = gsm8k.Problem | humaneval.Problem
Predictions = Sequence[report.Prediction | report.CodePrediction]


def files(task: str) -> tuple[str, ...]:
    return ("predictions.jsonl", "metrics.json", "report.md", CHARTS[task])


@dataclass(frozen=True)
class Inputs:
    """Everything checked before the model loads."""

    problems: Sequence[Problem]
    pool: list[gsm8k.Shot]
    fewshot_uri: str | None
    adapters: list[Adapter]
    engine: str
    isolation: sandbox.Isolation | None = None  # humaneval: how programs are run


def math_problems(inputs: Inputs) -> list[gsm8k.Problem]:
    return [p for p in inputs.problems if isinstance(p, gsm8k.Problem)]


def code_problems(inputs: Inputs) -> list[humaneval.Problem]:
    return [p for p in inputs.problems if isinstance(p, humaneval.Problem)]


def gather(settings: EvalSettings) -> Inputs:
    """Read and check every input; each unusable one is named, all in one PermanentError."""
    problems_found: list[str] = []

    def attempt(check: Callable[[], T], fallback: T) -> T:
        try:
            return check()
        except PermanentError as exc:
            problems_found.append(str(exc))
            return fallback

    limit, seed = settings.eval_limit, settings.seed
    problems: Sequence[Problem]
    isolation = None
    if settings.task == "humaneval":
        problems = attempt(
            lambda: humaneval.load_problems(settings.data, limit=limit, seed=seed), []
        )
        isolation = attempt(probe_sandbox, None)
    else:
        problems = attempt(lambda: gsm8k.load_problems(settings.data, limit=limit, seed=seed), [])
    fewshot_uri = settings.fewshot_data or gsm8k.default_fewshot_uri(settings.data)
    pool: list[gsm8k.Shot] = (
        attempt(lambda: gsm8k.load_shots(fewshot_uri), []) if settings.shots else []
    )
    adapters: list[Adapter] = attempt(lambda: adapters_mod.resolve(settings.adapters), [])
    has_cuda = settings.device != "cpu" and torch.cuda.is_available()
    engine, why = attempt(
        lambda: engines.choose(
            settings.engine, adapters, has_vllm=engines.vllm_installed(), has_cuda=has_cuda
        ),
        ("", ""),
    )
    if engine == "transformers":
        attempt(lambda: one_device(settings, why), None)
    if problems_found:
        raise PermanentError("; ".join(problems_found))
    log.info(f"engine {engine}: {why}", extra={"event": "engine", "engine": engine})
    if settings.shots and fewshot_uri == settings.data:
        log.warning(
            f"few-shot examples are drawn from {settings.data} itself (never a problem's "
            "own): set LORAFORGE_FEWSHOT_DATA to a training split for lm-eval's setup"
        )
    fewshot = fewshot_uri if settings.shots else None
    return Inputs(problems, pool, fewshot, adapters, engine, isolation)


def one_device(settings: EvalSettings, why: str) -> None:
    """The transformers engine runs on one device: PermanentError for tensor parallelism."""
    n = settings.tensor_parallel
    if n > 1:
        raise PermanentError(
            f"LORAFORGE_TENSOR_PARALLEL={n} needs the vLLM engine and the transformers engine "
            f"was chosen ({why}), which runs on one device: set LORAFORGE_TENSOR_PARALLEL=1, or "
            f"LORAFORGE_ENGINE=vllm in the CUDA image on a node with {n} GPUs"
        )


def probe_sandbox() -> sandbox.Isolation:
    """How generated code will run here (logged); PermanentError when no process can start."""
    try:
        isolation = sandbox.probe()
    except sandbox.SandboxUnavailable as exc:
        raise PermanentError(
            f"LORAFORGE_TASK=humaneval: {exc}: run the job as a user that can execute its own "
            "Python interpreter (the image's non-root user can)"
        ) from exc
    log.info(f"sandbox: {isolation.description}", extra={"event": "sandbox"})
    if "net" not in isolation.namespaces:
        log.warning(
            "generated code runs without a network namespace here: only the sandbox's audit "
            "hook (a Python-level check) keeps it off the network the pod may reach"
        )
    return isolation


# --- prompts ------------------------------------------------------------------------------------


def build_prompts(
    settings: EvalSettings, inputs: Inputs, tokenizer: Any
) -> tuple[list[list[int]], list[list[int]]]:
    """(token ids, few-shot indices) per problem."""
    if settings.task == "humaneval":
        code = code_problems(inputs)
        return [humaneval.encode_prompt(p, tokenizer) for p in code], [[] for _ in code]
    if settings.chat_template and not getattr(tokenizer, "chat_template", None):
        raise PermanentError(
            f"LORAFORGE_CHAT_TEMPLATE=true but the tokenizer of {settings.base_model} has no chat "
            "template: set it to false for plain-text prompts"
        )
    sampler = gsm8k.ShotSampler(inputs.pool, settings.shots, settings.seed)
    prompts, shot_ids = [], []
    for problem in math_problems(inputs):
        drawn = sampler.draw(problem)
        shots = [inputs.pool[i] for i in drawn]
        prompts.append(gsm8k.encode_prompt(problem, shots, tokenizer, settings.chat_template))
        shot_ids.append(drawn)
    return prompts, shot_ids


def token_budgets(
    prompts: Sequence[list[int]],
    problems: Sequence[Problem],
    new_tokens: int,
    context: int | None,
) -> list[int]:
    """New tokens per prompt: the setting, less where the prompt nearly fills the context."""
    if context is None:
        return [new_tokens] * len(prompts)
    budgets = [min(new_tokens, context - len(p)) for p in prompts]
    too_long = [(pb, len(p)) for pb, p, b in zip(problems, prompts, budgets, strict=True) if b < 1]
    if too_long:
        problem, length = too_long[0]
        raise PermanentError(
            f"{problem.where}: the prompt has {length} tokens and the model takes {context} "
            f"({len(too_long)} such problems): lower LORAFORGE_NUM_FEWSHOT"
        )
    clipped = sum(b < new_tokens for b in budgets)
    if clipped:
        log.warning(
            f"{clipped} prompts leave fewer than {new_tokens} new tokens in the model's "
            f"{context}-token context; their answers may be cut short"
        )
    return budgets


def decoding(settings: EvalSettings) -> tuple[Decoding, tuple[str, ...]]:
    """(how tokens are chosen, the stop strings) of the task."""
    if settings.task == "gsm8k":
        return Decoding(seed=settings.seed), gsm8k.STOP_STRINGS
    chosen = Decoding(
        settings.samples, settings.sampling_temperature, settings.sampling_top_p, settings.seed
    )
    return chosen, humaneval.STOP_STRINGS


def context_length(config: Any, tokenizer: Any) -> int | None:
    limits = [
        getattr(config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10**7]
    return min(usable) if usable else None


# --- engines ------------------------------------------------------------------------------------


def build_engine(
    settings: EvalSettings, inputs: Inputs, path: str, tokenizer: Any
) -> tuple[Engine, int | None]:
    """The chosen engine with the base loaded once and every adapter checked to fit it."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.precision, device)
    if inputs.engine == "vllm":
        return _vllm_engine(settings, inputs, path, tokenizer, dtype)
    from loraforge.engines.transformers_engine import Stops, TransformersEngine, attach_adapters

    base = load_base_model(path, settings, device, dtype)
    context = context_length(base.config, tokenizer)
    eos = end_token_ids(tokenizer, base.generation_config.eos_token_id)
    model, names = attach_adapters(base, inputs.adapters, settings.base_model)
    log.info(f"base {settings.base_model} loaded once on {device} ({dtype}); adapters: {names}")
    chosen, strings = decoding(settings)
    stops = Stops(tokenizer, eos, strings)
    engine = TransformersEngine(model, tokenizer, names, settings.batch_size, stops, chosen)
    return engine, context


def _vllm_engine(
    settings: EvalSettings, inputs: Inputs, path: str, tokenizer: Any, dtype: torch.dtype
) -> tuple[Engine, int | None]:
    from transformers import GenerationConfig

    from loraforge.engines.vllm_engine import VllmEngine

    meta = adapters_mod.meta_model(path, settings.base_revision)
    for adapter in inputs.adapters:
        adapters_mod.check_fits(adapter, meta, settings.base_model)
    try:
        revision = settings.base_revision or "main"
        generation_eos = GenerationConfig.from_pretrained(path, revision=revision).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        generation_eos = None
    args = vllm_args(settings, inputs.adapters, path, dtype)
    eos = sorted(end_token_ids(tokenizer, generation_eos))
    chosen, strings = decoding(settings)
    engine = VllmEngine(args, eos, settings.seed, chosen, strings)
    return engine, context_length(meta.config, tokenizer)


def vllm_args(
    settings: EvalSettings, adapters: Sequence[Adapter], path: str, dtype: torch.dtype
) -> dict[str, Any]:
    """`vllm.LLM`'s arguments: the base, the adapters' LoRA slots, the GPUs it spans."""
    from loraforge.engines.vllm_engine import engine_args

    tp = settings.tensor_parallel
    if tp > 1 and torch.cuda.device_count() < tp:
        raise PermanentError(
            f"LORAFORGE_TENSOR_PARALLEL={tp} but {torch.cuda.device_count()} GPUs are visible: "
            f"give the pod {tp} GPUs or lower LORAFORGE_TENSOR_PARALLEL"
        )
    args = engine_args(
        path,
        settings.base_revision,
        adapters,
        dtype,
        settings.seed,
        settings.gpu_memory_utilization,
    )
    return args | {"tensor_parallel_size": tp}


# --- generating a plan's units ------------------------------------------------------------------


def plan(settings: EvalSettings, engine: str, prompts: Sequence[list[int]]) -> list[list[Row]]:
    """The units of work over every problem, fixed before a shard takes its part."""
    if engine == "transformers":
        from loraforge.engines.transformers_engine import batch_plan

        return batch_plan([len(p) for p in prompts], settings.samples, settings.batch_size)
    return shards.problem_plan(len(prompts), settings.samples)


def generate(
    settings: EvalSettings,
    inputs: Inputs,
    path: str,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    units: Sequence[Sequence[Row]],
) -> dict[str, list[Generation]]:
    """{label: generations of the units' rows in (problem, sample) order}; no model is loaded
    for no rows (a shard beyond the units)."""
    rows = sorted(row for unit in units for row in unit)
    if not rows:
        return {a.label: [] for a in inputs.adapters}
    engine, context = build_engine(settings, inputs, path, tokenizer)
    budgets = token_budgets(prompts, inputs.problems, settings.new_tokens, context)
    progress = Progress(log, total=len(rows) * len(inputs.adapters))
    done = 0

    def on_batch(completions: int, tokens: int) -> None:
        nonlocal done
        done += completions
        progress.update(done, tokens, force=done == progress.total)

    log.info(
        f"generating {len({i for i, _ in rows})} problems x {settings.samples} samples x "
        f"{len(inputs.adapters)} adapters with {engine.name}"
    )
    return generate_units(engine, inputs.adapters, units, prompts, budgets, on_batch)


def generate_units(
    engine: Engine,
    adapters: Sequence[Adapter],
    units: Sequence[Sequence[Row]],
    prompts: Sequence[list[int]],
    budgets: Sequence[int],
    on_batch: OnBatch,
) -> dict[str, list[Generation]]:
    """The transformers engine runs exactly these batches; vLLM gets whole problems."""
    from loraforge.engines.transformers_engine import TransformersEngine

    rows = sorted(row for unit in units for row in unit)
    if isinstance(engine, TransformersEngine):
        done = engine.generate_rows(adapters, units, prompts, budgets, on_batch)
        return {label: [by_row[row] for row in rows] for label, by_row in done.items()}
    positions = sorted({i for i, _ in rows})
    return engine.generate(
        adapters, [prompts[i] for i in positions], [budgets[i] for i in positions], on_batch
    )


# --- scoring and publishing ---------------------------------------------------------------------


def score(
    problems: Sequence[gsm8k.Problem],
    shot_ids: Sequence[list[int]],
    adapters: Sequence[Adapter],
    generations: dict[str, list[Generation]],
) -> list[report.Prediction]:
    rows = []
    for adapter in adapters:
        for problem, shots, gen in zip(problems, shot_ids, generations[adapter.label], strict=True):
            strict, flexible = gsm8k.extract_strict(gen.text), gsm8k.extract_flexible(gen.text)
            rows.append(
                report.Prediction(
                    problem_id=problem.index,
                    adapter=adapter.label,
                    output=gen.text,
                    target=problem.target,
                    strict=strict,
                    flexible=flexible,
                    strict_correct=gsm8k.is_correct(strict, problem.target),
                    flexible_correct=gsm8k.is_correct(flexible, problem.target),
                    output_tokens=gen.tokens,
                    finish=gen.finish,
                    shots=shots,
                )
            )
    return rows


def score_rows(
    settings: EvalSettings,
    inputs: Inputs,
    shot_ids: Sequence[list[int]],
    rows: Sequence[Row],
    generations: dict[str, list[Generation]],
) -> tuple[Predictions, dict[str, Any] | None]:
    """(prediction rows adapter by adapter over `rows`, humaneval: how the programs ran)."""
    if settings.task == "humaneval":
        if not rows:
            return [], None
        assert inputs.isolation is not None  # gather probed it
        problems, adapters = code_problems(inputs), inputs.adapters
        return humaneval.execute(settings, problems, adapters, generations, inputs.isolation, rows)
    math = math_problems(inputs)
    chosen = [math[i] for i, _ in rows], [shot_ids[i] for i, _ in rows]
    return score(*chosen, inputs.adapters, generations), None


def input_records(settings: EvalSettings, inputs: Inputs) -> list[dict[str, Any]]:
    """The inputs as the manifest names them (artifacts with their manifests' sha256)."""
    records = [dict(input_record(settings.base_model, None), revision=settings.base_revision)]
    records.append(dict(input_record(settings.data, None)))
    if inputs.fewshot_uri:
        records.append(dict(input_record(inputs.fewshot_uri, None)))
    records += [
        dict(input_record(a.uri, a.manifest_bytes)) for a in inputs.adapters if not a.is_base
    ]
    return records


def scope_of(settings: EvalSettings, inputs: Inputs, ran: dict[str, Any] | None) -> Scope:
    labels = [(a.label, a.uri) for a in inputs.adapters]
    records = input_records(settings, inputs)
    n = len(inputs.problems)
    return Scope(settings.task, labels, n, inputs.fewshot_uri, inputs.engine, records, ran)


def setup_summary(settings: EvalSettings, scope: Scope) -> dict[str, Any]:
    return {
        "base model": settings.base_model,
        "eval data": settings.data,
        "problems": f"{scope.problems}"
        + (
            f" (LORAFORGE_EVAL_LIMIT={settings.eval_limit}, seed {settings.seed})"
            if settings.eval_limit
            else ""
        ),
        "profile": settings.profile_name,
        "few-shot": f"{settings.shots} from {scope.fewshot_uri}" if settings.shots else "0",
        "max new tokens": settings.new_tokens,
        "chat template": settings.chat_template,
        "decoding": "greedy, stop at 'Question:' or an end token",
        "engine": scope.engine,
    }


def write_outputs(
    out: Path, settings: EvalSettings, scope: Scope, predictions: Sequence[report.Prediction]
) -> dict[str, Any]:
    m = report.metrics(predictions, scope.labels, settings.bootstrap_samples, settings.seed)
    m |= {
        "profile": settings.profile_name,
        "num_fewshot": settings.shots,
        "max_new_tokens": settings.new_tokens,
        "engine": scope.engine,
        "metric": settings.metric,
    }
    report.write_predictions(out / "predictions.jsonl", predictions)
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    report.bar_chart(m, out / "accuracy.png")
    setup = setup_summary(settings, scope)
    (out / "report.md").write_text(report.markdown(m, setup, settings.metric, "accuracy.png"))
    return m


def write_and_publish(
    out: Path, settings: EvalSettings, scope: Scope, predictions: Predictions
) -> list[str]:
    """The task's outputs from the prediction rows, published at LORAFORGE_OUTPUT: an unsharded
    run and a merge both end here. Returns the verdict's lines."""
    if scope.task == "humaneval":
        code = [p for p in predictions if isinstance(p, report.CodePrediction)]
        m = humaneval.write_outputs(
            out, settings, scope.problems, scope.labels, code, scope.ran or {}, scope.engine
        )
        verdict = report.code_verdict(m)
    else:
        math = [p for p in predictions if isinstance(p, report.Prediction)]
        m = write_outputs(out, settings, scope, math)
        verdict = report.verdict(m, settings.metric)
    store.publish(
        out,
        settings.output_uri,
        job="eval",
        run_id=settings.run_id,
        settings=settings.redacted(),
        inputs=scope.records,
        metrics=m,
    )
    return verdict


def announce(settings: EvalSettings, verdict: Sequence[str]) -> None:
    for line in verdict:
        log.info(line.replace("**", ""), extra={"event": "verdict"})
    published = ", ".join(files(settings.task))
    log.info(f"published {settings.output_uri}: {published}", extra={"event": "published"})


# --- the job ------------------------------------------------------------------------------------


def run(settings: EvalSettings, ctx: JobContext) -> None:
    if store.exists(settings.output_uri):
        log.info(f"{settings.output_uri} is already published: nothing to do")
        return
    role = shards.role(settings, os.environ)
    if role.merging:
        verdict = shards.merge(settings, role.count, write_and_publish)
    elif role.sharded and shards.published(settings.output_uri, role):
        log.info(f"shard {role.index} of {role.count} is already published")
        verdict = shards.merge_when_complete(settings, role, write_and_publish)
    else:
        verdict = score_part(settings, role)
    if verdict is not None:
        announce(settings, verdict)


def score_part(settings: EvalSettings, role: Role) -> list[str] | None:
    """Generate and score this job's part (all of it unsharded) and publish it; the verdict's
    lines when this job published LORAFORGE_OUTPUT."""
    inputs = gather(settings)
    path = base_model_path(settings)
    tokenizer = load_tokenizer(path, settings)
    prompts, shot_ids = build_prompts(settings, inputs, tokenizer)
    units = plan(settings, inputs.engine, prompts)
    mine = shards.take(units, role.index or 0, role.count)
    rows = sorted(row for unit in mine for row in unit)
    generations = generate(settings, inputs, path, tokenizer, prompts, mine)
    predictions, ran = score_rows(settings, inputs, shot_ids, rows, generations)
    scope = scope_of(settings, inputs, ran)
    if role.sharded:
        found = shards.fingerprint(settings, scope, inputs.problems, prompts, units)
        shards.publish_partial(settings, role, scope, found, rows, predictions)
        return shards.merge_when_complete(settings, role, write_and_publish)
    with tempfile.TemporaryDirectory(prefix="loraforge-eval-") as tmp:
        return write_and_publish(Path(tmp), settings, scope, predictions)


def main() -> None:
    job_main(EvalSettings, run)


if __name__ == "__main__":  # python -m loraforge.eval
    main()
