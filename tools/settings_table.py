"""The service's settings as a Markdown table, generated from `app.config.Settings` (the one settings class), for
docs/operations.md. `python -m tools.settings_table` prints it; tests/test_docs.py checks the doc holds it."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import SecretStr


def _default(value) -> str:
    if value is None or isinstance(value, SecretStr):
        return "(none)"
    if isinstance(value, Path):
        root = Path(__file__).resolve().parent.parent
        value = value.relative_to(root) if value.is_relative_to(root) else value
    return f"`{json.dumps(value) if isinstance(value, bool) else value}`"


def settings_table() -> str:
    from app.config import Settings

    prefix = Settings.model_config["env_prefix"]
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name.upper()}` | {_default(field.default)} | {text} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
