"""The eval job on the tiny model, CPU: base + two real PEFT adapters, artifact, statistics, errors.

The problems are the tiny kit's copy-task questions (the pretrained base answers ~75% of them),
so base and adapters score differently and the statistics have something to say. The adapters
are real PEFT LoRA adapters with random non-zero B, published to a local store.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from loraforge import engines, gsm8k, store, tiny
from loraforge import eval as eval_job
from loraforge.adapters import Adapter
from loraforge.engines import transformers_engine
from loraforge.engines.transformers_engine import Stops, TransformersEngine, attach_adapters
from loraforge.errors import EXIT_OK, EXIT_PERMANENT
from loraforge.runner import run_job
from loraforge.settings import EvalSettings
from loraforge.stats import Z95

N_PROBLEMS = 24
SMALL, BIG = "small/train", "big/train"  # labels: the shortest distinct URI suffixes
FILES = ["accuracy.png", "loraforge.json", "metrics.json", "predictions.jsonl", "report.md"]


def copy_problems(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        tiny.render(
            rng.choice(tiny.COPY),
            rng.choice(tiny.NAMES),
            rng.choice(tiny.OBJECTS),
            rng.randint(10, 99),
            rng.randint(10, 99),
        )
        for _ in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def publish_lora(
    model: torch.nn.Module, out: Path, name: str, config: LoraConfig, std: float, seed: int
) -> str:
    """A PEFT LoRA adapter with B ~ N(0, std), published as an artifact under `out`."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    for param_name, param in peft_model.named_parameters():
        if "lora_B" in param_name:
            torch.nn.init.normal_(param, std=std)
    peft_model.save_pretrained(out / f"src-{name}")
    uri = str(out / "runs" / name / "train")
    store.publish(out / f"src-{name}", uri, job="train", run_id=name)
    return uri


@dataclass
class World:
    kit: Any
    data: str  # copy-task problems
    small: str  # adapter URIs
    big: str
    other_base: str
    other_arch: str
    pickled: str
    root: Path


