"""Benchmark training cost, side by side: what carries adapters, how rows are batched, and the
standard QLoRA recipe a user would write by hand.

--model bench_llama (default): conf/model/bench_llama.yaml (random-init Llama, 8 layers, hidden
512, nf4, fp32 compute) on the synthetic instruction task packed into blocks of --seq tokens:

  all                       plain QLoRA: adapters on every linear module of every layer
  top_half                  the same module types on the top half of the layers only
  spectrum25                selection=spectrum top_frac=0.25 (random weights: the SNR ranking is
                            noise, so its lowest selected layer decides its cost)
  top_half_gc               top_half with spectraqlora's checkpointing (non-reentrant, no input grads)
  top_half_gc_prepare_kbit  top_half prepared the usual way: peft's prepare_model_for_kbit_training
                            defaults (input grads, reentrant checkpointing, fp32 upcasts)
  lora_unquantized          top_half without quantization, for reference

--model smollm2: the real SmolLM2-135M-Instruct (nf4) on Rotten Tomatoes in its chat template
(--seq is dataset.max_length), first its one-time costs (GGUF conversion into a fresh cache, the
SNR scan of its 210 matrices), then all / spectrum25 / last7 (selection=layers last_k=7: the same
49-module count on the top layers).

--model llm_rt: the job of experiment=llm_rt (SmolLM2-135M-Instruct as a 4-bit classifier on
Rotten Tomatoes, batch 16, max_length 64), each selection with the default batching (auto:
padding-free on this model) and with `_padded` batching (each batch padded to its longest row):
all (210 modules), spectrum (top 25% per type, 49), last7 (the same 49-module count on the top
layers); and `recipe`, the standard QLoRA recipe as the transformers, peft and bitsandbytes docs
give it: the same 4-bit base through peft's prepare_model_for_kbit_training, LoraConfig(
target_modules="all-linear", task_type=SEQ_CLS) with our r, alpha and dropout, DataCollatorWithPadding,
the model's own loss. Evaluation throughput (the eval split, forward only, in the Trainer's eval
batches) is measured for all, all_padded and spectrum (the llm_rt job's own selection), one eval
batch right after each training step of the same configuration (the next batch each round, round
after round through the split), so that evaluation and the training it is divided by share the
machine's state.

Every configuration is built once in this one process and trained on the same batches. After
--warmup steps each, the timed steps are interleaved: each of --repeats rounds runs --steps steps
of every configuration, the order reversed every other round, so that the machine's drift hits
every configuration alike (`--steps 1`: configurations alternate step by step, so that a slowdown
of the machine hits neighbouring configurations alike). Each figure is the median over rounds with
its range (min-max); each ratio is computed within each round, then the median and range of those,
and pooled over all rounds (one configuration's time over the other's) with a 95% bootstrap interval
over rounds: where the figure may land on as many other rounds (other batches too) on a machine as
noisy. A rerun trains on the same batches, so it moves less: --compare pairs two runs round by
round and says how far the machine alone moves each figure, and how many rounds keep a rerun
within 0.03 of it (on this 2-vCPU machine: the llm_rt job's spectrum/spectrum_padded run alone with
`--only`, ~120 rounds, 15 minutes; docs/benchmarks.md).
Evaluation over training is reported per pass over the eval split (its rounds' eval tokens/s over
the same rounds' training tokens/s) and pooled likewise. Tokens are the rows' own tokens (no
padding), the same count for every configuration. A step is forward + backward + AdamW step.

--memory measures peak memory instead, each configuration in a fresh process (so its peak is its
own): the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over the
timed training steps, then over one evaluation (CUDA: max allocated).

    python scripts/bench_train.py --model llm_rt --out results.json [--steps 1] [--repeats 48]
    python scripts/bench_train.py --model llm_rt --memory --out memory.json
    python scripts/bench_train.py --compare A.json B.json
    python scripts/bench_train.py --out results.json [--steps 8] [--batch 2] [--seq 256] [--repeats 3]
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

PREPARE_KBIT, RECIPE = "+prepare_kbit", "+recipe"  # configurations built outside spectraqlora's path
MODELS = {  # model -> (its overrides, defaults of --batch and --seq, its configurations)
    "bench_llama": (["model=bench_llama", "dataset.packing=true", "dataset.eval_size=32"], (2, 256), {
        "all": ["selection=all"],
        "top_half": ["selection=layers", "selection.last_k=4"],
        "spectrum25": ["selection=spectrum", "selection.top_frac=0.25"],
        "top_half_gc": ["selection=layers", "selection.last_k=4", "trainer.gradient_checkpointing=true"],
        "top_half_gc_prepare_kbit": ["selection=layers", "selection.last_k=4", PREPARE_KBIT],
        "lora_unquantized": ["selection=layers", "selection.last_k=4", "quant=none"],
    }),
    "smollm2": (["model=smollm2", "dataset=rotten_tomatoes", "dataset.eval_size=32"], (16, 96), {
        "all": ["selection=all"],
        "spectrum25": ["selection=spectrum", "selection.top_frac=0.25"],
        "last7": ["selection=layers", "selection.last_k=7"],
    }),
    "llm_rt": (["experiment=llm_rt"], (None, None), {
        "all": ["selection=all"],
        "all_padded": ["selection=all", "dataset.batching=padded"],
        "spectrum": ["selection=spectrum", "selection.top_frac=0.25"],
        "spectrum_padded": ["selection=spectrum", "selection.top_frac=0.25", "dataset.batching=padded"],
        "last7": ["selection=layers", "selection.last_k=7"],
        "last7_padded": ["selection=layers", "selection.last_k=7", "dataset.batching=padded"],
        "recipe": ["selection=all", "dataset.batching=padded", RECIPE],
    }),
}
EVALUATED = {"llm_rt": ["all", "all_padded", "spectrum"]}
RATIOS = [("top_half", "all"), ("top_half_gc", "top_half_gc_prepare_kbit"), ("spectrum25", "all"),
          ("last7", "all"), ("last7", "spectrum25"), ("all", "all_padded"), ("spectrum", "spectrum_padded"),
          ("last7", "last7_padded"), ("all", "recipe")]
CONFIGS = {name for *_, configs in MODELS.values() for name in configs}


class Bench:
    """One configuration, built in this process: its model, optimizer, collator and loss."""

    def __init__(self, model: str, name: str, shared: Shared):
        import torch

        from spectraqlora.config import Batching
        from spectraqlora.data import batching, scoring
        from spectraqlora.run import build, losses, modeling
        from spectraqlora.spectrum.scanner import scan_and_select
        from spectraqlora.spectrum.selection import Selection

        overrides = MODELS[model][2][name]
        self.name, self.cfg = name, shared.config([o for o in overrides if not o.startswith("+")])
        task = self.cfg.model.task
        table, chosen = scan_and_select(shared.inputs.files, self.cfg)
        torch.manual_seed(self.cfg.seed)
        if RECIPE in overrides:  # the usual QLoRA recipe: peft's defaults around the same base
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

            lora = self.cfg.lora
            base = prepare_model_for_kbit_training(build.base_model(shared.inputs, self.cfg))
            self.net = get_peft_model(base, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules="all-linear",
                task_type="SEQ_CLS" if task.value == "classification" else "CAUSAL_LM"))
            self.loss = None
            mode = Batching.padded
        else:
            if PREPARE_KBIT in overrides:
                from peft import prepare_model_for_kbit_training

                base = prepare_model_for_kbit_training(build.base_model(shared.inputs, self.cfg))
                self.net = modeling.add_lora(base, modeling.model_names(base, chosen), self.cfg.lora, self.cfg.model)
            else:
                self.net, _ = build.new_model(shared.inputs, self.cfg, Selection(table, chosen))
            hf_model = scoring.hf_model(self.net)
            mode = batching.resolve(self.cfg.dataset.batching, hf_model, task, self.cfg.dataset.packing)
            if mode is Batching.padding_free:  # as training.build_trainer does
                batching.attend_per_row(hf_model)
            self.loss = losses.LabelLoss(task, hf_model, mode is Batching.padding_free)
        self.collate = batching.collator(shared.inputs.tokenizer, task, mode)
        self.optim = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=1e-4)
        self.device = next(self.net.parameters()).device
        self.facts = {"batching": mode.value, "selected_modules": len(chosen),
                      "trainable_params": modeling.trainable_params(self.net),
                      "lowest_layer": min((int(c.split(".")[2]) for c in chosen), default=None)}

    def _loss(self, batch: dict):
        batch = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}  # max_length_q: an int
        if self.loss is None:
            return self.net(**batch).loss
        inputs = self.loss.model_inputs(batch)
        labels = inputs.pop("labels")
        return self.loss(self.net(**inputs), labels)

    def step(self, rows: list[dict]) -> float:
        """One training step on these rows; its time in seconds."""
        batch = self.collate(rows)
        self.net.train()
        _sync(self.device)
        start = time.perf_counter()
        self._loss(batch).backward()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - start

    def evaluate(self, batches: list[list[dict]]) -> float:
        """Forward passes over these eval batches; their time in seconds."""
        import torch

        self.net.eval()
        collated = [self.collate(rows) for rows in batches]
        _sync(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            for batch in collated:
                self._loss(batch)
        _sync(self.device)
        return time.perf_counter() - start


class Shared:
    """What every configuration of a model shares: the checkpoint, tokenizer and rows."""

    def __init__(self, model: str, batch: int | None, seq: int | None):
        from spectraqlora.run import build

        base, (batch_default, seq_default), _ = MODELS[model]
        self.overrides = [*base, *([f"dataset.max_length={seq or seq_default}"] if seq or seq_default else [])]
        cfg = self.config([])
        self.batch = batch or batch_default or cfg.trainer.per_device_train_batch_size
        self.eval_batch = cfg.trainer.per_device_eval_batch_size
        self.inputs = build.load_inputs(cfg)
        tokenized, _ = self.inputs.tokenized(cfg)
        rows = tokenized["train"]
        if cfg.dataset.packing:
            rows = rows.filter(lambda r: len(r["input_ids"]) == cfg.dataset.max_length)  # full blocks only
        self.train = rows.shuffle(seed=0)
        eval_rows = list(tokenized["eval"])
        self.eval_batches = [eval_rows[i:i + self.eval_batch] for i in range(0, len(eval_rows), self.eval_batch)]

    def config(self, overrides: list[str]):
        from spectraqlora.config import compose, to_train_config

        return to_train_config(compose(*self.overrides, *overrides))

    def batch_rows(self, i: int) -> list[dict]:
        return [self.train[i * self.batch + j] for j in range(self.batch)]

    def tokens(self, i: int) -> int:
        return sum(len(r["input_ids"]) for r in self.batch_rows(i))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(model: str, names: list[str], args) -> dict:
    """Every configuration built here, its steps interleaved with the others' round by round."""
    shared = Shared(model, args.batch, args.seq)
    benches = {n: Bench(model, n, shared) for n in names}
    for bench in benches.values():
        for i in range(args.warmup):
            bench.step(shared.batch_rows(i))
    evaluated = [n for n in EVALUATED.get(model, []) if n in benches]
    rounds = []
    for r in range(args.repeats):
        first = args.warmup + r * args.steps
        batches = range(first, first + args.steps)
        tokens = sum(shared.tokens(i) for i in batches)
        eval_rows = shared.eval_batches[r % len(shared.eval_batches)] if evaluated else []
        eval_tokens = sum(len(row["input_ids"]) for row in eval_rows)
        got = {}
        for name in names if r % 2 == 0 else reversed(names):
            seconds = [benches[name].step(shared.batch_rows(i)) for i in batches]
            got[name] = {"tokens_per_sec": tokens / sum(seconds), "step_time_s": statistics.median(seconds),
                         "tokens": tokens, "seconds": sum(seconds)}
            if name in evaluated:  # one eval batch beside the training it is compared with
                got[name].update(eval_seconds=benches[name].evaluate([eval_rows]), eval_tokens=eval_tokens)
        rounds.append(got)
        print(f"round {r}: " + ", ".join(f"{n} {g['tokens_per_sec']:.1f}" for n, g in got.items()) + " tokens/s",
              flush=True)
    configs = {}
    for name in names:
        per_round = [got[name] for got in rounds]
        configs[name] = {**benches[name].facts, **{key: spread([g[key] for g in per_round])
                                                   for key in ("tokens_per_sec", "step_time_s")}}
        if name in evaluated:
            configs[name].update(_evaluation(per_round, len(shared.eval_batches)))
    # per round (median and range), and pooled: all rounds' time of b over a's (the same tokens)
    ratios = {f"{a}/{b}": {**spread([got[a]["tokens_per_sec"] / got[b]["tokens_per_sec"] for got in rounds]),
                           **pooled(lambda sb, sa, axis: sb.sum(axis) / sa.sum(axis),
                                    *([got[n]["seconds"] for got in rounds] for n in (b, a)))}
              for a, b in RATIOS if a in benches and b in benches}
    return {"model": model, "batch": shared.batch, "steps": args.steps, "repeats": args.repeats,
            "train_tokens_per_round": [sum(shared.tokens(args.warmup + r * args.steps + k) for k in range(args.steps))
                                       for r in range(args.repeats)],
            "eval_batches": len(shared.eval_batches), "configs": configs, "ratios": ratios}


