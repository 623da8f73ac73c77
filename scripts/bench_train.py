"""Benchmark training cost by what carries adapters: plain QLoRA vs the top layers only.

--model bench_llama (default): conf/model/bench_llama.yaml (random-init Llama, 8 layers, hidden
512, nf4, fp32 compute) on the synthetic instruction task packed into blocks of --seq tokens;
same batch and number of steps for every configuration:

  all                       plain QLoRA: adapters on every linear module of every layer
  top_half                  the same module types on the top half of the layers only
  spectrum25                selection=spectrum top_frac=0.25 (random weights: the SNR ranking is
                            noise, so its lowest selected layer decides its cost)
  top_half_gc               top_half with spectraqlora's checkpointing (non-reentrant, no input grads)
  top_half_gc_prepare_kbit  top_half prepared the usual way: peft's prepare_model_for_kbit_training
                            defaults (input grads, reentrant checkpointing, fp32 upcasts)
  lora_unquantized          top_half without quantization, for reference

--model smollm2: the real SmolLM2-135M-Instruct (nf4) on Rotten Tomatoes in its chat template
(rows as they come, padded per batch; --seq is dataset.max_length), first its one-time costs
(GGUF conversion into a fresh cache, the SNR scan of its 210 matrices), then:

  all                       adapters on all 210 linear modules
  spectrum25                selection=spectrum top_frac=0.25 (49 modules)
  last7                     the same count on the top layers: selection=layers last_k=7 (7 x 7)

Each configuration runs in its own fresh process (so its peak memory is its own), --repeats
rounds with the order reversed every other round; the record keeps the median over rounds.
A training step is forward + backward + AdamW step, timed after --warmup steps. Peak memory is
the peak over the timed steps only, reset after warm-up so that loading does not count (CUDA:
max allocated; CPU: the resident-set high-water mark, VmHWM, reset via /proc/self/clear_refs);
the eval loss is the mean over eval batches of --batch rows.

    python scripts/bench_train.py --out results.json [--steps 8] [--batch 2] [--seq 256] [--repeats 3]
    python scripts/bench_train.py --model smollm2 --out results.json --steps 6 --batch 16 --seq 96
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # model -> (its data overrides, its configurations)
    "bench_llama": (["model=bench_llama", "dataset.packing=true"], {
        "all": ["selection=all"],
        "top_half": ["selection=layers", "selection.last_k=4"],
        "spectrum25": ["selection=spectrum", "selection.top_frac=0.25"],
        "top_half_gc": ["selection=layers", "selection.last_k=4", "trainer.gradient_checkpointing=true"],
        "top_half_gc_prepare_kbit": ["selection=layers", "selection.last_k=4", "+prepare_kbit=true"],
        "lora_unquantized": ["selection=layers", "selection.last_k=4", "quant=none"],
    }),
    "smollm2": (["model=smollm2", "dataset=rotten_tomatoes"], {
        "all": ["selection=all"],
        "spectrum25": ["selection=spectrum", "selection.top_frac=0.25"],
        "last7": ["selection=layers", "selection.last_k=7"],
    }),
}
CONFIGS = {name for _, configs in MODELS.values() for name in configs}


def measure(model: str, name: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    """One configuration, in this process."""
    import torch

    from spectraqlora import build, data, modeling
    from spectraqlora.config import compose, to_train_config
    from spectraqlora.scanner import scan_and_select
    from spectraqlora.selection import Selection

    base_overrides, configs = MODELS[model]
    overrides = [o for o in configs[name] if not o.startswith("+prepare_kbit")]
    cfg = to_train_config(compose(*base_overrides, f"dataset.max_length={seq}", "dataset.eval_size=32",
                                  *overrides))
    torch.manual_seed(cfg.seed)
    inputs = build.load_inputs(cfg)
    tokenizer, (tokenized, _) = inputs.tokenizer, inputs.tokenized(cfg)
    table, chosen = scan_and_select(inputs.files, cfg)
    if name.endswith("prepare_kbit"):
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(build.base_model(inputs, cfg))  # its defaults: the usual QLoRA recipe
        net = modeling.add_lora(base, modeling.model_names(base, chosen), cfg.lora, cfg.model)
    else:
        net, _ = build.new_model(inputs, cfg, Selection(table, chosen))
    device = next(p for p in net.parameters()).device
    optim = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    collate = data.collator(tokenizer, cfg.model.task)
    rows = tokenized["train"]
    if cfg.dataset.packing:
        rows = rows.filter(lambda r: len(r["input_ids"]) == seq)  # full blocks only
    batches = [collate([rows[i * batch + j] for j in range(batch)]) for i in range(warmup + steps)]

    net.train()
    times, tokens = [], 0
    for i, b in enumerate(batches):
        if i == warmup:
            baseline = reset_peak_memory(device)
        b = {k: v.to(device) for k, v in b.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        net(**b).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            tokens += int(b["attention_mask"].sum())

    peak = peak_memory_gb(device)  # the training peak, before evaluation adds its own
    net.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(tokenized["eval"]), batch):
            evals = collate([tokenized["eval"][j] for j in range(i, min(i + batch, len(tokenized["eval"])))])
            losses.append(float(net(**{k: v.to(device) for k, v in evals.items()}).loss))
    eval_loss = statistics.mean(losses)
    return {"name": name, "step_time_s": statistics.median(times),
            "tokens_per_sec": tokens / sum(times),
            "peak_mem_gb": peak, "mem_before_steps_gb": baseline,
            "trainable_params": modeling.trainable_params(net), "eval_loss": eval_loss,
            "selected_modules": len(chosen), "lowest_layer": min(int(c.split(".")[2]) for c in chosen)}


def one_time_costs() -> dict:
    """SmolLM2's GGUF conversion and its SNR scan, timed in this process (run it with
    SPECTRAQLORA_CACHE pointing at an empty dir)."""
    from spectraqlora import checkpoint
    from spectraqlora.config import compose, to_train_config
    from spectraqlora.scanner import compute

    model = to_train_config(compose("model=smollm2")).model
    began = time.perf_counter()
    files = checkpoint.safetensors_files(checkpoint.resolve(model))
    converted = time.perf_counter()
    table = compute(files, progress=False)
    return {"convert_s": converted - began, "scan_s": time.perf_counter() - converted, "modules": len(table)}


def reset_peak_memory(device) -> float:
    """Start the peak over from here (so loading does not count); returns the memory now, GB.
    CPU: Linux's resident-set high-water mark, reset through /proc/self/clear_refs."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**30
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") / 2**20


