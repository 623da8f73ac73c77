"""The CPU's practical fp32 ceiling, and what share of it a measured tokens/s is.

Times torch.mm in fp32 with torch's default threads at every linear shape of a model's decoder
(transformers builds the model from its config.json on the meta device: no weights are read) for
a batch of `--tokens` positions, interleaved over --repeats rounds, and a large square GEMM; prints
GFLOP/s (median and range over rounds) and, per --tokens, the ceiling at the model's shapes (all
its linear layers' FLOPs over their summed times). With --train-tokens-per-sec and
--eval-tokens-per-sec, also the GFLOP/s that throughput means (2 FLOPs per linear weight per
token forward; training of a frozen base: forward plus activation backward, twice that, before
LoRA) and its share of the ceiling: training at the first --tokens (a training batch's
positions), evaluation at the last (an eval batch's).

    python scripts/bench_gemm.py --model-dir ~/.cache/spectraqlora/smollm2-135m-instruct --tokens 400 1280 \\
        --train-tokens-per-sec 216.8 --eval-tokens-per-sec 586.8
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch


def linear_shapes(model_dir: Path) -> Counter:
    """(in, out) -> how many, of the linear layers in the model's decoder (AutoModel: no head)."""
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    return Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))


def forward_flops_per_token(shapes: Counter) -> float:
    """2 FLOPs per weight of these linear layers (no embedding, no head, no attention scores)."""
    return 2.0 * sum(i * o * count for (i, o), count in shapes.items())


def time_mm(a: torch.Tensor, b: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, b)
    return time.perf_counter() - start


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="a checkpoint dir with config.json")
    parser.add_argument("--tokens", type=positive(int), nargs="+", default=[400], help="positions per matmul")
    parser.add_argument("--square", type=positive(int), default=2048, help="side of the large square GEMM")
    parser.add_argument("--repeats", type=positive(int), default=10, help="rounds")
    parser.add_argument("--seconds", type=positive(float), default=0.5, help="time per shape per round")
    parser.add_argument("--train-tokens-per-sec", type=positive(float), help="a training throughput to set against it")
    parser.add_argument("--eval-tokens-per-sec", type=positive(float), help="an evaluation throughput to set against it")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir}: no config.json there")

    layers = linear_shapes(args.model_dir)
    gemms = {(t, i, o) for t in args.tokens for i, o in layers} | {(args.square,) * 3}
    tensors = {mkn: (torch.randn(mkn[0], mkn[1]), torch.randn(mkn[1], mkn[2])) for mkn in gemms}
    calls = {mkn: max(3, int(args.seconds * 3 / time_mm(a, b, 3))) for mkn, (a, b) in tensors.items()}  # warm-up
    order, rounds = sorted(gemms), {mkn: [] for mkn in gemms}
    for r in range(args.repeats):
        for m, k, n in order if r % 2 == 0 else reversed(order):
            a, b = tensors[m, k, n]
            rounds[m, k, n].append(2.0 * m * k * n * calls[m, k, n] / time_mm(a, b, calls[m, k, n]) / 1e9)
    median = {mkn: statistics.median(v) for mkn, v in rounds.items()}
    flops = forward_flops_per_token(layers)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the decoder's linear layers: "
          f"{flops / 1e9:.3f} GFLOP per token forward")
    for mkn in order:
        print(f"{'x'.join(map(str, mkn)):<18} {median[mkn]:7.1f} GFLOP/s ({min(rounds[mkn]):.1f}-{max(rounds[mkn]):.1f})")
    ceiling = {}
    for t in args.tokens:  # all the model's linear layers' FLOPs over their summed times
        work = {(i, o): 2.0 * t * i * o * count for (i, o), count in layers.items()}
        ceiling[t] = sum(work.values()) / sum(w / median[t, i, o] for (i, o), w in work.items())
        print(f"the model's linear layers at {t} positions: {ceiling[t]:.1f} GFLOP/s")
    result = {"threads": torch.get_num_threads(), "forward_gflop_per_token": flops / 1e9,
              "gflops": {"x".join(map(str, mkn)): {"median": median[mkn], "min": min(v), "max": max(v)}
                         for mkn, v in rounds.items()},
              "ceiling": {str(t): c for t, c in ceiling.items()}}
    for what, rate, factor, t in (("training", args.train_tokens_per_sec, 2, args.tokens[0]),
                                  ("evaluation", args.eval_tokens_per_sec, 1, args.tokens[-1])):
        if rate:
            used = rate * factor * flops / 1e9
            result[what] = {"tokens_per_sec": rate, "gflops": used, "share": used / ceiling[t]}
            print(f"{what}: {rate:.0f} tokens/s = {used:.1f} GFLOP/s of the linear layers' "
                  f"{'forward + activation backward' if factor == 2 else 'forward'}, "
                  f"{used / ceiling[t]:.0%} of their {ceiling[t]:.1f} at {t} positions")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
