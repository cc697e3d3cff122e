"""One RL step of this project vs TRL's GRPOTrainer doing the same single-turn work, side by side.

Same tiny model (built from scratch here, briefly SFT-trained here: no download), same prompts
(32 problems x 8 completions per optimizer step), same generation length (at most 8 new tokens,
stopping at eos), temperature 1, KL 0.01 to the starting model, clip 0.2/0.28, token-mean loss,
one optimizer step per generation, same torch thread count, same process. The rounds interleave:
TRL step, project step, floor step, TRL step, ... (a TRL callback runs the other two after each TRL
optimizer step), so a machine that gets busier or quieter affects all three alike.

- project: `stages.rl.stage.train_step` with algorithm=grpo, T=1, its defaults otherwise (rollout,
  reward, reference forward, update; the "old" forward skipped, each prompt run once for its 8
  completions, episodes length-bucketed), no MLflow logging.
- TRL: `GRPOTrainer` (bf16=False, gradient_checkpointing=False, use_cpu=True: TRL's defaults turn
  the first two on, which costs ~20% on CPU), per-step time from one `on_step_end` to the next,
  minus the project and floor steps run in between (so it includes TRL's data loading and logging).
- floor: one `generate` of the same 256 completions + one forward/backward/AdamW step on them: what
  any implementation must at least do (no reference model, no grading).

It also reports, for the project at T = 5 (the paper's 5 turns) with the same model, the token slots
of one reference/old/update forward pass and the share of them that is padding: every episode in
one tensor padded to the longest (before) vs the project's shared prefixes + length buckets (after).

Run (from the repository root; ~4-6 min on 2 quiet cores, SFT included):
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rl_step_vs_trl.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rl_step_vs_trl.py --steps 30 --threads 2
Needs `trl` (pip install 'trl>=1.16,<2'). The last line reads `project/trl step time ratio: R`.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see stages/common/runtime.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stages.common.chat import ChatFormat, build_char_tokenizer  # noqa: E402
from stages.common.contracts import Problem  # noqa: E402
from stages.common.episodes import rollout  # noqa: E402
from stages.common.grading import grade  # noqa: E402
from stages.common.model import load_pretrained, new_scratch_model, save_pretrained  # noqa: E402
from stages.common.model_spec import ModelConfig  # noqa: E402
from stages.common.rollout_engines import HFEngine  # noqa: E402
from stages.common.runtime import cpu_budget  # noqa: E402
from stages.rl import Config  # noqa: E402
from stages.rl.batch import collate, forward_slots, micro_batches, padding_share  # noqa: E402
from stages.rl.losses import masked_mean  # noqa: E402
from stages.rl.models import build_models  # noqa: E402
from stages.rl.stage import train_step  # noqa: E402

FEEDBACK = "Let's try again."


def problems_and_format() -> tuple[list[Problem], ChatFormat]:
    """The tiny task: 3-digit x 1-digit multiplication, the character tokenizer built locally."""
    problems = [Problem(f"mul/{a}x{b}", f"{a}*{b}", str(a * b)) for a in range(100, 1000) for b in range(2, 10)]
    random.Random(0).shuffle(problems)
    tokenizer = build_char_tokenizer([p.question for p in problems[:200]], FEEDBACK)
    return problems, ChatFormat(tokenizer, FEEDBACK)


def sft_model(fmt: ChatFormat, problems: list[Problem], steps: int, seed: int):
    """The tiny default's model (0.53M parameters) SFT-trained for `steps` steps, half the examples
    answering after 1-4 wrong attempts + feedback like the tiny default's SFT (so episodes at T = 5 end
    at different turns, as in the pipeline). ~700 steps reach ~40-50% sampled accuracy."""
    torch.manual_seed(seed)
    model = new_scratch_model(ModelConfig(), fmt.tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 50)
        examples = []
        for _ in range(128):
            p = rng.choice(problems)
            wrong = [rng.choice(problems).answer for _ in range(rng.randint(1, 4))] if rng.random() < 0.5 else []
            examples.append(fmt.sft_example(p.question, wrong, p.answer))
        width = max(len(ids) for ids, _ in examples)
        ids = torch.full((len(examples), width), fmt.pad_id)
        labels = torch.full((len(examples), width), -100)
        attn = torch.zeros((len(examples), width), dtype=torch.long)
        for i, (x, m) in enumerate(examples):
            ids[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
            labels[i, : len(x)] = torch.where(torch.tensor(m) == 1, torch.tensor(x), -100)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def project_config(max_turns: int) -> Config:
    """GRPO; at T = 1 the reward is TRL's (1 correct, 0 otherwise): no repetition penalty, which at T = 1
    would only charge invalid answers."""
    return Config(algorithm="grpo", max_turns=max_turns, problems_per_step=32, group_size=8, minibatch_size=256,
                  kl_coef=0.01, lr=2e-4, max_new_tokens=8, checkpoint_every=0,
                  repetition_penalty=0.0 if max_turns == 1 else 0.5)


class FloorStep:
    """One generate of the step's completions + one forward/backward/AdamW step on them."""

    def __init__(self, model, fmt: ChatFormat, problems: list[Problem]):
        self.model, self.fmt, self.problems = model, fmt, problems
        self.engine = HFEngine(model, fmt.eos_id, fmt.pad_id)
        self.opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)

    def __call__(self, step: int) -> None:
        batch_problems = self.problems[(step * 32) % len(self.problems):][:32]
        contexts = [self.fmt.prompt_ids(p.question) for p in batch_problems for _ in range(8)]
        self.model.eval()
        gens = self.engine.generate(contexts, temperature=1.0, max_new_tokens=8)
        ids = [c + g.token_ids for c, g in zip(contexts, gens, strict=True)]
        width = max(map(len, ids))
        x = torch.full((len(ids), width), self.fmt.pad_id)
        attn = torch.zeros_like(x)
        mask = torch.zeros_like(x)
        for i, (c, s) in enumerate(zip(contexts, ids, strict=True)):
            x[i, : len(s)], attn[i, : len(s)], mask[i, len(c): len(s)] = torch.tensor(s), 1, 1
        self.model.train()
        logits = self.model(input_ids=x, attention_mask=attn).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        loss = -masked_mean(lp, mask[:, 1:])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


