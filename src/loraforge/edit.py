"""The edit job (`loraforge-edit`): settings -> inputs -> run -> publish. Built in issue #5."""

from __future__ import annotations

from loraforge.errors import PermanentError
from loraforge.runner import JobContext, job_main
from loraforge.settings import EditSettings


def run(settings: EditSettings, ctx: JobContext) -> None:
    raise PermanentError(
        f"the edit job is not implemented yet (issue #5); settings for run {settings.run_id} "
        "validated, nothing was written"
    )


def main() -> None:
    job_main(EditSettings, run)
