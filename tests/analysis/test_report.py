"""spectraqlora.report (analysis/report.py) over run dirs, and the strategy study's arms."""
import json

import pytest
import yaml

from spectraqlora.analysis import report
from spectraqlora.config import compose, to_train_config
from spectraqlora.errors import UserError
from tests.helpers import run_cli, train_run


def fake_run(root, n, overrides, metrics, strategy="spectrum"):
    run = root / str(n)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / "selection.json").write_text(json.dumps({"strategy": strategy, "modules": []}))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))


def test_report_groups_by_swept_settings_over_seeds(tmp_path):
    base = {"trainable_params": 1000, "tokens_per_sec": 50.0, "peak_mem_gb": 0.7, "selected_modules": 6}
    for n, (arm, seed, acc) in enumerate([("a", 1, 0.8), ("a", 2, 0.9), ("b", 1, 0.6), ("b", 2, 0.6)]):
        fake_run(tmp_path, n, [f"arm={arm}", f"seed={seed}", "model=minilm", f"selection.top_frac={1 / 6 if arm == 'a' else 0.5}"],
                 {**base, "eval_loss": 1 - acc, "eval_accuracy": acc}, strategy=arm)
    fake_run(tmp_path, 9, ["arm=a", "seed=3"], None)  # unfinished

    printed = report.write_report(tmp_path)
    assert printed.startswith("4 finished runs, 1 unfinished skipped")
    text = (tmp_path / "report.md").read_text()
    assert "| arm | selection.top_frac | strategy | n | modules | eval loss | accuracy | trainable | tokens/s | peak GB |" in text
    # the best (lowest eval loss) in bold; top_frac rounded
    assert "| **a** | **0.167** | **a** | **2** | **6** | **0.1500 ± 0.0707** | **0.8500 ± 0.0707** | **1,000** |" in text
    assert "| b | 0.5 | b | 2 | 6 | 0.4000 ± 0.0000 | 0.6000 ± 0.0000 |" in text
    for png in ("report_metric_vs_params.png", "report_metric_vs_memory.png"):
        assert (tmp_path / png).stat().st_size > 1000


@pytest.mark.slow
def test_compare_gives_the_paired_difference_per_seed_with_a_t_interval(tmp_path):
    losses = {("a", 1): 0.5, ("a", 2): 0.4, ("a", 3): 0.3, ("b", 1): 0.6, ("b", 2): 0.6, ("b", 3): 0.6, ("b", 4): 9.0}
    for n, ((arm, seed), loss) in enumerate(losses.items()):
        fake_run(tmp_path, n, [f"arm={arm}", f"seed={seed}"], {"eval_loss": loss, "eval_accuracy": 1 - loss,
                                                                "step_time_s": 1.5}, strategy=arm)
    printed = report.write_report(tmp_path, ["a:b"])
    # seeds 1-3 pair up (b's seed 4 has no partner): a - b = -0.1, -0.2, -0.3; mean -0.2, sd 0.1,
    # half-width t(0.975, 2 df) x 0.1 / sqrt(3) = 4.3027 x 0.05774 = 0.2484
    assert "| a - b | eval loss | 3 | -0.2000 | [-0.4484, +0.0484] | -0.1000 -0.2000 -0.3000 |" in printed
    assert "| a - b | accuracy | 3 | +0.2000 | [-0.0484, +0.4484] |" in printed
    assert (tmp_path / "report_metric_vs_step_time.png").is_file()
    with pytest.raises(UserError, match=r"report compare 'a:c': expected A:B with A and B among the settings here: a, b"):
        report.write_report(tmp_path, ["a:c"])
    result = run_cli("report", str(tmp_path), "--compare", "b:a", cwd=tmp_path)
    assert result.returncode == 0 and "| b - a | eval loss | 3 | +0.2000 | [-0.0484, +0.4484] |" in result.stdout


