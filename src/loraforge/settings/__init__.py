"""One pydantic-settings class per job; importing this package never imports torch."""

from loraforge.settings.base import (
    JobSettings,
    load_settings,
    read_env_file,
    unknown_names,
)
from loraforge.settings.edit import EditSettings
from loraforge.settings.eval import EvalSettings
from loraforge.settings.train import TrainSettings

JOB_SETTINGS: dict[str, type[JobSettings]] = {
    "train": TrainSettings,
    "edit": EditSettings,
    "eval": EvalSettings,
}

__all__ = [
    "JOB_SETTINGS",
    "EditSettings",
    "EvalSettings",
    "JobSettings",
    "TrainSettings",
    "load_settings",
    "read_env_file",
    "unknown_names",
]
