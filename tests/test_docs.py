"""The README is a front door and the manual lives in docs/: the README stays short and starts with its two
commands, every relative link in it and in docs/ leads to a file that exists, and the settings table in
docs/operations.md is the one generated from app/config.py's Settings."""
import re

from tests.conftest import ROOT
from tools.settings_table import settings_table

LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_the_readme_is_short_and_starts_with_its_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = re.search(r"```bash\n(.*?)```", text.split("Then, from a clone", 1)[1], re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ['pip install -e ".[openvino]" && monet-serve', 'pip install -e ".[dev]" && python -m pytest -q']
    # the CPU-or-GPU choice comes before the first install command
    assert text.index("download.pytorch.org/whl/cpu") < text.index('pip install -e ".[openvino]"')


def test_every_relative_link_of_the_readme_and_the_docs_exists():
    pages = [ROOT / "README.md", ROOT / "weights" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        for target, _ in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing
    linked = set(LINK.findall((ROOT / "README.md").read_text()))
    for doc in ("service.md", "training.md", "operations.md", "benchmarks.md", "architecture.md"):
        assert any(t.endswith(f"docs/{doc}") for t, _ in linked), f"the README does not link docs/{doc}"


def test_the_settings_table_is_generated_from_settings():
    from app.config import Settings

    table = settings_table()
    assert table in (ROOT / "docs" / "operations.md").read_text(), "run python -m tools.settings_table"
    assert len(table.splitlines()) == 2 + len(Settings.model_fields)
    assert all(field.description for field in Settings.model_fields.values()), "every setting says what it does"
