"""Rollout engines: what samples the answers of an episode, behind one interface.

An engine takes token-id contexts and returns, per context, the token ids it sampled and their
log-probabilities under the sampling distribution (the model's logits / temperature, nothing else:
no top-k, top-p or repetition penalty). The trainer then trains on exactly those ids, never on a
decode -> encode round trip, and can compare the engine's log-probs with its own.

- `hf`: `model.generate` on the training model itself (CPU or GPU); nothing to synchronise.
- `cached`: a sampling loop of our own on the training model that keeps each episode's keys/values
  across turns (turn t+1 runs only the tokens added since turn t: the last answer token and the
  feedback turn), runs each distinct prompt once for its group, and drops an answer from the batch as
  soon as it ends; `generate` recomputes the whole conversation at every turn and decodes every row of a
  padded batch until the longest answer ends.
- `paged`: transformers' continuous batching (`generate_batch`: paged KV cache, finished answers leave
  the batch at once, no padding) on the training model itself, with its prefix cache kept across the
  turns of one rollout, so turn t+1 computes only the tokens added since turn t (the answer and the
  feedback turn) instead of the whole conversation again. Weights change only between rollouts; the
  cache is dropped when a rollout ends (`end_rollout`).
- `vllm`: a vLLM engine next to the trainer (GPU). Weights are pushed into it after every update, read
  from the training engine (`stages.common.engine`: `full_state`, or `export_adapter` for a peft/LoRA
  policy, whose adapter alone is pushed, as a LoRA request on the SFT base), and prefix caching is on
  so later turns of an episode reuse the KV of the earlier ones. vLLM is not installed on any machine
  this project has: that code path has never run (see `VLLMEngine`). The RL config refuses
  `rollout_engine: vllm` at load time when vLLM is not importable, so it never falls back silently.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

if TYPE_CHECKING:
    from stages.common.engine import TrainEngine


@dataclass
class Generation:
    """One sampled answer: its token ids (ending with eos when the model stopped) and the log-probability
    of each under the sampling distribution (same length)."""

    token_ids: list[int]
    logprobs: list[float]


class RolloutEngine(Protocol):
    name: str

    def generate(self, contexts: list[list[int]], *, temperature: float, max_new_tokens: int) -> list[Generation]:
        """Sample one answer per context; temperature 0 = greedy."""
        ...

    def sync_weights(self, trainer: TrainEngine) -> None:
        """Make the engine sample from the current weights of the policy `trainer` trains (after an update,
        or a resume)."""
        ...

    def end_rollout(self) -> None:
        """The turns of one rollout are over: drop whatever the engine cached for them (KV of contexts that
        later turns extended). The next rollout may see other weights."""
        ...


class _SampledLogprobs(LogitsProcessor):
    """Records log p(sampled token) at every generation step without keeping [B, V] per step.

    `generate` calls logits processors before sampling, so the token chosen at step k is only known
    at step k+1 (the last column of `input_ids`); the step-k log-softmax is kept until then. Custom
    processors run before generate's own temperature warper, so the temperature is applied here. With
    every other warper neutral (see `HFEngine`) this is exactly the distribution sampled from.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self.pending: torch.Tensor | None = None  # [B, V] log-softmax of the last step
        self.steps: list[torch.Tensor] = []  # one [B] tensor per generated token

    def collect(self, sampled: torch.Tensor) -> None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, sampled[:, None]).squeeze(-1))  # [B]
            self.pending = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.collect(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # [B, V]
        return scores


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, W]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, W]
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def sampling_config(temperature: float, max_new_tokens: int, eos_id: int, pad_id: int) -> GenerationConfig:
    """What an engine samples with: logits / temperature (greedy at 0) and nothing else.

    Every distribution-changing option is set explicitly: a hub model's generation_config.json fills
    whatever is left unset (Qwen2.5-Instruct's sets top_k 20, top_p 0.8, repetition_penalty 1.05), and the
    trainer's log-probs would then not be those of the distribution sampled from. Repetition penalties
    apply to greedy decoding too; the warpers only when sampling.
    """
    neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    if temperature > 0:
        neutral |= {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "typical_p": 1.0,
                    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
    else:
        neutral |= {"do_sample": False}
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id, **neutral)


