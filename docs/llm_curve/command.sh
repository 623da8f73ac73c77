#!/bin/bash
# experiment=llm_curve as run on 2026-12-02 (docs/results.md, top section): commit ff956d4 in a git
# worktree at /tmp/wt, output under /tmp/curve/out. Two streams of runs side by side on the 2 cores,
# each process on one thread (torch's 2 threads per process would oversubscribe them): together
# ~1.7x the throughput of one 2-thread process (3.6-3.7 s/step each instead of ~3.1 s/step alone).
cd /tmp/curve
export PYTHONPATH=/tmp/wt OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python
( $PY -m spectraqlora.train -m experiment=llm_curve llm_arm=spectrum,alpha,random seed=1,2 hydra.sweep.dir=/tmp/curve/out/A1
  $PY -m spectraqlora.train -m experiment=llm_curve llm_arm=spectrum,alpha seed=5 hydra.sweep.dir=/tmp/curve/out/A2 ) &
( $PY -m spectraqlora.train -m experiment=llm_curve llm_arm=spectrum,alpha,random seed=3,4 hydra.sweep.dir=/tmp/curve/out/B1
  $PY -m spectraqlora.train -m experiment=llm_curve llm_arm=random seed=5 hydra.sweep.dir=/tmp/curve/out/B2 ) &
wait
# then, from the checkout (the per-step comparisons and curves came with the next commit):
python -m spectraqlora.report /tmp/curve/out --compare spectrum:random --compare alpha:random --compare spectrum:alpha
