"""Peak memory and step time of each arm of an experiment, each in a fresh process.

A Hydra multirun on the basic launcher runs its jobs one after another in one process, so a
job's peak resident memory there also covers the jobs before it. This runs every arm of
`--group` (default: llm_arm, the arms of experiment=llm_study) as its own short training run
and reads metrics.json: `peak_mem_gb` (process peak RSS on CPU, peak allocated on CUDA),
`step_time_s`, `tokens_per_sec`.

    python scripts/bench_arms_memory.py --out /tmp/arms [--experiment llm_study] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="where the runs go")
    parser.add_argument("--experiment", default="llm_study")
    parser.add_argument("--group", default="llm_arm")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    arms = sorted(p.stem for p in (CONF / args.group).glob("*.yaml"))
    rows = []
    for arm in arms:
        run_dir = args.out / arm
        subprocess.run([sys.executable, "-m", "spectraqlora.train", f"experiment={args.experiment}",
                        f"{args.group}={arm}", "seed=1", f"trainer.max_steps={args.steps}",
                        f"hydra.run.dir={run_dir}"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows.append((arm, metrics["selected_modules"], metrics["peak_mem_gb"], metrics["step_time_s"],
                     metrics["tokens_per_sec"]))
        print(f"{arm}: {rows[-1][2]:.2f} GB, {rows[-1][3]:.2f} s/step", flush=True)
    print("\n| arm | modules | peak GB | s/step | tokens/s |\n|---|---|---|---|---|")
    for arm, modules, peak, step, tokens in rows:
        print(f"| {arm} | {modules} | {peak:.2f} | {step:.2f} | {tokens:.0f} |")


if __name__ == "__main__":
    main()
