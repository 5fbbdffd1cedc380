"""HumanEval: pass@k against the estimator computed the slow way, problems and programs,
sampling, the eval job end to end on the tiny model (base + two adapters), bad input, and the
train job's `code` data format.

The tiny model writes no working code, so the end-to-end problems are built to make the outcome
known whatever it writes: the prompt opens a string literal that the test's first line closes,
so the completion lands inside a string; one problem's check then holds and one's fails.
"""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge import engines, humaneval, report, store
from loraforge import eval as eval_job
from loraforge.adapters import Adapter
from loraforge.data import detect_format, tokenize
from loraforge.engines import Decoding, vllm_engine
from loraforge.engines.transformers_engine import (
    Stops,
    TransformersEngine,
    nucleus_probs,
    sample_batch,
)
from loraforge.errors import EXIT_OK, EXIT_PERMANENT, PermanentError
from loraforge.gsm8k import cut_at_stop
from loraforge.runner import run_job
from loraforge.settings import EvalSettings, load_settings
from loraforge.stats import mcnemar_exact, paired_bootstrap, wilson_interval
from tests.test_eval import counted_eval, publish_lora

# --- pass@k -------------------------------------------------------------------------------------


def pass_at_k_exact(n: int, c: int, k: int) -> Fraction:
    """The definition: 1 - C(n-c, k) / C(n, k), in exact rational arithmetic."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


PASS_AT_K = [  # (n, c, k): small, edge and paper-sized cases
    (1, 0, 1),
    (1, 1, 1),
    (5, 0, 1),
    (5, 2, 1),
    (5, 5, 5),
    (5, 2, 4),  # n - c < k: always 1
    (10, 1, 10),
    (10, 3, 2),
    (20, 1, 1),
    (50, 1, 10),
    (50, 7, 1),
    (50, 7, 10),
    (50, 49, 10),
    (50, 0, 50),
    (100, 3, 10),
    (200, 1, 100),
    (200, 13, 1),
    (200, 13, 10),
    (200, 13, 100),
    (200, 199, 100),
]


@pytest.mark.parametrize(("n", "c", "k"), PASS_AT_K)
def test_pass_at_k_is_the_unbiased_estimator(n: int, c: int, k: int) -> None:
    expected = pass_at_k_exact(n, c, k)
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(float(expected), rel=1e-12, abs=1e-15)


def test_pass_at_1_is_the_pass_fraction_and_pass_at_n_is_any_pass() -> None:
    for n in (1, 7, 50):
        for c in range(n + 1):
            assert humaneval.pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-15)
            assert humaneval.pass_at_k(n, c, n) == (1.0 if c else 0.0)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 1, 6), (5, 6, 1), (5, 1, 0), (0, 0, 1)])
def test_pass_at_k_needs_k_at_most_n(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="need 0 <= c <= n and 1 <= k <= n"):
        humaneval.pass_at_k(n, c, k)


# --- metrics on hand-made rows ------------------------------------------------------------------


def rows_for(passes: dict[str, list[list[bool]]]) -> list[report.CodePrediction]:
    """CodePrediction rows from {adapter: per problem, per sample pass flags}."""
    return [
        report.CodePrediction(
            problem_id=p,
            task_id=f"T/{p}",
            adapter=label,
            sample=j,
            output="",
            passed=ok,
            status="passed" if ok else "failed",
            detail="",
            exec_s=0.0,
            output_tokens=3,
            finish="stop",
        )
        for label, problems in passes.items()
        for p, samples in enumerate(problems)
        for j, ok in enumerate(samples)
    ]


def slow_bootstrap(values: list[float], samples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of resampled means, one resample at a time."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = sorted(sum(values[i] for i in rng.integers(0, n, size=n)) / n for _ in range(samples))

    def quantile(q: float) -> float:
        h = (samples - 1) * q
        lo = math.floor(h)
        return means[lo] + (h - lo) * (means[lo + 1] - means[lo])

    return quantile(0.025), quantile(0.975)


def slow_sign_flip(d: list[float], samples: int, seed: int) -> float:
    rng = np.random.default_rng([seed, 1])
    observed = abs(sum(d) / len(d))
    count = 0
    for signs in rng.integers(0, 2, size=(samples, len(d))) * 2 - 1:
        count += abs(sum(s * x for s, x in zip(signs, d, strict=True)) / len(d)) >= observed - 1e-12
    return (1 + count) / (1 + samples)


def test_metrics_with_many_samples_match_slow_references() -> None:
    rng = np.random.default_rng(0)
    passes = {
        label: [list(rng.random(6) < rate) for rate in rng.random(9)]
        for label in ("base", "trained", "edited")
    }
    adapters = [("base", "base"), ("trained", "s3://b/t"), ("edited", "s3://b/e")]
    m = humaneval.metrics(rows_for(passes), adapters, [1, 3], 500, 7)
    assert (m["problems"], m["samples_per_problem"], m["k"]) == (9, 6, [1, 3])
    per_problem = {
        (label, k): [float(pass_at_k_exact(6, sum(s), k)) for s in passes[label]]
        for label in passes
        for k in (1, 3)
    }
    for entry in m["adapters"]:
        assert entry["problems_solved"] == sum(any(s) for s in passes[entry["label"]])
        assert entry["outcomes"]["passed"] == sum(map(sum, passes[entry["label"]]))
        for k in (1, 3):
            values = per_problem[entry["label"], k]
            got = entry[f"pass@{k}"]
            assert got["estimate"] == pytest.approx(sum(values) / 9, abs=1e-12)
            assert got["ci95"] == pytest.approx(slow_bootstrap(values, 500, 7), abs=1e-12)
    for c in m["comparisons"]:
        for k in (1, 3):
            ref, other = per_problem["base", k], per_problem[c["adapter"], k]
            d = [o - r for r, o in zip(ref, other, strict=True)]
            got = c[f"pass@{k}"]
            assert got["difference"] == pytest.approx(sum(d) / 9, abs=1e-12)
            assert got["ci95"] == pytest.approx(slow_bootstrap(d, 500, 7), abs=1e-12)
            assert got["p_value"] == pytest.approx(slow_sign_flip(d, 500, 7), abs=1e-12)
            assert got["test"] == "paired sign-flip permutation"
            assert (got["reference_better"], got["adapter_better"]) == (
                sum(r > o for r, o in zip(ref, other, strict=True)),
                sum(o > r for r, o in zip(ref, other, strict=True)),
            )


def test_metrics_with_one_sample_are_gsm8k_statistics() -> None:
    """n = 1: pass@1 is a proportion: Wilson intervals, exact McNemar, the same bootstrap."""
    rng = np.random.default_rng(1)
    flags = {label: [[bool(x)] for x in rng.random(30) < 0.4] for label in ("a", "b")}
    m = humaneval.metrics(rows_for(flags), [("a", "a"), ("b", "b")], [1], 2000, 3)
    a = [s[0] for s in flags["a"]]
    b = [s[0] for s in flags["b"]]
    assert m["adapters"][0]["pass@1"]["ci95"] == pytest.approx(wilson_interval(sum(a), 30))
    expected = paired_bootstrap(a, b, 2000, 3)
    got = m["comparisons"][0]["pass@1"]
    assert got["ci95"] == pytest.approx([expected.low, expected.high], abs=1e-15)
    assert got["p_value"] == mcnemar_exact(expected.only_reference, expected.only_other)
    assert (got["reference_better"], got["adapter_better"]) == (
        expected.only_reference,
        expected.only_other,
    )


def test_metrics_refuse_rows_of_different_problems() -> None:
    rows = rows_for({"a": [[True], [False]], "b": [[True]]})
    with pytest.raises(ValueError, match="b was not scored on the same problems and samples"):
        humaneval.metrics(rows, [("a", "a"), ("b", "b")], [1], 100, 0)


# --- problems, stops, programs ------------------------------------------------------------------

ALWAYS = {  # the completion ends up inside `_ = """..."""`; the check holds
    "task_id": "Toy/0",
    "prompt": 'def one():\n    return 1\n\n\n_ = """',
    "test": '"""\n\n\ndef check(candidate):\n    assert candidate() == 1\n',
    "entry_point": "one",
}
NEVER = {**ALWAYS, "task_id": "Toy/1", "test": ALWAYS["test"].replace("== 1", "== 2")}
ADD = {
    "task_id": "Toy/2",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    "entry_point": "add",
}
PROBLEMS = [ALWAYS, NEVER, ADD]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_completions_are_cut_at_the_next_top_level_statement() -> None:
    body = "    total = a + b\n    # an indented comment stays\n    return total\n"
    for tail in ("\ndef helper():", "\nclass X:", "\nif __name__ == '__main__':", "\nprint(1)"):
        assert cut_at_stop(body + tail, humaneval.STOP_STRINGS) == body
    assert cut_at_stop(body + "\n# top-level comment", humaneval.STOP_STRINGS) == body
    assert cut_at_stop(body, humaneval.STOP_STRINGS) == body


