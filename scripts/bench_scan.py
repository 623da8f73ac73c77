"""Benchmark the Spectrum scan: spectraqlora's streaming scan vs the whole-model load of spectrum.py.

What it measures, on a random-init Llama checkpoint (~0.5B parameters, bf16 safetensors, built once
in --workdir and reused):

  spectraqlora  spectraqlora's streaming scan (uncached): reads one 2-D weight at a time from
                the safetensors files and reduces it to its SNR with spectraqlora.spectrum.snr.
  reference     what the public spectrum.py does: AutoModelForCausalLM.from_pretrained(...,
                fp32), then the SNR of every nn.Linear inside model.model.layers, with the Spectrum
                formula written out here (independent of spectraqlora.spectrum.snr).

Each method runs in its own fresh subprocess (order alternated when --repeats > 1) and reports its
wall time from process start to result (imports, loading and all SVDs) and its peak RSS
(ru_maxrss). The parent compares the per-type top-25% selections, the largest relative SNR
difference, and the ratios reference/spectraqlora for wall time and peak RSS.

Run from the repository root, with the venv active:

    python scripts/bench_scan.py --out /tmp/bench_scan.json [--workdir DIR] [--repeats N]
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # child wall time counts from here, before torch/transformers imports

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

METHODS = ("spectraqlora", "reference")
TOP_FRAC = 0.25


# ---------------------------------------------------------------- helpers used by every process

def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def process_info() -> dict:
    """torch build and threads, CPU seconds used, and the load average at the end: a wall time
    far above the CPU seconds / threads, or a load above nproc, means the CPU was shared."""
    import torch

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_s": usage.ru_utime + usage.ru_stime, "loadavg_end": os.getloadavg()}


# ---------------------------------------------------------------- children

def child_build(ckpt: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> dict:
    """Save a random-init (seed 0) bf16 Llama at `ckpt`, atomically."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden,
                         intermediate_size=intermediate, vocab_size=vocab,
                         num_attention_heads=16, num_key_value_heads=16,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    tmp = Path(tempfile.mkdtemp(dir=ckpt.parent, prefix=f".{ckpt.name}."))
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(ckpt)
    return {"params": n_params}


def child_spectraqlora(ckpt: Path) -> dict:
    """spectraqlora's streaming scan without its cache (`scanner.compute`)."""
    from spectraqlora.spectrum.scanner import compute
    from spectraqlora.store.checkpoint import safetensors_files

    import_rss = peak_rss_gb()
    table = compute(safetensors_files(ckpt), progress=False)
    wall = time.perf_counter() - T0
    return {"wall_s": wall, "peak_rss_gb": peak_rss_gb(), "import_rss_gb": import_rss,
            "snr": {n: r["snr"] for n, r in table.items()},
            "types": {n: r["type"] for n, r in table.items()},
            "shapes": {n: r["shape"] for n, r in table.items()}, **process_info()}


def reference_snr(w) -> float:
    """Spectrum's SNR of one fp32 matrix, as the public spectrum.py computes it."""
    import torch

    s = torch.linalg.svdvals(w)  # descending
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    n, m = w.shape
    beta = min(n, m) / max(n, m)
    threshold = sigma * (1 + math.sqrt(beta))
    signal_values = s[s > threshold]
    noise_values = s[s <= threshold]
    if signal_values.numel() == 0:
        return 0.0
    signal = signal_values.sum()
    noise = noise_values.sum() if noise_values.numel() > 0 else 1.0
    return float((signal / noise) / s[0])


