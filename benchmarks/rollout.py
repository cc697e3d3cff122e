"""Rollout engines side by side: sampled tokens per second of `hf` (`model.generate`) and `paged`
(transformers' continuous batching with a prefix cache kept across turns) on the same multi-turn UFO
episodes of a real model, interleaved round by round in one process.

The model is SmolLM2-135M-Instruct from its GGUF file as `configs/smollm2-135m.yaml` imports it (same
dtype, same chat template), dequantized into a temporary folder; nothing is logged to MLflow. Install
the file first with `make models`. Each round plays `--problems` x `--group` episodes of up to T turns
through `stages.common.episodes.rollout` (the function RL and evaluate use) with each engine, the order
alternating from round to round; both engines see the same problems, prompts and protocol. The model
is the base model before SFT, so most answers are wrong and most episodes run all T turns, with replies
of uneven length (a long tail): the workload where padding and finished rows cost `generate` most.

    python benchmarks/rollout.py [--problems 16] [--group 4] [--turns 5] [--max-new-tokens 24] [--rounds 3]

Prints per round and engine: seconds, sampled tokens, tokens/s, turns played, then the medians. The log-
probs both engines return are checked against one teacher-forced forward pass of the same model on a few
episodes (the largest absolute difference is printed). The last line reads
`paged/hf rollout tokens/s ratio: R` (median over rounds). Run it alone: another CPU-bound process on the
machine changes both numbers.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stages.common.base_model import convert, gguf_path
from stages.common.chat import ChatFormat
from stages.common.config import read_yaml
from stages.common.contracts import Problem
from stages.common.episodes import rollout
from stages.common.model import load_pretrained
from stages.common.model_spec import ModelConfig
from stages.common.rollout_engines import make_engine
from stages.common.runtime import set_cpu_threads

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m.yaml"


def problems(n: int, seed: int = 0) -> list[Problem]:
    """The smollm2 config's task: 2-digit x 1-digit multiplication."""
    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(2, 9)) for _ in range(n)]
    return [Problem(f"mul/{a}x{b}", f"{a}*{b}", str(a * b)) for a, b in pairs]


def teacher_forced_gap(model, episodes, temperature: float) -> float:
    """Largest |engine log-prob - forward log-prob| over the sampled tokens of `episodes`."""
    worst = 0.0
    for e in episodes:
        ids = torch.tensor([e.token_ids()])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float() / temperature  # [L-1, V]
        logprobs = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)  # [L-1]
        at = 0
        for t in e.turns:
            at += len(t.context_ids)
            for k, lp in enumerate(t.logprobs):
                worst = max(worst, abs(lp - float(logprobs[at + k - 1])))
            at += len(t.answer_ids)
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=16)
    p.add_argument("--group", type=int, default=4, help="episodes per problem")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args()
    threads = set_cpu_threads()
    spec = ModelConfig.model_validate(read_yaml(CONFIG)["sft"]["model"])
    feedback = read_yaml(CONFIG).get("rl", {}).get("feedback", "Let's try again.")
    with tempfile.TemporaryDirectory(prefix="ufo-bench-") as tmp:
        t0 = time.perf_counter()
        folder = convert(spec, gguf_path(spec.gguf), Path(tmp) / "model")
        model, tokenizer = load_pretrained(folder, torch.device("cpu"))
        print(f"model: {spec.gguf.describe()} -> {sum(q.numel() for q in model.parameters()) / 1e6:.1f}M params "
              f"({time.perf_counter() - t0:.0f} s to import); {threads} threads")
    model.eval()
    fmt = ChatFormat(tokenizer, feedback)
    engines = {kind: make_engine(kind, model, eos_id=fmt.eos_id, pad_id=fmt.pad_id)
               for kind in ("hf", "cached", "paged")}
    probs = problems(args.problems)
    print(f"{len(probs)} problems x {args.group} episodes, T = {args.turns}, <= {args.max_new_tokens} new tokens "
          f"per answer, temperature {args.temperature}")
    rates: dict[str, list[float]] = {k: [] for k in engines}
    gaps: dict[str, float] = {}
    for r in range(args.rounds):
        order = list(engines)[r % len(engines):] + list(engines)[:r % len(engines)]  # rotate the order
        for kind in order:
            torch.manual_seed(1000 + r)
            t0 = time.perf_counter()
            eps = rollout(None, fmt, probs, group_size=args.group, max_turns=args.turns,
                          temperature=args.temperature, max_new_tokens=args.max_new_tokens, engine=engines[kind])
            dt = time.perf_counter() - t0
            tokens = sum(len(t.answer_ids) for e in eps for t in e.turns)
            turns = sum(e.num_turns for e in eps)
            rates[kind].append(tokens / dt)
            print(f"round {r} {kind:5s}: {dt:6.2f} s, {tokens} sampled tokens, {tokens / dt:7.1f} tokens/s, "
                  f"{turns} answers", flush=True)
            if r == 0:
                gaps[kind] = teacher_forced_gap(model, eps[:4], args.temperature)
    for kind in engines:
        print(f"{kind}: median {statistics.median(rates[kind]):.1f} tokens/s; log-probs vs a teacher-forced "
              f"forward: max abs difference {gaps[kind]:.2e}")
    med = {kind: statistics.median(r) for kind, r in rates.items()}
    print(f"cached/hf rollout tokens/s ratio: {med['cached'] / med['hf']:.2f}")
    print(f"paged/hf rollout tokens/s ratio: {med['paged'] / med['hf']:.2f}")


if __name__ == "__main__":
    main()