def test_program_is_prompt_completion_test_and_check(tmp_path: Path) -> None:
    (problem,) = humaneval.load_problems(
        write_jsonl(tmp_path / "p.jsonl", [ADD]), limit=None, seed=0
    )
    assert (problem.task_id, problem.entry_point, problem.where) == (
        "Toy/2",
        "add",
        f"{tmp_path / 'p.jsonl'}:1",
    )
    code = humaneval.program(problem, "    return a + b\n")
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # trusted here: the test's own program
    assert code.endswith("check(add)\n") and namespace["add"](1, 1) == 2


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({k: v for k, v in ADD.items() if k != "test"}, r"p\.jsonl:2: no test \(keys: entry_point"),
        (
            {k: v for k, v in ADD.items() if k != "entry_point"},
            r"p\.jsonl:2: no entry_point \(keys:",
        ),
        ({**ADD, "entry_point": "add numbers"}, r"p\.jsonl:2: entry_point 'add numbers' is not"),
        ({**ADD, "test": "assert add(1, 1) == 2\n"}, r"p\.jsonl:2: the test defines no `check"),
        (
            {**ADD, "task_id": ALWAYS["task_id"]},
            r"p\.jsonl:2: task_id 'Toy/0' also at .*p\.jsonl:1",
        ),
    ],
    ids=["no-test", "no-entry-point", "bad-entry-point", "no-check", "duplicate"],
)
def test_bad_problems_are_named_by_line(tmp_path: Path, record: dict[str, Any], match: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [ALWAYS, record])
    with pytest.raises(PermanentError, match=match):
        humaneval.load_problems(path, limit=None, seed=0)


