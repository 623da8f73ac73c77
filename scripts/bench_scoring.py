"""How much the class-name scoring in the eval loss pass saves: one evaluation of a causal LM on
labeled rows with the classes ranked in the loss pass (one-token class names), against the same
evaluation with choice_scores' own second pass over the prompts, alternating in one process.

    python scripts/bench_scoring.py [--rows 64] [--rounds 2]

SmolLM2-135M-Instruct (float32, no adapters: the scoring's cost, not the 4-bit path's) on Rotten
Tomatoes as a language model in its chat template. Prints each round's seconds and the accuracy
of both (equal by construction)."""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from spectraqlora.config import CONF_DIR, to_train_config
    from spectraqlora.run import build, loop

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_train_config(compose("train", overrides=[
            "model=smollm2", "dataset=rotten_tomatoes", "quant=none", f"dataset.eval_size={args.rows}",
            "trainer.per_device_eval_batch_size=16"]))
    inputs = build.load_inputs(cfg)
    tokenized, choices = inputs.tokenized(cfg, splits=("eval",))
    net = build.base_model(inputs, cfg)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = loop.build_trainer(net, tokenized, inputs.tokenizer, cfg, Path(scratch), choices=choices)
        loss = trainer.compute_loss_func
        tokens = loss.class_tokens
        assert tokens is not None, "the class names are not single tokens here"
        times: dict[str, list[float]] = {"loss pass": [], "second pass": []}
        accuracy = {}
        for _ in range(args.rounds):
            for name, class_tokens in (("loss pass", tokens), ("second pass", None)):
                loss.class_tokens = class_tokens
                began = time.perf_counter()
                accuracy[name] = trainer.evaluate()["eval_accuracy"]
                times[name].append(time.perf_counter() - began)
    print(json.dumps({"rows": len(tokenized["eval"]), "threads": torch.get_num_threads(),
                      "seconds": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
                      "second_pass_over_loss_pass": statistics.median(times["second pass"]) /
                      statistics.median(times["loss pass"]), "accuracy": accuracy}, indent=2))


if __name__ == "__main__":
    main()
