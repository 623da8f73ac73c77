#!/usr/bin/env bash
# Smoke of the real 4-bit path on whatever this machine has (CUDA if present, else CPU):
# the default MiniLM job, the tiny Llama causal-LM job, and evaluate on each run.
# Prints each run's metrics.json. Usage: bash scripts/smoke.sh [extra overrides...]
set -euo pipefail
out=${SMOKE_OUT:-$(mktemp -d)}
python -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
for job in "minilm:" "tiny_llama:selection.top_frac=0.25 trainer=smoke"; do
  name=${job%%:*}
  # shellcheck disable=SC2086
  python -m spectraqlora.train model="$name" ${job#*:} scan.device="$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')" \
    hydra.run.dir="$out/$name" "$@"
  python -m spectraqlora.evaluate run_dir="$out/$name"
  echo "== $name"; cat "$out/$name/metrics.json"; cat "$out/$name/eval_metrics.json"
done