class HFEngine:
    """Batched `model.generate` on the policy itself (no copy, so `sync_weights` has nothing to do).

    Contexts are left-padded into batches of at most `batch_size`. Memory per batch ~ batch_size x
    (context + max_new_tokens) of KV cache.
    """

    name = "hf"

    def __init__(self, model, eos_id: int, pad_id: int, batch_size: int = 512, synced_gpus: bool = False):
        self.model, self.eos_id, self.pad_id, self.batch_size = model, eos_id, pad_id, batch_size
        # ZeRO-3 over several ranks: every rank generates, and a rank whose rows all stopped keeps running
        # forwards until every rank's have (each forward gathers weights from all ranks).
        self.synced_gpus = synced_gpus

    @torch.no_grad()
    def generate(self, contexts: list[list[int]], *, temperature: float, max_new_tokens: int) -> list[Generation]:
        device = next(self.model.parameters()).device
        limit = int(self.model.config.max_position_embeddings)
        out: list[Generation] = []
        for start in range(0, len(contexts), self.batch_size):
            chunk = contexts[start:start + self.batch_size]
            longest = max(map(len, chunk))
            if longest + max_new_tokens > limit:
                raise ValueError(f"context of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
                                 f"model's {limit} positions; lower max_turns/max_new_tokens or enlarge the model")
            ids, mask = _left_pad(chunk, self.pad_id, device)
            recorder = _SampledLogprobs(temperature)
            gen = self.model.generate(input_ids=ids, attention_mask=mask,
                                      generation_config=sampling_config(temperature, max_new_tokens, self.eos_id, self.pad_id),
                                      logits_processor=LogitsProcessorList([recorder]),
                                      synced_gpus=self.synced_gpus)
            new = gen[:, ids.shape[1]:]  # [B, N]
            recorder.collect(new[:, -1])
            logprobs = torch.stack(recorder.steps, dim=1).tolist()  # [B, N]
            for row, lps in zip(new.tolist(), logprobs, strict=True):
                cut = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
                out.append(Generation(row[:cut], lps[:cut]))
        return out

    def sync_weights(self, trainer: TrainEngine) -> None:
        if trainer.hf_model is not self.model:
            raise ValueError("the hf engine samples from the policy object it was built with")

    def end_rollout(self) -> None:
        pass  # nothing cached between calls


#: Per decoder layer, one episode's (keys, values) of the tokens computed so far: [kv_heads, n, head_dim].
EpisodeKV = list[tuple[torch.Tensor, torch.Tensor]]


