"""Selection strategies, min_per_type and SNR rank allocation on hand-made tables."""
import pytest

from spectraqlora.config import Strategy, selection_config
from spectraqlora.errors import UserError
from spectraqlora.spectrum.selection import check_ranks_fit, lora_params, select, snr_ranks
from tests.helpers import typed_config


def table(layers=8, types=("q", "v"), shape=(64, 32)):
    """Layer i of type t has SNR (i + 1) x weight(t); type v scores 10x higher than q."""
    weight = {t: 10.0 ** k for k, t in enumerate(types)}
    return {f"layers.{i}.{t}": {"type": t, "layer": i, "snr": (i + 1) * weight[t], "shape": list(shape)}
            for i in range(layers) for t in types}


def pick(rows, **knobs):
    return select(rows, selection_config(**knobs))


def test_spectrum_global_ranks_across_types():
    chosen = pick(table(), strategy=Strategy.spectrum_global, top_frac=0.25, min_per_type=0)
    assert chosen == [f"layers.{i}.v" for i in (4, 5, 6, 7)]  # 4 of 16, all of the louder type
    with_min = pick(table(), strategy=Strategy.spectrum_global, top_frac=0.25, min_per_type=1)
    assert "layers.7.q" in with_min and len(with_min) == 5


def test_kappa_ranks_lowest_condition_number_globally_or_per_type():
    rows = table()
    for name, row in rows.items():  # condition numbers: q rises with the layer, v falls
        row["kappa"] = (row["layer"] + 1.0) if row["type"] == "q" else 100.0 - row["layer"]
    assert pick(rows, strategy=Strategy.kappa, top_frac=0.25) == [f"layers.{i}.q" for i in range(4)]
    assert pick(rows, strategy=Strategy.kappa, num_modules=2) == ["layers.0.q", "layers.1.q"]
    assert pick(rows, strategy=Strategy.kappa, top_frac=0.01) == ["layers.0.q"]  # max(1, ...) as peft
    assert pick(rows, strategy=Strategy.kappa_per_type, top_frac=0.25) == [
        "layers.0.q", "layers.1.q", "layers.6.v", "layers.7.v"]
    assert len(pick(rows, strategy=Strategy.kappa, num_modules=16)) == 16
    with pytest.raises(UserError, match=r"^selection.num_modules=1000, but the model has 16 candidate modules: "
                                        r"give at most 16"):  # was clamped to 16 without a word
        pick(rows, strategy=Strategy.kappa, num_modules=1000)


def test_alpha_ranks_per_type_in_the_order_asked():
    from spectraqlora.config import AlphaOrder

    rows = table()
    for name, row in rows.items():  # alpha: q falls with the layer, v rises; layer 0 of q unfitted
        row["alpha"] = 10.0 - row["layer"] if row["type"] == "q" else 2.0 + row["layer"]
    rows["layers.0.q"]["alpha"] = None
    assert pick(rows, strategy=Strategy.alpha, top_frac=0.25) == [
        "layers.1.q", "layers.2.q", "layers.6.v", "layers.7.v"]  # high_first, the default
    assert pick(rows, strategy=Strategy.alpha, top_frac=0.25, alpha_order=AlphaOrder.low_first) == [
        "layers.0.v", "layers.1.v", "layers.6.q", "layers.7.q"]  # the unfitted module is never first
    assert pick(rows, strategy=Strategy.alpha, top_frac=1.0) == list(rows)


def test_min_layer_restricts_every_strategy_to_the_upper_layers():
    rows = table()
    assert pick(rows, strategy=Strategy.spectrum, top_frac=0.5, min_layer=4) == [
        "layers.6.q", "layers.6.v", "layers.7.q", "layers.7.v"]  # per type, the best half of layers 4-7
    assert pick(rows, strategy=Strategy.random, top_frac=0.5, min_layer=6) in (
        [f"layers.{i}.{t}" for i in (6, 7) for t in "qv" if (i, t) in pairs] for pairs in
        ({(6, "q"), (6, "v")}, {(6, "q"), (7, "v")}, {(7, "q"), (6, "v")}, {(7, "q"), (7, "v")}))
    assert pick(rows, strategy=Strategy.all, min_layer=7) == ["layers.7.q", "layers.7.v"]
    with pytest.raises(UserError, match=r"selection.min_layer=8 but the model's layers are 0..7"):
        pick(rows, strategy=Strategy.all, min_layer=8)


def test_a_key_of_another_strategy_is_refused_naming_the_strategy_that_reads_it():
    """Each strategy's schema holds only the keys it reads: another's is refused while composing."""
    assert typed_config("selection=kappa", "selection.num_modules=49").selection.num_modules == 49
    for override in ("selection.num_modules=49", "+selection.num_modules=49"):
        with pytest.raises(UserError, match="selection.num_modules=49 is read by selection=kappa only, not "
                                            "selection=spectrum: add selection=kappa"):
            typed_config(override)
    with pytest.raises(UserError, match="selection.alpha_order=low_first is read by selection=alpha only"):
        typed_config("selection.alpha_order=low_first")
    with pytest.raises(UserError, match=r"selection.min_layer=15 is read by selection=spectrum, .* only, not "
                                        r"selection=layers: drop it"):
        typed_config("selection=layers", "selection.layers=[0]", "selection.min_layer=15")
    with pytest.raises(UserError, match="selection.strategy=layers with the keys of another strategy: choose the "
                                        "strategy with selection=layers"):
        typed_config("selection.strategy=layers")


