"""The sweeper's own cost per trial: N trivial trials (tests/apps/gated.py: no model, the task
returns x at once) against 1, in fresh processes, alternated over a few rounds so that machine
load hits both alike. Prints the wall times and the cost per extra trial.

    python scripts/bench_sweep_overhead.py --trials 20 --rounds 3
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "tests" / "apps" / "gated.py"


def sweep(n_trials: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        subprocess.run([sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp}/sweep",
                        f"hydra.sweeper.n_trials={n_trials}"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    one, many = [], []
    for _ in range(args.rounds):
        one.append(sweep(1))
        many.append(sweep(args.trials))
    print(f"1 trial:  {', '.join(f'{t:.2f}' for t in one)} s (median {statistics.median(one):.2f})")
    print(f"{args.trials} trials: {', '.join(f'{t:.2f}' for t in many)} s (median {statistics.median(many):.2f})")
    print(f"per extra trial: {(statistics.median(many) - statistics.median(one)) / (args.trials - 1):.3f} s")


if __name__ == "__main__":
    main()