def test_a_limit_takes_the_same_subset_as_gsm8k(tmp_path: Path) -> None:
    rows = [{**ADD, "task_id": f"Toy/{i}"} for i in range(20)]
    problems = humaneval.load_problems(write_jsonl(tmp_path / "p.jsonl", rows), limit=5, seed=3)
    from loraforge import gsm8k

    qa = [{"question": f"q{i}", "answer": "#### 1"} for i in range(20)]
    same = gsm8k.load_problems(write_jsonl(tmp_path / "qa.jsonl", qa), limit=5, seed=3)
    assert [p.index for p in problems] == [p.index for p in same]


# --- sampling -----------------------------------------------------------------------------------


def nucleus_reference(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """The smallest set of most likely tokens whose probability reaches top_p, renormalised."""
    weights = [math.exp(x / temperature) for x in logits]
    probs = [w / sum(weights) for w in weights]
    kept, total = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        kept.add(i)
        total += probs[i]
        if total >= top_p:
            break
    mass = sum(probs[i] for i in kept)
    return [probs[i] / mass if i in kept else 0.0 for i in range(len(probs))]


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(1.0, 1.0), (0.2, 0.95), (1.0, 0.5), (2.0, 0.9)]
)
def test_nucleus_matches_the_definition(temperature: float, top_p: float) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5], [0.1, 0.2, 0.3, 0.4, 0.5, 3.0]])
    got = nucleus_probs(logits, temperature, top_p)
    for row, out in zip(logits.tolist(), got.tolist(), strict=True):
        assert out == pytest.approx(nucleus_reference(row, temperature, top_p), abs=1e-6)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_kit) -> tuple[Any, Any]:  # type: ignore[no-untyped-def]
    model = AutoModelForCausalLM.from_pretrained(tiny_kit.model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_kit.model_dir)


def test_samples_do_not_depend_on_the_batch_and_differ_between_draws(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in PROBLEMS]
    stops = Stops(tokenizer, frozenset({tokenizer.eos_token_id}), humaneval.STOP_STRINGS)
    decoding = Decoding(n=3, temperature=1.0, top_p=0.95, seed=5)
    outputs = {
        size: TransformersEngine(model, tokenizer, {}, size, stops, decoding).generate_all(
            prompts, [16] * 3, lambda n, t: None
        )
        for size in (1, 4, 9)
    }
    assert outputs[1] == outputs[4] == outputs[9]
    assert len(outputs[1]) == 9  # prompt i, sample j at 3 * i + j
    assert len({g.text for g in outputs[1][:3]}) > 1  # samples of one prompt differ
    again = TransformersEngine(model, tokenizer, {}, 4, stops, Decoding(3, 1.0, 0.95, seed=6))
    assert again.generate_all(prompts, [16] * 3, lambda n, t: None) != outputs[1]


