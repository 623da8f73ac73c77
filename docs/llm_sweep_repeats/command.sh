#!/bin/bash
cd /tmp/sweep_rep
export PYTHONPATH=/tmp/wt
date -u +%FT%T > started
/work/main/.venv/bin/python -m spectraqlora.train -m hparams_search=snr_rank experiment=llm_rt \
  hydra.sweeper.n_trials=12 hydra.sweeper.sampler.seed=0 hydra.sweeper.sampler.n_startup_trials=6 \
  hydra.sweeper.repeats=3 hydra/sweeper/pruner=wilcoxon hydra.sweeper.pruner.p_threshold=0.3 \
  hydra.sweeper.confirm.top_k=3 'hydra.sweeper.confirm.seeds=[11,12,13,14,15]' \
  hydra.sweep.dir=/tmp/sweep_rep/out > sweep.log 2>&1
echo $? > rc
date -u +%FT%T > ended
