"""Sharded eval on the tiny model, CPU: shards as separate processes, the merge, its refusals.

Jobs run as forked processes of the fault suite's fork server (`tests.faults.Jobs`: the real
`loraforge.eval.main` with its own environment and exit code, one torch thread each, ~0.5 s to
start). The unsharded run and the merge of three shards must publish byte-identical
predictions.jsonl, metrics.json, report.md and accuracy.png; only the manifests differ (their
`created` time, the LORAFORGE_SHARDS/_SHARD/_OUTPUT settings).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge import eval as eval_job
from loraforge import shards, store
from loraforge.engines import Decoding
from loraforge.engines.transformers_engine import Stops, TransformersEngine, batch_plan
from loraforge.errors import EXIT_OK, EXIT_PERMANENT, EXIT_TRANSIENT, PermanentError
from loraforge.runner import run_job
from loraforge.settings import EvalSettings, load_settings
from tests.faults import Finished, Jobs
from tests.test_eval import copy_problems, publish_lora, write_jsonl

RESULTS = ("accuracy.png", "metrics.json", "predictions.jsonl", "report.md")
SHARDS = 3


@dataclass
class World:
    kit: Any
    data: str
    adapter: str
    root: Path

    def env(self, output: Path | str, **overrides: str) -> dict[str, str]:
        env = {
            "LORAFORGE_BASE_MODEL": str(self.kit.model_dir),
            "LORAFORGE_ADAPTERS": f"base,{self.adapter}",
            "LORAFORGE_EVAL_DATA": self.data,
            "LORAFORGE_FEWSHOT_DATA": str(self.kit.train),
            "LORAFORGE_NUM_FEWSHOT": "1",
            "LORAFORGE_MAX_NEW_TOKENS": "24",
            "LORAFORGE_BATCH_SIZE": "2",  # 9 problems: 5 batches, shards of 1, 2 and 2
            "LORAFORGE_BOOTSTRAP_SAMPLES": "200",
            "LORAFORGE_OUTPUT": str(output),
            "LORAFORGE_RUN_ID": "shards",
            "LORAFORGE_DEVICE": "cpu",
        }
        return {**env, **overrides}


@pytest.fixture(scope="module")
def world(tiny_kit, tmp_path_factory: pytest.TempPathFactory) -> World:  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("shards")
    data = write_jsonl(root / "copy.jsonl", copy_problems(9, seed=11))
    base = AutoModelForCausalLM.from_pretrained(tiny_kit.model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"])
    adapter = publish_lora(base, root, "lora", config, 0.12, 5)
    return World(tiny_kit, data, adapter, root)


@dataclass
class Runs:
    full: Path  # the unsharded run's output
    sharded: Path  # the three shards' merged output
    shards: list[Finished]


@pytest.fixture(scope="module")
def runs(world: World, jobs: Jobs) -> Runs:
    """The unsharded job, then three shard jobs at once (shard 2 told its index by
    JOB_COMPLETION_INDEX, as in an Indexed Job); the last to finish merges."""
    full, sharded = world.root / "full", world.root / "sharded"
    done = jobs.run("eval", world.env(full))
    assert done.code == EXIT_OK, done.err[-3000:]
    started = [
        jobs.start("eval", world.env(sharded, LORAFORGE_SHARDS="3", LORAFORGE_SHARD="0")),
        jobs.start("eval", world.env(sharded, LORAFORGE_SHARDS="3", LORAFORGE_SHARD="1")),
        jobs.start(
            "eval", {**world.env(sharded, LORAFORGE_SHARDS="3"), "JOB_COMPLETION_INDEX": "2"}
        ),
    ]
    return Runs(full, sharded, [job.wait() for job in started])


def copy_partials(runs: Runs, output: Path, indexes: list[int]) -> None:
    for i in indexes:
        source = Path(shards.partial_uri(str(runs.sharded), i, SHARDS))
        shutil.copytree(source, Path(shards.partial_uri(str(output), i, SHARDS)))


def merge_env(world: World, output: Path, **overrides: str) -> dict[str, str]:
    return world.env(output, LORAFORGE_SHARDS="3", LORAFORGE_SHARD="merge", **overrides)


def assert_same_results(got: Path, want: Path) -> None:
    for name in RESULTS:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


def error_line(done: Finished) -> str:
    return str(done.errors[-1]["msg"]) if done.errors else done.err[-2000:]


# --- (a) shards as processes, merged = unsharded --------------------------------------------


def test_three_shards_merge_to_exactly_the_unsharded_artifact(runs: Runs) -> None:
    assert [d.code for d in runs.shards] == [EXIT_OK] * SHARDS, [d.err[-2000:] for d in runs.shards]
    assert_same_results(runs.sharded, runs.full)
    assert sorted(p.name for p in runs.sharded.iterdir()) == sorted([*RESULTS, "loraforge.json"])
    merged, _ = store.read_manifest(str(runs.sharded))
    unsharded, _ = store.read_manifest(str(runs.full))
    assert merged.metrics == unsharded.metrics and merged.inputs == unsharded.inputs
    assert (merged.settings["shards"], unsharded.settings["shards"]) == (3, 1)
    parts = store.list_artifacts(f"{runs.sharded}-shards")
    assert [Path(p).name for p in parts] == ["0-of-3", "1-of-3", "2-of-3"]
    rows = [store.read_manifest(p)[0].metrics["rows"] for p in parts]
    assert rows == [2, 4, 3]  # batches of 2 rows, longest prompts first: 1, 2 and 2 batches
    merges = [d for d in runs.shards if d.events("published")]
    assert 1 <= len(merges) <= 2  # the last shard merged (two at once: one publish wins)


def test_a_rerun_shard_after_the_merge_changes_nothing(
    runs: Runs, world: World, jobs: Jobs
) -> None:
    before = (runs.sharded / "loraforge.json").read_bytes()
    done = jobs.run("eval", world.env(runs.sharded, LORAFORGE_SHARDS="3", LORAFORGE_SHARD="1"))
    assert done.code == EXIT_OK and "already published" in done.err
    assert (runs.sharded / "loraforge.json").read_bytes() == before


@pytest.mark.s3
def test_shards_on_s3_merge_to_the_unsharded_metrics(
    runs: Runs, world: World, jobs: Jobs, s3_bucket: str
) -> None:
    output = f"{s3_bucket}/runs/eval"
    started = [
        jobs.start("eval", world.env(output, LORAFORGE_SHARDS="2", LORAFORGE_SHARD=str(i)))
        for i in (0, 1)
    ]
    for job in started:
        done = job.wait()
        assert done.code == EXIT_OK, done.err[-2000:]
    assert store.list_artifacts(f"{s3_bucket}/runs") == sorted(
        [output, f"{output}-shards/0-of-2", f"{output}-shards/1-of-2"]
    )
    merged = store.fetch(output, world.root / "from-s3")
    assert_same_results(merged.path, runs.full)


# --- (b) a missing or corrupt shard blocks the merge ----------------------------------------


def test_merge_with_a_missing_shard_exits_75_then_merges_once_it_is_there(
    runs: Runs, world: World, jobs: Jobs
) -> None:
    output = world.root / "late"
    copy_partials(runs, output, [0, 2])
    done = jobs.run("eval", merge_env(world, output))
    assert done.code == EXIT_TRANSIENT
    message = error_line(done)
    assert "shard(s) 1 of 3 not published" in message and f"{output}-shards/1-of-3" in message
    assert "rerun index(es) 1" in message
    assert not output.exists() and not store.exists(str(output))
    copy_partials(runs, output, [1])
    done = jobs.run("eval", merge_env(world, output))
    assert done.code == EXIT_OK, done.err[-2000:]
    assert_same_results(output, runs.full)


def test_merge_refuses_a_corrupt_shard(runs: Runs, world: World, jobs: Jobs) -> None:
    output = world.root / "corrupt"
    copy_partials(runs, output, [0, 1, 2])
    damaged = Path(shards.partial_uri(str(output), 1, SHARDS)) / "predictions.jsonl"
    damaged.write_text(damaged.read_text().replace('"base"', '"BASE"', 1))
    done = jobs.run("eval", merge_env(world, output))
    assert done.code == EXIT_PERMANENT
    assert "shard(s) 1 and rerun" in error_line(done) and "sha256" in error_line(done)
    assert not store.exists(str(output))


# --- (c) shards that disagree ----------------------------------------------------------------


def test_a_shard_run_with_other_settings_blocks_the_merge(
    runs: Runs, world: World, jobs: Jobs
) -> None:
    output = world.root / "mixed"
    copy_partials(runs, output, [0, 1])
    env = world.env(output, LORAFORGE_SHARDS="3", LORAFORGE_SHARD="2", LORAFORGE_MAX_NEW_TOKENS="6")
    done = jobs.run("eval", env)
    assert done.code == EXIT_PERMANENT
    assert "shard 2 differs from shard 0 in LORAFORGE_MAX_NEW_TOKENS (24 vs 6)" in error_line(done)
    assert store.exists(shards.partial_uri(str(output), 2, SHARDS))  # its own part is kept
    assert not store.exists(str(output))


def test_a_merge_with_other_settings_than_the_shards_is_refused(
    runs: Runs, world: World, jobs: Jobs
) -> None:
    output = world.root / "other-merge"
    copy_partials(runs, output, [0, 1, 2])
    done = jobs.run("eval", merge_env(world, output, LORAFORGE_BOOTSTRAP_SAMPLES="300"))
    assert done.code == EXIT_PERMANENT
    assert "LORAFORGE_BOOTSTRAP_SAMPLES (200 vs 300)" in error_line(done)
    assert not store.exists(str(output))


# --- (d) settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LORAFORGE_SHARDS": "3", "LORAFORGE_SHARD": "3"},
            r"LORAFORGE_SHARD=3 is not a shard of ",
        ),
        (
            {"LORAFORGE_SHARD": "0"},
            r"LORAFORGE_SHARD=0 but LORAFORGE_SHARDS=1: set LORAFORGE_SHARDS",
        ),
        ({"LORAFORGE_SHARDS": "2", "LORAFORGE_SHARD": "last"}, r"LORAFORGE_SHARD=last: give a "),
        ({"LORAFORGE_SHARDS": "0"}, r"LORAFORGE_SHARDS=0: input should be greater"),
        ({"LORAFORGE_TENSOR_PARALLEL": "0"}, r"LORAFORGE_TENSOR_PARALLEL=0: input should be"),
    ],
)
def test_bad_shard_settings_are_one_line_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(PermanentError, match=message):
        load_settings(EvalSettings, {"LORAFORGE_BASE_MODEL": "m", **env})


def test_a_spec_with_shards_and_no_index_validates_but_the_job_needs_one(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = world.env(world.root / "x", LORAFORGE_SHARDS="3")
    assert load_settings(EvalSettings, spec).shard is None  # render time: no index yet
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    for name, value in spec.items():
        monkeypatch.setenv(name, value)
    assert run_job(EvalSettings, eval_job.run) == EXIT_PERMANENT
    assert "neither LORAFORGE_SHARD nor JOB_COMPLETION_INDEX is set" in capsys.readouterr().err
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "5")
    assert run_job(EvalSettings, eval_job.run) == EXIT_PERMANENT
    assert "JOB_COMPLETION_INDEX=5 is not a shard of LORAFORGE_SHARDS=3" in capsys.readouterr().err
    monkeypatch.delenv("LORAFORGE_RUN_ID")
    monkeypatch.delenv("LORAFORGE_OUTPUT")
    assert run_job(EvalSettings, eval_job.run) == EXIT_PERMANENT
    assert "neither LORAFORGE_OUTPUT nor LORAFORGE_RUN_ID set" in capsys.readouterr().err


def test_tensor_parallel_is_refused_by_the_transformers_engine(world: World) -> None:
    env = world.env(world.root / "tp", LORAFORGE_TENSOR_PARALLEL="2")
    with pytest.raises(PermanentError, match=r"LORAFORGE_TENSOR_PARALLEL=2 needs the vLLM engine"):
        eval_job.gather(load_settings(EvalSettings, env))


def test_tensor_parallel_reaches_the_vllm_engine_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(
        EvalSettings, {"LORAFORGE_BASE_MODEL": "m", "LORAFORGE_TENSOR_PARALLEL": "2"}
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = eval_job.vllm_args(settings, [], "/models/m", torch.bfloat16)
    assert (args["tensor_parallel_size"], args["model"], args["dtype"]) == (
        2,
        "/models/m",
        "bfloat16",
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(PermanentError, match="LORAFORGE_TENSOR_PARALLEL=2 but 1 GPUs are visible"):
        eval_job.vllm_args(settings, [], "/models/m", torch.bfloat16)


# --- (e) slicing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch_size"), [(1, 3), (4, 3), (2, 8)])
def test_shards_take_whole_batches_and_every_row_once(n: int, batch_size: int) -> None:
    lengths = [5, 9, 9, 2, 7, 9, 3, 5, 1, 8, 4]  # ties: kept in prompt order
    plan = batch_plan(lengths, n, batch_size)
    rows = [row for batch in plan for row in batch]
    assert sorted(rows) == [(i, j) for i in range(len(lengths)) for j in range(n)]
    assert [lengths[i] for i, _ in rows] == sorted(
        (x for x in lengths for _ in range(n)), reverse=True
    )
    for count in range(1, len(plan) + 4):
        parts = [shards.take(plan, index, count) for index in range(count)]
        assert [batch for part in parts for batch in part] == plan  # contiguous, whole, once
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
        if count > len(plan):
            assert sum(not part for part in parts) == count - len(plan)


def test_an_empty_shard_publishes_an_empty_part_without_loading_the_model(
    world: World, jobs: Jobs
) -> None:
    output = world.root / "wide"
    env = world.env(output, LORAFORGE_SHARDS="7", LORAFORGE_SHARD="0")  # 5 batches, 7 shards
    done = jobs.run("eval", env)
    assert done.code == EXIT_OK, done.err[-2000:]
    assert "waiting for shard(s) 1, 2, 3, 4, 5, 6 of 7" in done.err
    assert not any("loaded once" in str(e.get("msg")) for e in done.log)
    part = store.fetch(shards.partial_uri(str(output), 0, 7))
    assert (part.path / "predictions.jsonl").read_text() == ""
    assert part.manifest.metrics["rows"] == 0


def test_sampled_rows_are_the_same_whichever_shard_draws_them(world: World) -> None:
    """Seeds follow the problem's position in the whole set: three shards' batches give the
    rows one unsharded run gives."""
    tokenizer = AutoTokenizer.from_pretrained(world.kit.model_dir)
    model = AutoModelForCausalLM.from_pretrained(world.kit.model_dir, dtype=torch.float32).eval()
    questions = [p["question"] for p in copy_problems(5, seed=3)]
    prompts = [tokenizer(f"Question: {q}\nAnswer:")["input_ids"] for q in questions]
    budgets = [8] * len(prompts)
    decoding = Decoding(n=3, temperature=1.0, top_p=0.9, seed=5)
    engine = TransformersEngine(model, tokenizer, {}, 4, Stops(tokenizer, frozenset({2})), decoding)
    whole = engine.generate_all(prompts, budgets, lambda n, t: None)
    plan = batch_plan([len(p) for p in prompts], 3, 4)
    got: dict[tuple[int, int], Any] = {}
    for index in range(SHARDS):
        part = shards.take(plan, index, SHARDS)
        got |= engine.generate_batches(part, prompts, budgets, lambda n, t: None)
    assert [got[row] for row in sorted(got)] == whole
    assert len({g.text for g in whole}) > 3  # really sampled


def test_sampled_humaneval_shards_merge_to_the_unsharded_scores(world: World, jobs: Jobs) -> None:
    """Sampled decoding, samples of one problem split across shards, programs run per shard:
    the same rows and pass@k; only run times differ (each row's exec_s, sandbox.wall_s)."""
    from tests.test_humaneval import PROBLEMS

    data = write_jsonl(world.root / "toy.jsonl", PROBLEMS)
    code = {
        "LORAFORGE_TASK": "humaneval",
        "LORAFORGE_EVAL_DATA": data,
        "LORAFORGE_N_SAMPLES": "3",
        "LORAFORGE_TEMPERATURE": "1.0",
        "LORAFORGE_PASS_K": "1,2",
        "LORAFORGE_BATCH_SIZE": "4",  # 9 rows: batches of 4, 4, 1; a problem's samples split
        "LORAFORGE_SANDBOX_TIMEOUT": "5",
        "LORAFORGE_SANDBOX_MEMORY_MB": "512",
    }

    def env(output: Path, **more: str) -> dict[str, str]:
        spec = {**world.env(output, **code, **more)}
        del spec["LORAFORGE_FEWSHOT_DATA"], spec["LORAFORGE_NUM_FEWSHOT"]
        return spec

    full, sharded = world.root / "he-full", world.root / "he-sharded"
    for spec in (
        env(full),
        env(sharded, LORAFORGE_SHARDS="2", LORAFORGE_SHARD="1"),
        env(sharded, LORAFORGE_SHARDS="2", LORAFORGE_SHARD="0"),
    ):
        done = jobs.run("eval", spec)
        assert done.code == EXIT_OK, done.err[-2000:]

    def rows(out: Path) -> list[dict[str, Any]]:
        lines = (out / "predictions.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "exec_s"} for x in lines]

    def metrics(out: Path) -> dict[str, Any]:
        m = json.loads((out / "metrics.json").read_text())
        del m["sandbox"]["wall_s"]
        return dict(m)

    assert rows(sharded) == rows(full)
    assert len({r["output"] for r in rows(full)}) > 3  # really sampled
    assert metrics(sharded) == metrics(full)