def _evaluation(rounds: list[dict], per_pass: int) -> dict:
    """Eval tokens/s, and over the training tokens/s of the same rounds: per pass over the eval
    split (its median and range) and pooled over every round."""
    def rate(rows: list[dict], tokens: str, seconds: str) -> float:
        return sum(g[tokens] for g in rows) / sum(g[seconds] for g in rows)

    def over(et, es, t, s, axis):
        return et.sum(axis) / es.sum(axis) / (t.sum(axis) / s.sum(axis))

    passes = [rounds[i:i + per_pass] for i in range(0, len(rounds) - per_pass + 1, per_pass)] or [rounds]
    return {"eval_tokens_per_sec": spread([rate(p, "eval_tokens", "eval_seconds") for p in passes]),
            "eval_over_train": {**spread([rate(p, "eval_tokens", "eval_seconds") / rate(p, "tokens", "seconds")
                                          for p in passes]),
                                **pooled(over, *([g[key] for g in rounds]
                                                 for key in ("eval_tokens", "eval_seconds", "tokens", "seconds")))}}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": [round(v, 4) for v in values]}


def pooled(statistic, *columns: list[float]) -> dict:
    """A statistic of all rounds together (columns: one value per round each), and its 95%
    interval from resampling whole rounds (scipy's paired BCa bootstrap): where the statistic may
    land on as many other rounds, batches included, on a machine as noisy as this one was."""
    import numpy as np
    from scipy.stats import bootstrap

    data = [np.asarray(c, dtype=float) for c in columns]
    if len(data[0]) < 3:
        return {"pooled": float(statistic(*data, axis=-1))}
    ci = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=4000,
                   rng=np.random.default_rng(0)).confidence_interval
    return {"pooled": float(statistic(*data, axis=-1)), "pooled_95": [float(ci.low), float(ci.high)]}


