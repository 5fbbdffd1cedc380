"""The train job (`loraforge-train`): settings -> inputs -> run -> publish. Built in issue #4."""

from __future__ import annotations

from loraforge.errors import PermanentError
from loraforge.runner import JobContext, job_main
from loraforge.settings import TrainSettings


def run(settings: TrainSettings, ctx: JobContext) -> None:
    raise PermanentError(
        f"the train job is not implemented yet (issue #4); settings for run {settings.run_id} "
        "validated, nothing was written"
    )


def main() -> None:
    job_main(TrainSettings, run)
