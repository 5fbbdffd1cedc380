"""Sharded evaluation: n eval jobs score disjoint parts of the problems, and a merge publishes
exactly what one unsharded job would have published.

The units of work are fixed over the *whole* problem set before anything is split (`plan`):
the transformers engine's length-sorted batches (`transformers_engine.batch_plan`), so every
(problem, sample) row is generated with the batch-mates and padding it has in an unsharded
run; or one problem per unit for vLLM, which batches on its own. Shard i of n takes a
contiguous block of units (`take`): every row lies in exactly one shard, and a shard gets none
when n exceeds the units. Sampling seeds follow the problem's position in the whole set
(`transformers_engine.row_seed`), never the shard.

Shard i publishes a partial artifact at `<LORAFORGE_OUTPUT>-shards/<i>-of-<n>` (a sibling of
the output, never inside it): `predictions.jsonl` (its rows, each with the problem's position
in the whole set) and `shard.json` (the `Scope` the outputs describe and a fingerprint: the
settings that shape results, the inputs' manifest sha256, and sha256 of the problems, prompts
and plan). The merge fetches every partial (sizes and sha256 verified by the store), checks
that the fingerprints agree with each other and with the merge's own settings, puts the rows
in an unsharded run's order, and the eval job writes and publishes them with the code an
unsharded run uses. A missing partial is a `TransientError` (exit 75: the shard may still be
running), a corrupt or disagreeing one a `PermanentError` (exit 2: a rerun cannot fix it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraforge import store
from loraforge.errors import ArtifactExistsError, IntegrityError, PermanentError, TransientError
from loraforge.manifest import scan_directory
from loraforge.report import CodePrediction, Prediction
from loraforge.settings import EvalSettings

log = logging.getLogger("loraforge.shards")
Row = tuple[int, int]  # (position of the problem in the whole set, sample)
SHARD_FILE = "shard.json"
PREDICTIONS = "predictions.jsonl"
# Settings that say where artifacts go or how a pod logs and runs programs, not what is scored.
LOCAL_SETTINGS = ("shard", "run_id", "output", "store", "cache", "log_format", "sandbox_workers")


@dataclass(frozen=True)
class Role:
    """What this job does: score shard `index` of `count`, or merge them (`index` None)."""

    index: int | None
    count: int

    @property
    def merging(self) -> bool:
        return self.index is None

    @property
    def sharded(self) -> bool:
        return self.count > 1


def role(settings: EvalSettings, environ: Mapping[str, str]) -> Role:
    """LORAFORGE_SHARD, else the Indexed Job's JOB_COMPLETION_INDEX; one-line errors."""
    count = settings.shards
    if count == 1:
        return Role(0, 1)
    if not settings.output and "run_id" not in settings.model_fields_set:
        raise PermanentError(
            f"LORAFORGE_SHARDS={count} with neither LORAFORGE_OUTPUT nor LORAFORGE_RUN_ID set: "
            "each shard would make up a run id of its own; set one of them in the spec"
        )
    if settings.shard is not None:
        return Role(None if settings.shard == "merge" else int(settings.shard), count)
    index = environ.get("JOB_COMPLETION_INDEX")
    if index is None:
        raise PermanentError(
            f"LORAFORGE_SHARDS={count} but neither LORAFORGE_SHARD nor JOB_COMPLETION_INDEX is "
            f"set: run it as an Indexed Job with {count} completions, or set LORAFORGE_SHARD to "
            f"0..{count - 1} or `merge`"
        )
    if not index.strip().isdigit() or int(index) >= count:
        raise PermanentError(
            f"JOB_COMPLETION_INDEX={index} is not a shard of LORAFORGE_SHARDS={count}: give the "
            f"Indexed Job completions={count}"
        )
    return Role(int(index), count)


def partial_uri(output: str, index: int, count: int) -> str:
    """Where shard `index` of `count` publishes: beside the output, never under it."""
    return f"{output.rstrip('/')}-shards/{index}-of-{count}"


def problem_plan(problems: int, n: int) -> list[list[Row]]:
    """One unit per problem with its n samples (the vLLM engine batches on its own)."""
    return [[(i, j) for j in range(n)] for i in range(problems)]


def take(plan: Sequence[Sequence[Row]], index: int, count: int) -> list[Sequence[Row]]:
    """Shard `index`'s contiguous block of the plan's units; none when count > len(plan)."""
    start, stop = len(plan) * index // count, len(plan) * (index + 1) // count
    return list(plan[start:stop])


@dataclass(frozen=True)
class Scope:
    """What the outputs describe besides the predictions: the same for a run and its merge."""

    task: str
    labels: list[tuple[str, str]]  # (label, URI) per adapter, in the order given
    problems: int  # in the whole set
    fewshot_uri: str | None
    engine: str
    records: list[dict[str, Any]]  # the inputs, as the manifest names them
    ran: dict[str, Any] | None = None  # humaneval: how the programs ran

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scope:
        return cls(**{**data, "labels": [(label, uri) for label, uri in data["labels"]]})


