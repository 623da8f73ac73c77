"""docs/configuration.md, written from the schema's own help texts (spectraqlora/config.py): every
key of `python -m spectraqlora.train`, its type, default, meaning and allowed range.

    python scripts/config_docs.py           # write the page
    python scripts/config_docs.py --check   # exit 1 if the page is not what the schema gives (a test runs this)
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
import typing
from pathlib import Path

from omegaconf import MISSING

from spectraqlora.config import SELECTIONS, EvaluateConfig, ExportConfig, SelectionConfig, TrainConfig
from spectraqlora.sweep.schema import SpectraOptunaSweeperConf

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HEADER = """# Configuration

Every key `python -m spectraqlora.train`, `export`, `evaluate` and the sweeper take, as their schemas
(`spectraqlora/config.py`, `spectraqlora/sweep/schema.py`) declare them.
This page is written by `python scripts/config_docs.py` from the schema's help texts; a test fails
when it is stale. Set a key on the command line (`lora.r=16`) or pick a preset of its group
(`lora=default`, see [getting started](getting-started.md#config-groups-conf)); a key that is not
here is refused while composing, a value outside its range before anything loads.
"""


def type_name(tp) -> str:
    """A field's type as a user types it: `int`, `int or null`, `one of nf4, fp4, ...`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp is typing.Any:
        return "any"
    if typing.get_origin(tp) is typing.Union:
        return f"{type_name(args[0])} or null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.value for m in tp)
    if typing.get_origin(tp) in (list, typing.List):
        return f"list of {type_name(args[0])}"
    if typing.get_origin(tp) in (dict, typing.Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is MISSING:
        return "(required)"
    if isinstance(value, enum.Enum):
        value = value.value
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section(cls, prefix: str = "", title: str = "", skip: set[str] = frozenset()) -> list[str]:
    """One table for the plain keys of `cls` (but `skip`), then one section per nested schema;
    the selection group, one per strategy (each strategy's schema is its own)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    rows = [f for f in fields if not dataclasses.is_dataclass(hints[f.name]) and "help" in f.metadata
            and f.name not in skip]
    lines = []
    if rows:
        title = title or prefix.rstrip(".")
        doc = (cls.__doc__ or "").strip()
        lines += [f"## {title}", ""] + ([" ".join(doc.split()), ""] if doc and not doc.startswith(cls.__name__ + "(") else [])
        lines += ["| key | type | default | meaning | allowed |", "|---|---|---|---|---|"]
        for f in rows:
            check = f.metadata.get("check")
            lines.append(f"| `{prefix}{f.name}` | {cell(type_name(hints[f.name]))} | `{cell(default_text(f))}` | "
                         f"{cell(f.metadata.get('help', ''))} | {cell(check[1]) if check else ''} |")
        lines.append("")
    for f in fields:
        if hints[f.name] is SelectionConfig:
            lines += selection_sections(f"{prefix}{f.name}.")
        elif dataclasses.is_dataclass(hints[f.name]):
            lines += section(hints[f.name], f"{prefix}{f.name}.")
    return lines


def selection_sections(prefix: str) -> list[str]:
    """The keys every strategy takes, then each strategy's own (selection=<strategy> picks them)."""
    common = {f.name for f in dataclasses.fields(SelectionConfig)}
    lines = section(SelectionConfig, prefix, "selection (every strategy)")
    for strategy, schema in SELECTIONS.items():
        lines += section(schema, prefix, f"selection={strategy.value}", skip=common)
    return lines


COMMANDS = [  # (schema, the title of its top-level keys)
    (TrainConfig, "python -m spectraqlora.train: top-level keys"),
    (ExportConfig, "python -m spectraqlora.export"),
    (EvaluateConfig, "python -m spectraqlora.evaluate"),
    (SpectraOptunaSweeperConf, "hydra.sweeper (hydra/sweeper=spectraqlora_optuna)"),
]


def render() -> str:
    lines = [line for cls, title in COMMANDS
             for line in section(cls, "hydra.sweeper." if cls is SpectraOptunaSweeperConf else "", title)]
    return HEADER + "\n" + "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale; write nothing")
    parser.add_argument("--page", type=Path, default=PAGE, help=f"the page (default: {PAGE})")
    args = parser.parse_args()
    page = render()
    if args.check:
        if not args.page.is_file() or args.page.read_text() != page:
            sys.exit(f"{args.page} is stale: run python scripts/config_docs.py")
        return
    args.page.write_text(page)
    print(f"wrote {args.page}")


if __name__ == "__main__":
    main()