def test_curves_compare_the_settings_at_every_evaluated_step(tmp_path):
    """Runs that evaluated at steps 10 and 20 (metrics.jsonl, with train lines between): the
    per-step table pairs them by seed; the curves plot is written; step 20 equals the final
    comparison. Intervals by hand: t(0.975, 2 df) = 4.3027."""
    eval_loss = {("a", 1): (0.9, 0.5), ("a", 2): (0.8, 0.4), ("a", 3): (0.7, 0.3),
                 ("b", 1): (1.0, 0.6), ("b", 2): (1.0, 0.6), ("b", 3): (1.0, 0.6)}
    for n, ((arm, seed), losses) in enumerate(eval_loss.items()):
        fake_run(tmp_path, n, [f"arm={arm}", f"seed={seed}"], {"eval_loss": losses[1], "eval_accuracy": 1 - losses[1]},
                 strategy=arm)
        lines = [{"step": 5, "train/loss": 2.0}]
        lines += [{"step": step, "eval/loss": loss, "eval/accuracy": 1 - loss} for step, loss in zip((10, 20), losses)]
        (tmp_path / str(n) / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    printed = report.write_report(tmp_path, ["a:b"])
    # step 10: a - b = -0.1, -0.2, -0.3 (mean -0.2, sd 0.1: half-width 4.3027 x 0.1 / sqrt(3) = 0.2484)
    assert "| a - b | eval loss | 10 | 3 | -0.2000 | [-0.4484, +0.0484] | -0.1000 -0.2000 -0.3000 |" in printed
    assert "| a - b | eval loss | 20 | 3 | -0.2000 | [-0.4484, +0.0484] |" in printed
    assert "| a - b | accuracy | 10 | 3 | +0.2000 | [-0.0484, +0.4484] |" in printed
    assert "| a - b | eval loss | 5 |" not in printed  # a training line is no evaluation
    assert "4 intervals: at 95% about one in twenty excludes 0 by chance alone" in printed
    assert (tmp_path / "report_curves.png").stat().st_size > 5000
    assert "![learning curves](report_curves.png)" in (tmp_path / "report.md").read_text()

    one_eval = tmp_path / "flat"  # runs without curves: no per-step table, no plot
    fake_run(one_eval, 0, ["arm=a", "seed=1"], {"eval_loss": 0.5}, strategy="a")
    fake_run(one_eval, 1, ["arm=b", "seed=1"], {"eval_loss": 0.6}, strategy="b")
    assert "every evaluated step" not in report.write_report(one_eval, ["a:b"])
    assert not (one_eval / "report_curves.png").exists()


def test_report_of_a_dir_without_finished_runs_is_one_clear_error(tmp_path):
    fake_run(tmp_path, 0, ["seed=1"], None)
    with pytest.raises(UserError, match="holds no finished run .*1 unfinished"):
        report.write_report(tmp_path)
    result = run_cli("report", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "no such directory" in result.stderr


@pytest.mark.parametrize("arm, strategy, per_type", [
    ("spectrum_1of6", "spectrum", 1), ("random_2of6", "random", 2), ("last_3of6", "layers", 3),
    ("all", "all", 6), ("head_only", "none", 0)])
def test_strategy_study_arms_match_their_budget_on_minilm(arm, strategy, per_type):
    from spectraqlora.spectrum.scanner import scan_and_select
    from spectraqlora.store import checkpoint

    cfg = to_train_config(compose("experiment=strategy_study", f"arm={arm}", "seed=2"))
    assert cfg.selection.strategy.value == strategy and cfg.lora.r == 8
    table, chosen = scan_and_select(checkpoint.safetensors_files(checkpoint.resolve(cfg.model)), cfg)
    assert len(chosen) == 6 * per_type  # MiniLM: six module types, six layers
    assert {sum(table[n]["type"] == t for n in chosen) for t in {r["type"] for r in table.values()}} == {per_type}


@pytest.mark.slow
def test_head_only_trains_the_classifier_alone_and_reloads(tmp_path):
    from omegaconf import OmegaConf

    from spectraqlora.evaluate import evaluate_run

    composed = compose("selection=none", "trainer.max_steps=4", "trainer.eval_steps=0",
                       "dataset.eval_size=32", "dataset.train_size=64")
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(composed, tmp_path / ".hydra" / "config.yaml")  # as Hydra writes it
    metrics = train_run(to_train_config(composed), tmp_path)
    assert metrics["trainable_params"] == 384 * 2 + 2  # MiniLM's classifier: hidden 384, 2 classes
    assert metrics["selected_modules"] == 0
    again = evaluate_run(tmp_path)
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-4)
