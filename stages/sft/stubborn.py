"""The "stubborn" warm start: a model of the failure the UFO paper fixes.

Instruct models, told "Let's try again." after a wrong answer, tend to give the same answer again: the
paper finds that ~70% of single-turn-RL failures repeat one answer over all five turns (arXiv
2507.14295, §1 and Fig. 1). The tiny model trained from scratch here does not have that habit (its SFT
mixes in wrong attempts to OTHER problems, so it learns to answer afresh after feedback), and from such
a start multi-turn RL has little to fix (shared/research/arms-calibration.md: UFO vs single-turn RL,
Succ@5 -0.002). This module gives it the habit, by continued SFT from the normal warm start, so that
the comparison the paper makes can be made at tiny scale:

1. imprint: `stubborn.imprint_steps` steps at `imprint_lr` on a batch in which
   `imprint_multi_turn_fraction` of the examples are "X (k times, each followed by the feedback) -> X":
   X is one of the model's OWN sampled wrong answers to that problem (`own_answer_rate` of the time),
   otherwise a one-digit near miss of the gold. The rest are ordinary single-turn examples.
2. blend: `blend_steps` steps at `blend_lr`, `blend_multi_turn_fraction` multi-turn; of those,
   `copy_rate` repeat X and the rest go from X to the correct answer (a real successful retry).

The calibration's recipe (copy_rate 0.8) left a model that repeats itself in ~99% of its failed
episodes; copy_rate ~0.5 is a "partly stubborn" start whose RL groups still hold successful retries.
Loss is on the final answer only, as in every SFT example (`ChatFormat.sft_example`). Only the plain
torch engine is supported (each phase runs its own AdamW at a constant learning rate).
"""

from __future__ import annotations

import logging
import random
import time

import torch

from stages.common.chat import ChatFormat
from stages.common.contracts import Problem
from stages.common.engine import TorchEngine
from stages.common.episodes import rollout
from stages.common.grading import equivalent
from stages.common.metrics import episode_metrics, repeat_share
from stages.sft.batching import Example, loss_share, micro_batches, num_targets
from stages.sft.config import Config, StubbornConfig
from stages.sft.stage import LogFn

log = logging.getLogger("ufo.sft")

#: Most tries to find a digit change that is a different value (never loops for a gold with a digit).
_NEAR_MISS_TRIES = 20


def near_miss(gold: str, rng: random.Random) -> str | None:
    """`gold` with one digit replaced by another (never a leading zero): e.g. 1734 -> 1704.

    Returns None when `gold` has no digit that can change (a text answer).
    """
    digits = [i for i, c in enumerate(gold) if c.isdigit()]
    if not digits:
        return None
    for _ in range(_NEAR_MISS_TRIES):
        i = rng.choice(digits)
        leading = i == 0 or not gold[i - 1].isdigit()
        choices = [d for d in "0123456789" if d != gold[i] and not (leading and d == "0" and len(digits) > 1)]
        out = gold[:i] + rng.choice(choices) + gold[i + 1:]
        if not equivalent(gold, out):
            return out
    return None


@torch.no_grad()
def own_wrong_answers(model, fmt: ChatFormat, problems: list[Problem], samples: int, max_new_tokens: int,
                      seed: int) -> dict[str, list[str]]:
    """problem id -> the distinct valid WRONG answers among `samples` single-turn answers sampled at
    temperature 1 from `model` (problems it always solved are absent). The global RNG is left as it was."""
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        episodes = rollout(model, fmt, problems, group_size=samples, max_turns=1, temperature=1.0,
                           max_new_tokens=max_new_tokens)
    model.train()
    out: dict[str, list[str]] = {}
    for ep in episodes:
        turn = ep.turns[0]
        if turn.answer is None or turn.correct:
            continue
        seen = out.setdefault(ep.problem.id, [])
        if not any(equivalent(a, turn.answer) for a in seen):
            seen.append(turn.answer)
    return out


def stubborn_examples(fmt: ChatFormat, problems: list[Problem], wrong: dict[str, list[str]], batch_size: int,
                      multi_turn_fraction: float, copy_rate: float, s: StubbornConfig, max_wrong_attempts: int,
                      rng: random.Random) -> list[Example]:
    """One step's conversations. A multi-turn one is "X, feedback, X, feedback, ... -> target": X
    repeated k = 1..max_wrong_attempts times, the target X again (with probability copy_rate) or the
    gold. X is the model's own wrong answer (with probability s.own_answer_rate, when any was sampled)
    or a near miss of the gold."""
    by_id = {p.id: p for p in problems}
    with_wrong = [by_id[i] for i in wrong if i in by_id]
    examples = []
    while len(examples) < batch_size:
        if rng.random() >= multi_turn_fraction:
            p = rng.choice(problems)
            ids, mask = fmt.sft_example(p.question, [], p.answer)
            examples.append((ids, mask, 0))
            continue
        if with_wrong and rng.random() < s.own_answer_rate:
            p = rng.choice(with_wrong)
            x = rng.choice(wrong[p.id])
        else:
            p = rng.choice(problems)
            x = near_miss(p.answer, rng)
            if x is None:
                continue
        k = rng.randint(1, max_wrong_attempts)
        target = x if rng.random() < copy_rate else p.answer
        ids, mask = fmt.sft_example(p.question, [x] * k, target)
        examples.append((ids, mask, k))
    return examples


