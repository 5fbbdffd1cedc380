"""Bad inputs across the three jobs and the launcher: exit 2, one line, no traceback, nothing
published.

Each case runs its job's entrypoint in its own process (tests/faults.py) on the tiny kit: env
values of the wrong type, out of range or unknown; empty, huge and non-UTF-8 files; malformed
JSON lines; adapters with missing, extra, wrong-shape, NaN or integer tensors; manifests with a
wrong hash, a `../` or absolute path; a symlink in an artifact directory; pickle files;
`trust_remote_code` requests and `auto_map` in a model's config; credentials in a spec.
Every case must exit 2 with exactly one error line naming the problem (and no traceback), print
nothing on stdout, and leave the output store empty. The cases complement the ones in
test_train/test_edit/test_eval/test_settings; RELIABILITY.md tabulates them
(`RELIABILITY_DIR=... pytest tests/test_bad_inputs.py`).

The slow part runs a few cases through the installed console scripts as well, to show a real
interpreter start behaves as the forked one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge import store
from loraforge.errors import EXIT_PERMANENT
from loraforge.manifest import MANIFEST_NAME
from tests.faults import Finished, Jobs, record

pytestmark = pytest.mark.faults

ROOT = Path(__file__).parents[1]
WEIGHTS = "adapter_model.safetensors"


@dataclass
class Inputs:
    """What the cases are made of: the tiny kit, a good adapter and a directory to spoil."""

    kit: Any
    adapter: str  # a good LoRA adapter artifact
    root: Path

    def file(self, name: str, data: bytes) -> str:
        path = self.root / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def adapter_variant(
        self, name: str, spoil: Callable[[Path, dict[str, torch.Tensor]], None]
    ) -> str:
        """The good adapter with `spoil(dir, tensors)` applied, published as an artifact."""
        src, uri = self.root / "src" / name, str(self.root / "adapters" / name)
        if src.exists():  # made for an earlier test
            return uri
        shutil.copytree(store.fetch(self.adapter).path, src, ignore=_manifest)
        spoil(src, load_file(str(src / WEIGHTS)))
        store.publish(src, uri, job="train", run_id="bad")
        return uri

    def published_then(self, name: str, damage: Callable[[Path], None]) -> str:
        """The good adapter published, then damaged in the store (a manifest or its files)."""
        fresh = not (self.root / "src" / name).exists()
        uri = self.adapter_variant(name, lambda d, t: None)
        if fresh:
            damage(Path(uri))
        return uri

    def model_variant(self, name: str, spoil: Callable[[Path], None]) -> str:
        path = self.root / "models" / name
        if not path.exists():
            shutil.copytree(self.kit.model_dir, path)
            spoil(path)
        return str(path)


def _manifest(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == MANIFEST_NAME]


def _save(d: Path, t: dict[str, torch.Tensor]) -> None:
    save_file(t, str(d / WEIGHTS), metadata={"format": "pt"})


def _first(t: dict[str, torch.Tensor], kind: str) -> str:
    return sorted(k for k in t if kind in k)[0]


def nan_tensor(d: Path, t: dict[str, torch.Tensor]) -> None:
    t[_first(t, "lora_B")][0, 0] = float("nan")
    _save(d, t)


def int_tensor(d: Path, t: dict[str, torch.Tensor]) -> None:
    key = _first(t, "lora_A")
    t[key] = t[key].to(torch.int32)
    _save(d, t)


def missing_b(d: Path, t: dict[str, torch.Tensor]) -> None:
    del t[_first(t, "lora_B")]
    _save(d, t)


def missing_module(d: Path, t: dict[str, torch.Tensor]) -> None:
    module = _first(t, "lora_A").removesuffix(".lora_A.weight")
    for key in [k for k in t if k.startswith(module + ".")]:
        del t[key]
    _save(d, t)


def extra_module(d: Path, t: dict[str, torch.Tensor]) -> None:
    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    t[f"{prefix}.lora_A.weight"] = torch.zeros(16, 128)
    t[f"{prefix}.lora_B.weight"] = torch.zeros(256, 16)
    _save(d, t)


def wrong_rank(d: Path, t: dict[str, torch.Tensor]) -> None:
    key_a = _first(t, "lora_A")
    key_b = key_a.replace("lora_A", "lora_B")
    t[key_a], t[key_b] = t[key_a][:8].clone(), t[key_b][:, :8].clone()
    _save(d, t)


def shapes_disagree(d: Path, t: dict[str, torch.Tensor]) -> None:
    key = _first(t, "lora_A")
    t[key] = t[key][:8].clone()
    _save(d, t)


def empty_weights(d: Path, t: dict[str, torch.Tensor]) -> None:
    (d / WEIGHTS).write_bytes(b"")


def config_not_utf8(d: Path, t: dict[str, torch.Tensor]) -> None:
    (d / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "r": 16, "x": "\xff\xfe"}')


def pickle_beside(d: Path, t: dict[str, torch.Tensor]) -> None:
    torch.save({"x": torch.zeros(1)}, d / "adapter_model.bin")


def _edit_manifest(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = json.loads((path / MANIFEST_NAME).read_text())
        change(data)
        (path / MANIFEST_NAME).write_text(json.dumps(data))

    return damage


def _wrong_hash(data: dict[str, Any]) -> None:
    entry = next(f for f in data["files"] if f["path"] == WEIGHTS)
    entry["sha256"] = "0" * 64


def _entry_path(new: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["files"][0]["path"] = new

    return change


def _symlinked(path: Path) -> None:
    real = path.parent / "elsewhere.safetensors"
    shutil.copy(path / WEIGHTS, real)
    (path / WEIGHTS).unlink()
    (path / WEIGHTS).symlink_to(real)  # same bytes: only the link itself is wrong


def _auto_map(file: str) -> Callable[[Path], None]:
    def spoil(path: Path) -> None:
        config = json.loads((path / file).read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
        (path / file).write_text(json.dumps(config))
        (path / "modeling_x.py").write_text("raise SystemExit('custom code ran')\n")

    return spoil


def _pickle_weights(path: Path) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    torch.save(tensors, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


# --- the cases: job -> (spoiled env, fragment of the one error line) -----------------------------

Case = tuple[str, Callable[[Inputs], dict[str, str]], str]
QA = b'{"question": "q", "answer": "a #### 1"}\n'


def train_cases() -> list[Case]:
    def data(name: str, raw: bytes) -> Callable[[Inputs], dict[str, str]]:
        return lambda i: {"LORAFORGE_DATA": i.file(name, raw)}

    def model(name: str, spoil: Callable[[Path], None]) -> Callable[[Inputs], dict[str, str]]:
        return lambda i: {"LORAFORGE_BASE_MODEL": i.model_variant(name, spoil)}

    huge = b'{"question": "' + b"7 " * 1_000_000 + b'", "answer": "#### 1"}\n'
    return [
        ("rank not a number", lambda i: {"LORAFORGE_RANK": "sixteen"}, "LORAFORGE_RANK=sixteen"),
        (
            "learning rate negative",
            lambda i: {"LORAFORGE_LEARNING_RATE": "-0.001"},
            "LORAFORGE_LEARNING_RATE=-0.001",
        ),
        ("dropout above 1", lambda i: {"LORAFORGE_DROPOUT": "1.5"}, "LORAFORGE_DROPOUT=1.5"),
        ("max steps 0", lambda i: {"LORAFORGE_MAX_STEPS": "0"}, "LORAFORGE_MAX_STEPS=0"),
        ("unknown method", lambda i: {"LORAFORGE_METHOD": "qlora"}, "LORAFORGE_METHOD=qlora"),
        (
            "packing not a boolean",
            lambda i: {"LORAFORGE_PACKING": "perhaps"},
            "LORAFORGE_PACKING=perhaps",
        ),
        (
            "rank pattern without =",
            lambda i: {"LORAFORGE_RANK_PATTERN": "q_proj"},
            "LORAFORGE_RANK_PATTERN",
        ),
        (
            "run id with capitals",
            lambda i: {"LORAFORGE_RUN_ID": "My_Run"},
            "LORAFORGE_RUN_ID=My_Run",
        ),
        (
            "store with an unknown scheme",
            lambda i: {"LORAFORGE_STORE": "gs://bucket/x"},
            "unsupported scheme gs://",
        ),
        (
            "trust_remote_code requested",
            lambda i: {"LORAFORGE_TRUST_REMOTE_CODE": "true"},
            "never runs a model's own code",
        ),
        ("data: empty file", data("empty.jsonl", b""), "no records"),
        (
            "data: invalid UTF-8",
            data("latin1.jsonl", QA + b'{"question": "caf\xe9", "answer": "#### 2"}\n'),
            "latin1.jsonl:2: not valid UTF-8",
        ),
        (
            "data: a JSON array line",
            data("array.jsonl", QA + b'["q", "a"]\n'),
            "array.jsonl:2: not a JSON object (got a JSON list)",
        ),
        (
            "data: truncated last line",
            data("cut.jsonl", QA + b'{"question": "q", "ans'),
            "cut.jsonl:2: not a JSON object",
        ),
        (
            "data: a 2 MB record",
            data("huge.jsonl", QA + huge),
            "huge.jsonl:2: record is 2,000,025 characters",
        ),
        (
            "data: unknown record format",
            data("odd.jsonl", b'{"input_text": "q", "target": "a"}\n'),
            "unknown record format",
        ),
        (
            "data: answer is a number",
            data("number.jsonl", b'{"question": "q", "answer": 5}\n'),
            "answer must be a string, got int",
        ),
        ("data: a directory", lambda i: {"LORAFORGE_DATA": str(i.root)}, "is a directory"),
        (
            "data: malformed hf:// URI",
            lambda i: {"LORAFORGE_DATA": "hf://nosplit"},
            "expected hf://dataset[:config]/split",
        ),
        (
            "validation data malformed",
            lambda i: {"LORAFORGE_VAL_DATA": i.file("val.jsonl", b"{oops}\n")},
            "val.jsonl:1: not a JSON object",
        ),
        (
            "base config with auto_map",
            model("automap", _auto_map("config.json")),
            "auto_map (AutoModelForCausalLM)",
        ),
        (
            "base tokenizer config with auto_map",
            model("tok-automap", _auto_map("tokenizer_config.json")),
            "tokenizer_config.json has auto_map",
        ),
        (
            "base with pickle weights only",
            model("pickled", _pickle_weights),
            "cannot load a model and tokenizer",
        ),
        (
            "base config.json not JSON",
            model("badconfig", lambda p: (p / "config.json").write_bytes(b"{nope")),
            "config.json: not readable JSON",
        ),
        (
            "learning rate that diverges",
            lambda i: {"LORAFORGE_LEARNING_RATE": "1e6"},
            "training diverged",
        ),
    ]


def adapter_cases(job: str) -> list[Case]:
    var = "LORAFORGE_ADAPTER" if job == "edit" else "LORAFORGE_ADAPTERS"

    def variant(name: str, spoil: Callable[..., None]) -> Callable[[Inputs], dict[str, str]]:
        return lambda i: {var: i.adapter_variant(f"{job}-{name}", spoil)}

    def damaged(name: str, damage: Callable[[Path], None]) -> Callable[[Inputs], dict[str, str]]:
        return lambda i: {var: i.published_then(f"{job}-{name}", damage)}

    return [
        ("adapter: a NaN in a tensor", variant("nan", nan_tensor), "holds NaN or infinite values"),
        ("adapter: an integer tensor", variant("int", int_tensor), "not a floating-point tensor"),
        ("adapter: lora_B missing", variant("no-b", missing_b), "has lora_A but no lora_B"),
        (
            "adapter: a module missing",
            variant("no-module", missing_module),
            "has no tensors for model.layers.0",
        ),
        (
            "adapter: an extra module",
            variant("extra", extra_module),
            "up_proj has tensors but adapter_config.json does not target it",
        ),
        (
            "adapter: rank not the config's",
            variant("rank", wrong_rank),
            "has rank 8 but adapter_config.json gives it r=16",
        ),
        (
            "adapter: A and B of different ranks",
            variant("shapes", shapes_disagree),
            "do not share a rank",
        ),
        (
            "adapter: empty weights file",
            variant("empty", empty_weights),
            "not a readable safetensors file",
        ),
        (
            "adapter: config not UTF-8",
            variant("latin1", config_not_utf8),
            "adapter_config.json is not JSON",
        ),
        (
            "adapter: a pickle beside the safetensors",
            variant("pickle", pickle_beside),
            "holds pickled weights (adapter_model.bin)",
        ),
        (
            "adapter: manifest with a wrong sha256",
            damaged("hash", _edit_manifest(_wrong_hash)),
            "adapter_model.safetensors: sha256",
        ),
        (
            "adapter: manifest path with ../",
            damaged("dotdot", _edit_manifest(_entry_path("../../etc/passwd"))),
            "unsafe file path '../../etc/passwd'",
        ),
        (
            "adapter: manifest with an absolute path",
            damaged("abs", _edit_manifest(_entry_path("/etc/passwd"))),
            "unsafe file path '/etc/passwd'",
        ),
        (
            "adapter: manifest not JSON",
            damaged("garbled", lambda p: (p / MANIFEST_NAME).write_bytes(b"\x00{")),
            "not a valid loraforge manifest",
        ),
        (
            "adapter: a symlink in the artifact",
            damaged("symlink", _symlinked),
            "adapter_model.safetensors is a symlink",
        ),
    ]


def edit_cases() -> list[Case]:
    return [
        *adapter_cases("edit"),
        (
            "calibration samples 0",
            lambda i: {"LORAFORGE_CALIB_SAMPLES": "0"},
            "LORAFORGE_CALIB_SAMPLES=0",
        ),
        (
            "calibration data not UTF-8",
            lambda i: {"LORAFORGE_CALIB_DATA": i.file("calib.jsonl", b'{"question": "\xff"}\n')},
            "calib.jsonl:1: not valid UTF-8",
        ),
        ("unknown edit mode", lambda i: {"LORAFORGE_EDIT_MODE": "svd"}, "LORAFORGE_EDIT_MODE=svd"),
    ]


def eval_cases() -> list[Case]:
    long_question = b'{"question": "' + b"9 " * 5000 + b'", "answer": "#### 1"}\n'
    cases = [c for c in adapter_cases("eval") if c[0].split(": ")[1] in _EVAL_ADAPTER_CASES]
    return [
        *cases,
        (
            "eval data not UTF-8",
            lambda i: {"LORAFORGE_EVAL_DATA": i.file("t1.jsonl", QA + b"\xc3\x28\n")},
            "t1.jsonl:2: not valid UTF-8",
        ),
        (
            "eval data: a malformed line",
            lambda i: {"LORAFORGE_EVAL_DATA": i.file("t2.jsonl", QA + b"{'single': 'quotes'}\n")},
            "t2.jsonl:2",
        ),
        (
            "eval data: empty file",
            lambda i: {"LORAFORGE_EVAL_DATA": i.file("t3.jsonl", b"")},
            "t3.jsonl",
        ),
        (
            "eval data: a prompt longer than the model",
            lambda i: {"LORAFORGE_EVAL_DATA": i.file("t4.jsonl", long_question)},
            "tokens and the model takes",
        ),
        ("eval limit 0", lambda i: {"LORAFORGE_EVAL_LIMIT": "0"}, "LORAFORGE_EVAL_LIMIT=0"),
        (
            "num fewshot 100",
            lambda i: {"LORAFORGE_NUM_FEWSHOT": "100"},
            "LORAFORGE_NUM_FEWSHOT=100",
        ),
        (
            "batch size not a number",
            lambda i: {"LORAFORGE_BATCH_SIZE": "many"},
            "LORAFORGE_BATCH_SIZE=many",
        ),
        ("unknown metric", lambda i: {"LORAFORGE_METRIC": "exact"}, "LORAFORGE_METRIC=exact"),
        (
            "base config with auto_map",
            lambda i: {
                "LORAFORGE_BASE_MODEL": i.model_variant("eval-automap", _auto_map("config.json"))
            },
            "auto_map",
        ),
    ]


_EVAL_ADAPTER_CASES = {
    "a NaN in a tensor",
    "A and B of different ranks",
    "a module missing",
    "manifest with a wrong sha256",
    "a symlink in the artifact",
}


# --- the launcher --------------------------------------------------------------------------------

SPEC = "LORAFORGE_BASE_MODEL={model}\nLORAFORGE_DATA={data}\nLORAFORGE_STORE={store}\n"


def launcher_cases() -> list[tuple[str, Callable[[Inputs, Path], list[str]], str]]:
    def spec(extra: str, raw: bytes | None = None) -> Callable[[Inputs, Path], list[str]]:
        def argv(i: Inputs, out: Path) -> list[str]:
            text = SPEC.format(model=i.kit.model_dir, data=i.kit.train, store=out) + extra
            path = i.file(f"spec-{abs(hash(extra + str(raw)))}.env", raw or text.encode())
            return ["render", "train", "--env-file", path, "--gpu", "l4"]

        return argv

    def fetch_damaged(
        name: str, damage: Callable[[Path], None]
    ) -> Callable[[Inputs, Path], list[str]]:
        return lambda i, out: ["fetch", i.published_then(f"cli-{name}", damage), str(out / "copy")]

    def publish_linked(i: Inputs, out: Path) -> list[str]:
        src = i.root / "linked"
        src.mkdir(exist_ok=True)
        (src / "a.txt").write_text("a")
        if not (src / "b.txt").is_symlink():
            (src / "b.txt").symlink_to(src / "a.txt")
        return ["publish", str(src), str(out / "x")]

    return [
        (
            "render: spec file missing",
            lambda i, out: [
                "render",
                "train",
                "--env-file",
                str(i.root / "none.env"),
                "--gpu",
                "l4",
            ],
            "cannot read the job spec",
        ),
        (
            "render: spec not UTF-8",
            spec("", b"LORAFORGE_BASE_MODEL=caf\xe9\n"),
            "cannot read the job spec",
        ),
        ("render: a line without =", spec("just some words\n"), "expected NAME=value"),
        (
            "render: an AWS secret in the spec",
            spec("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG\n"),
            "AWS_SECRET_ACCESS_KEY in the train spec looks like a credential",
        ),
        (
            "render: credentials in a URI",
            spec("LORAFORGE_OUTPUT=s3://AKIAIOSFODNN7EXAMPLE:pw@bucket/x\n"),
            "LORAFORGE_OUTPUT in the train spec looks like a credential",
        ),
        (
            "render: trust_remote_code in the spec",
            spec("LORAFORGE_TRUST_REMOTE_CODE=1\n"),
            "never runs a model's own code",
        ),
        ("render: a value out of range", spec("LORAFORGE_RANK=0\n"), "LORAFORGE_RANK=0"),
        (
            "estimate: unknown GPU",
            lambda i, out: [
                "estimate",
                "train",
                "--env-file",
                spec("")(i, out)[3],
                "--gpu",
                "tpu-v5",
            ],
            "unknown GPU 'tpu-v5'",
        ),
        (
            "check: empty spec",
            lambda i, out: ["check", "train", "--env-file", i.file("empty.env", b"")],
            "LORAFORGE_BASE_MODEL is required",
        ),
        (
            "fetch: manifest path with ../",
            fetch_damaged("dotdot", _edit_manifest(_entry_path("../x"))),
            "unsafe file path '../x'",
        ),
        (
            "fetch: a corrupted file",
            fetch_damaged(
                "corrupt", lambda p: (p / WEIGHTS).write_bytes(b"x" * (p / WEIGHTS).stat().st_size)
            ),
            "sha256",
        ),
        ("publish: a symlink in the directory", publish_linked, "symlinks are not published"),
        (
            "publish: a reserved file name",
            lambda i, out: ["publish", str(Path(i.adapter).parent), str(out / "y")],
            "loraforge.json is reserved",
        ),
    ]


# --- running them --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tiny_kit: Any, reference: Any, tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return Inputs(tiny_kit, reference("lora"), tmp_path_factory.mktemp("bad-inputs"))


def base_env(job: str, i: Inputs, out: Path) -> dict[str, str]:
    env = {
        "LORAFORGE_BASE_MODEL": str(i.kit.model_dir),
        "LORAFORGE_STORE": str(out),
        "LORAFORGE_RUN_ID": "bad",
        "LORAFORGE_DEVICE": "cpu",
    }
    if job == "train":
        env |= {"LORAFORGE_DATA": str(i.kit.train), "LORAFORGE_MAX_STEPS": "3"}
        env |= {"LORAFORGE_MAX_SEQ_LEN": "256", "LORAFORGE_CHECKPOINT_INTERVAL": "0"}
        env |= {"LORAFORGE_EVAL_INTERVAL": "0", "LORAFORGE_VAL_DATA": str(i.kit.val)}
    elif job == "edit":
        env |= {"LORAFORGE_ADAPTER": i.adapter, "LORAFORGE_CALIB_DATA": str(i.kit.val)}
        env |= {"LORAFORGE_TARGET_MODULES": "q_proj,k_proj,v_proj,o_proj"}
        env |= {"LORAFORGE_CALIB_SAMPLES": "4", "LORAFORGE_MAX_SEQ_LEN": "256"}
    else:
        env |= {"LORAFORGE_ADAPTERS": f"base,{i.adapter}", "LORAFORGE_EVAL_DATA": str(i.kit.test)}
        env |= {"LORAFORGE_EVAL_LIMIT": "2", "LORAFORGE_NUM_FEWSHOT": "0"}
        env |= {"LORAFORGE_MAX_NEW_TOKENS": "4", "LORAFORGE_BOOTSTRAP_SAMPLES": "100"}
    return env


def assert_refused(done: Finished, expected: str, out: Path) -> str:
    """Exit 2, one error line holding `expected`, no traceback, no stdout, nothing in `out`."""
    assert done.code == EXIT_PERMANENT, done.err[-3000:]
    assert "Traceback" not in done.err and not done.out.strip(), done.err[-3000:]
    messages = [e["msg"] for e in done.errors]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert expected in messages[0], messages[0]
    left = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not left, left  # nothing published, nothing staged
    return str(messages[0])


JOB_CASES = {"train": train_cases(), "edit": edit_cases(), "eval": eval_cases()}
JOB_PARAMS = [
    pytest.param(job, name, id=f"{job}: {name}")
    for job, cases in JOB_CASES.items()
    for name, *_ in cases
]


@pytest.mark.parametrize(("job", "name"), JOB_PARAMS)
def test_job_refuses_bad_input_with_one_line(
    jobs: Jobs, inputs: Inputs, tmp_path: Path, job: str, name: str
) -> None:
    _, make, expected = next(c for c in JOB_CASES[job] if c[0] == name)
    out = tmp_path / "out"
    done = jobs.run(job, {**base_env(job, inputs, out), **make(inputs)})
    message = assert_refused(done, expected, out)
    record("bad_inputs", {"job": job, "case": name, "code": done.code, "message": message})


LAUNCHER_CASES = launcher_cases()


@pytest.mark.parametrize("name", [c[0] for c in LAUNCHER_CASES])
def test_launcher_refuses_bad_input_with_one_line(
    jobs: Jobs, inputs: Inputs, tmp_path: Path, name: str
) -> None:
    _, make, expected = next(c for c in LAUNCHER_CASES if c[0] == name)
    out = tmp_path / "out"
    done = jobs.cli(make(inputs, out))
    assert done.code == EXIT_PERMANENT, done.err[-3000:]
    lines = [line for line in done.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.err and not done.out.strip(), done.err
    assert expected in lines[0], lines[0]
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
    record("bad_inputs", {"job": "launcher", "case": name, "code": done.code, "message": lines[0]})


def test_at_least_forty_cases() -> None:
    assert sum(len(c) for c in JOB_CASES.values()) + len(LAUNCHER_CASES) >= 40


# --- the same through the installed console scripts ----------------------------------------------

SCRIPT_CASES = [
    ("train", "data: invalid UTF-8"),
    ("edit", "adapter: a NaN in a tensor"),
    ("eval", "adapter: manifest with a wrong sha256"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("job", "name"), SCRIPT_CASES)
def test_console_script_refuses_bad_input_with_one_line(
    inputs: Inputs, tmp_path: Path, job: str, name: str
) -> None:
    _, make, expected = next(c for c in JOB_CASES[job] if c[0] == name)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFORGE_")}
    env |= {**base_env(job, inputs, out), **make(inputs), "LORAFORGE_LOG_FORMAT": "json"}
    done = subprocess.run(
        [Path(sys.executable).parent / f"loraforge-{job}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    finished = Finished(done.returncode, done.stdout, done.stderr, 0.0, 0.0)
    assert_refused(finished, expected, out)


def test_a_huge_record_is_refused_before_it_is_tokenized(
    jobs: Jobs, inputs: Inputs, tmp_path: Path
) -> None:
    record_16mib = b'{"question": "' + b"7 " * (8 * 2**20) + b'", "answer": "#### 1"}\n'
    env = {
        **base_env("train", inputs, tmp_path / "out"),
        "LORAFORGE_DATA": inputs.file("16m.jsonl", QA + record_16mib),
    }
    done = jobs.start("train", env).wait(timeout=20)  # raises when still running after 20 s
    assert_refused(done, "16m.jsonl:2", tmp_path / "out")