def test_a_sampled_row_draws_only_from_the_nucleus(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer(ADD["prompt"])["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[:, -1]
    allowed = set(torch.nonzero(nucleus_probs(logits, 0.7, 0.5)[0]).flatten().tolist())
    stops = Stops(tokenizer, frozenset(), ())
    firsts = {
        ids[0]
        for ids, _ in sample_batch(
            model, [prompt] * 20, [1] * 20, stops, 0, Decoding(20, 0.7, 0.5), list(range(20))
        )
    }
    assert firsts <= allowed


def test_greedy_decoding_refuses_several_samples() -> None:
    with pytest.raises(ValueError, match="3 greedy completions per prompt would be identical"):
        Decoding(n=3)


# --- vLLM requests (vLLM is not installed: a stand-in records them) -----------------------------


def test_vllm_is_asked_for_n_samples_with_the_code_stops() -> None:
    decoding = Decoding(n=50, temperature=0.2, top_p=0.95, seed=9)
    args = vllm_engine.sampling_args(512, [2], 9, decoding, humaneval.STOP_STRINGS)
    assert args == {
        "n": 50,
        "temperature": 0.2,
        "top_p": 0.95,
        "max_tokens": 512,
        "stop": ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"],
        "stop_token_ids": [2],
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "seed": 9,
    }
    greedy = vllm_engine.sampling_args(64, [2], 9, Decoding(), humaneval.STOP_STRINGS)
    assert greedy["temperature"] == 0.0 and "n" not in greedy and "top_p" not in greedy


def test_vllm_engine_returns_each_prompts_samples_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            pass

        def generate(self, prompts: Any, params: Any, lora_request: Any, use_tqdm: bool) -> Any:
            calls.append(params)
            return [
                types.SimpleNamespace(
                    outputs=[
                        types.SimpleNamespace(
                            text=f"    return {i}{j}\ndef extra():",
                            token_ids=[1] * (j + 1),
                            finish_reason="stop",
                            stop_reason="\ndef ",
                        )
                        for j in range(p["n"])
                    ]
                )
                for i, p in enumerate(params)
            ]

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM  # type: ignore[attr-defined]
    vllm.SamplingParams = lambda **kw: kw  # type: ignore[attr-defined]
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda *a: a  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    engine = vllm_engine.VllmEngine(
        {}, [2], 1, Decoding(n=2, temperature=0.2, top_p=0.95), humaneval.STOP_STRINGS
    )
    done: list[tuple[int, int]] = []
    results = engine.generate(
        [Adapter("base", "base")], [[1, 2], [1, 3]], [8, 8], lambda n, t: done.append((n, t))
    )
    assert [g.text for g in results["base"]] == [
        "    return 00",
        "    return 01",
        "    return 10",
        "    return 11",
    ]
    assert done == [(4, 6)]
    assert all(p["n"] == 2 and p["top_p"] == 0.95 for p in calls[0])


# --- settings -----------------------------------------------------------------------------------


def test_profiles_set_samples_temperature_and_k() -> None:
    code = load_settings(EvalSettings, {"LORAFORGE_BASE_MODEL": "m", "LORAFORGE_TASK": "humaneval"})
    assert (code.profile_name, code.samples, code.sampling_temperature, code.sampling_top_p) == (
        "paper_code_main",
        50,
        0.2,
        0.95,
    )
    assert (code.ks, code.data, code.shots, code.new_tokens) == (
        [1, 10],
        "hf://openai/openai_humaneval/test",
        0,
        512,
    )
    greedy = load_settings(
        EvalSettings,
        {
            "LORAFORGE_BASE_MODEL": "m",
            "LORAFORGE_TASK": "humaneval",
            "LORAFORGE_PROFILE": "greedy_code",
        },
    )
    assert (greedy.samples, greedy.sampling_temperature, greedy.ks) == (1, 0.0, [1])
    math_ = load_settings(EvalSettings, {"LORAFORGE_BASE_MODEL": "m"})
    assert (math_.task, math_.profile_name, math_.data) == (
        "gsm8k",
        "paper_math",
        "hf://openai/gsm8k:main/test",
    )


@pytest.mark.parametrize(
    ("env", "match"),
    [
        (
            {"LORAFORGE_PROFILE": "greedy_code"},
            "LORAFORGE_PROFILE=greedy_code is a humaneval profile",
        ),
        ({"LORAFORGE_N_SAMPLES": "5"}, "LORAFORGE_N_SAMPLES applies to LORAFORGE_TASK=humaneval"),
        (
            {"LORAFORGE_TASK": "humaneval", "LORAFORGE_TEMPERATURE": "0"},
            "50 samples per problem with greedy decoding",
        ),
        (
            {"LORAFORGE_TASK": "humaneval", "LORAFORGE_PASS_K": "1,x"},
            "LORAFORGE_PASS_K=1,x: give comma-separated whole numbers",
        ),
        (
            {"LORAFORGE_TASK": "humaneval", "LORAFORGE_CHAT_TEMPLATE": "true"},
            "humaneval completions continue the prompt's code",
        ),
    ],
)
def test_inconsistent_settings_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(PermanentError, match=match):
        load_settings(EvalSettings, {"LORAFORGE_BASE_MODEL": "m", **env})


# --- the train job's code format ----------------------------------------------------------------


def test_code_records_train_on_the_whole_text(model_and_tokenizer: tuple[Any, Any]) -> None:
    _, tokenizer = model_and_tokenizer
    record = {"code": "def add(a, b):\n    return a + b\n"}
    fmt = detect_format(record)
    assert fmt is not None and fmt.name == "code"
    (example,) = tokenize([record], tokenizer, 512, "code.jsonl")
    ids = tokenizer(record["code"], add_special_tokens=False)["input_ids"]
    assert example.input_ids == [*ids, tokenizer.eos_token_id]
    assert example.labels == example.input_ids  # nothing masked
    with pytest.raises(PermanentError, match=r"code\.jsonl record 2: empty code"):
        tokenize([record, {"code": "  "}], tokenizer, 512, "code.jsonl")


# --- the eval job end to end --------------------------------------------------------------------

N_SAMPLES = 3
FILES = ["loraforge.json", "metrics.json", "pass_at_k.png", "predictions.jsonl", "report.md"]
SMALL, BIG = "small/train", "big/train"


def random_lora(base: Any, root: Path, name: str, targets: list[str], seed: int) -> str:
    """A PEFT LoRA adapter with random B (so it changes the outputs), published under `root`."""
    return publish_lora(
        base, root, name, LoraConfig(r=4, lora_alpha=8, target_modules=targets), 0.2, seed
    )


@dataclass
class World:
    kit: Any
    root: Path
    data: str
    small: str
    big: str


@pytest.fixture(scope="module")
def world(tiny_kit, tmp_path_factory: pytest.TempPathFactory) -> World:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("humaneval")

    def base() -> Any:
        return AutoModelForCausalLM.from_pretrained(tiny_kit.model_dir, dtype=torch.float32)

    small = random_lora(base(), root, "small", ["q_proj", "v_proj"], 1)
    big = random_lora(base(), root, "big", ["q_proj", "v_proj", "o_proj", "down_proj"], 2)
    data = write_jsonl(root / "problems.jsonl", PROBLEMS)
    return World(tiny_kit, root, data, small, big)


def spec(world: World, store_dir: Path, **overrides: str) -> dict[str, str]:
    env = {
        "LORAFORGE_TASK": "humaneval",
        "LORAFORGE_BASE_MODEL": str(world.kit.model_dir),
        "LORAFORGE_ADAPTERS": f"base,{world.small},{world.big}",
        "LORAFORGE_EVAL_DATA": world.data,
        "LORAFORGE_N_SAMPLES": str(N_SAMPLES),
        "LORAFORGE_TEMPERATURE": "1.0",
        "LORAFORGE_PASS_K": "1,2",
        "LORAFORGE_MAX_NEW_TOKENS": "24",
        "LORAFORGE_BOOTSTRAP_SAMPLES": "1000",
        "LORAFORGE_SANDBOX_TIMEOUT": "5",
        "LORAFORGE_SANDBOX_MEMORY_MB": "512",
        "LORAFORGE_STORE": str(store_dir),
        "LORAFORGE_RUN_ID": "he",
        "LORAFORGE_DEVICE": "cpu",
        "LORAFORGE_LOG_FORMAT": "json",
    }
    return {**env, **overrides}


@dataclass
class Run:
    code: int
    out: Path
    log: list[dict[str, Any]]
    base_loads: list[str]
    sampled_rows: int


@pytest.fixture(scope="module")
def run(world: World) -> Run:
    """The job in process on base + small + big, counting base loads and sampled rows."""
    code, log, loads, rows = counted_eval(spec(world, world.root / "store"), "sample_batch")
    return Run(code, world.root / "store/he/eval", log, loads, rows)


def predictions(run: Run) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run.out / "predictions.jsonl").read_text().splitlines()]


