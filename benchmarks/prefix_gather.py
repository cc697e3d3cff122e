"""The shared-prefix gather, `k[group]` (before) vs `index_select` (now, stages/rl/models.py:gather_prefix):
is its gradient the same bits every time, and what does the deterministic one cost in RL step time?

1. Bits: 200 backward passes of each gather at the tiny default's shapes (32 prompts x 8 episodes, 4 heads
   x 32 dims, a 14-token prefix, episodes in a shuffled order as length-bucketed micro-batches take them),
   with one CPU-bound process beside; prints how many distinct gradients each gave (1 = deterministic).
2. Step time: the RL stage's own `train_step` (the tiny default's RL: PPO+GAE, T = 5, 32 x 8, its 0.53M
   model; no MLflow) for a few steps with each gather, rounds interleaved so the machine's drift hits both.

    .venv/bin/python benchmarks/prefix_gather.py [--steps 6] [--rounds 3]      (~3-6 min on 2 cores)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def getitem_gather(kv, group):
    """The gather before: advanced indexing, whose CPU backward adds with atomics in thread order."""
    return [(k[group], v[group]) for k, v in kv]


def distinct_gradients(gather, passes: int = 200) -> int:
    import torch

    torch.manual_seed(0)
    k = torch.randn(32, 4, 14, 32, requires_grad=True)  # [U, h, P, d]
    group = torch.arange(32).repeat_interleave(8)[torch.randperm(256)]  # [b]
    upstream = torch.randn(256, 4, 14, 32)
    seen = set()
    for _ in range(passes):
        k.grad = None
        ((gather([(k, k)], group)[0][0]) * upstream).sum().backward()
        seen.add(hashlib.sha256(k.grad.numpy().tobytes()).hexdigest())
    return len(seen)


def step_worker(gather_name: str, steps: int, warmup: int, tmp: str) -> None:
    """Runs in a fresh process: time `steps` RL steps after `warmup` ones; print the times as JSON."""
    import torch

    from stages.common.chat import ChatFormat, build_char_tokenizer
    from stages.common.contracts import Problem
    from stages.common.model import new_scratch_model, save_pretrained
    from stages.common.model_spec import ModelConfig
    from stages.common.rollout_engines import HFEngine
    from stages.common.runtime import set_cpu_threads
    from stages.rl import Config, models
    from stages.rl.stage import train_step

    if gather_name == "getitem":
        models.gather_prefix = getitem_gather
    set_cpu_threads()
    problems = [Problem(f"mul/{a}x{b}", f"{a}*{b}", str(a * b)) for a in range(100, 1000) for b in range(2, 10)]
    fmt = ChatFormat(build_char_tokenizer([p.question for p in problems[:200]], "Let's try again."),
                     "Let's try again.")
    torch.manual_seed(0)
    folder = save_pretrained(new_scratch_model(ModelConfig(), fmt.tokenizer), fmt.tokenizer,
                             Path(tmp) / f"model-{os.getpid()}")
    cfg = Config(checkpoint_every=0)
    built = models.build_models(cfg, folder, torch.device("cpu"))
    engine = HFEngine(built.policy, fmt.eos_id, fmt.pad_id, cfg.rollout_batch_size)
    times = []
    for step in range(1, warmup + steps + 1):
        t = time.perf_counter()
        metrics = train_step(cfg, step, built, engine, fmt, problems, torch.device("cpu"))
        if step > warmup:  # (the phases that run the gather, the whole step)
            phases = sum(metrics[f"perf/{phase}_seconds"] for phase in ("ref_forward", "old_forward", "value_forward",
                                                                        "update"))
            times.append((phases, time.perf_counter() - t))
    print(json.dumps(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=("getitem", "index_select"), help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6, help="timed RL steps per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.worker:
        step_worker(args.worker, args.steps, args.warmup, os.environ["UFO_BENCH_TMP"])
        return
    from stages.rl.models import gather_prefix

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for name, gather in (("k[group]", getitem_gather), ("index_select", gather_prefix)):
            print(f"{name:>12}: {distinct_gradients(gather)} distinct gradients in 200 backward passes "
                  "beside a busy process", flush=True)
    finally:
        busy.kill()
        busy.wait()
    times: dict[str, list[tuple[float, float]]] = {"getitem": [], "index_select": []}
    with tempfile.TemporaryDirectory(prefix="ufo-gather-") as tmp:
        for r in range(args.rounds):
            for name in times:
                out = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                                      "--warmup", str(args.warmup)], env={**os.environ, "UFO_BENCH_TMP": tmp},
                                     capture_output=True, text=True, check=True).stdout
                times[name] += [tuple(t) for t in json.loads(out.strip().splitlines()[-1])]
                print(f"round {r + 1}: {name:<12} median step {statistics.median(s for _, s in times[name]):.3f} s",
                      flush=True)
    print(f"\nRL step (PPO+GAE, T=5, 32x8, tiny model), {os.cpu_count()} CPUs, medians over "
          f"{args.rounds} x {args.steps} steps:")
    for name, ts in times.items():
        print(f"  {name:<12} step {statistics.median(s for _, s in ts):.3f} s, of which forwards+update "
              f"{statistics.median(f for f, _ in ts):.3f} s")
    ratio = statistics.median(s for _, s in times["index_select"]) / statistics.median(s for _, s in times["getitem"])
    print(f"step time index_select / k[group]: {ratio:.3f}")


if __name__ == "__main__":
    main()
