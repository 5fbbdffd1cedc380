"""Kill-and-resume matrix: nothing lost beyond a checkpoint interval, nothing half-published.

Train (LoRA, DoRA, BiDoRA) is SIGKILLed and SIGTERMed at seeded random points of a run (during a
step, while a checkpoint is written, between its files' uploads, before its manifest, after it,
during the final publish; in the slow matrix also at random wall-clock moments from outside) and
restarted until it finishes. Every chain must end with adapter tensors bit-identical to an
uninterrupted run's; a restart resumes from the newest checkpoint, so the steps redone never
exceed one checkpoint interval; a SIGTERM ends in exit 143 with the last finished step published
as a checkpoint, well inside the Job's terminationGracePeriodSeconds. Edit and eval, killed and
restarted, redo their work and publish once, with the same output as an uninterrupted run.

`make test` runs one short chain per method and store-free edit/eval chains; `make test-faults`
adds the matrix (`slow`): every method on a local and an S3 store, several seeds each.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from loraforge import store
from loraforge.errors import EXIT_TERMINATED
from loraforge.launcher.render import GRACE_SECONDS
from loraforge.uri import parse_uri
from tests.faults import (
    INTERVAL,
    METHODS,
    STEPS,
    Finished,
    Jobs,
    assert_bit_identical,
    record,
    tensors,
    train_env,
)

pytestmark = pytest.mark.faults

GRACE = GRACE_SECONDS["train"]
CHECKPOINT_FILES = 6  # adapter config, weights and README, optimizer, RNG, trainer state


# --- the points ----------------------------------------------------------------------------------

_TERMINAL = ("final-done",)  # after these the output is published: nothing further to fault


def candidate_points(external: bool) -> list[tuple[tuple[int, int, int], str]]:
    """(position, point) pairs of one training run, positions in the order a run reaches them."""
    points = [((-1, 0, 0), "load")]
    for c in range(STEPS):  # after step c: its progress line, its checkpoint, step c+1
        points += [((c, 5, 1), f"forward:{c}:1"), ((c, 5, 2), f"forward:{c}:2")]
        if external:
            points.append(((c, 0, 0), f"time:{c}"))
        if 0 < c < STEPS and c % INTERVAL == 0:
            points += [((c, 1, 0), f"ckpt-save:{c}"), ((c, 3, 0), f"ckpt-manifest:{c}")]
            points += [((c, 2, k), f"ckpt-upload:{c}:{k}") for k in range(CHECKPOINT_FILES)]
            points.append(((c, 4, 0), f"ckpt-done:{c}"))
    points += [((STEPS, 5, k), f"final-upload:{k}") for k in range(3)]
    points += [((STEPS, 6, 0), "final-manifest"), ((STEPS, 7, 0), "final-done")]
    return points


def fault_chain(seed: int, n: int, external: bool = False) -> list[str]:
    """Up to `n` faults, each at a point the restarted run still reaches, with random signals.

    A SIGKILLed run's successor resumes from an older checkpoint and passes the same points
    again, so the next fault only has to come later; a SIGTERMed one publishes the step it was
    in, so the next fault comes after that step's checkpoint. The chain ends at a fault after
    which the output is published (nothing further can fire)."""
    rng = random.Random(seed)
    points, chain = candidate_points(external), []
    floor: tuple[int, int, int] = (-2, 0, 0)
    while len(chain) < n:
        later = [(p, pt) for p, pt in points if p > floor]
        steps = [(p, pt) for p, pt in later if not pt.startswith("final")]
        if steps and len(chain) < n - 1:  # the output's own points end a chain: keep them last
            later = steps
        if not later:
            break
        kind = rng.choice(sorted({point.split(":")[0] for _, point in later}))  # kinds evenly
        later = [(pos, point) for pos, point in later if point.split(":")[0] == kind]
        pos, point = later[int(rng.betavariate(1.0, 2.0) * len(later))]  # early-leaning
        action = rng.choice(["kill", "kill", "term"])
        chain.append(f"{action}@{point}")
        if point in _TERMINAL or (action == "term" and point.startswith("final")):
            break
        floor = pos
        if action == "term" and point != "load":  # resumes after the step it was in
            step = pos[0] + 1 if point.startswith(("forward", "time")) else pos[0]
            floor = (step, 4, CHECKPOINT_FILES)
        if point.startswith("time"):  # a signal from outside lands a step or so later
            floor = (pos[0] + 2, 4, CHECKPOINT_FILES)
    return chain


# --- one faulted run -----------------------------------------------------------------------------


def run_faulted(jobs: Jobs, env: dict[str, str], fault: str, rng: random.Random) -> Finished:
    """The job with `fault`: injected in the process, or (`time:c`) sent from outside at a
    random moment after c steps."""
    action, _, point = fault.partition("@")
    if not point.startswith("time:"):
        return jobs.run("train", env, fault)
    running = jobs.start("train", env)
    wanted = int(point.split(":")[1])
    deadline = time.monotonic() + 120
    while running.progress_step() < wanted and running.process.is_alive():
        assert time.monotonic() < deadline, running.err_text()[-2000:]
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.04))
    sent = time.time()
    with contextlib.suppress(ProcessLookupError):  # it may have finished in the meantime
        running.process.kill() if action == "kill" else running.process.terminate()
    finished = running.wait()
    if action == "term":  # the injector's own record, for the grace-period figure
        finished.err += f'\n{{"fault": "term", "point": "time", "t": {sent}}}\n'
    return finished


def check_run(fault: str, run: Finished) -> dict[str, Any]:
    """Exit code and what was published, for one faulted run; returns its figures."""
    action, _, point = fault.partition("@")
    last = max(run.last_step, run.resumed_at)
    checkpoints = [int(e["step"]) for e in run.events("checkpoint")]
    row = {"fault": fault, "code": run.code, "last_step": last, "checkpoints": checkpoints}
    assert point.startswith("time") or run.fault is not None, f"{fault} never fired"
    if run.code == 0:  # only when the output got published first (final points, late signals)
        assert point.startswith(("final", "time")), run.err[-3000:]
        assert run.events("published"), run.err[-3000:]
        return row
    if action == "kill":
        assert run.code == -signal.SIGKILL, run.err[-3000:]
        return row
    assert run.code == EXIT_TERMINATED, run.err[-3000:]
    assert [e["msg"] for e in run.errors] == ["SIGTERM received"], run.errors
    fault_event = run.fault
    assert fault_event is not None
    row["grace_s"] = round(run.ended - float(fault_event["t"]), 3)
    assert row["grace_s"] < GRACE
    if last > run.resumed_at:  # steps were done: the last one is published, nothing lost
        assert checkpoints and checkpoints[-1] == last, (checkpoints, last)
    return row


def run_chain(jobs: Jobs, env: dict[str, str], chain: list[str], seed: int) -> list[dict[str, Any]]:
    """Run the faults one restart after another, then a clean run; check lost work between."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for fault in [*chain, None]:
        run = jobs.run("train", env) if fault is None else run_faulted(jobs, env, fault, rng)
        done_before = any("already published" in e.get("msg", "") for e in run.log)
        if rows and not done_before:  # what this restart redoes, against what was finished
            lost = rows[-1]["last_step"] - run.resumed_at
            rows[-1]["lost_steps"] = max(lost, 0)
            assert lost <= INTERVAL, (rows[-1], run.resumed_at)
            if rows[-1]["code"] == EXIT_TERMINATED:
                assert lost <= 0, (rows[-1], run.resumed_at)
        if fault is None:
            assert run.code == 0, run.err[-3000:]
            break
        after_time = bool(rows) and rows[-1]["fault"].split("@")[1].startswith("time")
        if after_time and run.fault is None and run.code == 0:
            break  # an outside signal at a random moment let the run get past this point
        rows.append(check_run(fault, run))
        if run.code == 0:
            break
    return rows