def _interval(r: dict) -> str:
    return f", 95% {r['pooled_95'][0]:.3f}-{r['pooled_95'][1]:.3f}" if "pooled_95" in r else ""


def memory(model: str, name: str, args) -> dict:
    """One configuration in this (fresh) process: peak memory over the timed steps, then over
    one evaluation, each from a reset after what came before."""
    shared = Shared(model, args.batch, args.seq)
    bench = Bench(model, name, shared)
    for i in range(args.warmup):
        bench.step(shared.batch_rows(i))
    before = reset_peak_memory(bench.device)
    for i in range(args.warmup, args.warmup + args.steps):
        bench.step(shared.batch_rows(i))
    train_peak = peak_memory_gb(bench.device)
    reset_peak_memory(bench.device)
    bench.evaluate(shared.eval_batches)
    return {"name": name, "mem_before_steps_gb": before, "train_peak_gb": train_peak,
            "eval_peak_gb": peak_memory_gb(bench.device)}


def one_time_costs() -> dict:
    """SmolLM2's GGUF conversion and its SNR scan, timed in this process (run it with
    SPECTRAQLORA_CACHE pointing at an empty dir)."""
    from spectraqlora.config import compose, to_train_config
    from spectraqlora.spectrum.scanner import compute
    from spectraqlora.store import checkpoint

    model = to_train_config(compose("model=smollm2")).model
    began = time.perf_counter()
    files = checkpoint.safetensors_files(checkpoint.resolve(model))
    converted = time.perf_counter()
    table = compute(files, progress=False)
    return {"convert_s": converted - began, "scan_s": time.perf_counter() - converted, "modules": len(table)}


