"""Job specs (`jobs/*.env`): each setting written with its field's docstring as a comment.

`render_spec` writes a spec; the suite checks every shipped spec's comments against the field
docs, so a setting is documented once, under its field.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

from loraforge.settings.base import PREFIX, JobSettings


def field_comment(cls: type[JobSettings], name: str) -> list[str]:
    """The field's docstring as `# ` lines, wrapped at 98 columns."""
    doc = " ".join((cls.model_fields[name].description or "").split())
    return ["# " + line for line in textwrap.wrap(doc, 96)]


def render_spec(cls: type[JobSettings], values: Mapping[str, str], title: str) -> str:
    """`values` maps field names to the values the spec sets."""
    lines = [f"# {title}", f"# Validate: loraforge check {cls.job} --env-file <this file>", ""]
    for name, value in values.items():
        lines += field_comment(cls, name)
        lines += [f"{PREFIX}{name.upper()}={value}", ""]
    return "\n".join(lines)


def spec_comments(text: str) -> dict[str, list[str]]:
    """For each `LORAFORGE_*` assignment, the comment lines right above it."""
    found: dict[str, list[str]] = {}
    block: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            block.append(line)
        elif line.startswith(PREFIX) and "=" in line:
            found[line.split("=", 1)[0]] = block
            block = []
        else:
            block = []
    return found


def settings_table(cls: type[JobSettings]) -> str:
    """A Markdown table of the settings `cls` adds to its base (README; the suite checks it)."""
    inherited = JobSettings.model_fields if cls is not JobSettings else {}
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in cls.model_fields.items():
        if name in inherited:
            continue
        if info.is_required():
            default = "*required*"
        elif info.default_factory is not None:
            default = "*generated*" if name == "run_id" else f"`{info.default_factory()}`"  # type: ignore[call-arg]
        else:
            default = f"`{info.default}`" if info.default is not None else "-"
        doc = " ".join((info.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{PREFIX}{name.upper()}` | {default} | {doc} |")
    return "\n".join(rows)


def refresh_spec(path: Path) -> None:
    """Rewrite a shipped spec's comments from the field docs, keeping its title and values."""
    from loraforge.settings import JOB_SETTINGS
    from loraforge.settings.base import read_env_file

    cls = JOB_SETTINGS[path.name.split(".")[0]]
    title = path.read_text().splitlines()[0].removeprefix("# ")
    values = {cls.env_names()[k]: v for k, v in read_env_file(path).items()}
    path.write_text(render_spec(cls, values, title))


def refresh_readme(path: Path) -> None:
    """Replace the README's settings tables (between the markers) with fresh ones."""
    from loraforge.settings import JOB_SETTINGS

    parts = ["### Every job", "", settings_table(JobSettings), ""]
    for job, cls in JOB_SETTINGS.items():
        parts += [f"### {job} (`loraforge-{job}`)", "", settings_table(cls), ""]
    text = path.read_text()
    start, end = "<!-- settings-tables:start -->\n", "<!-- settings-tables:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(head + start + "\n".join(parts) + end + tail)


if __name__ == "__main__":  # python -m loraforge.settings.spec: refresh README and jobs/*.env
    root = Path.cwd()
    refresh_readme(root / "README.md")
    for spec in sorted((root / "jobs").rglob("*.env")):
        refresh_spec(spec)