def child_reference(ckpt: Path) -> dict:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    import_rss = peak_rss_gb()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    load_s = time.perf_counter() - T0
    snr, types, shapes, svd_s = {}, {}, {}, {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for suffix, module in layer.named_modules():
                if not isinstance(module, nn.Linear):
                    continue
                name = f"model.layers.{i}.{suffix}"
                start = time.perf_counter()
                snr[name] = reference_snr(module.weight.float())
                svd_s[name] = time.perf_counter() - start
                types[name], shapes[name] = suffix, list(module.weight.shape)
    wall = time.perf_counter() - T0
    return {"wall_s": wall, "peak_rss_gb": peak_rss_gb(), "import_rss_gb": import_rss,
            "load_s": load_s, "snr": snr, "types": types, "shapes": shapes,
            "snr_seconds": svd_s, **process_info()}


def run_child(argv: list[str]) -> None:
    """Entry point of `--child METHOD CKPT [...]`: print the result as one JSON line."""
    method, ckpt, *rest = argv
    if method == "build":
        result = child_build(Path(ckpt), *map(int, rest))
    elif method == "spectraqlora":
        result = child_spectraqlora(Path(ckpt))
    elif method == "reference":
        result = child_reference(Path(ckpt))
    else:
        raise SystemExit(f"unknown child method {method!r}")
    print(json.dumps(result))


# ---------------------------------------------------------------- parent

def spawn(*args: str) -> dict:
    """Run this script as a fresh child process and parse its last stdout line."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args],
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_checkpoint(workdir: Path, args: argparse.Namespace) -> tuple[Path, bool]:
    """The checkpoint directory, built in a child process unless already there."""
    ckpt = workdir / (f"llama-l{args.layers}-h{args.hidden}-i{args.intermediate}"
                      f"-v{args.vocab}-bf16")
    if (ckpt / "config.json").is_file() and list(ckpt.glob("*.safetensors")):
        return ckpt, True
    workdir.mkdir(parents=True, exist_ok=True)
    spawn("build", str(ckpt), str(args.layers), str(args.hidden), str(args.intermediate),
          str(args.vocab))
    return ckpt, False


def top_set(snr: dict[str, float], types: dict[str, str], order: list[str]) -> set[str]:
    """Spectrum rule: per type, stable sort by SNR descending, keep floor(count * 0.25)."""
    chosen: set[str] = set()
    for t in sorted(set(types.values())):
        names = [n for n in order if types[n] == t]
        keep = math.floor(len(names) * TOP_FRAC)
        chosen.update(sorted(names, key=lambda n: -snr[n])[:keep])
    return chosen


def compare(a: dict, b: dict) -> dict:
    """Selections and SNR agreement of spectraqlora (a) vs reference (b)."""
    common = [n for n in a["snr"] if n in b["snr"]]
    layer = {n: int(n.split(".")[2]) for n in common}
    order = sorted(common, key=lambda n: (layer[n], n))
    types_differ = sorted(n for n in common if a["types"][n] != b["types"][n])
    rel = [abs(a["snr"][n] - b["snr"][n]) / abs(b["snr"][n])
           for n in common if b["snr"][n] != 0]
    set_a = top_set(a["snr"], a["types"], order)
    set_b = top_set(b["snr"], b["types"], order)
    return {"modules": len(common),
            "only_spectraqlora": sorted(set(a["snr"]) - set(b["snr"])),
            "only_reference": sorted(set(b["snr"]) - set(a["snr"])),
            "types_differ": types_differ,
            "top25_size": len(set_a),
            "top25_identical": set_a == set_b,
            "top25_only_spectraqlora": sorted(set_a - set_b),
            "top25_only_reference": sorted(set_b - set_a),
            "max_rel_snr_diff": max(rel) if rel else 0.0}


def code_version() -> dict:
    """The checkout's commit and whether spectraqlora/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                              text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "spectraqlora_dirty": bool(git("status", "--porcelain", "--", "spectraqlora"))}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Median wall time and peak RSS per method over the repeats, and their ratios."""
    s = {m: {"wall_s": statistics.median(r["wall_s"] for r in runs[m]),
             "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs[m]),
             "import_rss_gb": statistics.median(r["import_rss_gb"] for r in runs[m])}
         for m in METHODS}
    s["rss_ratio"] = s["reference"]["peak_rss_gb"] / s["spectraqlora"]["peak_rss_gb"]
    s["speedup"] = s["reference"]["wall_s"] / s["spectraqlora"]["wall_s"]
    return s


def print_table(summary: dict, comparison: dict, runs: dict[str, list[dict]]) -> None:
    print(f"{'method':<14}{'wall s':>10}{'peak RSS GB':>14}{'RSS after imports GB':>23}")
    for m in METHODS:
        s = summary[m]
        print(f"{m:<14}{s['wall_s']:>10.1f}{s['peak_rss_gb']:>14.2f}{s['import_rss_gb']:>23.2f}")
    for m in METHODS:
        for i, r in enumerate(runs[m]):
            print(f"  run {i + 1} {m:<13} wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB  loadavg at end "
                  f"{', '.join(f'{x:.2f}' for x in r['loadavg_end'])}")
    print(f"rss_ratio (reference/spectraqlora) = {summary['rss_ratio']:.2f}")
    print(f"speedup   (reference/spectraqlora) = {summary['speedup']:.2f}")
    load_s = statistics.median(r["load_s"] for r in runs["reference"])
    print(f"reference model load (incl. imports) = {load_s:.1f} s")
    print(f"modules compared = {comparison['modules']}, top-25% size = {comparison['top25_size']}, "
          f"identical = {comparison['top25_identical']}")
    print(f"max relative SNR difference = {comparison['max_rel_snr_diff']:.3g}")
    print(f"over all repeats: identical = {comparison['top25_identical_all_repeats']}, max "
          f"relative SNR difference = {comparison['max_rel_snr_diff_all_repeats']:.3g}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON results here")
    p.add_argument("--workdir", type=Path,
                   help="where the checkpoint is built and reused (default: a temp dir, removed)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=1)
    return p.parse_args()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_child(sys.argv[2:])
        return
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scan."))
    version = code_version()
    try:
        ckpt, reused = ensure_checkpoint(workdir, args)
        ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for r in range(args.repeats):
            for method in (METHODS if r % 2 == 0 else METHODS[::-1]):
                print(f"[repeat {r + 1}/{args.repeats}] {method} ...", file=sys.stderr, flush=True)
                runs[method].append(spawn(method, str(ckpt)))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    first = {m: runs[m][0] for m in METHODS}
    summary = summarize(runs)
    comparison = compare(first["spectraqlora"], first["reference"])
    every = [compare(a, b) for a, b in zip(runs["spectraqlora"], runs["reference"])]
    comparison["top25_identical_all_repeats"] = all(c["top25_identical"] for c in every)
    comparison["max_rel_snr_diff_all_repeats"] = max(c["max_rel_snr_diff"] for c in every)
    print_table(summary, comparison, runs)
    changed = code_version() != version
    if changed:
        print("WARNING: the spectraqlora checkout changed during the benchmark; rerun it")
    print(f"code: {version}")
    if args.out:
        result = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "code": version, "code_changed_during_run": changed,
            "machine": {"cpu": cpu_model(), "nproc": len(os.sched_getaffinity(0)),
                        "python": platform.python_version(),
                        "torch_version": first["spectraqlora"]["torch_version"],
                        "torch_threads": first["spectraqlora"]["torch_threads"]},
            "checkpoint": {"dir": str(ckpt), "reused": reused, "layers": args.layers,
                           "hidden": args.hidden, "intermediate": args.intermediate,
                           "vocab": args.vocab, "safetensors_bytes": ckpt_bytes},
            "summary": summary, "comparison": comparison, "runs": runs,
        }
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
