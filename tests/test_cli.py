"""The commands as a user types them, end to end, offline."""
import json
import re

import pytest
import yaml

from spectraqlora.evaluate import evaluate_run
from tests.helpers import run_cli


def finished(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def assert_reproduced(run_dir, tmp_path):
    result = run_cli("evaluate", f"run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((run_dir / "eval_metrics.json").read_text())
    recorded = finished(run_dir)
    assert "eval_tokens_per_sec" in again  # a timing: measured again, not reproduced
    for key, value in again.items():
        if not key.endswith("_per_sec"):
            assert value == pytest.approx(recorded[key], abs=1e-3), key


@pytest.mark.slow
def test_default_job_trains_minilm_to_090_and_evaluate_reproduces_it(default_run, tmp_path):
    run_dir, result = default_run
    out = result.stdout + result.stderr
    assert "selected 6 of 36 modules (spectrum)" in out
    assert "trainer=small: the preset model=minilm picks (learning_rate=0.002)" in out  # said, not silent
    assert "before training: loss=" in out and "accuracy=" in out
    # piped output is plain lines: no ANSI codes, no load report for the new head, bitsandbytes' note once
    assert "\x1b" not in out and "LOAD REPORT" not in out and "kernels-community" not in out
    assert out.count("bitsandbytes: the CPU 4-bit kernel from the package") <= 1
    metrics = finished(run_dir)
    assert metrics["eval_accuracy"] >= 0.90
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    selection = json.loads((run_dir / "selection.json").read_text())
    snr = json.loads((run_dir / "snr.json").read_text())
    assert len(snr) == 36 and len(selection["modules"]) == 6
    assert len({snr[m]["type"] for m in selection["modules"]}) == 6  # one layer per type
    assert all(t.startswith("bert.") for t in selection["lora_targets"])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert_reproduced(run_dir, tmp_path)


@pytest.mark.slow
def test_tiny_llama_causal_lm_smoke_learns_and_reproduces(smoke_run):
    run_dir, result = smoke_run
    metrics = finished(run_dir)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    summary = result.stdout.split("run finished\n")[1].splitlines()[:6]  # the run's last words
    assert summary == [
        f"  run dir      {run_dir}",
        f"  eval         loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss']:.4f}   "
        f"perplexity {metrics['eval_perplexity_before']:.4f} -> {metrics['eval_perplexity']:.4f}   "
        f"accuracy {metrics['eval_accuracy_before']:.4f} -> {metrics['eval_accuracy']:.4f}",  # label words scored
        f"  training     20 steps in {metrics['train_runtime_s']:.1f} s, {metrics['tokens_per_sec']:,.0f} tokens/s "
        f"(evaluation {metrics['eval_tokens_per_sec']:,.0f} tokens/s)",
        summary[3], f"  peak memory  {metrics['peak_mem_gb']:.2f} GB", f"  adapter      {run_dir / 'adapter'}"]
    assert re.fullmatch(r"  wall time    \d+\.\d s", summary[3])
    out = result.stdout + result.stderr  # piped, as in a job log
    assert "\x1b" not in out and "FutureWarning" not in out and "{'loss'" not in out
    assert "the preset model=" not in out  # trainer=smoke was typed
    assert re.search(r"step 20/20: loss \d+\.\d+  lr \S+  \d+\.\d+ s/step  00:00:00 left", out)
    assert metrics["eval_perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)
    assert metrics["train_steps"] == 20
    # the time left counts the evaluations to come (eval_steps=10) at the one before training's pace
    assert re.search(r"step 5/20: .* left \(with 2 evaluations\)", out)
    assert re.search(r"step 15/20: .* left \(with 1 evaluation\)", out)
    again = evaluate_run(run_dir)  # in process; the default job above checks the command
    for key, value in again.items():
        if not key.endswith("_per_sec"):
            assert value == pytest.approx(metrics[key], abs=1e-3), key
    assert not (run_dir / "checkpoints").exists()  # evaluate leaves nothing of the Trainer's


@pytest.mark.slow
@pytest.mark.slow
def test_evaluate_refuses_data_that_changed_since_the_run(smoke_run, tmp_path):
    """A file edited after the run gave evaluate another eval split (75 rows, not 100), reported as
    the run's evaluation. The run records its rows (selection.json); evaluate compares."""
    import shutil

    from spectraqlora.errors import UserError

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir)
    (run_dir / "eval_metrics.json").unlink(missing_ok=True)  # another test's evaluation of the shared run
    selection = json.loads((run_dir / "selection.json").read_text())
    assert set(selection["data"]) == {"train_rows", "eval_rows", "eval_sha256"}
    recorded_rows = selection["data"]["eval_rows"]
    selection["data"].update(eval_rows=recorded_rows + 25, eval_sha256="0" * 64)  # as if the file had changed
    (run_dir / "selection.json").write_text(json.dumps(selection))
    with pytest.raises(UserError, match=rf"^the data differ from what the run trained and evaluated on \(eval rows: "
                                        rf"{recorded_rows + 25} -> {recorded_rows}; eval sha256: 0000"):
        evaluate_run(run_dir)
    assert not (run_dir / "eval_metrics.json").exists()
    assert evaluate_run(run_dir, force=True)["eval_loss"] > 0  # force: evaluated, with a warning


@pytest.mark.parametrize("args, message", [
    ([], "error: which run? python -m spectraqlora.evaluate run_dir=<finished run dir>"),
    (["run_dir=outputs/nope"], "error: run_dir=outputs/nope: no such directory"),
    (["rundir=outputs/nope"], "error: unknown key rundir: did you mean run_dir? (the keys of the top level are: "
                              "run_dir, allow_pickle, force)"),  # Hydra's multi-line report before
])
def test_evaluate_without_a_run_is_one_line_and_creates_nothing(tmp_path, args, message):
    result = run_cli("evaluate", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message + (" (e.g. outputs/<date>/<time>)" if not args else "")]
    assert list(tmp_path.iterdir()) == []


def test_export_keys_typed_as_other_tools_name_them_get_ours(tmp_path):
    result = run_cli("export", "output=merged", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown key output: did you mean out? (the keys "
                                                             "of the top level are: run_dir, out,")


@pytest.mark.slow
def test_evaluate_help_names_only_its_own_keys(tmp_path):
    result = run_cli("evaluate", "--help", cwd=tmp_path)
    assert result.stdout.startswith("python -m spectraqlora.evaluate run_dir=<finished run dir>")
    assert "selection" not in result.stdout and "== Config ==" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["model=llama3", "selection.top_frac=0.25"],  # the README's first usage line, offline
     "download it where the hub answers, or set model.name_or_path=<local checkpoint dir>; it is gated: accept "
     "its licence on https://huggingface.co/meta-llama/Meta-Llama-3-8B and give a token (HF_TOKEN=... or "
     "`hf auth login`)"),
    (["selection.top_frac=1.5"], "selection.top_frac=1.5 is out of range"),
    (["lora.r=0"], "lora.r=0 is out of range"),
    (["model.name_or_path=/no/such/dir"], "model.name_or_path=/no/such/dir: no such directory"),
    # Hydra's own refusals, as one line with the nearest key or option (they were Hydra's report, exit 1)
    (["selection.top_frac=abc"], "error: Error merging override selection.top_frac=abc: Value 'abc' of type 'str' "
                                 "could not be converted to Float"),
    (["trainer.lr=1e-3"], "error: unknown key trainer.lr: did you mean trainer.learning_rate? (the keys of trainer "
                          "are: max_steps,"),
    (["quant=nf5"], "error: quant=nf5: no such option; did you mean quant=nf4? (the options of quant are: fp4, int8, "
                    "nf4, none)"),
    (["selection.strategy=foo"], "error: Error merging override selection.strategy=foo: Invalid value 'foo', expected "
                                 "one of [spectrum, spectrum_global, snr_cutoff, kappa, kappa_per_type, alpha,"),
    (["dataset=file"], "error: dataset.path is not set: which file? give dataset.path="),  # trained on synthetic rows
    (["hparams_search=snr_rank", "lora.r=8"],  # ran one plain training job and exited 0
     "error: hparams_search=snr_rank configures a sweep, which runs with -m: python -m spectraqlora.train -m "
     "hparams_search=snr_rank lora.r=8"),
])
def test_bad_input_gets_one_clear_line_and_no_finished_run(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = run_cli("train", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]  # one line, the last
    assert "Traceback" not in result.stderr
    assert not (run_dir / "metrics.json").exists()


def test_a_run_or_sweep_dir_that_cannot_be_made_is_one_line(tmp_path):
    """Hydra's FileExistsError traceback (exit 1) for a path that is a file; /proc takes no dirs."""
    taken = tmp_path / "afile"
    taken.write_text("x")
    for args, line in [([f"hydra.run.dir={taken}"], f"error: hydra.run.dir={taken} is a file, not a directory: "
                                                   f"give another hydra.run.dir"),
                       (["hydra.run.dir=/proc/spectraqlora-run"], "error: hydra.run.dir=/proc/spectraqlora-run cannot "
                                                                 "be created (No such file or directory): give a "
                                                                 "writable hydra.run.dir"),
                       (["-m", f"hydra.sweep.dir={taken}"], f"error: hydra.sweep.dir={taken} is a file, not a "
                                                          f"directory: give another hydra.sweep.dir")]:
        result = run_cli("train", *args, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == line, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def checksums(run_dir) -> dict:
    """Every file of a run dir and its content hash (the lock file, which names its last holder, aside)."""
    import hashlib

    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".run.lock"}


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["trainer.resume=true", "lora.r=32", "selection=random"],  # said "nothing to resume", recorded r=32
     "was trained with another config than this command gives: lora.r: 8 -> 32; selection.strategy: spectrum -> random; "),
    ([], "already holds a finished run: add trainer.resume=true to continue it"),
])
def test_a_refused_command_leaves_the_run_it_names_as_it_was(smoke_run, tmp_path, extra, message):
    run_dir, _ = smoke_run
    before = checksums(run_dir)
    result = run_cli("train", "model=tiny_llama", "selection.top_frac=0.25", "trainer=smoke", f"hydra.run.dir={run_dir}",
                     *extra, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert checksums(run_dir) == before  # its record, log and results untouched
    recorded = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert "lora.r=32" not in recorded and "logger=wandb" in recorded


@pytest.mark.slow
def test_resume_in_a_dir_with_nothing_to_resume_says_it_starts_over(tmp_path):
    run_dir = tmp_path / "typo"
    result = run_cli("train", "model=tiny_llama", "trainer=smoke", "trainer.resume=true", "selection=layers",
                     "selection.layers=[99]", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # refused after planning
    assert result.returncode == 2
    assert f"trainer.resume=true, but {run_dir} holds no checkpoint: training starts from step 0" in result.stdout
    assert not run_dir.exists()