def digest(value: Any) -> str:
    """sha256 of `value` as canonical JSON."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def settings_print(settings: EvalSettings) -> dict[str, Any]:
    """The settings every shard and the merge must share."""
    return {k: v for k, v in settings.redacted().items() if k not in LOCAL_SETTINGS}


def fingerprint(
    settings: EvalSettings,
    scope: Scope,
    problems: Sequence[Any],
    prompts: Sequence[list[int]],
    plan: Sequence[Sequence[Row]],
) -> dict[str, Any]:
    """What must be equal for shards to be parts of one run (JSON-normal, so it compares)."""
    found = {
        "settings": settings_print(settings),
        "inputs": scope.records,
        "adapters": scope.labels,
        "engine": scope.engine,
        "problems_sha256": digest([asdict(p) for p in problems]),
        "prompts_sha256": digest(prompts),
        "plan_sha256": digest(plan),
    }
    normal: dict[str, Any] = json.loads(json.dumps(found, default=str))
    return normal


# --- a shard's partial artifact -------------------------------------------------------------


def write_partial(
    out: Path,
    role: Role,
    scope: Scope,
    found: dict[str, Any],
    rows: Sequence[Row],
    predictions: Sequence[Prediction | CodePrediction],
) -> None:
    """predictions.jsonl (adapter by adapter over `rows`, each line with its position) and
    shard.json in `out`."""
    positions = [i for i, _ in rows] * len(scope.labels)
    with (out / PREDICTIONS).open("w", encoding="utf-8") as f:
        for i, p in zip(positions, predictions, strict=True):
            f.write(json.dumps({"position": i, **asdict(p)}, ensure_ascii=False) + "\n")
    meta = {"shard": role.index, "shards": role.count, "scope": asdict(scope), "fingerprint": found}
    (out / SHARD_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


@dataclass(frozen=True)
class Partial:
    """A shard's published part, verified."""

    index: int
    uri: str
    scope: Scope
    fingerprint: dict[str, Any]
    lines: list[dict[str, Any]]


def missing(output: str, count: int) -> list[int]:
    """Shards whose partial artifact is not published (yet)."""
    return [i for i in range(count) if not store.exists(partial_uri(output, i, count))]


def read_partial(output: str, index: int, count: int) -> Partial:
    uri = partial_uri(output, index, count)
    artifact = store.fetch(uri)  # every file's size and sha256 checked against the manifest
    try:
        meta = json.loads((artifact.path / SHARD_FILE).read_text())
        lines = [json.loads(x) for x in (artifact.path / PREDICTIONS).read_text().splitlines()]
        if (meta["shard"], meta["shards"]) != (index, count):
            raise ValueError(f"it says it is shard {meta['shard']} of {meta['shards']}")
        return Partial(index, uri, Scope.from_json(meta["scope"]), meta["fingerprint"], lines)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{uri}: not a shard of this run ({exc})") from exc


def collect(output: str, count: int) -> list[Partial]:
    """Every shard's partial, verified; exit 75 naming the missing ones, 2 for corrupt ones."""
    absent = missing(output, count)
    if absent:
        uris = ", ".join(partial_uri(output, i, count) for i in absent)
        indexes = ", ".join(map(str, absent))
        raise TransientError(
            f"cannot merge {output} yet: shard(s) {indexes} of {count} not published ({uris}); "
            f"they may still be running, otherwise rerun index(es) {indexes} "
            "(LORAFORGE_SHARD=<index>); nothing was published"
        )
    partials, broken = [], []
    for index in range(count):
        try:
            partials.append(read_partial(output, index, count))
        except IntegrityError as exc:
            broken.append((index, str(exc)))
    if broken:
        indexes = ", ".join(str(i) for i, _ in broken)
        raise PermanentError(
            f"cannot merge {output}: {'; '.join(m for _, m in broken)}: delete the partial(s) of "
            f"shard(s) {indexes} and rerun those indexes; nothing was published"
        )
    return partials


# --- the merge --------------------------------------------------------------------------------


def check_agree(partials: Sequence[Partial], settings: EvalSettings, output: str) -> None:
    """Every shard evaluated the same inputs with the same settings as shard 0 and the merge."""
    reference = partials[0].fingerprint
    for partial in partials[1:]:
        diff = differences(reference, partial.fingerprint)
        if diff:
            raise PermanentError(
                f"cannot merge {output}: shard {partial.index} differs from shard 0 in {diff}: "
                f"the shards of one run need one spec; delete {output}-shards/ and rerun every "
                "index with the same spec"
            )
    own = differences(reference, {**reference, "settings": settings_print(settings)})
    if own:
        raise PermanentError(
            f"cannot merge {output}: the shards ran with other settings than this job ({own}): "
            "merge with the spec the shards ran with"
        )


def differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    """What differs, for a message: settings by variable (shard 0's value vs the other)."""
    sa, sb = a.get("settings", {}), b.get("settings", {})
    found = [
        f"LORAFORGE_{k.upper()} ({sa.get(k)!r} vs {sb.get(k)!r})"
        for k in sorted(set(sa) | set(sb))
        if sa.get(k) != sb.get(k)
    ]
    found += [k for k in sorted(set(a) | set(b)) if k != "settings" and a.get(k) != b.get(k)]
    return ", ".join(found)


