"""The run dir: one run at a time holds it, and only dirs refused before training are discarded."""
import subprocess
import sys

import pytest

from spectraqlora.errors import UserError
from spectraqlora.store import rundir
from tests.helpers import smoke_config as config
from tests.helpers import train_run


def test_a_run_dir_in_use_is_refused_and_its_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from spectraqlora.store import rundir; "
         "rundir.claim(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for resume in ("false", "true"):
            with pytest.raises(UserError, match=rf"is in use by another run \(pid {holder.pid} on .*\): "
                                                r"wait for it to end, or choose another hydra.run.dir"):
                train_run(config(f"trainer.resume={resume}"), tmp_path)
        assert not rundir.discard_if_untrained(tmp_path)  # never removed under a live run
    finally:
        holder.kill()  # as a crash: the OS drops the lock, none goes stale
        holder.wait()
    rundir.claim(tmp_path)
    rundir.release(tmp_path)
    assert rundir.discard_if_untrained(tmp_path) and not tmp_path.exists()


def test_only_run_dirs_refused_before_training_are_discarded(tmp_path):
    untrained = tmp_path / "outputs" / "2026-11-29" / "12-00-00"
    (untrained / ".hydra").mkdir(parents=True)
    (untrained / "snr.json").write_text("{}")
    (tmp_path / "outputs" / "2026-11-29" / "12-30-00" / rundir.CHECKPOINTS).mkdir(parents=True)
    assert rundir.discard_if_untrained(untrained)
    assert not untrained.exists() and (tmp_path / "outputs" / "2026-11-29").is_dir()
    assert not rundir.discard_if_untrained(tmp_path / "outputs" / "2026-11-29" / "12-30-00")