def reset_peak_memory(device) -> float:
    """Start the peak over from here; returns the memory now, GB. CPU: Linux's resident-set
    high-water mark, reset through /proc/self/clear_refs."""
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


def _child(args, *extra: str) -> dict:
    """This script in a fresh process; its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, __file__, "--model", args.model, "--out", str(out), "--steps", str(args.steps),
               "--warmup", str(args.warmup), *(["--batch", str(args.batch)] if args.batch else []),
               *(["--seq", str(args.seq)] if args.seq else []), *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, **({"SPECTRAQLORA_CACHE": tmp} if "one_time_costs" in extra else {})})
        return json.loads(out.read_text())


def compare(a: dict, b: dict, within: float = 0.03) -> dict:
    """Two runs on the same batches: each pooled figure in both and their difference, and how far
    a rerun moves it from the machine alone. The figure's per-round (per-pass for evaluation) values
    of the two runs, paired item by item, give the spread of their log ratio, hence about the
    standard deviation of the pooled figure's difference between runs, and the rounds a run needs
    for a rerun to land within `within` of it 95% of the time."""
    import numpy as np

    if a["train_tokens_per_round"] != b["train_tokens_per_round"]:
        raise SystemExit("error: the two runs trained on different batches: run both with the same --model, "
                         "--steps, --warmup and --repeats")
    figures = {key: (a["ratios"][key], b["ratios"][key], "rounds") for key in a["ratios"] if key in b["ratios"]}
    figures |= {f"{n} evaluation/training": (a["configs"][n]["eval_over_train"], b["configs"][n]["eval_over_train"],
                                             f"passes of {a['eval_batches']} rounds")
                for n in a["configs"] if "eval_over_train" in a["configs"][n] and "eval_over_train" in b["configs"].get(n, {})}
    out = {}
    for key, (x, y, unit) in figures.items():
        paired = np.log(np.asarray(x["rounds"]) / np.asarray(y["rounds"]))
        sd = x["pooled"] * paired.std(ddof=1) / np.sqrt(len(paired))  # of the pooled A - B
        out[key] = {"pooled": [x["pooled"], y["pooled"]], "difference": y["pooled"] - x["pooled"],
                    "rerun_sd": float(sd), "items": len(paired), "unit": unit,
                    "items_for_within": int(np.ceil(len(paired) * (1.96 * sd / within) ** 2))}
    return out


def report(result: dict) -> None:
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"{result['repeats']} rounds of {result['steps']} steps, batch {result['batch']}")
    print(f"{'config':<26} {'batching':<13} {'tokens/s (min-max)':>22} {'s/step':>7} {'eval tok/s':>12} "
          f"{'trainable':>10} {'low':>4}")
    for name, c in result["configs"].items():
        t = c["tokens_per_sec"]
        evals = f"{c['eval_tokens_per_sec']['median']:12.0f}" if "eval_tokens_per_sec" in c else " " * 12
        print(f"{name:<26} {c['batching']:<13} {t['median']:9.1f} ({t['min']:.1f}-{t['max']:.1f}) "
              f"{c['step_time_s']['median']:7.3f} {evals} {c['trainable_params']:>10,} {c['lowest_layer']!s:>4}")
    for name, c in result["configs"].items():
        if "eval_over_train" in c:
            e = c["eval_over_train"]
            print(f"{name}: evaluation {e['median']:.2f}x its training tokens/s (passes {e['min']:.2f}-{e['max']:.2f}; "
                  f"pooled {e['pooled']:.3f}x{_interval(e)})")
    for key, r in result["ratios"].items():
        print(f"{key}: tokens/s {r['median']:.3f}x (rounds {r['min']:.3f}-{r['max']:.3f}; pooled {r['pooled']:.3f}x"
              f"{_interval(r)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, help="where the results go (JSON)")
    what.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                      help="two runs' results on the same batches: each pooled figure's difference, against "
                           "how far the machine alone moves it (runs nothing)")
    parser.add_argument("--model", choices=list(MODELS), default="bench_llama")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, help="rows per step (default: the model's)")
    parser.add_argument("--seq", type=int, help="dataset.max_length (default: the model's)")
    parser.add_argument("--repeats", type=int, default=6, help="rounds")
    parser.add_argument("--memory", action="store_true", help="peak memory per configuration, fresh processes")
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="a subset of the configurations")
    parser.add_argument("--one", choices=sorted(CONFIGS | {"one_time_costs"}), help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.compare:
        if given := [o for o in ("--memory", "--only", "--one") if getattr(args, o[2:])]:
            parser.error(f"--compare runs nothing: drop {' '.join(given)}")
        if missing := [str(p) for p in args.compare if not p.is_file()]:
            parser.error(f"no such file: {', '.join(missing)}")
        for key, c in compare(*(json.loads(p.read_text()) for p in args.compare)).items():
            print(f"{key}: {c['pooled'][0]:.3f} / {c['pooled'][1]:.3f}, difference {c['difference']:+.3f}; "
                  f"a rerun's from the machine alone: SD {c['rerun_sd']:.3f} over {c['items']} {c['unit']}, "
                  f"within 0.03 at 95% from {c['items_for_within']}")
        return
    if args.one == "one_time_costs":
        args.out.write_text(json.dumps(one_time_costs()))
        return
    if args.one:
        args.out.write_text(json.dumps(memory(args.model, args.one, args)))
        return
    names = args.only or list(MODELS[args.model][2])
    if args.memory:
        peaks = [_child(args, "--one", name) for name in names]
        args.out.write_text(json.dumps(peaks, indent=2) + "\n")
        for p in peaks:
            print(f"{p['name']:<26} training peak {p['train_peak_gb']:.3f} GB, evaluation peak {p['eval_peak_gb']:.3f} GB "
                  f"(before the steps {p['mem_before_steps_gb']:.3f} GB)")
        return
    once = None
    if args.model == "smollm2":
        once = _child(args, "--one", "one_time_costs")
        print(f"one-time: GGUF conversion {once['convert_s']:.1f} s, scan of {once['modules']} modules "
              f"{once['scan_s']:.1f} s", flush=True)
    result = {**timed(args.model, names, args), **({"one_time": once} if once else {})}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    report(result)


if __name__ == "__main__":
    main()
