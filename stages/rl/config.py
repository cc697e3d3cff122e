"""The RL stage's config: the episode protocol (T, gamma, lambda, feedback), the estimator (PPO with a
GAE critic, or GRPO), batching, the rollout engine and checkpoints. Imports no torch: the batch
invariants are checked when the config is loaded, naming the field."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, model_validator

from stages.common.config import StageConfig
from stages.common.contracts import DEFAULT_FEEDBACK, CurateOutput, SFTOutput
from stages.common.contracts import RLOutput as Output
from stages.common.memory import describe_paper_setting
from stages.common.model_spec import Device, EngineConfig

__all__ = ["Config", "Output"]


class Config(StageConfig):
    device: Device = "auto"
    """auto = cuda when visible, else cpu."""
    data: CurateOutput | None = None
    """The curate stage's Output (set by the flow)."""
    sft: SFTOutput | None = None
    """The SFT stage's Output: the starting policy and the KL reference (set by the flow)."""
    engine: EngineConfig = EngineConfig()
    """How the policy and the critic train: plain torch in this process (default), or DeepSpeed ZeRO-2 on
    `num_processes` ranks this stage launches itself (rank 0 rolls out and broadcasts the episodes, each rank
    scores and trains on its share of the micro-batches, see stages/common/ranks.py; the rollout does not get
    faster with more ranks, the forwards, backwards and optimizer memory do; shared_prefix is off there).
    `lora`: LoRA adapters (peft) on the policy only; the KL reference is then the policy with its adapter
    disabled (the SFT weights exactly, no second copy in memory), the critic still trains all its weights,
    and the logged model is the merged one (plain transformers). ZeRO-3 is refused for RL (not built: at the
    paper's scale ZeRO-2 fits, see stages/common/memory.py)."""

    # --- the episode protocol and its reward ---
    max_turns: int = Field(5, ge=1)
    """T: most answers per episode (paper: 5). Rollout time grows with it."""
    gamma: float = Field(0.5, gt=0, le=1)
    """γ: a correct answer at 0-based turn t earns γ**t (paper: 0.5)."""
    repetition_penalty: float = Field(0.5, ge=0)
    """λ: at episode end, subtract λ·(1 − E/T), E distinct valid answers of the T given (paper: 0.5)."""
    repetition_count: Literal["distinct", "plausible"] = "distinct"
    """What E counts in the repetition penalty. `distinct`: every mathematically distinct valid answer (the
    paper). `plausible`: only those that some episode of the same group gave as its FIRST answer (what the
    policy finds likely for that problem), so inventing another wrong number after the feedback does not
    lower the penalty; moving to another of its own likely answers does. Costs nothing measurable."""
    feedback: str = DEFAULT_FEEDBACK
    """The unary feedback appended as the next user turn after a wrong answer."""

    # --- the estimator ---
    algorithm: Literal["ppo", "grpo"] = "ppo"
    """`ppo`: PPO with a learned critic and GAE over the generated tokens (the paper's estimator); costs
    a critic forward per step and a critic forward/backward per update. `grpo`: group-normalised
    episode returns, no critic (DeepSeekMath)."""
    critic: Literal["separate", "value_head"] = "separate"
    """PPO only. `separate`: a copy of the SFT model's decoder with a scalar head, its own optimizer
    (the paper's verl setup; doubles the trained weights and optimizer memory). `value_head`: a
    scalar head on the policy's last hidden state, the value loss also training the shared decoder."""
    gamma_gae: float = Field(1.0, ge=0, le=1)
    """γ_GAE: discount between generated tokens in GAE (paper code: 1.0). Feedback and question
    tokens are not steps: they neither discount nor break the recursion."""
    lambda_gae: float = Field(1.0, ge=0, le=1)
    """λ_GAE: GAE's bias/variance trade-off; 1.0 = Monte Carlo returns minus the critic's value
    (paper code: 1.0), 0 = one-step TD."""
    critic_lr: float = Field(1e-3, gt=0)
    """AdamW learning rate of the critic (the separate critic, or the value head) (paper: 1e-5)."""
    value_clip: float = Field(0.5, gt=0)
    """PPO value clipping: the critic may move a value at most this far from its rollout-time
    estimate per update (verl's cliprange_value default 0.5)."""
    value_loss_coef: float = Field(0.5, ge=0)
    """Weight of the value loss next to the policy loss. With `critic: value_head` it sets how hard the
    value loss pulls on the shared decoder; with a separate critic it only rescales the critic's gradient."""
    whiten_advantages: bool = True
    """PPO: normalise GAE advantages to mean 0, std 1 over the batch's generated tokens (verl, baselines)."""
    scale_advantages: bool = True
    """GRPO: divide group-centred returns by the group std; False only centres them (Dr. GRPO)."""
    kl_coef: float = Field(0.01, ge=0)
    """Weight of the KL to the frozen SFT reference (paper: 0.001). 0 skips the reference model and its
    forward pass."""
    kl_mode: Literal["loss", "reward"] = "loss"
    """`loss`: k3 KL estimate added to the loss per token (GRPO's way). `reward`: -kl_coef·(log π_old −
    log π_ref) added to each generated token's reward before advantages (the paper code's way:
    verl use_kl_in_reward); needs the pre-update log-probs, so the "old" forward always runs."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight (paper: 0.001). The entropy of the sampling distribution at generated
    positions is logged either way."""
    clip_low: float = Field(0.2, gt=0, lt=1)
    """PPO ratio clip below 1 (paper: 0.2)."""
    clip_high: float = Field(0.28, gt=0)
    """PPO ratio clip above 1 (paper: 0.28, "clip-higher")."""

    # --- batch sizes ---
    steps: int = Field(130, ge=1)
    """Policy updates (rollout + update). ~0.7-0.9 s each for the tiny default on 2 cores."""
    problems_per_step: int = Field(32, ge=1)
    """Problems sampled per step (paper: 8). Problems are drawn without replacement, epoch by epoch."""
    group_size: int = Field(8, ge=2)
    """Episodes per problem; GRPO normalises advantages within each group (paper: 16)."""
    rollout_filter_fraction: float = Field(1.0, gt=0, le=1)
    """Keep the int(f · problems_per_step) problem groups whose returns spread most, drop the rest before
    the update (paper code: 0.25, RAGEN's rollout_filter_ratio). 1.0 keeps everything. Rollout cost
    is unchanged; update cost shrinks with f."""
    minibatch_size: int = Field(256, ge=1)
    """Episodes per optimizer step; must divide the episodes kept per step. Fewer than all of them =
    several optimizer steps per rollout, and the "old" log-prob forward must run."""
    micro_batch_tokens: int = Field(4096, ge=1)
    """Most padded token slots per forward/backward (gradient accumulation in between): bounds activation
    memory; must hold the longest possible episode. Episodes are sorted by length and cut into
    micro-batches each padded only to its own longest episode (see `micro_batch_call_cost`)."""
    micro_batch_call_cost: int = Field(256, ge=0)
    """What one more forward/backward call costs, in token slots: the cut into micro-batches minimises
    padded slots + this x calls. 0 = a micro-batch per distinct length (no padding, many small calls);
    large = as few calls as the budget allows. At T = 5 with the tiny default, 256 gives ~4 calls and
    ~6% padding, vs ~55% for one tensor padded to the longest episode."""
    shared_prefix: bool = True
    """Run each problem's prompt once per forward pass and let its group_size episodes attend to its
    keys/values (Prefix Grouper, arXiv 2506.05433): same log-probs and gradients, fewer token slots
    (at T = 1 on the tiny task about half). Needs full attention in every layer and engine.kind 'torch'
    (else ignored: the prefix pass's backward runs outside a DeepSpeed engine)."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each rollout batch. 1 with one minibatch = strictly on-policy: the ratio is exactly 1,
    so the "old" log-prob forward is skipped (the update's own forward, detached, is used)."""
    lr: float = Field(2e-4, gt=0)
    """AdamW learning rate of the policy. For the tiny default >= 5e-4 lets the policy game the repetition penalty."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the global gradient norm of the policy (and of the critic, separately) to this."""

    # --- rollouts ---
    rollout_engine: Literal["hf", "cached", "paged", "vllm"] = "hf"
    """`hf`: batched `generate` on the training model (CPU or GPU). `cached`: our own sampling loop on the
    training model that keeps each episode's keys/values across turns, runs each prompt once for its group
    and drops finished answers from the batch (far fewer positions run than `hf`). `paged`: transformers' continuous
    batching on the training model (paged KV cache, no padding, finished answers leave the batch, a prefix
    cache across the turns of a rollout; benchmarks/rollout.py measures it against `hf`). `vllm`: a vLLM
    engine on the GPU, weights pushed after each update (adapter only for LoRA), prefix caching across
    turns. Refused at load when vLLM is not installed."""
    rollout_batch_size: int = Field(512, ge=1)
    """hf engine: contexts per `generate` call (KV-cache memory grows with it)."""
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0, lt=1)
    """vllm engine: share of GPU memory vLLM may take (weights + KV cache); the trainer needs the rest."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of rollouts; log-probs in the loss use the same temperature."""
    max_new_tokens: int = Field(8, ge=1)
    """Most tokens per answer. An answer cut off here gets no eos and is usually invalid."""
    max_prompt_tokens: int = Field(32, ge=1)
    """Longest question prompt allowed, in tokens (longer prompts are an error naming the row)."""
    max_feedback_tokens: int = Field(8, ge=1)
    """Upper bound on the template tokens of one feedback turn (4 with the tiny tokenizer, ~15 with Qwen's)."""

    # --- checkpoints ---
    checkpoint_every: int = Field(50, ge=0)
    """Save policy, critic, optimizers, RNG states and data position every N steps into the stage's MLflow
    run (`checkpoints/step-N/`; ~12 MB each for the tiny default, ~4x the weights' size in general).
    0 = never."""
    resume: bool = True
    """On start, continue from the newest checkpoint of an unfinished (killed or failed) run with the
    same resume key: this config minus `experiment`/`resume`/`checkpoint_every`, the input artifacts'
    digests and the RL code's digest. A rerun of a killed stage therefore resumes, whatever its new
    MLflow run id. False = always start over."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        kept = self.kept_problems
        if kept < 1:
            raise ValueError(f"rollout_filter_fraction: keeps int({self.rollout_filter_fraction} * "
                             f"{self.problems_per_step}) = 0 problem groups per step")
        if self.kept_episodes % self.minibatch_size:
            if kept == self.problems_per_step:
                raise ValueError(f"minibatch_size: {self.minibatch_size} must divide problems_per_step * group_size "
                                 f"({kept} * {self.group_size} = {self.kept_episodes})")
            raise ValueError(f"minibatch_size: {self.minibatch_size} must divide the episodes kept per step by the "
                             f"rollout filter (int(rollout_filter_fraction * problems_per_step) * group_size = "
                             f"{kept} * {self.group_size} = {self.kept_episodes})")
        if self.micro_batch_tokens < self.max_episode_tokens:
            raise ValueError(f"micro_batch_tokens: {self.micro_batch_tokens} cannot hold one episode of up to "
                             f"{self.max_episode_tokens} tokens (max_prompt_tokens + max_turns * "
                             "(max_new_tokens + 1) + (max_turns - 1) * max_feedback_tokens)")
        if self.rollout_engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("rollout_engine: 'vllm' needs the vllm package, which is not importable here "
                             "(pip install vllm on a CUDA machine), or use 'hf'")
        if self.rollout_engine == "vllm" and self.device == "cpu":
            raise ValueError("rollout_engine: 'vllm' runs on a GPU, but device is 'cpu'; use 'hf'")
        if self.engine.kind == "deepspeed" and self.engine.deepspeed.zero_stage == 3:
            # Not built because not needed: ZeRO-3 would also partition the weights, which the paper's model
            # does not need, and would gather every layer from all ranks at each decoding step of the rollout.
            raise ValueError("engine.deepspeed.zero_stage: 3 is not available in the RL stage yet (SFT has it); "
                             f"use 2. ZeRO-2 keeps the weights whole on each GPU and still fits: "
                             f"{describe_paper_setting()}; ZeRO-3 would also gather every layer's weights from "
                             "all ranks at each decoding step of the rollout")
        zero3_ranks = self.engine.kind == "deepspeed" and self.engine.deepspeed.zero_stage == 3 \
            and self.engine.world_size > 1
        if self.rollout_engine == "vllm" and zero3_ranks:
            raise ValueError("rollout_engine: 'vllm' takes its weights from rank 0, which under ZeRO-3 holds only "
                             "its partition; use engine.deepspeed.zero_stage 2 or one process")
        if self.algorithm == "ppo" and self.critic == "value_head" and self.engine.kind == "deepspeed":
            raise ValueError("critic: 'value_head' trains the policy's decoder with the value loss in one backward "
                             "through one engine; with engine.kind 'deepspeed' use 'separate'")
        return self

    @property
    def kept_problems(self) -> int:
        """Problem groups per step that survive the rollout filter (RAGEN rounds down the same way)."""
        return int(self.rollout_filter_fraction * self.problems_per_step)

    @property
    def kept_episodes(self) -> int:
        return self.kept_problems * self.group_size

    @property
    def skips_old_forward(self) -> bool:
        """True when the pre-update log-probs equal the update's own forward: one epoch, one optimizer step
        per rollout, and no KL-in-reward (which needs them before the update)."""
        return (self.ppo_epochs == 1 and self.minibatch_size == self.kept_episodes
                and not (self.kl_mode == "reward" and self.kl_coef > 0))

    @property
    def max_episode_tokens(self) -> int:
        """Worst-case episode length: prompt + T answers + (T-1) feedback turns (+1 closing eos each)."""
        return self.max_prompt_tokens + self.max_turns * (self.max_new_tokens + 1) \
            + (self.max_turns - 1) * self.max_feedback_tokens