def peak_memory_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return _status_kb("VmHWM") / 2**20


def _status_kb(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", choices=list(MODELS), default="bench_llama")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="a subset of the configurations")
    parser.add_argument("--one", choices=sorted(CONFIGS | {"one_time_costs"}), help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.one == "one_time_costs":
        args.out.write_text(json.dumps(one_time_costs()))
        return
    if args.one:
        args.out.write_text(json.dumps(measure(args.model, args.one, args.steps, args.warmup, args.batch, args.seq)))
        return

    names = args.only or list(MODELS[args.model][1])
    if args.model == "smollm2":
        child = args.out.with_suffix(".one_time.json")
        with tempfile.TemporaryDirectory() as cache:
            subprocess.run([sys.executable, __file__, "--one", "one_time_costs", "--out", str(child)], check=True,
                           stdout=subprocess.DEVNULL, env={**os.environ, "SPECTRAQLORA_CACHE": cache})
        once = json.loads(child.read_text())
        child.unlink()
        print(f"one-time: GGUF conversion {once['convert_s']:.1f} s, scan of {once['modules']} modules "
              f"{once['scan_s']:.1f} s", flush=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for round_ in range(args.repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            child = args.out.with_suffix(f".{name}.{round_}.json")
            cmd = [sys.executable, __file__, "--model", args.model, "--one", name, "--out", str(child), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--seq", str(args.seq)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            runs[name].append(json.loads(child.read_text()))
            child.unlink()
            print(f"round {round_} {name}: {runs[name][-1]['step_time_s']:.3f} s/step", flush=True)

    records = []
    for name, got in runs.items():
        record = dict(got[0])
        for key in ("step_time_s", "tokens_per_sec", "peak_mem_gb"):
            record[key] = statistics.median(r[key] for r in got)
        record["step_time_s_runs"] = [round(r["step_time_s"], 4) for r in got]
        records.append(record)
    args.out.write_text(json.dumps({"one_time": once, "configs": records} if args.model == "smollm2" else records,
                                   indent=2) + "\n")
    by = {r["name"]: r for r in records}
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{'config':<26} {'s/step':>7} {'tok/s':>7} {'peak GB':>8} {'trainable':>10} {'eval loss':>9} {'low':>4}")
    for r in records:
        print(f"{r['name']:<26} {r['step_time_s']:7.3f} {r['tokens_per_sec']:7.0f} {r['peak_mem_gb']:8.3f} "
              f"{r['trainable_params']:>10,} {r['eval_loss']:9.4f} {r['lowest_layer']:>4}")
    for a, b in (("top_half", "all"), ("top_half_gc", "top_half_gc_prepare_kbit"), ("spectrum25", "all"),
                 ("last7", "all"), ("last7", "spectrum25")):
        if a in by and b in by:
            print(f"{a}/{b}: step time {by[a]['step_time_s'] / by[b]['step_time_s']:.2f}x, "
                  f"peak memory {by[a]['peak_mem_gb'] / by[b]['peak_mem_gb']:.2f}x")


if __name__ == "__main__":
    main()