@torch.no_grad()
def feedback_behaviour(model, fmt: ChatFormat, problems: list[Problem], max_turns: int, max_new_tokens: int,
                       seed: int) -> dict[str, float]:
    """Succ@1..T, effective answer ratio and repeat share of T-turn episodes with feedback (one per
    problem, temperature 1): what the stubborn phases did to the model's behaviour after feedback."""
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        episodes = rollout(model, fmt, problems, group_size=1, max_turns=max_turns, temperature=1.0,
                           max_new_tokens=max_new_tokens)
    model.train()
    out = episode_metrics(episodes, max_turns)
    out["repeat_share"] = repeat_share(episodes, max_turns)
    return out


def make_stubborn(engine, fmt: ChatFormat, train_problems: list[Problem], val_problems: list[Problem],
                  config: Config, rng: random.Random, pack_length: int, device: torch.device,
                  log_metrics: LogFn, first_step: int) -> dict[str, float]:
    """Continue training `engine.module` into the stubborn warm start (module docstring); returns summary
    metrics `sft/stubborn/*` (behaviour after feedback on the validation problems, before and after).

    Steps are logged after the warm start's own, from `first_step` on.
    """
    s = config.stubborn
    t0 = time.time()
    model = engine.hf_model
    max_turns = config.max_wrong_attempts + 1
    val_problems = random.Random(config.seed).sample(val_problems, min(s.eval_problems, len(val_problems)))
    before = feedback_behaviour(model, fmt, val_problems, max_turns, config.max_new_tokens, seed=config.seed + 1)
    pool = rng.sample(train_problems, min(s.sample_problems, len(train_problems)))
    wrong = own_wrong_answers(model, fmt, pool, s.samples_per_problem, config.max_new_tokens, seed=config.seed + 2)
    log.info("stubborn: %d of %d problems have sampled wrong answers", len(wrong), len(pool))
    step = first_step
    phases = [("imprint", s.imprint_steps, s.imprint_lr, s.imprint_multi_turn_fraction, 1.0),
              ("blend", s.blend_steps, s.blend_lr, s.blend_multi_turn_fraction, s.copy_rate)]
    for name, steps, lr, multi, copy in phases:
        # A fresh AdamW at a constant rate per phase, on the same (possibly LoRA-wrapped) module.
        phase_engine = TorchEngine(engine.module, lr=lr, weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                                   lr_lambda=lambda _step: 1.0)
        for i in range(1, steps + 1):
            examples = stubborn_examples(fmt, train_problems, wrong, config.batch_size, multi, copy, s,
                                         config.max_wrong_attempts, rng)
            targets = num_targets(examples)
            total = 0.0
            for forwards in micro_batches(examples, config, fmt.pad_id, pack_length, device):
                loss = loss_share(engine.module, forwards, targets)
                phase_engine.backward(loss)
                total += loss.item()
            grad_norm = phase_engine.step()
            step += 1
            if i % config.log_every == 0:
                log_metrics({f"loss/stubborn_{name}": total, "loss/grad_norm": grad_norm, "train/lr": lr}, step)
        log.info("stubborn: %s phase done (%d steps at lr %g, loss %.4f)", name, steps, lr, total)
    after = feedback_behaviour(model, fmt, val_problems, max_turns, config.max_new_tokens, seed=config.seed + 1)
    log.info("stubborn: repeat share of failed episodes %.3f -> %.3f, Succ@1 %.3f -> %.3f, Succ@%d %.3f -> %.3f",
             before["repeat_share"], after["repeat_share"], before["succ_at_1"], after["succ_at_1"], max_turns,
             before[f"succ_at_{max_turns}"], after[f"succ_at_{max_turns}"])
    out = {f"sft/stubborn/before_{k}": v for k, v in before.items()}
    out |= {f"sft/stubborn/{k}": v for k, v in after.items()}
    out |= {"sft/stubborn/problems_with_wrong_answers": float(len(wrong)), "perf/stubborn_seconds": time.time() - t0}
    return out
