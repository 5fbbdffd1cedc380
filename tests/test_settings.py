"""Job settings: env vars only, unknown names rejected with a suggestion, all errors at once."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import SecretStr

from loraforge.errors import PermanentError
from loraforge.logs import setup_logging
from loraforge.settings import (
    JOB_SETTINGS,
    EvalSettings,
    JobSettings,
    TrainSettings,
    load_settings,
    read_env_file,
)

BASE = {"LORAFORGE_BASE_MODEL": "Qwen/Qwen2.5-0.5B", "LORAFORGE_DATA": "data/train.jsonl"}


def test_values_are_read_from_the_given_environment() -> None:
    env = {
        **BASE,
        "LORAFORGE_RANK": "8",
        "LORAFORGE_METHOD": "dora",
        "LORAFORGE_PACKING": "false",
        "LORAFORGE_RUN_ID": "exp-7",
        "LORAFORGE_STORE": "s3://team-bucket/runs",
    }
    settings = load_settings(TrainSettings, env)
    assert (settings.rank, settings.method, settings.packing) == (8, "dora", False)
    assert settings.output_uri == "s3://team-bucket/runs/exp-7/train"


def test_explicit_output_wins_over_the_derived_one() -> None:
    env = {**BASE, "LORAFORGE_OUTPUT": "s3://b-k-t/adapters/x"}
    assert load_settings(TrainSettings, env).output_uri == "s3://b-k-t/adapters/x"


def test_typo_is_rejected_with_a_suggestion() -> None:
    with pytest.raises(
        PermanentError,
        match=r"LORAFORGE_RNAK is not a setting of the train job "
        r"\(did you mean LORAFORGE_RANK\?\)",
    ):
        load_settings(TrainSettings, {**BASE, "LORAFORGE_RNAK": "8"})


def test_other_jobs_settings_are_unknown_here() -> None:
    with pytest.raises(PermanentError, match="LORAFORGE_EDIT_MODE is not a setting of the train"):
        load_settings(TrainSettings, {**BASE, "LORAFORGE_EDIT_MODE": "gd"})


def test_every_problem_is_reported_in_one_message() -> None:
    env = {
        "LORAFORGE_DATA": "x.jsonl",
        "LORAFORGE_RANK": "0",
        "LORAFORGE_QUANTIZATION": "fp4",
        "LORAFORGE_RNAK": "8",
    }
    with pytest.raises(PermanentError) as err:
        load_settings(TrainSettings, env)
    message = str(err.value)
    assert message.startswith("train settings: 4 problems: ")
    assert "\n" not in message
    for part in (
        "LORAFORGE_RANK=0: input should be greater than or equal to 1",
        "LORAFORGE_QUANTIZATION=fp4: input should be 'auto', 'none', 'nf4' or 'int8'",
        "LORAFORGE_BASE_MODEL is required",
        "did you mean LORAFORGE_RANK?",
    ):
        assert part in message


def test_bad_uris_and_run_ids_are_named() -> None:
    env = {**BASE, "LORAFORGE_STORE": "gs://bucket", "LORAFORGE_RUN_ID": "My_Run"}
    with pytest.raises(PermanentError, match="2 problems") as err:
        load_settings(TrainSettings, env)
    assert "LORAFORGE_STORE=gs://bucket: unsupported scheme gs://" in str(err.value)
    assert "LORAFORGE_RUN_ID=My_Run: use lower-case letters" in str(err.value)


def test_eval_adapters_are_comma_separated() -> None:
    env = {"LORAFORGE_BASE_MODEL": "m", "LORAFORGE_ADAPTERS": "base, s3://bkt/a/train ,/tmp/b"}
    assert load_settings(EvalSettings, env).adapters == ["base", "s3://bkt/a/train", "/tmp/b"]


def test_os_environ_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LORAFORGE_MAX_STEPS", "12")
    assert load_settings(TrainSettings).max_steps == 12


def test_env_file_is_parsed_like_the_pod_environment(tmp_path: Path) -> None:
    spec = tmp_path / "train.env"
    spec.write_text(
        '# a comment\nLORAFORGE_BASE_MODEL="Qwen/Qwen2.5-0.5B"\n\n'
        "export LORAFORGE_DATA=data/train.jsonl  # trailing comment\n"
        "LORAFORGE_RANK='32'\n"
    )
    settings = load_settings(TrainSettings, read_env_file(spec))
    assert (settings.base_model, settings.data, settings.rank) == (
        "Qwen/Qwen2.5-0.5B",
        "data/train.jsonl",
        32,
    )


def test_env_file_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    spec = tmp_path / "bad.env"
    spec.write_text("LORAFORGE_BASE_MODEL=x\nthis is not an assignment\n")
    with pytest.raises(PermanentError, match=r"bad.env:2: expected NAME=value"):
        read_env_file(spec)


class SecretSettings(JobSettings):
    job: ClassVar[str] = "secretive"
    api_key: SecretStr | None = None
    """A secret, as a job that talks to a token-protected service would have."""


def test_secrets_never_appear_in_a_dump_or_a_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-very-secret-1234")
    settings = load_settings(
        SecretSettings, {"LORAFORGE_BASE_MODEL": "m", "LORAFORGE_API_KEY": "sk-live-abcdef123456"}
    )
    dump = json.dumps(settings.redacted())
    assert "sk-live-abcdef123456" not in dump and '"api_key": "***"' in dump

    stream = io.StringIO()
    scrubber = setup_logging("json", stream=stream)
    scrubber.add(settings.secret_values())
    log = logging.getLogger("loraforge.test")
    log.info("connecting with sk-live-abcdef123456", extra={"auth": "aws-very-secret-1234"})
    log.info("settings", extra={"settings": settings.model_dump(mode="python")})
    text = stream.getvalue()
    assert "sk-live-abcdef123456" not in text and "aws-very-secret-1234" not in text
    first = json.loads(text.splitlines()[0])
    assert first["msg"] == "connecting with ***" and first["auth"] == "***"


def test_a_bad_secret_value_is_not_echoed() -> None:
    with pytest.raises(PermanentError) as err:
        load_settings(
            SecretSettings,
            {"LORAFORGE_BASE_MODEL": "m", "LORAFORGE_API_KEY": "", "LORAFORGE_DEVICE": "tpu"},
        )
    assert "LORAFORGE_DEVICE=tpu" in str(err.value)


@pytest.mark.parametrize("job", sorted(JOB_SETTINGS))
def test_every_field_is_documented(job: str) -> None:
    for name, info in JOB_SETTINGS[job].model_fields.items():
        assert info.description, f"LORAFORGE_{name.upper()} has no docstring"


@pytest.mark.parametrize(
    "spec", sorted(Path(__file__).parents[1].glob("jobs/*.env")), ids=lambda p: p.name
)
def test_shipped_job_specs_validate(spec: Path) -> None:
    job = spec.name.split(".")[0]
    settings = load_settings(JOB_SETTINGS[job], read_env_file(spec))
    assert settings.job == job


@pytest.mark.parametrize(
    "spec", sorted(Path(__file__).parents[1].glob("jobs/*.env")), ids=lambda p: p.name
)
def test_shipped_spec_comments_are_the_field_docs(spec: Path) -> None:
    from loraforge.settings.spec import field_comment, spec_comments

    cls = JOB_SETTINGS[spec.name.split(".")[0]]
    comments = spec_comments(spec.read_text())
    assert comments, f"{spec} sets nothing"
    for env_name, block in comments.items():
        field = cls.env_names()[env_name]
        assert block[-len(field_comment(cls, field)) :] == field_comment(cls, field), env_name


def test_readme_settings_tables_match_the_classes() -> None:
    from loraforge.settings.spec import settings_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for cls in (JobSettings, *JOB_SETTINGS.values()):
        assert settings_table(cls) in readme, f"README table of {cls.job} is stale"