def test_publishes_exactly_the_humaneval_files(run: Run) -> None:
    assert run.code == EXIT_OK, run.log[-3:]
    assert sorted(p.name for p in run.out.iterdir()) == FILES
    manifest = store.read_manifest(str(run.out))[0]
    assert manifest.job == "eval" and manifest.metrics["task"] == "humaneval"
    assert (run.out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_base_loads_once_and_every_prompt_is_sampled_once_per_adapter_and_sample(
    run: Run, world: World
) -> None:
    assert run.base_loads == [str(world.kit.model_dir)]
    assert run.sampled_rows == 3 * len(PROBLEMS) * N_SAMPLES
    keys = [(p["adapter"], p["problem_id"], p["sample"]) for p in predictions(run)]
    assert len(keys) == len(set(keys)) == 3 * len(PROBLEMS) * N_SAMPLES
    assert {a for a, _, _ in keys} == {"base", SMALL, BIG}
    assert {s for _, _, s in keys} == set(range(N_SAMPLES))


def test_each_sample_is_scored_by_running_it(run: Run) -> None:
    rows = predictions(run)
    outputs = {(p["adapter"], p["problem_id"]): set() for p in rows}
    for p in rows:
        assert not any(stop in p["output"] for stop in humaneval.STOP_STRINGS)
        assert p["passed"] == (p["status"] == "passed")
        outputs[p["adapter"], p["problem_id"]].add(p["output"])
        if p["task_id"] == "Toy/0":  # the completion sits in a string: the check holds
            assert p["passed"] or '"""' in p["output"] or "\\" in p["output"], p
        if p["task_id"] == "Toy/1":
            assert not p["passed"] and p["status"] == "failed", p
    assert any(len(texts) > 1 for texts in outputs.values())  # sampled, not greedy
    base = [p["output"] for p in rows if p["adapter"] == "base"]
    assert base != [p["output"] for p in rows if p["adapter"] == BIG]  # the adapter is applied


def test_metrics_are_recomputed_from_predictions(run: Run) -> None:
    metrics = json.loads((run.out / "metrics.json").read_text())
    rows = predictions(run)
    assert (metrics["problems"], metrics["samples_per_problem"], metrics["k"]) == (3, 3, [1, 2])
    passed: dict[tuple[str, int], int] = {}
    for p in rows:
        key = (p["adapter"], p["problem_id"])
        passed[key] = passed.get(key, 0) + p["passed"]
    per_problem = {
        (label, k): [float(pass_at_k_exact(N_SAMPLES, passed[label, pid], k)) for pid in range(3)]
        for label in ("base", SMALL, BIG)
        for k in (1, 2)
    }
    assert [a["label"] for a in metrics["adapters"]] == ["base", SMALL, BIG]
    for entry in metrics["adapters"]:
        assert entry["samples"] == 3 * N_SAMPLES
        for k in (1, 2):
            values = per_problem[entry["label"], k]
            assert entry[f"pass@{k}"]["estimate"] == pytest.approx(sum(values) / 3, abs=1e-12)
            assert entry[f"pass@{k}"]["ci95"] == pytest.approx(
                slow_bootstrap(values, 1000, 1234), abs=1e-12
            )
    assert [c["adapter"] for c in metrics["comparisons"]] == [SMALL, BIG]
    for c in metrics["comparisons"]:
        assert c["reference"] == "base"
        for k in (1, 2):
            ref, other = per_problem["base", k], per_problem[c["adapter"], k]
            d = [o - r for r, o in zip(ref, other, strict=True)]
            assert c[f"pass@{k}"]["difference"] == pytest.approx(sum(d) / 3, abs=1e-12)
            assert c[f"pass@{k}"]["ci95"] == pytest.approx(slow_bootstrap(d, 1000, 1234), abs=1e-12)
            if any(d):
                assert c[f"pass@{k}"]["p_value"] == pytest.approx(slow_sign_flip(d, 1000, 1234))
    # and the published numbers are what humaneval.metrics makes of the published rows
    again = humaneval.metrics(
        report.read_code_predictions(run.out / "predictions.jsonl"),
        [(a["label"], a["uri"]) for a in metrics["adapters"]],
        [1, 2],
        1000,
        1234,
    )
    assert {k: metrics[k] for k in again} == json.loads(json.dumps(again))
    assert metrics["sandbox"]["samples"] == 3 * 3 * N_SAMPLES
    assert metrics["sandbox"]["programs"] == len({(p["problem_id"], p["output"]) for p in rows})


def test_report_gives_the_verdict_tables_and_sandbox(run: Run) -> None:
    text = (run.out / "report.md").read_text()
    assert text.startswith("# HumanEval evaluation (3 problems, 3 samples each)")
    assert f"| `{SMALL}` | pass@1 |" in text and f"| `{BIG}` | pass@2 |" in text
    assert "sandbox: `" in text and "![pass@k" in text
    assert any(line.get("event") == "verdict" for line in run.log)
    assert any(line.get("event") == "sandbox" for line in run.log)


def test_greedy_code_profile_scores_one_completion(world: World, tmp_path: Path) -> None:
    env = spec(world, tmp_path / "store", LORAFORGE_PROFILE="greedy_code", LORAFORGE_EVAL_LIMIT="2")
    for name in ("LORAFORGE_N_SAMPLES", "LORAFORGE_TEMPERATURE", "LORAFORGE_PASS_K"):
        del env[name]
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        assert run_job(EvalSettings, eval_job.run) == EXIT_OK
    metrics = json.loads((tmp_path / "store/he/eval/metrics.json").read_text())
    assert (metrics["problems"], metrics["samples_per_problem"], metrics["k"]) == (2, 1, [1])
    assert metrics["comparisons"][0]["pass@1"]["test"] == "exact McNemar"
    assert metrics["temperature"] == 0.0


# --- bad input: exit 2, one line, nothing published ---------------------------------------------


def _without(world: World, key: str) -> dict[str, str]:
    rows = [ALWAYS, {k: v for k, v in ADD.items() if k != key}]
    return {"LORAFORGE_EVAL_DATA": write_jsonl(world.root / f"no-{key}.jsonl", rows)}


BAD_INPUTS = {
    "task file without test": (lambda w: _without(w, "test"), "no-test.jsonl:2: no test"),
    "task file without entry_point": (
        lambda w: _without(w, "entry_point"),
        "no-entry_point.jsonl:2: no entry_point",
    ),
    "k larger than n": (
        lambda w: {"LORAFORGE_PASS_K": "1,5"},
        "LORAFORGE_PASS_K=1,5: pass@5 needs at least 5 samples per problem and there are 3",
    ),
    "unknown profile": (
        lambda w: {"LORAFORGE_PROFILE": "paper_code"},
        "LORAFORGE_PROFILE=paper_code: input should be 'paper_math' or 'greedy_math' "
        "(LORAFORGE_TASK=gsm8k), or 'paper_code_main' or 'greedy_code'",
    ),
    "math profile for code": (
        lambda w: {"LORAFORGE_PROFILE": "paper_math"},
        "LORAFORGE_PROFILE=paper_math is a gsm8k profile: set LORAFORGE_TASK=gsm8k",
    ),
    "bad file and bad adapter at once": (
        lambda w: {**_without(w, "test"), "LORAFORGE_ADAPTERS": str(w.root / "runs/nope/train")},
        "entry_point strings; ",  # and then the adapter, in the same line:
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
    monkeypatch.setattr(engines, "vllm_installed", lambda: False)
    assert run_job(EvalSettings, eval_job.run) == EXIT_PERMANENT
    errors = [
        json.loads(line)
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("{") and '"error"' in line
    ]
    assert len(errors) == 1 and expected in errors[0]["msg"], errors
    assert "\n" not in errors[0]["msg"]
    if "LORAFORGE_ADAPTERS" in make(world):
        assert errors[0]["msg"].endswith("rerun the job that makes it")
    assert not (tmp_path / "store").exists() or store.list_artifacts(str(tmp_path / "store")) == []