def check_store(root: str, run_id: str) -> None:
    """Only the output and verifiable checkpoints are published; nothing else is visible."""
    published = store.list_artifacts(root)
    output = f"{root}/{run_id}/train"
    assert output in published
    for uri in published:
        assert uri == output or "/train-checkpoints/step-" in uri, uri
        store.fetch(uri)  # every file verifies


def train_chain(
    jobs: Jobs, kit: Any, reference: Any, root: str, method: str, seed: int, n: int, external: bool
) -> None:
    run_id = f"{method}-s{seed}"
    env = train_env(kit, root, method, run_id)
    chain = fault_chain(seed, n, external)
    rows = run_chain(jobs, env, chain, seed)
    output = f"{root}/{run_id}/train"
    assert_bit_identical(tensors(output), tensors(reference(method)))
    metrics = store.read_manifest(output)[0].metrics  # the figures too: losses, tokens seen
    assert metrics == store.read_manifest(reference(method))[0].metrics
    check_store(root, run_id)
    for row in rows:
        kind = "s3" if root.startswith("s3://") else "local"
        record("kill_resume", {"method": method, "store": kind, **row})


# --- make test: a short chain per method ---------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_killed_and_terminated_training_ends_bit_identical(
    jobs: Jobs,
    tiny_kit: Any,
    reference: Any,
    tmp_path: Path,
    method: str,
) -> None:
    seed = {"lora": 11, "dora": 12, "bidora": 13}[method]
    train_chain(jobs, tiny_kit, reference, str(tmp_path / "store"), method, seed, 3, False)


