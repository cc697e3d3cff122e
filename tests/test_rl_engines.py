"""Rollout engines: each (hf, cached, paged) returns the sampled ids with the log-probs the trainer computes
for them, whatever the model's own generation defaults; the cached and paged engines play the hf engine's
greedy episodes token for token, and the cached one runs far fewer positions than `generate` to do it;
vllm is refused at config load where it is absent."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from flows.config import PipelineConfig
from stages.common.config import ConfigError, validate
from stages.common.episodes import rollout
from stages.common.rollout_engines import HFEngine, make_engine
from stages.rl import Config
from stages.rl.batch import collate
from stages.rl.models import score

VLLM_MISSING = importlib.util.find_spec("vllm") is None
ENGINES = ["hf", "cached", "paged"]


def _engine(kind, model, fmt):
    return make_engine(kind, model, eos_id=fmt.eos_id, pad_id=fmt.pad_id)


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_the_trainers_forward(tiny, kind, temperature):
    model, fmt, problems = tiny
    torch.manual_seed(5)
    episodes = rollout(model, fmt, problems[:8], group_size=4, max_turns=3, temperature=temperature,
                       max_new_tokens=6, engine=_engine(kind, model, fmt))
    assert sum(e.num_turns > 1 for e in episodes) >= 8  # later turns: generated after left-padded contexts
    batch = collate(episodes, fmt.pad_id)
    with torch.no_grad():
        trainer = score(model, batch, temperature).logprobs  # right-padded, no KV cache
    mask = batch.response_mask.bool()
    assert mask.sum() == sum(len(t.answer_ids) for e in episodes for t in e.turns)
    torch.testing.assert_close(batch.rollout_logprobs[mask], trainer[mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ENGINES)
def test_engine_ignores_the_models_own_sampling_defaults(tiny, kind):
    """A hub model's generation_config (Qwen2.5-Instruct: top_k 20, top_p 0.8, repetition_penalty 1.05)
    must not change the distribution sampled from, or the trainer's log-probs would be of another one."""
    model, fmt, problems = tiny
    skewed = copy.deepcopy(model)
    skewed.generation_config.top_k = 1
    skewed.generation_config.repetition_penalty = 5.0
    contexts = [fmt.prompt_ids(p.question) for p in problems[:16]]
    outputs = []
    for m in (model, skewed):
        torch.manual_seed(11)
        outputs.append(_engine(kind, m, fmt).generate(contexts, temperature=1.0, max_new_tokens=6))
    assert [g.token_ids for g in outputs[0]] == [g.token_ids for g in outputs[1]]
    assert [g.logprobs for g in outputs[0]] == [g.logprobs for g in outputs[1]]
    # top_k 1 would have made every row its argmax; pure sampling from a random model does not
    assert len({tuple(g.token_ids) for g in outputs[1]}) > 1


def test_hf_engine_greedy_takes_the_argmax(tiny):
    model, fmt, problems = tiny
    ctx = fmt.prompt_ids(problems[0].question)
    (gen,) = HFEngine(model, fmt.eos_id, fmt.pad_id).generate([ctx], temperature=0.0, max_new_tokens=4)
    with torch.no_grad():
        first = model(input_ids=torch.tensor([ctx])).logits[0, -1]
    assert gen.token_ids[0] == int(first.argmax())
    assert gen.logprobs[0] == pytest.approx(float(torch.log_softmax(first, -1).max()), abs=1e-5)


@pytest.mark.skipif(not VLLM_MISSING, reason="vllm is importable here: the refusal path does not apply")
def test_vllm_engine_is_refused_at_config_load_when_vllm_is_missing():
    with pytest.raises(ConfigError) as err:
        validate(Config, {"rollout_engine": "vllm"}, "rl.yaml")
    assert "rollout_engine: 'vllm' needs the vllm package" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate(PipelineConfig, {"rl": {"rollout_engine": "vllm"}}, "pipeline.yaml")
    assert "rl.rollout_engine: 'vllm' needs the vllm package" in str(err.value)


@pytest.mark.parametrize("kind", ["cached", "paged"])
def test_engine_plays_the_hf_engines_greedy_episodes(tiny, kind):
    """Greedy decoding leaves no room for the engines to differ: the same answers at every turn of 5, and
    the same log-probs, although `cached` runs only new tokens from turn 2 on and `paged` schedules tokens
    over a paged cache."""
    model, fmt, problems = tiny
    played = {}
    for k in ("hf", kind):
        played[k] = rollout(model, fmt, problems[:12], group_size=2, max_turns=5, temperature=0.0, max_new_tokens=6,
                            engine=_engine(k, model, fmt))
    assert sum(e.num_turns for e in played["hf"]) >= 5 * 12  # feedback turns were played
    for a, b in zip(played["hf"], played[kind], strict=True):
        assert [t.answer_ids for t in a.turns] == [t.answer_ids for t in b.turns]
        for ta, tb in zip(a.turns, b.turns, strict=True):
            torch.testing.assert_close(torch.tensor(tb.logprobs), torch.tensor(ta.logprobs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ENGINES)
def test_a_seeded_rollout_samples_the_same_answers_again(tiny, kind):
    model, fmt, problems = tiny
    runs = []
    for _ in range(2):
        torch.manual_seed(21)
        eps = rollout(model, fmt, problems[:6], group_size=3, max_turns=3, temperature=1.0, max_new_tokens=6,
                      engine=_engine(kind, model, fmt))
        runs.append([e.token_ids() for e in eps])
    assert runs[0] == runs[1]


def test_the_cached_engine_runs_only_new_tokens_and_each_prompt_once(tiny):
    """What makes it faster, counted rather than timed: over a 5-turn rollout of 8 problems x 4 episodes, the
    positions the model runs (prefill + decode) with the cached engine are a fraction of `generate`'s."""
    model, fmt, problems = tiny
    counted = {}
    for kind in ("hf", "cached"):
        positions: list[int] = []

        def count(_module, args, kwargs, seen=positions):
            seen.append(kwargs["input_ids"].numel() if "input_ids" in kwargs else args[0].numel())

        hook = model.model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            torch.manual_seed(3)
            eps = rollout(model, fmt, problems[:8], group_size=4, max_turns=5, temperature=0.0, max_new_tokens=6,
                          engine=_engine(kind, model, fmt))
        finally:
            hook.remove()
        counted[kind] = sum(positions)
        assert sum(e.num_turns for e in eps) > 32
    assert counted["cached"] < 0.5 * counted["hf"], counted
