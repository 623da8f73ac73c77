"""The CPU's practical fp32 ceiling, and what share of it a measured tokens/s is.

Times torch.mm in fp32 with torch's default threads at the shapes of a decoder's linear layers
for a batch of `--tokens` positions (q/o, k/v, gate/up, down), interleaved over --repeats rounds,
and a large square GEMM; prints GFLOP/s (median and range over rounds). With --tokens-per-sec,
also the GFLOP/s that throughput means on the model (2 FLOPs per weight per token in a forward
pass of the decoder's linear layers; training of a frozen base: forward plus activation backward,
twice that, before LoRA) and its share of the ceiling at those shapes.

    python scripts/bench_gemm.py --model-dir ~/.cache/spectraqlora/smollm2-135m-instruct --tokens 400 1250
    python scripts/bench_gemm.py --model-dir DIR --tokens 400 1250 --train-tokens-per-sec 215 --eval-tokens-per-sec 590

Training is set against the ceiling at the first --tokens (a training batch's positions),
evaluation against the last (an eval batch's).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def linear_shapes(config: dict) -> dict[str, tuple[int, int, int]]:
    """(in, out, how many) of the linear layers of one decoder layer of a Llama-style config."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    return {"q_proj/o_proj": (hidden, hidden, 2), "k_proj/v_proj": (hidden, kv, 2),
            "gate_proj/up_proj": (hidden, inter, 2), "down_proj": (inter, hidden, 1)}


def forward_flops_per_token(config: dict) -> float:
    """2 FLOPs per weight of the decoder's linear layers (no embedding, no head, no attention)."""
    per_layer = sum(i * o * count for i, o, count in linear_shapes(config).values())
    return 2.0 * per_layer * config["num_hidden_layers"]


def gflops(m: int, k: int, n: int, seconds: float, calls: int) -> float:
    return 2.0 * m * k * n * calls / seconds / 1e9


def time_mm(a: torch.Tensor, b: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, b)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="a checkpoint dir with config.json")
    parser.add_argument("--tokens", type=int, nargs="+", default=[400], help="positions per matmul")
    parser.add_argument("--square", type=int, default=2048, help="side of the large square GEMM")
    parser.add_argument("--repeats", type=int, default=10, help="rounds")
    parser.add_argument("--seconds", type=float, default=0.5, help="time per shape per round")
    parser.add_argument("--train-tokens-per-sec", type=float, help="a training throughput to set against it")
    parser.add_argument("--eval-tokens-per-sec", type=float, help="an evaluation throughput to set against it")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    config = json.loads((args.model_dir / "config.json").read_text())
    layers = linear_shapes(config)
    shapes = {f"{name} x{t}": (t, i, o) for t in args.tokens for name, (i, o, _) in layers.items()}
    shapes[f"square {args.square}"] = (args.square, args.square, args.square)
    tensors = {key: (torch.randn(m, k), torch.randn(k, n)) for key, (m, k, n) in shapes.items()}
    calls = {}
    for key, (a, b) in tensors.items():  # warm up, and size each shape's calls to --seconds
        per_call = time_mm(a, b, 3) / 3
        calls[key] = max(3, int(args.seconds / per_call))
    rounds = {key: [] for key in shapes}
    for r in range(args.repeats):
        for key in (shapes if r % 2 == 0 else reversed(list(shapes))):
            a, b = tensors[key]
            rounds[key].append(gflops(*shapes[key], time_mm(a, b, calls[key]), calls[key]))
    result = {"threads": torch.get_num_threads(), "forward_gflop_per_token": forward_flops_per_token(config) / 1e9,
              "gflops": {key: {"median": statistics.median(v), "min": min(v), "max": max(v)} for key, v in rounds.items()}}
    print(f"torch {torch.__version__}, {result['threads']} threads; forward of the decoder's linear layers: "
          f"{result['forward_gflop_per_token']:.3f} GFLOP per token")
    for key, g in result["gflops"].items():
        print(f"{key:<28} {g['median']:7.1f} GFLOP/s ({g['min']:.1f}-{g['max']:.1f})")
    # the ceiling at the model's shapes: all its linear layers' FLOPs over their summed times
    for t in args.tokens:
        own = {k: v for k, v in result["gflops"].items() if k.endswith(f" x{t}")}
        flops = {k: 2 * shapes[k][0] * shapes[k][1] * shapes[k][2] * layers[k.split(" ")[0]][2] for k in own}
        ceiling = sum(flops.values()) / sum(flops[k] / (own[k]["median"] * 1e9) for k in own) / 1e9
        result[f"ceiling_x{t}"] = ceiling
        print(f"the model's linear layers at {t} positions: {ceiling:.1f} GFLOP/s")
    # training at the first --tokens (a training batch's positions), evaluation at the last
    for what, rate, factor, t in (("training", args.train_tokens_per_sec, 2, args.tokens[0]),
                                  ("evaluation", args.eval_tokens_per_sec, 1, args.tokens[-1])):
        if rate:
            used = rate * factor * result["forward_gflop_per_token"]
            result[what] = {"tokens_per_sec": rate, "gflops": used, "share": used / result[f"ceiling_x{t}"]}
            print(f"{what}: {rate:.0f} tokens/s = {used:.1f} GFLOP/s of the linear layers' "
                  f"{'forward + activation backward' if factor == 2 else 'forward'}, "
                  f"{used / result[f'ceiling_x{t}']:.0%} of their {result[f'ceiling_x{t}']:.1f} at {t} positions")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
