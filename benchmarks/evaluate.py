"""What the evaluate stage's additions cost, measured side by side in one process on one model.

  A  the protocol before: one multi-turn episode per problem (with feedback), n single-turn samples, greedy
  B  A plus the no-feedback episodes (`inference: [feedback, no_feedback]`, the default)
  C  the statistics and the report for two models: bootstrap intervals and paired differences of every
     metric, the PNG plots and the HTML page

Usage (a `save_pretrained` folder, e.g. an SFT run's model downloaded with
`mlflow artifacts download -u runs:/<sft run id>/model -d /tmp/sft`):

    python benchmarks/evaluate.py /tmp/sft/model [--problems 200] [--samples 5] [--repeats 3]

The last line reads `B/A = R (A a s, B b s), C c s for 2 models x P problems`. On a shared machine run it
twice; the medians over --repeats interleaved runs are what it prints.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from stages.common import report as rep
from stages.common.contracts import Problem
from stages.common.runtime import set_cpu_threads
from stages.evaluate import Config
from stages.evaluate.stage import Checkpoint, evaluate_model, load_checkpoint, model_arms


def multiplication(n: int, seed: int = 0) -> list[Problem]:
    """n problems of the tiny default's task (3-digit x 1-digit)."""
    rng = random.Random(seed)
    pairs = [(rng.randint(100, 999), rng.randint(2, 9)) for _ in range(n)]
    return [Problem(f"mul/{a}x{b}", f"{a}*{b}", str(a * b)) for a, b in pairs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a save_pretrained folder (model + tokenizer)")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--samples", type=int, default=5, help="n single-turn samples for Pass@k")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    set_cpu_threads()
    model, tokenizer = load_checkpoint(Checkpoint(args.model, args.model, ""), torch.device("cpu"))
    problems = multiplication(args.problems)
    before = Config(num_samples=args.samples, inference=["feedback"])
    now = Config(num_samples=args.samples)
    evaluate_model(model, tokenizer, problems[:20], now)  # warm-up: imports, grading caches of the parser
    times: dict[str, list[float]] = {"A": [], "B": [], "C": []}
    for _ in range(args.repeats):
        for name, cfg in (("A", before), ("B", now)):
            t0 = time.perf_counter()
            ev = evaluate_model(model, tokenizer, problems, cfg)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        arms = model_arms("a", ev, now) + model_arms("b", ev, now)
        results, comparisons = rep.summarise_set("test", arms, [("a", "b"), ("a_no_feedback", "a")])
        plots = rep.make_plots(results, comparisons, now.max_turns)
        rep.build_html(results, comparisons, max_turns=now.max_turns, plots=plots)
        times["C"].append(time.perf_counter() - t0)
    a, b, c = (statistics.median(times[k]) for k in "ABC")
    print({k: [round(t, 2) for t in v] for k, v in times.items()})
    print(f"B/A = {b / a:.2f} (A {a:.2f} s, B {b:.2f} s), C {c:.2f} s for 2 models x {args.problems} problems")


if __name__ == "__main__":
    main()
