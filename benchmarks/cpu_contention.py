"""An RL step alone vs beside one CPU-bound process, per OpenMP wait policy: why stages set
OMP_WAIT_POLICY=PASSIVE and size their thread pool to the CPUs they may use.

Each measurement is a fresh worker process (the wait policy is read once, when torch's OpenMP runtime
starts) running the RL stage's own `train_step` (PPO+GAE, T = 5, 32 problems x 8 episodes, the tiny
default's 0.53M-parameter model and character tokenizer; no MLflow) for a few steps after a warm-up.
The competitor is one busy Python loop (`while True: pass`), as another user's job would be. Rounds
interleave alone/beside for every policy, so the machine's own drift hits all alike.

Run alone on the machine (~3-5 min on 2 cores):
    .venv/bin/python benchmarks/cpu_contention.py [--steps 6] [--rounds 3]
The last line reads `beside/alone step time ratio with OMP_WAIT_POLICY=PASSIVE: R` (goal R <= 2.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICIES = {"default": None, "ACTIVE": "ACTIVE", "PASSIVE": "PASSIVE"}


def worker(steps: int, warmup: int) -> None:
    """Runs in a fresh process: time `steps` RL steps after `warmup` ones; print the times as JSON."""
    sys.path.insert(0, str(REPO))
    import torch

    from stages.common.chat import ChatFormat, build_char_tokenizer
    from stages.common.contracts import Problem
    from stages.common.model import new_scratch_model, save_pretrained
    from stages.common.model_spec import ModelConfig
    from stages.common.rollout_engines import HFEngine
    from stages.common.runtime import set_cpu_threads
    from stages.rl import Config
    from stages.rl.models import build_models
    from stages.rl.stage import train_step

    threads = set_cpu_threads()
    problems = [Problem(f"mul/{a}x{b}", f"{a}*{b}", str(a * b)) for a in range(100, 1000) for b in range(2, 10)]
    fmt = ChatFormat(build_char_tokenizer([p.question for p in problems[:200]], "Let's try again."),
                     "Let's try again.")
    torch.manual_seed(0)
    folder = save_pretrained(new_scratch_model(ModelConfig(), fmt.tokenizer), fmt.tokenizer,
                             Path(os.environ["UFO_BENCH_TMP"]) / f"model-{os.getpid()}")
    cfg = Config(checkpoint_every=0)  # the tiny default's RL: PPO+GAE, T=5, 32 x 8
    models = build_models(cfg, folder, torch.device("cpu"))
    engine = HFEngine(models.policy, fmt.eos_id, fmt.pad_id, cfg.rollout_batch_size)
    times = []
    for step in range(1, warmup + steps + 1):
        t = time.perf_counter()
        train_step(cfg, step, models, engine, fmt, problems, torch.device("cpu"))
        if step > warmup:
            times.append(time.perf_counter() - t)
    print(json.dumps({"threads": threads, "times": times}))


def measure(policy: str | None, beside: bool, steps: int, warmup: int, tmp: str) -> tuple[list[float], float]:
    """(step times, CPU seconds per step) of one worker, with or without a busy competitor."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["UFO_BENCH_TMP"] = tmp
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if beside else None
    try:
        t0 = os.times()
        out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(steps), "--warmup", str(warmup)],
                             env=env, capture_output=True, text=True, check=True).stdout
        t1 = os.times()
    finally:
        if hog:
            hog.kill()
            hog.wait()
    times = json.loads(out.strip().splitlines()[-1])["times"]
    cpu = (t1.children_user + t1.children_system) - (t0.children_user + t0.children_system)
    return times, cpu / (steps + warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6, help="timed RL steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every (policy, alone/beside)")
    p.add_argument("--policies", default="default,PASSIVE", help=f"comma-separated among {list(POLICIES)}")
    args = p.parse_args()
    if args.worker:
        worker(args.steps, args.warmup)
        return
    import tempfile

    policies = args.policies.split(",")
    results: dict[tuple[str, bool], list[float]] = {(pol, b): [] for pol in policies for b in (False, True)}
    cpu: dict[tuple[str, bool], list[float]] = {k: [] for k in results}
    with tempfile.TemporaryDirectory(prefix="ufo-contention-") as tmp:
        for r in range(args.rounds):
            for pol in policies:
                for beside in (False, True):
                    times, cpu_per_step = measure(POLICIES[pol], beside, args.steps, args.warmup, tmp)
                    results[(pol, beside)] += times
                    cpu[(pol, beside)].append(cpu_per_step)
                    print(f"round {r + 1}: OMP_WAIT_POLICY={pol:<8} {'beside a busy process' if beside else 'alone':<22}"
                          f" median step {statistics.median(times):.3f} s", flush=True)
    print(f"\nRL step (PPO+GAE, T=5, 32x8, tiny model), {os.cpu_count()} CPUs, medians over "
          f"{args.rounds} x {args.steps} steps:")
    ratios = {}
    for pol in policies:
        alone, beside = statistics.median(results[(pol, False)]), statistics.median(results[(pol, True)])
        ratios[pol] = beside / alone
        print(f"  OMP_WAIT_POLICY={pol:<8} alone {alone:.3f} s (CPU {statistics.median(cpu[(pol, False)]):.2f} s/step), "
              f"beside {beside:.3f} s (CPU {statistics.median(cpu[(pol, True)]):.2f} s/step): ratio {ratios[pol]:.2f}")
    if "PASSIVE" in ratios:
        print(f"beside/alone step time ratio with OMP_WAIT_POLICY=PASSIVE: {ratios['PASSIVE']:.2f}")


if __name__ == "__main__":
    main()
