"""Settings shared by every job: read from `LORAFORGE_*` env vars only, validated all at once.

One pydantic-settings class per job (see `train.py`, `edit.py`, `eval.py` beside this module)
subclasses `JobSettings`. The same class validates a `jobs/*.env` spec on a laptop at render
time (`load_settings(cls, read_env_file(path))`) and the pod's environment at job start
(`load_settings(cls)`), so a typo fails before a GPU is allocated. pydantic-settings ignores
unknown variables, so `load_settings` rejects every `LORAFORGE_*` name that is not a field,
with a did-you-mean suggestion, in the same message as every invalid value.
"""

from __future__ import annotations

import contextvars
import difflib
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from loraforge.errors import PermanentError
from loraforge.logs import redact_credentials
from loraforge.uri import parse_uri

PREFIX = "LORAFORGE_"
S = TypeVar("S", bound="JobSettings")

# The environment the next settings object reads (os.environ when unset).
_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "loraforge_environ", default=None
)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' env source, reading a given mapping instead of os.environ."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        if environ is None:
            return super()._load_env_vars()
        return parse_env_vars(
            environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def new_run_id() -> str:
    """`YYYYmmdd-HHMMSS-xxxx`: sortable, unique enough, valid as a Kubernetes label value."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


class JobSettings(BaseSettings):
    """Settings every job reads. Subclasses set `job` and add their own fields."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        case_sensitive=False,
        use_attribute_docstrings=True,
        validate_default=True,
        extra="forbid",
    )
    job: ClassVar[str] = "job"

    run_id: str = Field(default_factory=new_run_id, max_length=48)
    """Identifies the run: names the default output prefix and the Kubernetes Job. Lower-case
    letters, digits and '-' (a DNS label); default: the UTC time plus 4 random hex digits."""

    base_model: str = Field(min_length=1)
    """Base model: a hub id (`Qwen/Qwen2.5-0.5B-Instruct`), a local directory or an `s3://` URI."""

    base_revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model; the resolved commit is recorded."""

    output: str | None = None
    """Artifact URI this job publishes to; default `<LORAFORGE_STORE>/<run id>/<job>`."""

    store: str = ".loraforge/store"
    """Artifact store: `s3://bucket/prefix` in a cluster, a local directory or `file://` URI."""

    cache: str | None = None
    """Local cache for downloaded models and artifacts; default `~/.cache/loraforge`."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to compute: `auto` takes CUDA when a GPU is visible, else the CPU."""

    log_format: Literal["auto", "json", "text"] = "auto"
    """Log lines: `json` (one object per line, for pods), `text` (for terminals); `auto` picks
    JSON in a pod or when output is piped and text at a terminal."""

    @field_validator("run_id")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", value):
            raise ValueError("use lower-case letters, digits and '-' (e.g. qwen-lora-01)")
        return value

    @field_validator("store", "output")
    @classmethod
    def _artifact_uri(cls, value: str | None) -> str | None:
        if value is not None:
            parse_uri(value)  # raises ValueError naming what is wrong
        return value

    @property
    def output_uri(self) -> str:
        """Where this job publishes: `output`, else derived from the store, run id and job."""
        if self.output:
            return self.output
        return f"{self.store.rstrip('/')}/{self.run_id}/{self.job}"

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """`LORAFORGE_<FIELD>` -> field name, for every field."""
        return {PREFIX + name.upper(): name for name in cls.model_fields}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # env vars only: no .env file or secrets dir is read behind the spec's back
        return init_settings, _MappingEnvSource(settings_cls)

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON-able data, secrets replaced by `***`: for logs and manifests."""
        data = self.model_dump(mode="json")
        for name, value in self:
            if isinstance(value, SecretStr):
                data[name] = "***" if value.get_secret_value() else ""
        data["output"] = self.output_uri
        return data

    def secret_values(self) -> list[str]:
        return [v.get_secret_value() for _, v in self if isinstance(v, SecretStr)]


def unknown_names(cls: type[JobSettings], environ: Mapping[str, str]) -> list[str]:
    """Problems for `LORAFORGE_*` names that are not fields of `cls`, with suggestions."""
    known = cls.env_names()
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper in known:
            continue
        if "TRUST_REMOTE_CODE" in upper:
            problems.append(
                f"{name}: loraforge never runs a model's own code (trust_remote_code is always "
                "False): use a model whose architecture transformers ships"
            )
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"the {cls.job} job has no such setting"
        problems.append(f"{name} is not a setting of the {cls.job} job ({hint})")
    return problems


def _describe(cls: type[JobSettings], error: Mapping[str, Any]) -> str:
    msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if msg[:2].istitle():  # "Input should be ..." reads "input should be ..." after a colon
        msg = msg[0].lower() + msg[1:]
    loc = error.get("loc") or ()
    if not loc:  # a check across fields: its message names the variables itself
        return msg
    field = str(loc[0])
    env = PREFIX + field.upper()
    info = cls.model_fields.get(field)
    doc = re.split(r"\.\s", info.description or "")[0] if info else ""
    if error.get("type") == "missing":
        return f"{env} is required ({doc})" if doc else f"{env} is required"
    secret = info is not None and info.annotation in (SecretStr, SecretStr | None)
    value = "***" if secret else redact_credentials(str(error.get("input")))
    return f"{env}={value}: {msg}"


def load_settings(cls: type[S], environ: Mapping[str, str] | None = None) -> S:
    """Build `cls` from `environ` (default os.environ); every problem is reported in one error."""
    environ = dict(os.environ if environ is None else environ)
    problems = unknown_names(cls, environ)
    token = _ENVIRON.set(environ)
    try:
        settings = cls()
    except ValidationError as exc:
        problems += [_describe(cls, err) for err in exc.errors()]
        settings = None
    finally:
        _ENVIRON.reset(token)
    if problems or settings is None:
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise PermanentError(f"{cls.job} settings: {count}: " + "; ".join(problems))
    return settings


_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def read_env_file(path: str | Path) -> dict[str, str]:
    """Parse a `jobs/*.env` spec: `NAME=value` lines, `#` comments, optional quotes."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PermanentError(f"{path}: cannot read the job spec ({exc})") from exc
    environ: dict[str, str] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if not match:
            raise PermanentError(f"{path}:{number}: expected NAME=value, got {line[:60]!r}")
        name, value = match.groups()
        environ[name] = _unquote(value.strip())
    return environ


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value.split(" #")[0].rstrip()  # trailing comment on an unquoted value
