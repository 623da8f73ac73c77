"""The map of docs/architecture.md holds: each stage folder imports only the stages below it, the
shared top-level modules import no stage, and hydra_plugins/ holds only the shim Hydra discovers."""
import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "spectraqlora"
ENTRYPOINTS = {"train", "scan", "evaluate", "export", "report"}  # what users type: may import anything
SHARED = {"config", "errors", "resolvers", "cli"}  # the top level every stage may import
MAY_IMPORT = {  # a stage -> the stages it may import (besides itself and SHARED)
    "store": set(),
    "spectrum": {"store"},
    "data": {"store"},
    "run": {"store", "spectrum", "data"},
    "analysis": {"store", "run"},
    "sweep": {"store", "run", "analysis"},
}


def stage(module: str) -> str:
    """spectraqlora.run.loop -> run; spectraqlora.config -> config."""
    return module.split(".")[1]


def imported(path: Path) -> set[str]:
    """Every spectraqlora module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spectraqlora"):
            found.update(f"{node.module}.{a.name}" for a in node.names)  # a module, or a name in one
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("spectraqlora."))
    return found


def test_each_stage_imports_only_the_stages_below_it():
    # the reader sees imports in every form the code uses (module, from-module, inside a function)
    assert {"spectraqlora.run.loop", "spectraqlora.spectrum.artifacts", "spectraqlora.run.build"} <= imported(
        PACKAGE / "run" / "recipe.py")
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        own = parts[0]
        if own in ENTRYPOINTS or own == "__init__":
            continue
        allowed = SHARED | {own} | MAY_IMPORT.get(own, set())
        wrong += [f"{path.relative_to(ROOT)} imports {m}" for m in sorted(imported(path)) if stage(m) not in allowed]
    assert not wrong, "\n".join(wrong)


def test_every_module_belongs_to_a_stage_the_map_names():
    unplaced = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE
                and p.relative_to(PACKAGE).parts[0] not in MAY_IMPORT]
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert not unplaced and top == ENTRYPOINTS | SHARED, (unplaced, top - ENTRYPOINTS - SHARED)
    documented = (ROOT / "docs" / "architecture.md").read_text()
    assert all(f"{name}/" in documented for name in MAY_IMPORT)


def test_hydra_plugins_holds_only_the_shim():
    shim = ROOT / "hydra_plugins" / "spectraqlora_optuna_sweeper"
    assert sorted(p.name for p in shim.glob("*.py")) == ["__init__.py", "optuna_sweeper.py"]
    for path in shim.glob("*.py"):
        assert all(stage(m) == "sweep" for m in imported(path)), path
