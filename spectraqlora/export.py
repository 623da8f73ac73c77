"""`python -m spectraqlora.export run_dir=<finished run dir>`: what a run trained, as a standalone
transformers checkpoint (the adapter merged into the base) or as the adapter alone, with a
Hugging Face model card; checked against what the run evaluated before anything is kept.

Merging (peft's merge_and_unload on a float base, the library's own path):
- base=dequantized (default): the base as training saw it, the 4-bit weights dequantized
  (transformers' `dequantize`); the merged model reproduces the run's eval loss.
- base=original: the full-precision checkpoint; what users often want for quality, not
  what was trained against, so its eval loss differs a little.

The output is written into a temporary dir beside `out` and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import re
import shutil
import tempfile
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig, OmegaConf

from spectraqlora import cli
from spectraqlora.config import (
    CONF_DIR,
    EXPORT_BASES,
    ExportConfig,
    TrainConfig,
    checked,
    load_run_config,
    show_progress,
)
from spectraqlora.errors import UserError, exit_on_user_error
from spectraqlora.store import rundir

log = logging.getLogger("spectraqlora.export")

EXPORT = "export.json"
LOSS_TOLERANCE = 1e-3  # relative: the dequantized merge must reproduce the run's eval loss


def export_run(run_dir: Path | None, out: Path | None = None, **options) -> Path:
    """Write the export of a finished run; returns where it is. `options`: the other keys of
    ExportConfig (the schema holds their defaults and ranges)."""
    opts = checked(ExportConfig(run_dir=run_dir, out=out, **options))
    run_dir = rundir.finished_run(run_dir and Path(run_dir), "export")
    dtype, base, adapter_only = opts.dtype, opts.base, opts.adapter_only
    if adapter_only and (base != EXPORT_BASES[0] or dtype is not None):
        given = " ".join(f"{k}={v}" for k, v in (("base", base), ("dtype", dtype)) if v not in (EXPORT_BASES[0], None))
        raise UserError(f"adapter_only=true copies the adapter as trained, with no base to merge into: "
                        f"{given} has nothing to act on; drop it")
    cfg = load_run_config(run_dir)
    out = Path(out) if out else run_dir / ("adapter_export" if adapter_only else "merged")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out={out} exists and is not empty: remove it, or give out=<new dir>")
    from spectraqlora.run import telemetry  # torch: after the checks
    from spectraqlora.store import checkpoint

    telemetry.configure_progress(show_progress(cfg.logger))  # piped: plain lines, no bars

    path = checkpoint.resolve(cfg.model)
    check_base_unchanged(run_dir, path)
    with rundir.building(out) as tmp:
        if adapter_only:
            for file in (run_dir / rundir.ADAPTER).iterdir():
                shutil.copy2(file, tmp / file.name)
            checks = {}
        else:
            checks = merge(cfg, run_dir, tmp, dtype or cfg.model.dtype, base, opts.check_rows, opts.allow_pickle,
                           opts.loss_rows)
        rundir.write_text(tmp / "README.md", model_card(cfg, run_dir, adapter_only, base, checks))
        rundir.write_json(tmp / EXPORT, {"run_dir": str(run_dir), "adapter_only": adapter_only,
                                         **({"base": base, "dtype": dtype or cfg.model.dtype} if not adapter_only else {}),
                                         **checks})
    log.info("exported %s to %s", run_dir, out)
    return out


def check_base_unchanged(run_dir: Path, path: Path) -> None:
    """The base checkpoint must be the one the adapter was trained on (its identity, as the scan
    cache keys it, recorded in selection.json)."""
    from spectraqlora.spectrum.cache import identity
    from spectraqlora.store import checkpoint

    recorded = rundir.read_json(run_dir / rundir.SELECTION).get("base")
    if recorded is None:
        raise UserError(f"{run_dir}/{rundir.SELECTION} does not record its base checkpoint (a run "
                        f"trained before spectraqlora recorded it): retrain to export it")
    if identity(checkpoint.safetensors_files(path)) != recorded["identity"]:
        raise UserError(f"the base checkpoint {path} changed since {run_dir} was trained on it: "
                        f"the adapter would be merged into other weights")


def merge(cfg: TrainConfig, run_dir: Path, out: Path, dtype: str, base: str, check_rows: int,
          allow_pickle: bool, loss_rows: int | None = 64) -> dict:
    """The merged checkpoint written to out; the checks (export.json's figures): logits on
    check_rows eval rows, and the eval loss on the first loss_rows of them against the adapter on
    the 4-bit base (null: on the whole split, against the loss the run recorded)."""
    import torch
    from datasets import DatasetDict

    from spectraqlora.data import batching, dataset
    from spectraqlora.run import build, modeling

    inputs = build.load_inputs(cfg)
    tokenizer, num_labels = inputs.tokenizer, dataset.num_labels(inputs.raw, cfg.dataset, cfg.model.task)
    tokenized, choices = inputs.tokenized(cfg, splits=("eval",))
    whole = loss_rows is None or loss_rows >= len(tokenized["eval"])
    if not whole:  # the loss on a bounded number of rows: the same rows for both models, no scoring
        tokenized, choices = DatasetDict(eval=tokenized["eval"].select(range(loss_rows))), None
    rows = batching.collator(tokenizer, cfg.model.task)(
        [tokenized["eval"][i] for i in range(min(check_rows, len(tokenized["eval"])))])
    rows.pop("labels")

    trained = build.trained_model(inputs, cfg, run_dir / rundir.ADAPTER, allow_pickle)
    with torch.no_grad():
        reference = trained(**rows).logits.float()
    recorded = rundir.read_json(run_dir / rundir.METRICS)["eval_loss"]
    before = recorded if whole else _evaluate(trained, tokenized, None, tokenizer, cfg)["eval_loss"]
    if base == "dequantized":
        float_base = trained.unload()  # the 4-bit base without the adapter's layers
        float_base.dequantize(dtype=getattr(torch, dtype))
    else:
        del trained
        gc.collect()
        float_base = build.base_model(inputs, dataclasses.replace(cfg, quant=_no_quant()))
    merged = modeling.load_adapter(float_base, run_dir / rundir.ADAPTER, allow_pickle).merge_and_unload()
    merged.to(getattr(torch, dtype))
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del merged, float_base
    gc.collect()

    as_saved = dataclasses.replace(cfg.model, dtype=dtype)
    reloaded = modeling.load_base(out, as_saved, _no_quant(), tokenizer, num_labels)  # as users load it
    with torch.no_grad():
        max_diff = float((reloaded(**rows).logits.float() - reference).abs().max())
    metrics = _evaluate(reloaded, tokenized, choices, tokenizer, cfg)
    rel = abs(metrics["eval_loss"] - before) / abs(before)
    against = "the run's eval loss" if whole else "the adapter on the 4-bit base"
    checks = {"check_rows": len(rows["input_ids"]), "max_logit_diff": max_diff, "loss_rows": len(tokenized["eval"]),
              **{f"merged_{k}": v for k, v in metrics.items()}, "reference_eval_loss": before,
              "reference": against, "run_eval_loss": recorded, "eval_loss_rel_diff": rel}
    log.info("merged (%s base, %s): largest logit difference on %d eval rows %.3g; eval loss on %d rows %.6f "
             "(%s %.6f, relative difference %.2g)", base, dtype, checks["check_rows"], max_diff,
             checks["loss_rows"], metrics["eval_loss"], against, before, rel)
    if base == "dequantized" and rel > LOSS_TOLERANCE:
        raise UserError(f"the merged model's eval loss {metrics['eval_loss']:.6f} differs from "
                        f"{against} ({before:.6f}) by {rel:.2g} relative (more than {LOSS_TOLERANCE}): "
                        f"not exported")
    return checks


def _no_quant():
    from spectraqlora.config import Quant, QuantConfig

    return QuantConfig(mode=Quant.none)


def _evaluate(net, tokenized, choices, tokenizer, cfg: TrainConfig) -> dict:
    from spectraqlora.run import loop

    with tempfile.TemporaryDirectory(prefix="spectraqlora-export-") as scratch:
        trainer = loop.build_trainer(net, tokenized, tokenizer, cfg, Path(scratch), choices=choices)
        return loop.evaluate(trainer, cfg.model.task)


def model_card(cfg: TrainConfig, run_dir: Path, adapter_only: bool, base: str, checks: dict) -> str:
    """A Hugging Face model card: YAML front matter, then what was trained, how, and how well."""
    selection = rundir.read_json(run_dir / rundir.SELECTION)
    metrics = rundir.read_json(run_dir / rundir.METRICS)
    table = rundir.read_json(run_dir / rundir.SNR) if (run_dir / rundir.SNR).is_file() else {}
    base_dir = Path(selection.get("base", {}).get("path", cfg.model.name_or_path))
    hub_id = cfg.model.hub_id or (cfg.model.name_or_path if _is_hub_id(cfg.model.name_or_path) else None)
    gguf = _gguf_origin(base_dir)
    front = {**({"base_model": hub_id} if hub_id else {}),  # the hub refuses a local path here
             "library_name": "peft" if adapter_only else "transformers",
             "tags": ["spectraqlora", "lora", "qlora", f"selection-{selection['strategy']}"]}
    if license_ := cfg.model.license or _license(base_dir) or gguf.get("license"):
        front["license"] = license_
    if _is_hub_id(cfg.dataset.path):
        front["datasets"] = [cfg.dataset.path]
    model_name = hub_id or Path(cfg.model.name_or_path).name
    modules = selection["modules"]
    ranks = selection.get("ranks") or {}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {model_name} fine-tuned on {cfg.dataset.name} with spectraqlora", "",
             ("The LoRA adapter alone (peft, safetensors): load it over the base model, or serve "
              "several adapters over one base." if adapter_only else
              f"A standalone checkpoint: the LoRA adapter merged into the {base} base "
              f"({'its 4-bit weights dequantized, as training saw them' if base == 'dequantized' else 'full-precision weights'}); "
              f"loads with plain transformers, no peft or bitsandbytes."), "",
             "## Training", "",
             f"- Base model: `{model_name}` ({cfg.model.task.value}), quantized `{cfg.quant.mode.value}` "
             f"during training" + (f"; its weights dequantized to float32 from the GGUF `{gguf['file']}` "
                                   f"(sha256 {gguf['sha256'][:12]}), close to, not equal to, the original"
                                   if gguf else ""),
             f"- Dataset: `dataset={cfg.dataset.name}` ({_source(cfg.dataset.path)}), max_length {cfg.dataset.max_length}",
             f"- Selection: `{selection['strategy']}`{_knobs(selection)}: {len(modules)} adapted modules",
             f"- LoRA: r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}"
             + (" (ranks by SNR, below)" if ranks else ""),
             f"- Steps: {metrics['train_steps']}, learning rate {cfg.trainer.learning_rate}, "
             f"batch {cfg.trainer.per_device_train_batch_size}, seed {cfg.seed}", "",
             "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {k.removeprefix('eval_')} | {metrics[k + '_before']:.4f} | {metrics[k]:.4f} |" if k + "_before" in metrics
              else f"| {k.removeprefix('eval_')} | (not evaluated) | {metrics[k]:.4f} |"
              for k in metrics if k.startswith("eval_") and not k.endswith("_before")]
    if checks:
        lines += ["", f"Merged model, checked by `spectraqlora.export`: eval loss {checks['merged_eval_loss']:.6f} "
                      f"on {checks['loss_rows']} eval rows ({checks['reference']}: {checks['reference_eval_loss']:.6f}); "
                      f"largest logit difference from the "
                      f"adapter on the 4-bit base over {checks['check_rows']} eval rows: {checks['max_logit_diff']:.3g}."]
    lines += ["", "## Adapted modules", "", "| module | type | SNR | rank |", "|---|---|---|---|"]
    for name in modules:
        row = table.get(name, {})
        snr = row.get("snr")
        lines.append(f"| {name} | {row.get('type', '')} | {'' if snr is None else f'{snr:.4f}'} | "
                     f"{ranks.get(name, cfg.lora.r)} |")
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    lines += ["", "## Reproduce", "", "```bash", " ".join(["python -m spectraqlora.train", *overrides]), "```", ""]
    return "\n".join(lines)


def _is_hub_id(name: str) -> bool:
    """`org/name` as the hub spells ids, not a path on this machine."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def _knobs(selection: dict) -> str:
    """`, top_frac 0.25`: the strategy's keys that say how much it keeps, as selection.json has them."""
    counted = any(selection.get(k) is not None for k in ("num_modules", "layers", "last_k"))  # top_frac unread
    return "".join(f", {k} {selection[k]}" for k in ("top_frac", "num_modules", "snr_cutoff", "layers", "last_k",
                                                     "min_layer")
                   if selection.get(k) is not None and not (k == "top_frac" and counted))


def _source(path: str) -> str:
    """Where a dataset came from, said without this machine's paths: a package's file by its
    package, a hub id as it is, a local file by its name."""
    parts = Path(path).parts
    if "site-packages" in parts:
        return f"the file `{'/'.join(parts[parts.index('site-packages') + 1:])}` its package ships"
    return f"`{path}`" if _is_hub_id(path) or path == "synthetic" else f"the local file `{Path(path).name}`"


def _gguf_origin(checkpoint_dir: Path) -> dict:
    """For a checkpoint converted from a GGUF (its gguf.json): the file's name and sha256, and
    the license its metadata names (general.license)."""
    from spectraqlora.store.checkpoint import GGUF_MARK

    mark = checkpoint_dir / GGUF_MARK
    if not mark.is_file():
        return {}
    done = rundir.read_json(mark)
    origin = {"file": Path(done["gguf"]).name, "sha256": done["sha256"]}
    try:
        from gguf import GGUFReader

        field = GGUFReader(done["gguf"]).fields.get("general.license")
        if field is not None:
            origin["license"] = bytes(field.parts[field.data[0]]).decode()
    except (ImportError, OSError, ValueError):
        pass  # the file moved or gguf is absent: the card goes without its license
    return origin


def _license(checkpoint_dir: Path) -> str | None:
    """The license in the base checkpoint's own model card front matter, if it has one."""
    card = checkpoint_dir / "README.md"
    if not card.is_file():
        return None
    text = card.read_text()
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---")[1])
    except yaml.YAMLError:
        return None
    return front.get("license") if isinstance(front, dict) else None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        export_run(**dataclasses.asdict(OmegaConf.to_object(cfg)))


def main() -> None:
    cli.run(hydra_main, "export")


if __name__ == "__main__":
    main()
