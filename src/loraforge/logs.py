"""Logging for jobs: JSON lines in a pod, readable lines in a terminal, secrets scrubbed from both.

Every record passes `SecretScrubber`, which replaces the values of secret environment variables
(AWS keys, tokens, passwords) and of `SecretStr` settings with `***`, wherever they appear in
the message or its fields, and anything shaped like a credential whatever its source: the
`user:password@` of a URI, a presigned URL's signature, an AWS key id, a Hugging Face token.
Progress of long work goes through `Progress`, which logs step, loss, tokens/s and ETA as fields,
so a pod's log is machine-readable and a terminal shows one line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TextIO

LogFormat = Literal["auto", "json", "text"]

REDACTED = "***"
# Names of environment variables whose values are secrets.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|_KEY$|_KEY_ID$|API_KEY")
_MIN_SECRET_LEN = 4  # shorter values would blank out ordinary words
# A value shaped like a credential, whatever the name: AWS key ids, Hugging Face tokens,
# user:password@ in a URI (the launcher refuses a spec holding one).
CREDENTIAL_VALUE = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bhf_[A-Za-z0-9]{30,}\b|://[^/\s:@]+:[^/\s@]+@"
)
# What of a credential-shaped text is replaced: a URI's user:password, a presigned URL's
# signature, credential and token parameters, AWS key ids, Hugging Face tokens.
_CREDENTIAL_PARTS = (
    (re.compile(r"(://)[^/\s:@]+:[^/\s@]+@"), r"\1***@"),
    (re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s]+", re.I), r"\1***"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bhf_[A-Za-z0-9]{30,}\b"), REDACTED),
)
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables whose names mark them as secrets."""
    environ = os.environ if environ is None else environ
    return [v for k, v in environ.items() if SECRET_NAME.search(k.upper()) and v]


class SecretScrubber(logging.Filter):
    """Replaces known secret values in every record (message, args and extra fields)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        self._secrets.update(s for s in secrets if len(s) >= _MIN_SECRET_LEN)

    def scrub(self, text: str) -> str:
        # longest first, so a secret containing another is replaced whole
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        return redact_credentials(text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.scrub(record.getMessage())
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS:
                setattr(record, key, self._scrub_value(value))
        return True

    def _scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._scrub_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub_value(v) for v in value]
        return value


def redact_credentials(text: str) -> str:
    """`text` with every credential-shaped part replaced by `***`."""
    for pattern, replacement in _CREDENTIAL_PARTS:
        text = pattern.sub(replacement, text)
    return text


def scrub(text: str) -> str:
    """`text` without the values of secret environment variables or credential-shaped parts: for
    lines that do not go through a logger (termination log, the CLI's error line)."""
    return SecretScrubber(secret_env_values()).scrub(text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`HH:MM:SS level  message  key=value ...` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = _fields(record)
        if fields.pop("event", None) == "progress":
            fields = {}  # the message already says it all
        extra = "  ".join(f"{k}={_short(v)}" for k, v in fields.items() if k != "settings")
        text = f"{stamp} {record.levelname.lower():<7} {record.getMessage()}"
        if extra:
            text += f"  {extra}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def resolve_format(fmt: LogFormat, stream: TextIO) -> Literal["json", "text"]:
    """`auto` is JSON in a pod or when piped, text at a terminal."""
    if fmt != "auto":
        return fmt
    in_pod = "KUBERNETES_SERVICE_HOST" in os.environ
    return "text" if stream.isatty() and not in_pod else "json"


def setup_logging(
    fmt: LogFormat = "auto", level: int = logging.INFO, stream: TextIO | None = None
) -> SecretScrubber:
    """Configure the `loraforge` logger once per process; returns its scrubber to add secrets to."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    resolved = resolve_format(fmt, stream)
    handler.setFormatter(JsonFormatter() if resolved == "json" else TextFormatter())
    scrubber = SecretScrubber(secret_env_values())
    handler.addFilter(scrubber)
    root = logging.getLogger("loraforge")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return scrubber


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Logs step, loss, tokens/s and ETA of a loop of `total` steps, at most every `every_s`."""

    def __init__(
        self, logger: logging.Logger, total: int, every_s: float = 10.0, start_step: int = 0
    ) -> None:
        self.logger, self.total, self.every_s = logger, total, every_s
        self._t0 = self._last = time.monotonic()
        self._start_step = start_step
        self._tokens = 0

    def update(self, step: int, tokens: int, force: bool = False, **metrics: float) -> None:
        """Record that `step` finished after processing `tokens` more tokens."""
        self._tokens += tokens
        now = time.monotonic()
        if not force and now - self._last < self.every_s and step < self.total:
            return
        self._last = now
        elapsed = max(now - self._t0, 1e-9)
        done = max(step - self._start_step, 1)
        eta_s = elapsed / done * (self.total - step)
        fields = {"event": "progress", "step": step, "total_steps": self.total}
        fields |= {"tokens_per_s": round(self._tokens / elapsed, 1), "eta_s": round(eta_s, 1)}
        fields |= {k: float(v) for k, v in metrics.items()}
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.logger.info(
            f"step {step}/{self.total}  {shown}  {self._tokens / elapsed:,.0f} tok/s  "
            f"ETA {format_eta(eta_s)}",
            extra=fields,
        )