@pytest.fixture(scope="module")
def world(tiny_kit, tmp_path_factory: pytest.TempPathFactory) -> World:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("eval")
    data = write_jsonl(root / "copy.jsonl", copy_problems(N_PROBLEMS, seed=7))

    def base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tiny_kit.model_dir, dtype=torch.float32)

    small = publish_lora(
        base(),
        root,
        "small",
        LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        0.1,
        1,
    )
    big_targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    big = publish_lora(
        base(), root, "big", LoraConfig(r=4, lora_alpha=4, target_modules=big_targets), 0.12, 2
    )
    other = LlamaConfig(
        vocab_size=453,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    other_base = publish_lora(
        AutoModelForCausalLM.from_config(other),
        root,
        "other",
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        0.1,
        3,
    )
    gpt2 = GPT2Config(vocab_size=453, n_embd=32, n_layer=1, n_head=2)
    other_arch = publish_lora(
        AutoModelForCausalLM.from_config(gpt2),
        root,
        "gpt2",
        LoraConfig(r=4, target_modules=["c_attn"]),
        0.1,
        4,
    )
    pickled_dir = root / "src-pickled"
    pickled_dir.mkdir()
    (pickled_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (pickled_dir / "adapter_model.bin").write_bytes(b"not loaded")
    store.publish(pickled_dir, str(root / "runs/pickled/train"), job="train", run_id="p")
    return World(
        tiny_kit, data, small, big, other_base, other_arch, str(root / "runs/pickled/train"), root
    )


def spec(world: World, store_dir: Path, **overrides: str) -> dict[str, str]:
    env = {
        "LORAFORGE_BASE_MODEL": str(world.kit.model_dir),
        "LORAFORGE_ADAPTERS": f"base,{world.small},{world.big}",
        "LORAFORGE_EVAL_DATA": world.data,
        "LORAFORGE_FEWSHOT_DATA": str(world.kit.train),
        "LORAFORGE_NUM_FEWSHOT": "2",
        "LORAFORGE_MAX_NEW_TOKENS": "40",
        "LORAFORGE_BOOTSTRAP_SAMPLES": "2000",
        "LORAFORGE_STORE": str(store_dir),
        "LORAFORGE_RUN_ID": "ev",
        "LORAFORGE_DEVICE": "cpu",
        "LORAFORGE_LOG_FORMAT": "json",
    }
    return {**env, **overrides}


@contextlib.contextmanager
def job_env(env: dict[str, str]) -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        yield mp


@dataclass
class Run:
    code: int
    out: Path
    log: list[dict[str, Any]]
    base_loads: list[str]
    engine_rows: int


def counted_eval(
    env: dict[str, str], batch: str
) -> tuple[int, list[dict[str, Any]], list[str], int]:
    """The eval job in process under `env`: exit code, JSON log, the paths every model load
    read and the rows the engine's `batch` function (greedy_batch, sample_batch) generated."""
    loads: list[str] = []
    rows = [0]
    original_load = AutoModelForCausalLM.from_pretrained.__func__  # type: ignore[attr-defined]
    original_batch = getattr(transformers_engine, batch)

    def counting_load(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(str(path))
        return original_load(cls, path, *args, **kwargs)

    def counting_batch(model: Any, prompts: Any, *args: Any) -> Any:
        rows[0] += len(prompts)
        return original_batch(model, prompts, *args)

    stderr = io.StringIO()
    with job_env(env) as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting_load))
        mp.setattr(transformers_engine, batch, counting_batch)
        with contextlib.redirect_stderr(stderr):
            code = run_job(EvalSettings, eval_job.run)
    log = [json.loads(line) for line in stderr.getvalue().splitlines() if line.startswith("{")]
    return code, log, loads, rows[0]


@pytest.fixture(scope="module")
def run(world: World) -> Run:
    """The job, in process, on base + small + big; counting base loads and generated rows."""
    store_dir = world.root / "store"
    code, log, loads, rows = counted_eval(spec(world, store_dir), "greedy_batch")
    return Run(code, store_dir / "ev" / "eval", log, loads, rows)


def test_publishes_exactly_the_eval_files(run: Run) -> None:
    assert run.code == EXIT_OK, run.log[-3:]
    assert sorted(p.name for p in run.out.iterdir()) == FILES
    manifest = store.read_manifest(str(run.out))[0]
    assert manifest.job == "eval" and manifest.metrics["problems"] == N_PROBLEMS
    assert (run.out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_base_loads_once_and_every_prompt_is_generated_once_per_adapter(
    run: Run, world: World
) -> None:
    assert run.base_loads == [str(world.kit.model_dir)]
    assert run.engine_rows == 3 * N_PROBLEMS
    predictions = [
        json.loads(line) for line in (run.out / "predictions.jsonl").read_text().splitlines()
    ]
    pairs = [(p["adapter"], p["problem_id"]) for p in predictions]
    assert len(pairs) == len(set(pairs)) == 3 * N_PROBLEMS
    assert {a for a, _ in pairs} == {"base", SMALL, BIG}


def test_adapters_change_the_answers(run: Run) -> None:
    outputs: dict[str, list[str]] = {}
    for line in (run.out / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        outputs.setdefault(row["adapter"], []).append(row["output"])
    assert outputs[SMALL] != outputs["base"] != outputs[BIG] != outputs[SMALL]


def test_predictions_are_scored_as_lm_eval_scores_them(run: Run, world: World) -> None:
    answers = [json.loads(line)["answer"] for line in Path(world.data).read_text().splitlines()]
    for line in (run.out / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        assert "Question:" not in p["output"]
        target = answers[p["problem_id"]].rsplit("#### ", 1)[1]
        assert p["target"] == target
        assert p["strict"] == gsm8k.extract_strict(p["output"])
        assert p["flexible"] == gsm8k.extract_flexible(p["output"])
        for match in ("strict", "flexible"):
            got = p[match]
            plain = (
                None if got is None else re.sub(r"\.$", "", got.replace(",", "").replace("$", ""))
            )
            assert p[f"{match}_correct"] == (plain == target)
        assert len(p["shots"]) == 2


def _wilson(k: int, n: int) -> tuple[float, float]:
    p, z2 = k / n, Z95**2
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _mcnemar(b: int, c: int) -> float:
    n = b + c
    return (
        1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)
    )


def _bootstrap_ci(
    ref: list[bool], other: list[bool], samples: int, seed: int
) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = len(ref)
    diffs = sorted(
        sum(int(other[i]) - int(ref[i]) for i in rng.integers(0, n, size=n)) / n
        for _ in range(samples)
    )

    def quantile(q: float) -> float:
        h = (samples - 1) * q
        lo = math.floor(h)
        return diffs[lo] + (h - lo) * (diffs[lo + 1] - diffs[lo])

    return quantile(0.025), quantile(0.975)


def test_metrics_are_recomputed_from_predictions(run: Run) -> None:
    metrics = json.loads((run.out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run.out / "predictions.jsonl").read_text().splitlines()]
    flags = {
        (label, match): [
            r[f"{match}_correct"]
            for r in sorted(rows, key=lambda r: r["problem_id"])
            if r["adapter"] == label
        ]
        for label in ("base", SMALL, BIG)
        for match in ("strict", "flexible")
    }
    assert [a["label"] for a in metrics["adapters"]] == ["base", SMALL, BIG]
    for entry in metrics["adapters"]:
        for match in ("strict", "flexible"):
            k = sum(flags[entry["label"], match])
            assert entry[match]["correct"] == k and entry[match]["accuracy"] == k / N_PROBLEMS
            assert entry[match]["ci95"] == pytest.approx(_wilson(k, N_PROBLEMS), abs=1e-12)
    # each adapter was really applied: the random big adapter changes some answers of the base
    texts = {
        label: [
            r["output"]
            for r in sorted(rows, key=lambda r: r["problem_id"])
            if r["adapter"] == label
        ]
        for label in ("base", BIG)
    }
    assert texts["base"] != texts[BIG]
    assert [c["adapter"] for c in metrics["comparisons"]] == [SMALL, BIG]
    for comparison in metrics["comparisons"]:
        assert comparison["reference"] == "base"
        for match in ("strict", "flexible"):
            ref, other = flags["base", match], flags[comparison["adapter"], match]
            got = comparison[match]
            b = sum(r and not o for r, o in zip(ref, other, strict=True))
            c = sum(o and not r for r, o in zip(ref, other, strict=True))
            assert (got["only_reference_correct"], got["only_adapter_correct"]) == (b, c)
            assert got["difference"] == pytest.approx((sum(other) - sum(ref)) / N_PROBLEMS)
            assert got["mcnemar_p"] == pytest.approx(_mcnemar(b, c), rel=1e-12)
            assert got["ci95"] == pytest.approx(
                _bootstrap_ci(ref, other, 2000, seed=1234), abs=1e-12
            )


def test_report_gives_a_plain_verdict_and_the_table(run: Run) -> None:
    report = (run.out / "report.md").read_text()
    metrics = json.loads((run.out / "metrics.json").read_text())
    big = next(c for c in metrics["comparisons"] if c["adapter"] == BIG)["strict"]
    word = "worse than" if big["mcnemar_p"] < 0.05 else "cannot be told apart"
    assert f"**{BIG}** {word}" in report or f"**{BIG}** and **base** {word}" in report
    assert f"| `{SMALL}` |" in report and "McNemar p" in report and "![accuracy" in report


def test_progress_reports_problems_tokens_per_second_and_eta(run: Run) -> None:
    progress = [line for line in run.log if line.get("event") == "progress"]
    assert progress[-1]["step"] == progress[-1]["total_steps"] == 3 * N_PROBLEMS
    assert progress[-1]["tokens_per_s"] > 0 and "eta_s" in progress[-1]
    assert any(line.get("event") == "verdict" for line in run.log)


def test_rerun_with_the_same_output_changes_nothing(run: Run, world: World) -> None:
    before = (run.out / "loraforge.json").read_bytes()
    with job_env(spec(world, world.root / "store")):
        assert run_job(EvalSettings, eval_job.run) == EXIT_OK
    assert (run.out / "loraforge.json").read_bytes() == before


# --- the engine itself --------------------------------------------------------------------------


def test_batched_generation_equals_one_prompt_at_a_time_and_adapters_switch_cleanly(
    world: World,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(world.kit.model_dir)
    problems = gsm8k.load_problems(world.data, limit=8, seed=0)
    pool = gsm8k.load_shots(str(world.kit.train))
    sampler = gsm8k.ShotSampler(pool, 2, seed=0)
    prompts = [
        gsm8k.encode_prompt(p, [pool[i] for i in sampler.draw(p)], tokenizer, False)
        for p in problems
    ]
    assert len({len(p) for p in prompts}) > 1  # ragged: left padding matters
    budgets = [32] * len(prompts)
    scored = [Adapter("base", "base"), *_adapters(world)]
    base = AutoModelForCausalLM.from_pretrained(world.kit.model_dir, dtype=torch.float32)
    model, names = attach_adapters(base, scored, str(world.kit.model_dir))
    stops = Stops(tokenizer, frozenset({2, 5}))
    batched = TransformersEngine(model, tokenizer, names, 8, stops).generate(
        scored, prompts, budgets, lambda n, t: None
    )
    single = TransformersEngine(model, tokenizer, names, 1, stops).generate(
        scored, prompts, budgets, lambda n, t: None
    )
    assert batched == single
    for adapter in scored:  # each against a model holding only that adapter (or none)
        plain = AutoModelForCausalLM.from_pretrained(
            world.kit.model_dir, dtype=torch.float32
        ).eval()
        alone = (
            plain if adapter.is_base else PeftModel.from_pretrained(plain, str(adapter.path)).eval()
        )
        expected = TransformersEngine(alone, tokenizer, {}, 8, stops).generate_all(
            prompts, budgets, lambda n, t: None
        )
        assert batched[adapter.label] == expected, adapter.label


def _adapters(world: World) -> list[Adapter]:
    from loraforge.adapters import resolve

    return resolve([world.small, world.big])


def test_budget_stops_a_rambling_answer(world: World) -> None:
    tokenizer = AutoTokenizer.from_pretrained(world.kit.model_dir)
    model = AutoModelForCausalLM.from_pretrained(world.kit.model_dir, dtype=torch.float32).eval()
    prompt = tokenizer("Question: Tom has 12 apples.")["input_ids"]
    stops = Stops(tokenizer, frozenset(), strings=())
    ((ids, finish),) = transformers_engine.greedy_batch(model, [prompt], [5], stops, 0)
    assert (len(ids), finish) == (5, "length")


# --- a second configuration: limit, 0-shot profile, chat template -------------------------------


def test_limit_profile_and_chat_template(world: World, tmp_path: Path) -> None:
    env = spec(
        world,
        tmp_path / "store",
        LORAFORGE_ADAPTERS=world.small,
        LORAFORGE_EVAL_LIMIT="5",
        LORAFORGE_PROFILE="greedy_math",
        LORAFORGE_CHAT_TEMPLATE="true",
        LORAFORGE_MAX_NEW_TOKENS="24",
    )
    del env["LORAFORGE_NUM_FEWSHOT"]
    with job_env(env):
        assert run_job(EvalSettings, eval_job.run) == EXIT_OK
    out = tmp_path / "store/ev/eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["problems"] == 5 and metrics["num_fewshot"] == 0 and metrics["comparisons"] == []
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["shots"] == [] for r in rows)
    assert "List a second adapter to compare" in (out / "report.md").read_text()


@pytest.mark.s3
def test_adapters_and_output_on_s3(world: World, s3_bucket: str) -> None:
    remote = f"{s3_bucket}/runs/small/train"
    store.publish(
        Path(world.small).parent.parent.parent / "src-small", remote, job="train", run_id="s"
    )
    env = spec(world, Path("unused"), LORAFORGE_ADAPTERS=f"base,{remote}", LORAFORGE_EVAL_LIMIT="4")
    env["LORAFORGE_STORE"] = f"{s3_bucket}/store"
    with job_env(env):
        assert run_job(EvalSettings, eval_job.run) == EXIT_OK
    manifest, _ = store.read_manifest(f"{s3_bucket}/store/ev/eval")
    assert sorted(f.path for f in manifest.files) == sorted(set(FILES) - {"loraforge.json"})
    assert any(i["uri"] == remote and i["manifest_sha256"] for i in manifest.inputs)


# --- bad input: exit 2, one line, nothing published ---------------------------------------------


def _no_answer(world: World) -> dict[str, str]:
    path = world.root / "no-answer.jsonl"
    return {"LORAFORGE_EVAL_DATA": write_jsonl(path, [{"question": "q", "solution": "#### 1"}])}


def _no_number(world: World) -> dict[str, str]:
    rows = [{"question": "q", "answer": "#### 1"}, {"question": "r", "answer": "It is two."}]
    return {"LORAFORGE_EVAL_DATA": write_jsonl(world.root / "no-number.jsonl", rows)}


BAD_INPUTS = {
    "no adapters": (lambda w: {"LORAFORGE_ADAPTERS": ""}, "LORAFORGE_ADAPTERS=: give one or more"),
    "adapter twice": (
        lambda w: {"LORAFORGE_ADAPTERS": f"base,{w.small},{w.small}"},
        "listed more than once",
    ),
    "adapter for another base": (
        lambda w: {"LORAFORGE_ADAPTERS": f"base,{w.other_base}"},
        "does not fit LORAFORGE_BASE_MODEL=",
    ),
    "adapter for another architecture": (
        lambda w: {"LORAFORGE_ADAPTERS": w.other_arch},
        "the adapter targets transformer.h.0.attn.c_attn, which the base does not have",
    ),
    "adapter not published": (
        lambda w: {"LORAFORGE_ADAPTERS": str(w.root / "runs/missing/train")},
        "no published artifact here",
    ),
    "pickled adapter": (
        lambda w: {"LORAFORGE_ADAPTERS": w.pickled},
        "holds pickled weights (adapter_model.bin)",
    ),
    "eval file without answer": (_no_answer, "no-answer.jsonl:1: no string answer"),
    "answer without a number": (
        _no_number,
        "no-number.jsonl:2: the answer has no final `#### N` number",
    ),
    "unknown profile": (
        lambda w: {"LORAFORGE_PROFILE": "paper"},
        "LORAFORGE_PROFILE=paper: input should be 'paper_math' or 'greedy_math'",
    ),
    "vllm requested, not installed": (
        lambda w: {"LORAFORGE_ENGINE": "vllm"},
        "LORAFORGE_ENGINE=vllm but vLLM is not installed",
    ),
    "two problems at once": (
        lambda w: {**_no_number(w), "LORAFORGE_ADAPTERS": w.pickled},
        "a line like `#### 42`; LORAFORGE_ADAPTERS: ",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_publishes_nothing(
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    make, expected = BAD_INPUTS[case]
    for name, value in spec(world, tmp_path / "store", **make(world)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(engines, "vllm_installed", lambda: False)  # as on this CPU machine
    assert run_job(EvalSettings, eval_job.run) == EXIT_PERMANENT
    errors = [
        json.loads(line)
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("{") and '"error"' in line
    ]
    assert len(errors) == 1 and expected in errors[0]["msg"], errors
    assert "\n" not in errors[0]["msg"]
    assert not (tmp_path / "store").exists() or store.list_artifacts(str(tmp_path / "store")) == []


# --- GPU (make test-gpu; not run on the CPU machine this was written on) -------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_eval_on_cuda(world: World, tmp_path: Path, engine: str) -> None:
    if engine == "vllm":
        pytest.importorskip("vllm")
    env = spec(
        world,
        tmp_path / "store",
        LORAFORGE_DEVICE="cuda",
        LORAFORGE_ENGINE=engine,
        LORAFORGE_EVAL_LIMIT="8",
        LORAFORGE_GPU_MEMORY_UTILIZATION="0.3",
    )
    with job_env(env):
        assert run_job(EvalSettings, eval_job.run) == EXIT_OK
    metrics = json.loads((tmp_path / "store/ev/eval/metrics.json").read_text())
    assert metrics["engine"] == engine and metrics["problems"] == 8
    assert [a["label"] for a in metrics["adapters"]] == ["base", SMALL, BIG]


def test_adapter_labels_are_the_shortest_distinct_uri_suffixes() -> None:
    from loraforge.adapters import labels_for

    assert labels_for(["base", "s3://b/r1/train", "s3://b/r1/edit"]) == ["base", "train", "edit"]
    assert labels_for(["s3://b/r1/train", "s3://b/r2/train"]) == ["r1/train", "r2/train"]
    assert labels_for(["base", "/x/base"]) == ["base", "x/base"]