class CachedEngine:
    """Sampling with each episode's keys/values kept across the turns of a rollout (token ids in and out).

    A context that extends one this engine answered before (the same conversation one turn later: the
    context, the answer, the closing eos, the feedback turn) starts from that conversation's cached
    keys/values, so only the new tokens run. Contexts with nothing cached that are identical (the
    `group_size` episodes of a problem at turn 0, the Pass@k samples of a problem) run once and share
    the result. Rows of a batch are right-aligned: a row whose new tokens are fewer than the batch's
    recomputes the tail of its cache instead of being padded in the middle of its real tokens; padding
    and per-row positions (`position_ids`) keep every row's attention and RoPE exactly its own. An answer
    that ends (eos or `max_new_tokens`) leaves the batch at once.

    Sampling is logits / temperature and nothing else (greedy at 0), and the log-prob of each sampled id
    is taken from the very logits it was drawn from, with torch's global generator: a seeded run samples
    the same answers again. The cache lives until `end_rollout` (the rollout function calls it), so the
    weights must not change in between. Memory: every episode's keys/values, 2 x layers x kv_heads x
    head_dim x tokens x 4 bytes (SmolLM2-135M: 46 kB per token, ~1.2 GB for 256 episodes of 100 tokens).
    Needs a decoder whose layers all attend to the full context (no sliding window); LoRA (peft) applies.
    """

    name = "cached"

    def __init__(self, model, eos_id: int, pad_id: int, batch_size: int = 512):
        self.model, self.eos_id, self.pad_id, self.batch_size = model, eos_id, pad_id, batch_size
        self._kv: dict[int, dict[tuple[int, ...], EpisodeKV]] = {}  # stored length -> conversation -> KV
        config = self._config()
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        if any(t != "full_attention" for t in layer_types) or getattr(config, "use_sliding_window", False):
            raise ValueError(f"rollout_engine 'cached' keeps whole-conversation keys/values; {type(config).__name__} "
                             "has sliding-window layers: use 'hf'")

    def end_rollout(self) -> None:
        self._kv.clear()

    def sync_weights(self, trainer: TrainEngine) -> None:
        if trainer.hf_model is not self.model:
            raise ValueError("the cached engine samples from the policy object it was built with")
        self.end_rollout()

    def _lookup(self, context: list[int]) -> tuple[EpisodeKV | None, int]:
        """The cached keys/values of the longest conversation this context extends, and how many of its
        tokens they cover (one fewer than the conversation: its last token was sampled, never run)."""
        for length in sorted(self._kv, reverse=True):
            if length < len(context):
                kv = self._kv[length].get(tuple(context[:length]))
                if kv is not None:
                    return kv, length - 1
        return None, 0

    @torch.no_grad()
    def generate(self, contexts: list[list[int]], *, temperature: float, max_new_tokens: int) -> list[Generation]:
        limit = int(self.model.config.max_position_embeddings)
        if contexts and max(map(len, contexts)) + max_new_tokens > limit:
            raise ValueError(f"context of {max(map(len, contexts))} tokens + max_new_tokens {max_new_tokens} "
                             f"exceeds the model's {limit} positions; lower max_turns/max_new_tokens or enlarge "
                             "the model")
        out: list[Generation] = []
        for start in range(0, len(contexts), self.batch_size):
            out += self._generate(contexts[start:start + self.batch_size], temperature, max_new_tokens)
        return out

    def _generate(self, contexts: list[list[int]], temperature: float, max_new_tokens: int) -> list[Generation]:
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        found = [self._lookup(c) for c in contexts]
        # Distinct (cache, new tokens) pairs run once; rows are copies of their pair's result.
        unique: dict[tuple, int] = {}
        row_of = [unique.setdefault((id(kv), tuple(c[n:])), len(unique)) for c, (kv, n) in zip(contexts, found,
                                                                                               strict=True)]
        firsts = {u: i for i, u in reversed(list(enumerate(row_of)))}  # first row of each distinct pair
        heads = [firsts[u] for u in range(len(unique))]
        # Right-aligned rows: [pad][cached kept][pad][window], the window being the last N tokens to run.
        news = [len(contexts[i]) - found[i][1] for i in heads]
        width = max(news)  # N
        kept = [max(0, found[i][1] - (width - n)) for i, n in zip(heads, news, strict=True)]  # cached tokens kept
        past = max(kept)  # K
        layers = len(self._layers())
        U = len(heads)
        mask = torch.zeros((U, past + width), dtype=torch.long)  # [U, K+N]
        window = torch.full((U, width), self.pad_id, dtype=torch.long)  # [U, N]
        positions = torch.zeros((U, width), dtype=torch.long)  # [U, N]
        kv_rows: list[EpisodeKV | None] = []
        for u, i in enumerate(heads):
            r = kept[u]
            tokens = contexts[i][r:]  # the window's real tokens (<= N)
            window[u, width - len(tokens):] = torch.tensor(tokens)
            positions[u, width - len(tokens):] = torch.arange(r, r + len(tokens))
            mask[u, past - r:past] = 1
            mask[u, past + width - len(tokens):] = 1
            kv_rows.append(found[i][0])
        if past:
            data = []
            for layer in range(layers):
                some = next(kv[layer] for kv in kv_rows if kv is not None)
                ks, vs = [], []
                for u in range(U):
                    if kv_rows[u] is None:
                        ks.append(some[0].new_zeros((some[0].shape[0], past, some[0].shape[2])))  # [h, K, d]
                        vs.append(some[1].new_zeros((some[1].shape[0], past, some[1].shape[2])))
                        continue
                    k, v = kv_rows[u][layer]
                    pad = past - kept[u]
                    ks.append(torch.nn.functional.pad(k[:, :kept[u]], (0, 0, pad, 0)))  # [h, K, d]
                    vs.append(torch.nn.functional.pad(v[:, :kept[u]], (0, 0, pad, 0)))
                data.append((torch.stack(ks).to(device), torch.stack(vs).to(device)))  # [U, h, K, d]
            cache = DynamicCache(ddp_cache_data=data, config=self._config())
        else:
            cache = DynamicCache(config=self._config())
        logits = self._forward(window.to(device), mask.to(device), positions.to(device), cache)  # [U, V]
        # Every row from its pair's result.
        rows = torch.tensor(row_of)
        if len(contexts) != U:
            cache.batch_select_indices(rows.to(device))
            logits, mask = logits[rows.to(device)], mask[rows]
        mask = mask.to(device)
        next_pos = torch.tensor([len(c) for c in contexts], device=device)  # [B]
        answers: list[list[int]] = [[] for _ in contexts]
        logprobs: list[list[float]] = [[] for _ in contexts]
        alive = torch.arange(len(contexts))  # batch row -> context index
        while True:
            tokens, lps = self._sample(logits, temperature)  # [b], [b]
            done = []
            for b, (t, lp) in enumerate(zip(tokens.tolist(), lps.tolist(), strict=True)):
                i = int(alive[b])
                answers[i].append(t)
                logprobs[i].append(lp)
                if t == self.eos_id or len(answers[i]) == max_new_tokens:
                    done.append(b)
            if done:
                self._store(contexts, answers, alive, cache, mask, done)
            finished = set(done)
            keep = [b for b in range(len(alive)) if b not in finished]
            if not keep:
                break
            if done:
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                mask, tokens, alive, next_pos = mask[idx], tokens[idx], alive[idx.cpu()], next_pos[idx]
            mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=device)], dim=1)
            logits = self._forward(tokens[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        return [Generation(a, lp) for a, lp in zip(answers, logprobs, strict=True)]

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Last position's logits [b, V], the cache extended in place."""
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40)
        name = "cache" if "cache" in inspect.signature(self._hf().forward).parameters else "past_key_values"
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{name: cache})
        return out.logits[:, -1].float()

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled ids [b] and their log-probs [b] under logits / temperature (argmax at 0)."""
        if temperature > 0:
            logp = torch.log_softmax(logits / temperature, dim=-1)  # [b, V]
            tokens = torch.multinomial(logp.exp(), 1).squeeze(-1)  # [b]
        else:
            logp = torch.log_softmax(logits, dim=-1)
            tokens = logits.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)

    def _store(self, contexts, answers, alive, cache, mask, done: list[int]) -> None:
        """Keep the keys/values of the conversations that just ended a turn: context + answer, all but the
        last sampled token (never run)."""
        for b in done:
            i = int(alive[b])
            real = mask[b].bool()
            kv = [(layer.keys[b][:, real].clone(), layer.values[b][:, real].clone()) for layer in cache.layers]
            conversation = tuple(contexts[i] + answers[i])
            self._kv.setdefault(len(conversation), {})[conversation] = kv

    def _hf(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _config(self):
        return self._hf().config

    def _layers(self):
        return self._hf().model.layers


class PagedEngine:
    """transformers' continuous batching (`generate_batch`) on the policy itself, token ids in and out.

    Requests are scheduled token by token over a paged KV cache: an answer that ends leaves the batch at
    once (`generate` keeps every row of a padded batch until the longest stops), no row is padded, and
    with `allow_block_sharing` a context whose first `page_size` * k tokens were computed before (the
    same prompt in a group, or the conversation so far at the next turn) reuses those pages. The manager
    (and its cache) persists across the `generate` calls of one rollout and is destroyed by
    `end_rollout`, before any weight update.

    Sampling is the distribution the trainer assumes: logits / temperature, every other warper neutral
    (as in `HFEngine`); the log-probs are the engine's own (log of the sampled token's probability under
    that distribution, computed from the same logits). Its sampler has its own generator: its seed is
    drawn from torch's global generator at every call, so a seeded run samples the same answers again.
    The attention is the model's own (`sdpa` here, over all requests of a batch flattened into one
    sequence with a dense mask: on a CPU that makes it slower than `generate`, see benchmarks/rollout.py).
    Switching to flash attention and CUDA graphs is left off: both change the attention implementation of
    the very model the trainer uses. Not measured on a GPU.
    """

    name = "paged"

    def __init__(self, model, eos_id: int, pad_id: int, page_size: int = 16, max_batch_tokens: int | None = None):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.page_size, self.max_batch_tokens = page_size, max_batch_tokens
        self._settings: tuple[float, int] | None = None

    def _configs(self, temperature: float, max_new_tokens: int, seed: int):
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        gen = sampling_config(temperature, max_new_tokens, self.eos_id, self.pad_id)
        cb = ContinuousBatchingConfig(page_size=self.page_size, return_logprobs=True, seed=seed,
                                      allow_block_sharing=True, max_batch_tokens=self.max_batch_tokens,
                                      auto_switch_to_flash=False, use_cuda_graph=False)
        return gen, cb

    @torch.no_grad()
    def generate(self, contexts: list[list[int]], *, temperature: float, max_new_tokens: int) -> list[Generation]:
        if not contexts:
            return []
        limit = int(self.model.config.max_position_embeddings)
        longest = max(map(len, contexts))
        if longest + max_new_tokens > limit:
            raise ValueError(f"context of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
                             f"model's {limit} positions; lower max_turns/max_new_tokens or enlarge the model")
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        gen, cb = self._configs(temperature, max_new_tokens, seed)
        # A persistent manager keeps the generation config it was made with: another temperature or length
        # needs a new one (and the pages cached for the other are of no use to it anyway).
        if self._settings != (temperature, max_new_tokens):
            self.end_rollout()
        self._settings = (temperature, max_new_tokens)
        cb_log = logging.getLogger("ContinuousBatchingLogger")
        level = cb_log.level
        cb_log.setLevel(logging.ERROR)  # it warns at every call that a persistent manager is kept: we know
        try:
            results = self._hf_model().generate_batch(contexts, generation_config=gen, continuous_batching_config=cb,
                                                      persistent_manager=True, warmup=False)
        finally:
            cb_log.setLevel(level)
        out = list(results.values())
        if len(out) != len(contexts) or any(r.error for r in out):
            errors = [r.error for r in out if r.error]
            self.end_rollout()
            raise RuntimeError(f"paged engine: {len(contexts) - len(out)} request(s) missing, errors: {errors[:3]}")
        gens = []
        for r in out:
            ids = list(r.generated_tokens)
            cut = ids.index(self.eos_id) + 1 if self.eos_id in ids else len(ids)
            gens.append(Generation(ids[:cut], [float(x) for x in r.logprobs[:cut]]))
        return gens

    def _hf_model(self):
        """The transformers model that owns `generate_batch` (under a peft wrapper, its LoRA layers included)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def sync_weights(self, trainer: TrainEngine) -> None:
        if trainer.hf_model is not self.model:
            raise ValueError("the paged engine samples from the policy object it was built with")
        self.end_rollout()

    def end_rollout(self) -> None:
        model = self._hf_model()
        if getattr(model, "_cached_continuous_batching_manager", None) is not None:
            model.destroy_cached_continuous_batching_manager()
        self._settings = None


