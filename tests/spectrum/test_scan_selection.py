import json

import pytest
import torch
from safetensors.torch import save_file

from spectraqlora.config import Strategy, selection_config
from spectraqlora.errors import UserError
from spectraqlora.spectrum.scanner import compute
from spectraqlora.spectrum.selection import restrict_types, select, spectrum
from spectraqlora.spectrum.snr import spectrum_snr
from spectraqlora.store.checkpoint import safetensors_files


def bert_like(tmp_path, layers=4):
    """A checkpoint whose `attention.output.dense` and `output.dense` must stay two types."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"embeddings.word_embeddings.weight": torch.randn(50, 16, generator=gen)}
    for i in range(layers):
        for suffix in ("attention.self.query", "attention.output.dense", "output.dense"):
            tensors[f"encoder.layer.{i}.{suffix}.weight"] = torch.randn(16, 16, generator=gen)
            tensors[f"encoder.layer.{i}.{suffix}.bias"] = torch.randn(16, generator=gen)
        tensors[f"encoder.layer.{i}.output.LayerNorm.weight"] = torch.ones(16)
    save_file(tensors, tmp_path / "model.safetensors")
    return tensors


def test_scan_reads_every_block_matrix_with_exact_suffix_types(tmp_path):
    tensors = bert_like(tmp_path)
    table = compute(safetensors_files(tmp_path), progress=False)
    assert len(table) == 12  # 4 layers x 3 matrices; embeddings, biases and norms are not candidates
    assert {r["type"] for r in table.values()} == {
        "attention.self.query", "attention.output.dense", "output.dense"}
    row = table["encoder.layer.2.attention.output.dense"]
    assert row["layer"] == 2 and row["shape"] == [16, 16]
    assert row["snr"] == pytest.approx(spectrum_snr(tensors["encoder.layer.2.attention.output.dense.weight"]))


def test_scan_follows_a_sharded_index_and_keeps_stacks_apart(tmp_path):
    gen = torch.Generator().manual_seed(1)
    shard_a = {f"encoder.block.{i}.layer.0.SelfAttention.q.weight": torch.randn(8, 8, generator=gen)
               for i in range(2)}
    shard_b = {f"decoder.block.{i}.layer.0.SelfAttention.q.weight": torch.randn(8, 8, generator=gen)
               for i in range(2)}
    save_file(shard_a, tmp_path / "model-00001-of-00002.safetensors")
    save_file(shard_b, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard_a}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in shard_b}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    table = compute(safetensors_files(tmp_path), progress=False)
    assert {r["type"] for r in table.values()} == {
        "encoder.block.layer.0.SelfAttention.q", "decoder.block.layer.0.SelfAttention.q"}


def test_unknown_module_type_lists_the_known_ones(tmp_path):
    bert_like(tmp_path)
    table = compute(safetensors_files(tmp_path), progress=False)
    with pytest.raises(UserError, match="foo matches no module.*attention.output.dense, attention.self.query"):
        restrict_types(table, ["foo"])
    only = restrict_types(table, ["output.dense"])
    assert {r["type"] for r in only.values()} == {"output.dense"}


def test_checkpoint_without_safetensors_is_an_error(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="no \\*.safetensors"):
        safetensors_files(tmp_path)


def table_of(scores: dict[str, tuple[str, float]]) -> dict[str, dict]:
    return {n: {"type": t, "snr": s, "layer": None, "shape": [1, 1]} for n, (t, s) in scores.items()}


def test_spectrum_keeps_the_floor_of_top_frac_per_type_by_snr():
    table = table_of({
        "l0.q": ("q", 0.1), "l1.q": ("q", 0.9), "l2.q": ("q", 0.5), "l3.q": ("q", 0.7),
        "l0.v": ("v", 3.0), "l1.v": ("v", 1.0), "l2.v": ("v", 2.0), "l3.v": ("v", 0.0),
        "head": ("lm", 5.0),  # a type with one member keeps none at 50%
    })
    assert sorted(spectrum(table, 0.5)) == ["l0.v", "l1.q", "l2.v", "l3.q"]
    assert sorted(spectrum(table, 0.25)) == ["l0.v", "l1.q"]
    assert len(spectrum(table, 1.0)) == 9


def test_ties_keep_checkpoint_order_and_thirds_are_exact():
    six = table_of({f"l{i}.q": ("q", 1.0) for i in range(6)})
    assert spectrum(six, 1 / 3) == ["l0.q", "l1.q"]
    assert spectrum(six, 1 / 6) == ["l0.q"]


def test_select_returns_checkpoint_order_and_refuses_an_empty_selection():
    table = table_of({"l0.q": ("q", 0.1), "l1.q": ("q", 0.9), "l2.q": ("q", 0.5), "l3.q": ("q", 0.7)})
    assert select(table, selection_config(top_frac=0.5)) == ["l1.q", "l3.q"]
    assert select(table, selection_config(Strategy.all)) == list(table)
    assert select(table, selection_config(top_frac=0.2)) == ["l1.q"]  # min_per_type=1
    with pytest.raises(UserError, match=r"keeps no module.*top_frac>=0.25"):
        select(table, selection_config(top_frac=0.2, min_per_type=0))