def merged_scope(partials: Sequence[Partial], lines: Sequence[dict[str, Any]]) -> Scope:
    """Shard 0's scope; for humaneval the sandbox figures summed over the shards."""
    scope = partials[0].scope
    rans = [p.scope.ran for p in partials if p.scope.ran]
    if scope.task != "humaneval" or not rans:
        return scope
    ran = {
        **rans[0],
        "programs": len({(x["problem_id"], x["output"]) for x in lines}),
        "samples": len(lines),
        "wall_s": round(sum(r["wall_s"] for r in rans), 1),
    }
    return Scope(**{**asdict(scope), "labels": scope.labels, "ran": ran})


def merged_lines(partials: Sequence[Partial], samples: int) -> list[dict[str, Any]]:
    """Every shard's rows in an unsharded run's order (adapter, problem, sample), each row
    there exactly once; the positions dropped."""
    scope = partials[0].scope
    order = {label: k for k, (label, _) in enumerate(scope.labels)}

    def key(line: dict[str, Any]) -> tuple[int, int, int]:
        return order[line["adapter"]], line["position"], line.get("sample", 0)

    lines = sorted((x for p in partials for x in p.lines), key=key)
    want = [
        (a, i, j) for a in range(len(order)) for i in range(scope.problems) for j in range(samples)
    ]
    if [key(x) for x in lines] != want:
        raise PermanentError(
            f"{partials[0].uri}: the shards' rows do not cover every problem and sample once "
            f"({len(lines)} rows, {len(want)} expected): delete the partials and rerun every index"
        )
    return [{k: v for k, v in x.items() if k != "position"} for x in lines]


def same_result(uri: str, out: Path) -> bool:
    """Whether the artifact at `uri` holds the predictions and metrics in `out` (a merge by
    another shard that finished at the same time)."""
    manifest, _ = store.read_manifest(uri)
    results = ("metrics.json", PREDICTIONS)
    published = {e.path: e.sha256 for e in manifest.files if e.path in results}
    ours = {e.path: e.sha256 for e in scan_directory(out) if e.path in results}
    return published == ours


# --- the jobs' part ---------------------------------------------------------------------------

# Writes the outputs of prediction rows and publishes them at LORAFORGE_OUTPUT (the eval job's
# `write_and_publish`, which an unsharded run ends in); returns the verdict's lines.
Writer = Callable[[Path, EvalSettings, Scope, Sequence[Prediction | CodePrediction]], list[str]]


def published(output: str, role: Role) -> bool:
    return store.exists(partial_uri(output, role.index or 0, role.count))


def publish_partial(
    settings: EvalSettings,
    role: Role,
    scope: Scope,
    found: dict[str, Any],
    rows: Sequence[Row],
    predictions: Sequence[Prediction | CodePrediction],
) -> None:
    """A shard's rows as a partial artifact beside LORAFORGE_OUTPUT (manifest last)."""
    uri = partial_uri(settings.output_uri, role.index or 0, role.count)
    with tempfile.TemporaryDirectory(prefix="loraforge-shard-") as tmp:
        write_partial(Path(tmp), role, scope, found, rows, predictions)
        store.publish(
            tmp,
            uri,
            job="eval",
            run_id=settings.run_id,
            settings=settings.redacted(),
            inputs=scope.records,
            metrics={"shard": role.index, "shards": role.count, "rows": len(rows)},
        )
    log.info(f"published shard {role.index} of {role.count}: {uri}", extra={"event": "partial"})


def merge_when_complete(settings: EvalSettings, role: Role, write: Writer) -> list[str] | None:
    """After a shard: merge when every partial is there, else leave it to the last shard."""
    absent = missing(settings.output_uri, role.count)
    if absent:
        waiting = ", ".join(map(str, absent))
        log.info(f"waiting for shard(s) {waiting} of {role.count}: the last one to finish merges")
        return None
    return merge(settings, role.count, write)


def merge(settings: EvalSettings, count: int, write: Writer) -> list[str] | None:
    """Every partial, verified and agreeing, written by `write` and published at
    LORAFORGE_OUTPUT. The verdict's lines, or None when an identical merge by another shard
    was published first (create-only publishing makes the race harmless)."""
    output = settings.output_uri
    if store.exists(output):
        log.info(f"{output} is already published (merged): nothing to do")
        return None
    partials = collect(output, count)
    check_agree(partials, settings, output)
    lines = merged_lines(partials, settings.samples)
    scope = merged_scope(partials, lines)
    kind = CodePrediction if scope.task == "humaneval" else Prediction
    predictions = [kind(**line) for line in lines]
    log.info(f"merging {count} shards: {len(lines)} rows")
    with tempfile.TemporaryDirectory(prefix="loraforge-eval-") as tmp:
        try:
            return write(Path(tmp), settings, scope, predictions)
        except ArtifactExistsError:
            if not same_result(output, Path(tmp)):
                raise
    log.info(f"{output} was merged by another shard at the same time, with these results")
    return None