class VLLMEngine:
    """Rollouts in vLLM (`vllm.LLM`, colocated with the trainer on the same GPU), token ids in and out.

    NEVER EXERCISED: vLLM cannot be installed on any machine available to this project, so not one line
    of this class has run. It follows vLLM's documented offline API and the way TRL's colocated mode
    drives it (trl/generation/vllm_generation.py); expect to debug it on first use. Choices it makes:
    - `logprobs_mode="processed_logprobs"`: log-probs after temperature, i.e. of the distribution sampled
      from (vLLM's default returns raw-logit log-probs, which bias importance ratios when T != 1);
    - `enable_prefix_caching=True`: turn t+1's context starts with turn t's, so its KV is reused;
    - full-weight push: `load_weights` on the engine's model then `reset_prefix_cache()` (cached KV was
      computed with the old weights); LoRA push: the adapter saved to a folder by the training engine
      (`export_adapter`: peft's adapter_config.json + adapter weights) and passed as a new `LoRARequest`
      with every generate call. The base weights in vLLM are the SFT model's (`model_path`) and never
      change, which is the same model the trainer's reference is (the policy with its adapter disabled).
      Until the first push (a fresh run) no adapter is applied: peft initialises B = 0, so base = policy.
    - it lives on rank 0 only, which rolls out; under DeepSpeed ZeRO-2 rank 0 holds full weights (and the
      whole adapter), so the push needs no collective. ZeRO-3 with vllm is refused at config load.
    """

    name = "vllm"

    def __init__(self, model_path: str | Path, eos_id: int, *, max_model_len: int, gpu_memory_utilization: float,
                 seed: int, lora_rank: int | None = None):
        from vllm import LLM  # noqa: PLC0415 - only importable where vLLM is installed

        self.eos_id = eos_id
        self.lora_rank = lora_rank
        self._lora_request = None
        self._lora_dir = Path(tempfile.mkdtemp(prefix="ufo-vllm-lora-"))
        self._version = 0
        self.llm = LLM(model=str(model_path), enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                       max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                       enable_lora=lora_rank is not None, max_lora_rank=_vllm_lora_rank(lora_rank or 16))

    def generate(self, contexts: list[list[int]], *, temperature: float, max_new_tokens: int) -> list[Generation]:
        from vllm import SamplingParams, TokensPrompt  # noqa: PLC0415

        params = SamplingParams(temperature=temperature, top_k=-1, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                                max_tokens=max_new_tokens, stop_token_ids=[self.eos_id], logprobs=0,
                                skip_special_tokens=False, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=c) for c in contexts], params,
                                    lora_request=self._lora_request, use_tqdm=False)
        result = []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            # logprobs=0: one {token_id: Logprob} dict per generated token, holding the sampled token
            lps = [step[tok].logprob for tok, step in zip(ids, completion.logprobs, strict=True)]
            result.append(Generation(ids, lps))
        return result

    def sync_weights(self, trainer: TrainEngine) -> None:
        self._version += 1
        if self.lora_rank is not None:  # a peft model: push the adapter only
            from vllm.lora.request import LoRARequest  # noqa: PLC0415

            folder = trainer.export_adapter(self._lora_dir / f"v{self._version}")  # adapter files only
            self._lora_request = LoRARequest(f"policy-v{self._version}", self._version, str(folder))
            if self._version > 1:  # the previous adapter's folder is no longer read
                shutil.rmtree(self._lora_dir / f"v{self._version - 1}", ignore_errors=True)
        else:
            state = trainer.full_state()
            engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            engine_model.load_weights((name, p.detach()) for name, p in state.items())
        self.llm.reset_prefix_cache()

    def end_rollout(self) -> None:
        pass  # vLLM's prefix cache is reset when weights change (`sync_weights`)


