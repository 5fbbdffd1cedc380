"""Progress lines: step, loss, tokens/s and ETA as JSON fields in a pod, one line in a terminal."""

from __future__ import annotations

import io
import json
import logging

from loraforge.logs import Progress, format_eta, setup_logging


def test_progress_emits_machine_readable_fields(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = iter([100.0, 102.0])
    monkeypatch.setattr("loraforge.logs.time.monotonic", lambda: next(clock))
    stream = io.StringIO()
    setup_logging("json", stream=stream)
    progress = Progress(logging.getLogger("loraforge.train"), total=10)
    progress.update(step=2, tokens=4000, force=True, loss=1.25)
    line = json.loads(stream.getvalue())
    assert line["event"] == "progress"
    assert (line["step"], line["total_steps"], line["loss"]) == (2, 10, 1.25)
    assert line["tokens_per_s"] == 2000.0  # 4000 tokens in 2 s
    assert line["eta_s"] == 8.0  # 2 steps took 2 s; 8 remain


def test_progress_text_is_one_readable_line(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = iter([0.0, 4.0])
    monkeypatch.setattr("loraforge.logs.time.monotonic", lambda: next(clock))
    stream = io.StringIO()
    setup_logging("text", stream=stream)
    Progress(logging.getLogger("loraforge.train"), total=100).update(4, 1000, force=True, loss=2.0)
    text = stream.getvalue().strip()
    assert text.endswith("step 4/100  loss 2  250 tok/s  ETA 1m36s")
    assert "\n" not in text


def test_eta_format() -> None:
    assert (format_eta(59), format_eta(61), format_eta(3 * 3600 + 120)) == (
        "0m59s",
        "1m01s",
        "3h02m",
    )
