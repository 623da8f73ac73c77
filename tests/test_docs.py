"""The docs: the configuration page is what the schema says, and the site builds with no broken
link or missing page (mkdocs build --strict)."""
import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from spectraqlora.config import SELECTIONS, EvaluateConfig, ExportConfig, SelectionConfig, TrainConfig
from spectraqlora.sweep.schema import SpectraOptunaSweeperConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOCS = [sys.executable, str(ROOT / "scripts" / "config_docs.py")]


def keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if hints[f.name] is SelectionConfig:  # every strategy's schema
            for schema in SELECTIONS.values():
                yield from keys(schema, f"{prefix}{f.name}.")
        elif dataclasses.is_dataclass(hints[f.name]):
            yield from keys(hints[f.name], f"{prefix}{f.name}.")
        elif "help" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata["help"]


def test_the_configuration_page_lists_every_key_with_its_help_and_is_current(tmp_path):
    page = (ROOT / "docs" / "configuration.md").read_text()
    listed = [*keys(TrainConfig), *keys(ExportConfig), *keys(EvaluateConfig),
              *keys(SpectraOptunaSweeperConf, "hydra.sweeper.")]
    assert len(listed) > 90 and "hydra.sweeper.confirm.top_k" in dict(listed)
    for key, help_text in listed:
        assert f"| `{key}` |" in page, key
        assert help_text.replace("|", "\\|") in page, key
    assert subprocess.run([*CONFIG_DOCS, "--check"], capture_output=True).returncode == 0
    stale = tmp_path / "configuration.md"
    stale.write_text(page.replace("| `lora.r` |", "| `lora.rank` |"))
    result = subprocess.run([*CONFIG_DOCS, "--check", "--page", str(stale)], capture_output=True, text=True)
    assert result.returncode == 1 and "is stale: run python scripts/config_docs.py" in result.stderr


def test_the_site_builds_strict_and_its_home_is_the_readme(tmp_path):
    pytest.importorskip("material", reason="the [docs] extra (mkdocs-material) is not installed")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(site)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    home = (site / "index.html").read_text()
    assert "QLoRA that trains only the layers that matter" in home
    assert 'href="configuration/"' in home  # the README's docs/configuration.md, relative on the site
    for page in ("getting-started", "configuration", "selection", "data", "runs", "sweeps", "results",
                 "benchmarks", "architecture"):
        assert (site / page / "index.html").is_file(), page