def test_the_matrix_covers_every_kind_of_point() -> None:
    """The slow matrix's chains: 20+ SIGKILLs, SIGTERMs, and every kind of point reached."""
    chains = [fault_chain(seed, MATRIX_FAULTS, external=True) for seed in matrix_seeds()]
    faults = [fault for chain in chains for fault in chain]
    kinds = {fault.split("@")[1].split(":")[0] for fault in faults}
    assert {"forward", "ckpt-save", "ckpt-upload", "ckpt-manifest", "ckpt-done", "time"} <= kinds
    assert {"final-upload", "final-manifest", "final-done"} & kinds
    assert sum(f.startswith("kill") for f in faults) >= 20
    assert sum(f.startswith("term") for f in faults) >= 6


# --- make test-faults: the matrix ----------------------------------------------------------------

MATRIX_SEEDS = (101, 202, 303)
MATRIX_FAULTS = 6


def matrix_seed(method: str, seed: int) -> int:
    return seed + 10 * sorted(METHODS).index(method)


def matrix_seeds() -> list[int]:
    local = [matrix_seed(m, s) for m in METHODS for s in MATRIX_SEEDS]
    return local + [S3_SEED + 10 * sorted(METHODS).index(m) for m in METHODS]


S3_SEED = 404


@pytest.mark.slow
@pytest.mark.parametrize("seed", MATRIX_SEEDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_matrix_local_store(
    jobs: Jobs, tiny_kit: Any, reference: Any, tmp_path: Path, method: str, seed: int
) -> None:
    root = str(tmp_path / "store")
    train_chain(
        jobs, tiny_kit, reference, root, method, matrix_seed(method, seed), MATRIX_FAULTS, True
    )


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.parametrize("method", sorted(METHODS))
def test_matrix_s3_store(
    jobs: Jobs, tiny_kit: Any, reference: Any, s3_bucket: str, method: str
) -> None:
    seed = S3_SEED + 10 * sorted(METHODS).index(method)
    train_chain(jobs, tiny_kit, reference, f"{s3_bucket}/store", method, seed, MATRIX_FAULTS, True)
    keys = _keys(s3_bucket)
    manifests = [k for k in keys if k.endswith("/train/loraforge.json")]
    assert len(manifests) == 1, manifests


def _keys(bucket_uri: str) -> list[str]:
    bucket = parse_uri(bucket_uri).bucket
    pages = boto3.session.Session().client("s3").get_paginator("list_objects_v2")
    return [o["Key"] for page in pages.paginate(Bucket=bucket) for o in page.get("Contents", [])]


# --- edit and eval: killed and restarted, they redo their work and publish once ------------------


def edit_env(kit: Any, adapter: str, root: str) -> dict[str, str]:
    return {
        "LORAFORGE_BASE_MODEL": str(kit.model_dir),
        "LORAFORGE_ADAPTER": adapter,
        "LORAFORGE_CALIB_DATA": str(kit.val),
        "LORAFORGE_CALIB_SAMPLES": "8",
        "LORAFORGE_TARGET_MODULES": "q_proj,k_proj,v_proj,o_proj",
        "LORAFORGE_MAX_SEQ_LEN": "256",
        "LORAFORGE_STORE": root,
        "LORAFORGE_RUN_ID": "e1",
        "LORAFORGE_DEVICE": "cpu",
    }


def eval_env(kit: Any, adapter: str, root: str) -> dict[str, str]:
    return {
        "LORAFORGE_BASE_MODEL": str(kit.model_dir),
        "LORAFORGE_ADAPTERS": f"base,{adapter}",
        "LORAFORGE_EVAL_DATA": str(kit.test),
        "LORAFORGE_EVAL_LIMIT": "8",
        "LORAFORGE_NUM_FEWSHOT": "0",
        "LORAFORGE_MAX_NEW_TOKENS": "12",
        "LORAFORGE_BATCH_SIZE": "4",
        "LORAFORGE_BOOTSTRAP_SAMPLES": "200",
        "LORAFORGE_STORE": root,
        "LORAFORGE_RUN_ID": "v1",
        "LORAFORGE_DEVICE": "cpu",
    }


JOB_CHAINS = {  # the faults of one output, one restart after another
    "edit": {
        "fast": ["term@calibrate", "kill@final-upload:1"],
        "full": ["kill@load", "term@load", "kill@calibrate", "kill@final-upload:0",
                 "kill@final-upload:2", "kill@final-manifest"],
        "after-publish": ["kill@final-done"],
    },
    "eval": {
        "fast": ["kill@progress:1", "kill@final-manifest"],
        "full": ["kill@load", "term@progress:1", "kill@progress:3", "kill@final-upload:0",
                 "kill@final-upload:3", "kill@final-manifest"],
        "after-publish": ["kill@final-done"],
    },
}  # fmt: skip
OUTPUT_FILES = {"edit": ["adapter_model.safetensors", "spectral_edit_meta.json"]}
OUTPUT_FILES["eval"] = ["predictions.jsonl", "metrics.json"]


def _contents(uri: str, job: str) -> dict[str, bytes]:
    path = store.fetch(uri).path
    contents = {name: (path / name).read_bytes() for name in OUTPUT_FILES[job]}
    if job == "edit":  # the meta records where it ran: compare the edit itself
        contents.pop("spectral_edit_meta.json")
    return contents


@pytest.mark.parametrize(
    "chain", ["fast", "after-publish", pytest.param("full", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("job", ["edit", "eval"])
def test_killed_edit_and_eval_redo_their_work_and_publish_once(
    jobs: Jobs, tiny_kit: Any, reference: Any, tmp_path: Path, job: str, chain: str
) -> None:
    make_env = edit_env if job == "edit" else eval_env
    want_env = make_env(tiny_kit, reference("lora"), str(tmp_path / "want"))
    assert (want := jobs.run(job, want_env)).code == 0, want.err[-3000:]
    root = str(tmp_path / "store")
    env = make_env(tiny_kit, reference("lora"), root)
    for fault in JOB_CHAINS[job][chain]:
        run = jobs.run(job, env, fault)
        expected = EXIT_TERMINATED if fault.startswith("term") else -signal.SIGKILL
        assert run.code == expected, run.err[-3000:]
        assert run.fault is not None, f"{fault} never fired"
        published = store.list_artifacts(root)
        assert published == ([f"{root}/{env['LORAFORGE_RUN_ID']}/{job}"] if "done" in fault else [])
        record("job_restart", {"job": job, "fault": fault, "code": run.code})
    output = f"{root}/{env['LORAFORGE_RUN_ID']}/{job}"
    manifest_before = store.read_manifest(output)[1] if store.exists(output) else None
    final = jobs.run(job, env)
    assert final.code == 0, final.err[-3000:]
    assert store.list_artifacts(root) == [output]  # published once
    if manifest_before is not None:  # the restart found it published and did nothing
        assert store.read_manifest(output)[1] == manifest_before
        assert any("already published: nothing to do" in e["msg"] for e in final.log)
    want_uri = f"{want_env['LORAFORGE_STORE']}/{want_env['LORAFORGE_RUN_ID']}/{job}"
    assert _contents(output, job) == _contents(want_uri, job)