def test_snr_cutoff_keeps_every_module_at_or_above_it():
    chosen = pick(table(), strategy=Strategy.snr_cutoff, snr_cutoff=60.0)
    assert chosen == [f"layers.{i}.v" for i in (5, 6, 7)]
    with pytest.raises(UserError, match="highest is 80"):
        pick(table(), strategy=Strategy.snr_cutoff, snr_cutoff=100.0)


def test_random_matches_spectrum_counts_per_type_and_is_seeded():
    rows = table()
    spectrum = pick(rows, strategy=Strategy.spectrum, top_frac=0.5)
    drawn = [select(rows, selection_config(Strategy.random, top_frac=0.5), seed=s) for s in (1, 1, 2)]
    assert drawn[0] == drawn[1] != drawn[2]
    for chosen in drawn:
        for t in ("q", "v"):
            assert sum(rows[n]["type"] == t for n in chosen) == sum(rows[n]["type"] == t for n in spectrum)


def test_layers_by_index_from_the_end_and_last_k():
    assert pick(table(4), strategy=Strategy.layers, layers=[0, -1]) == [
        "layers.0.q", "layers.0.v", "layers.3.q", "layers.3.v"]
    assert pick(table(4), strategy=Strategy.layers, last_k=1) == ["layers.3.q", "layers.3.v"]
    with pytest.raises(UserError, match=r"\[4\] out of range; this model has layers 0..3"):
        pick(table(4), strategy=Strategy.layers, layers=[4])
    with pytest.raises(UserError, match="last_k=5 but the model has 4 layers"):
        pick(table(4), strategy=Strategy.layers, last_k=5)


def test_explicit_layers_select_exactly_those_layers_as_composed():
    """conf/selection/layers.yaml once set last_k: 2, which won over selection.layers=[0]."""
    cfg = typed_config("selection=layers", "selection.layers=[0]").selection
    assert (cfg.layers, cfg.last_k) == ([0], None)
    assert select(table(4), cfg) == ["layers.0.q", "layers.0.v"]
    with pytest.raises(UserError, match=r"selection.layers=\[0\] and selection.last_k=2: give one"):
        typed_config("selection=layers", "selection.layers=[0]", "selection.last_k=2")


def test_a_rank_above_a_matrix_side_is_refused_with_its_shape():
    rows = table(4, shape=(64, 32))
    check_ranks_fit(rows, list(rows), r=32)
    with pytest.raises(UserError, match=r"^lora.r: rank 33 is larger than the smaller dimension of "
                                        r"layers.0.q \(shape 64x32\); use lora.r<=32$"):
        check_ranks_fit(rows, list(rows), r=33)
    with pytest.raises(UserError, match="lora.r_max"):
        check_ranks_fit(rows, list(rows), r=8, ranks={"layers.3.v": 40})


def test_min_per_type_rescues_a_small_fraction_on_a_shallow_model():
    rows = table(layers=3)
    assert pick(rows, top_frac=0.25) == ["layers.2.q", "layers.2.v"]
    with pytest.raises(UserError, match="keeps no module"):
        pick(rows, top_frac=0.25, min_per_type=0)


def test_snr_ranks_grow_with_snr_and_keep_parameters_near_uniform():
    rows = table(layers=8)
    chosen = list(rows)
    ranks = snr_ranks(rows, chosen, r=8, r_min=2, r_max=32)
    for t in ("q", "v"):
        by_layer = [ranks[f"layers.{i}.{t}"] for i in range(8)]
        assert by_layer == sorted(by_layer) and by_layer[0] < by_layer[-1]
        assert min(by_layer) >= 2 and max(by_layer) <= 32
    uniform = sum(lora_params(rows[n]["shape"], 8) for n in chosen)
    allocated = sum(lora_params(rows[n]["shape"], r) for n, r in ranks.items())
    assert abs(allocated - uniform) / uniform <= 0.10


def test_snr_ranks_of_a_lone_module_stay_at_r():
    rows = table(layers=1, types=("q",))
    assert snr_ranks(rows, list(rows), r=16, r_min=2, r_max=64) == {"layers.0.q": 16}


def test_the_selection_is_described_a_line_per_type_with_its_layers_in_order():
    from spectraqlora.spectrum.selection import Selection, layer_ranges

    rows = table(layers=12)
    chosen = [f"layers.{i}.v" for i in (10, 2, 0, 1, 11, 5)] + ["layers.3.q"]
    assert layer_ranges([0, 1, 2, 5, 10, 11]) == "0-2, 5, 10-11"
    assert Selection(rows, chosen).describe().splitlines() == [
        "  q    1 of 12  layers 3  (snr 4-4)",
        "  v    6 of 12  layers 0-2, 5, 10-11  (snr 10-120)"]  # not layers.10 before layers.2
