"""spectraqlora.export: a finished run as a standalone checkpoint that plain transformers loads
(peft and bitsandbytes never imported) and that reproduces the run's eval loss."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import run_cli
from spectraqlora import rundir
from spectraqlora.errors import UserError
from spectraqlora.export import export_run

# In a fresh interpreter: the merged checkpoint through transformers alone, its eval loss over the
# run's eval split computed as the Trainer does (the batch mean loss, weighted by batch size).
RELOAD = """
import json, sys, torch, transformers
from spectraqlora import batching, data
from spectraqlora.config import load_run_config
run_dir, merged = sys.argv[1], sys.argv[2]
cfg = load_run_config(run_dir)
auto = {"classification": transformers.AutoModelForSequenceClassification,
        "causal_lm": transformers.AutoModelForCausalLM}[cfg.model.task.value]
net = auto.from_pretrained(merged).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
rows = data.tokenize(data.load(cfg.dataset, cfg.model.task, cfg.seed), tokenizer, cfg.dataset, cfg.model.task)["eval"]
collate, size = batching.collator(tokenizer, cfg.model.task), cfg.trainer.per_device_eval_batch_size
total = 0.0
with torch.no_grad():
    for i in range(0, len(rows), size):
        batch = collate([rows[j] for j in range(i, min(i + size, len(rows)))])
        total += float(net(**batch).loss) * len(batch["input_ids"])
print(json.dumps({"eval_loss": total / len(rows), "peft": "peft" in sys.modules,
                  "bitsandbytes": "bitsandbytes" in sys.modules, "dtype": str(net.dtype)}))
"""


def reload_without_peft(run_dir, merged) -> dict:
    result = subprocess.run([sys.executable, "-c", RELOAD, str(run_dir), str(merged)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smoke_run", "default_run"])  # tiny_llama LM, MiniLM classifier
def test_a_merged_run_loads_without_peft_and_reproduces_its_eval_loss(which, request, tmp_path):
    run_dir, _ = request.getfixturevalue(which)
    if which == "smoke_run":  # as a user types it
        result = run_cli("export", f"run_dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        export_run(run_dir)
    merged = run_dir / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and not any("peft" in k for k in config)
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer_config.json").is_file()
    if which == "smoke_run":
        assert (merged / "generation_config.json").is_file()
    recorded = json.loads((run_dir / "metrics.json").read_text())["eval_loss"]
    checks = json.loads((merged / "export.json").read_text())
    assert checks["base"] == "dequantized" and checks["eval_loss_rel_diff"] < 1e-3
    assert checks["merged_eval_loss"] == pytest.approx(recorded, rel=1e-3)
    assert checks["max_logit_diff"] < 1e-3 * max(1.0, abs(recorded))
    plain = reload_without_peft(run_dir, merged)
    assert not plain["peft"] and not plain["bitsandbytes"]
    assert plain["eval_loss"] == pytest.approx(recorded, rel=1e-3)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".merged.")]  # no temp dir left


def test_the_model_card_says_what_was_trained_and_how_to_reproduce_it(smoke_run):
    run_dir, _ = smoke_run
    out = export_run(run_dir, run_dir / "card_only", adapter_only=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                       "adapter_model.safetensors", "export.json"]
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and "spectraqlora" in front["tags"]
    assert front["base_model"].endswith("tiny-llama-4x128")
    selection = json.loads((run_dir / "selection.json").read_text())
    for name in selection["modules"]:
        assert f"| {name} | " in card
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert "python -m spectraqlora.train " + " ".join(overrides) in card
    assert "| loss | " in card and "Selection: `spectrum`, top_frac 0.25" in card


@pytest.mark.slow
def test_the_original_base_merges_full_precision_weights(smoke_run, tmp_path):
    """base=original: the adapter over the float checkpoint, not over its 4-bit rounding."""
    from safetensors.torch import load_file

    run_dir, _ = smoke_run
    original = export_run(run_dir, tmp_path / "original", base="original")
    checks = json.loads((original / "export.json").read_text())
    assert checks["base"] == "original" and checks["eval_loss_rel_diff"] >= 0
    import torch

    selection = json.loads((run_dir / "selection.json").read_text())
    untouched = next(n for n in json.loads((run_dir / "snr.json").read_text()) if n not in selection["modules"])
    merged = load_file(original / "model.safetensors")[untouched + ".weight"]
    assert torch.equal(merged, load_file(f"{selection['base']['path']}/model.safetensors")[untouched + ".weight"])


def test_bad_exports_are_one_line_and_leave_nothing(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(UserError, match="is not a finished run: it has no metrics.json"):
        export_run(unfinished)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    with pytest.raises(UserError, match=r"export.out=.*taken exists and is not empty"):
        export_run(run_dir, taken)
    with pytest.raises(UserError, match="export.base=fused: expected one of dequantized, original"):
        export_run(run_dir, tmp_path / "a", base="fused")
    with pytest.raises(UserError, match=r"adapter_only=true copies the adapter as trained, with no base to merge "
                                        r"into: base=original dtype=bfloat16 has nothing to act on; drop it"):
        export_run(run_dir, tmp_path / "a", base="original", dtype="bfloat16", adapter_only=True)
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("merged", "card_only"))
    selection = json.loads((moved / "selection.json").read_text())
    selection["base"]["identity"] = "0" * 64  # as if the checkpoint had been rewritten since
    rundir.write_json(moved / "selection.json", selection)
    with pytest.raises(UserError, match="changed since .* was trained on it"):
        export_run(moved, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    result = run_cli("export", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: which run? python -m spectraqlora.export run_dir=<finished run dir> (e.g. outputs/<date>/<time>)"]
