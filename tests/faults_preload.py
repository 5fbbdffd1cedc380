"""Imported once by the fault suite's fork server, so that each forked job starts in ~0.5 s.

A module that does not import (another part mid-edit, an optional extra missing) is skipped:
the job that needs it imports it in its own process and reports the error there.
"""

from __future__ import annotations

import contextlib
import importlib

MODULES = (
    "torch",
    "transformers",
    "peft",
    "safetensors.torch",
    "boto3",
    "matplotlib",
    "loraforge.train",
    "loraforge.bidora",
    "loraforge.edit",
    "loraforge.eval",
    "loraforge.engines.transformers_engine",
    "loraforge.launcher.cli",
    "tests.faults",
)

for _name in MODULES:
    with contextlib.suppress(Exception):
        importlib.import_module(_name)