def trl_trainer(model_dir: Path, fmt: ChatFormat, problems: list[Problem], steps: int, seed: int, callback, outdir: str):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def correct(prompts, completions, answer, **_):
        return [1.0 if grade(a, c[0]["content"]).correct else 0.0 for c, a in zip(completions, answer, strict=True)]

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}], "answer": p.answer}
                              for p in problems[: 32 * (steps + 2)]])
    args = GRPOConfig(
        output_dir=outdir, per_device_train_batch_size=256, gradient_accumulation_steps=1, num_generations=8,
        steps_per_generation=1, num_iterations=1, max_completion_length=8, temperature=1.0, top_k=0, top_p=1.0,
        learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.01, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
        bf16=False, gradient_checkpointing=False, use_cpu=True, max_steps=steps, logging_steps=10**6,
        disable_tqdm=True,
        report_to="none", save_strategy="no", seed=seed, disable_dropout=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"},
    )
    # a path, not a model object: TRL builds its reference model from the same folder
    return GRPOTrainer(model=str(model_dir), reward_funcs=correct, args=args, train_dataset=data, processing_class=fmt.tokenizer,
                       callbacks=[callback])


def summary(name: str, xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4)
    return (f"{name:8s} median {statistics.median(xs):.3f} s  IQR [{q[0]:.3f}, {q[2]:.3f}]  "
            f"min {min(xs):.3f}  max {max(xs):.3f}  (n={len(xs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per contender (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per contender")
    parser.add_argument("--sft-steps", type=int, default=700, help="SFT steps of the scratch model (0 = random)")
    parser.add_argument("--sft-model", type=Path, help="a save_pretrained folder to start from instead (e.g. one "
                        "an earlier run of this script saved; its tokenizer must be this task's)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("UFO_THREADS") or cpu_budget()))
    parser.add_argument("--padding-rollouts", type=int, default=4, help="T=5 rollouts for the padding share")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    problems, fmt = problems_and_format()
    tmp = tempfile.mkdtemp(prefix="ufo-bench-")
    t0 = time.time()
    if args.sft_model:
        folder = args.sft_model
        base, tokenizer = load_pretrained(folder, torch.device("cpu"))
        fmt = ChatFormat(tokenizer, FEEDBACK)
        made = f"loaded from {folder}"
    else:
        base = sft_model(fmt, problems, args.sft_steps, args.seed)
        folder = save_pretrained(base, fmt.tokenizer, Path(tmp) / "sft")
        made = f"SFT {args.sft_steps} steps in {time.time() - t0:.0f} s, saved to {folder}"
    print(f"model: 0.53M-parameter Llama-style, {made}; torch {torch.__version__}, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")

    # the project's step, exactly as the stage runs it (minus MLflow)
    cfg = project_config(max_turns=1)
    models = build_models(cfg, folder, torch.device("cpu"))
    engine = HFEngine(models.policy, fmt.eos_id, fmt.pad_id, cfg.rollout_batch_size)
    floor = FloorStep(copy.deepcopy(base), fmt, problems)
    times: dict[str, list[float]] = {"project": [], "trl": [], "floor": []}
    phases: list[dict[str, float]] = []
    lengths: dict[str, list[float]] = {"project": [], "trl": []}
    threads_seen: set[int] = set()

    class Interleave(TrainerCallback):
        mark: float | None = None
        n = 0

        def on_train_begin(self, *_, **__):
            self.mark = time.perf_counter()

        def on_step_end(self, *_, **__):
            trl_seconds = time.perf_counter() - self.mark
            self.n += 1
            threads_seen.add(torch.get_num_threads())
            t = time.perf_counter()
            metrics = train_step(cfg, self.n, models, engine, fmt, problems, torch.device("cpu"))
            project_seconds = time.perf_counter() - t
            t = time.perf_counter()
            floor(self.n)
            floor_seconds = time.perf_counter() - t
            if self.n > args.warmup:
                # TRL keeps each step's metrics until it logs (never, with logging_steps = 10**6)
                lengths["trl"].append(trainer._metrics["train"]["completions/mean_length"][-1])
                times["trl"].append(trl_seconds)
                times["project"].append(project_seconds)
                times["floor"].append(floor_seconds)
                phases.append({k: v for k, v in metrics.items() if k.startswith("perf/") and k.endswith("_seconds")})
                lengths["project"].append(metrics["rollout/generated_tokens"] / 256)
            self.mark = time.perf_counter()


    trainer = trl_trainer(folder, fmt, problems, args.steps + args.warmup, args.seed, Interleave(), tmp)
    trainer.train()

    print(f"\nsingle-turn RL step, 32 prompts x 8 completions, <= 8 new tokens, KL 0.01, {args.threads} threads "
          f"(seen {sorted(threads_seen)}), interleaved rounds:")
    for name in ("project", "trl", "floor"):
        print("  " + summary(name, times[name]))
    print(f"  mean completion length: project {statistics.mean(lengths['project']):.2f} tokens (incl. eos), "
          f"TRL {statistics.mean(lengths['trl']):.2f}")
    print("  project step by phase (median s): " + ", ".join(
        f"{k.removeprefix('perf/').removesuffix('_seconds')} {statistics.median(p[k] for p in phases):.3f}"
        for k in phases[0] if k != "perf/step_seconds"))

    # padding at T = 5 with the same model: the token slots of one forward pass (ref, old or update)
    cfg5 = project_config(max_turns=5)
    full_slots, full_pad, slots, pad, turns = [], [], [], [], []
    for r in range(args.padding_rollouts):
        torch.manual_seed(args.seed + r)
        eps = rollout(base, fmt, problems[r * 32:(r + 1) * 32], group_size=8, max_turns=5, temperature=1.0,
                      max_new_tokens=8)
        turns.append(sum(e.num_turns for e in eps) / len(eps))
        whole = collate(eps, fmt.pad_id)  # before: every episode in full, one tensor padded to the longest
        full_slots.append(whole.lengths.numel() * int(whole.lengths.max()))
        full_pad.append(padding_share(whole.lengths, [torch.arange(len(whole))]))
        batch = collate(eps, fmt.pad_id, shared_prefix=cfg5.shared_prefix)  # after: as the stage cuts it
        chunks = micro_batches(batch.lengths, torch.arange(len(batch)), cfg5.micro_batch_tokens,
                               cfg5.micro_batch_call_cost)
        n, real = forward_slots(batch, chunks)
        slots.append(n)
        pad.append(1 - real / n)
    print(f"\nT=5, 32 x 8 episodes ({statistics.mean(turns):.2f} turns each on average, {args.padding_rollouts} "
          f"rollouts), token slots of one forward pass:\n"
          f"  before (one tensor, right-padded to the longest episode): {statistics.mean(full_slots):.0f} slots, "
          f"padding share {statistics.mean(full_pad):.1%}\n"
          f"  project (shared prefixes + length buckets, micro_batch_tokens={cfg5.micro_batch_tokens}, "
          f"call cost {cfg5.micro_batch_call_cost}): {statistics.mean(slots):.0f} slots, "
          f"padding share {statistics.mean(pad):.1%}")
    ratio = statistics.median(times["project"]) / statistics.median(times["trl"])
    print(f"project/trl step time ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