def _vllm_lora_rank(r: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds `r` (vLLM's LoRAConfig allows only these sizes)."""
    return next(size for size in (8, 16, 32, 64, 128, 256, 320, 512) if size >= r)


def make_engine(kind: str, policy, *, eos_id: int, pad_id: int, batch_size: int = 512, model_path: str | Path | None = None,
                max_model_len: int = 0, gpu_memory_utilization: float = 0.5, seed: int = 0,
                lora_rank: int | None = None, synced_gpus: bool = False) -> RolloutEngine:
    """The engine named by the config (`hf` | `cached` | `paged` | `vllm`). `policy` is the (peft-wrapped) transformers
    model the hf and paged engines generate with; `model_path` the SFT model's folder vLLM loads (the LoRA
    base)."""
    if kind == "hf":
        return HFEngine(policy, eos_id, pad_id, batch_size, synced_gpus=synced_gpus)
    if kind == "paged":
        return PagedEngine(policy, eos_id, pad_id)
    if kind == "cached":
        return CachedEngine(policy, eos_id, pad_id, batch_size)
    if kind == "vllm":
        if model_path is None:
            raise ValueError("the vllm engine loads the policy's weights from a folder: model_path is required")
        return VLLMEngine(model_path, eos_id, max_model_len=max_model_len,
                          gpu_memory_utilization=gpu_memory_utilization, seed=seed, lora_rank=lora_rank)
    raise ValueError(f"unknown rollout engine {kind!r} (expected 'hf', 'cached', 'paged' or 'vllm')")
