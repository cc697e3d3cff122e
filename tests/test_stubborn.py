"""The stubborn warm start (stages/sft/stubborn.py) and the plausible-only repetition penalty
(stages/rl/rewards.py): hand-built examples and episodes, and the SFT stage run with `warm_start: stubborn`
on the tiny scratch model."""

from __future__ import annotations

import random

import mlflow
import pytest
import torch

from stages import sft
from stages.common.chat import ChatFormat
from stages.common.grading import equivalent
from stages.common.model import build_model
from stages.common.model_spec import ModelConfig
from stages.rl.rewards import group_plausible_distinct, plausible_distinct
from stages.sft.config import StubbornConfig
from stages.sft.stubborn import near_miss, stubborn_examples
from tests.helpers import FEEDBACK, metric_histories, multiplication_problems

CPU = torch.device("cpu")
TINY = ModelConfig(init="scratch", hidden_size=32, num_layers=1, num_heads=4, max_position_embeddings=192)


@pytest.mark.parametrize("gold", ["1734", "7", "-42", "3/4", "0.5"])
def test_a_near_miss_changes_one_digit_to_another_value(gold):
    rng = random.Random(0)
    for _ in range(50):
        out = near_miss(gold, rng)
        assert out is not None and len(out) == len(gold) and not equivalent(gold, out)
        assert sum(a != b for a, b in zip(gold, out, strict=True)) == 1
        assert not (out[0] == "0" and len(out) > 1 and out[1].isdigit())  # never a new leading zero


def test_a_text_answer_has_no_near_miss():
    assert near_miss("Paris", random.Random(0)) is None


def test_plausible_distinct_counts_only_answers_the_group_gave_first():
    # One problem, group of 3. Firsts: "3", "4" (and an invalid first answer, which adds nothing).
    episodes = [["3", "4", "5", "6"],   # plausible: 3, 4 -> 2 ("5", "6" were invented after the feedback)
                ["4", "4", "4"],        # plausible: 4 -> 1
                [None, "3", "9"]]       # plausible: 3 -> 1
    assert group_plausible_distinct(episodes, group_size=3) == [2, 1, 1]
    assert plausible_distinct(["6/2", "3.0", "4"], ["3"]) == 1  # equal by value, counted once


def test_plausible_groups_never_mix_problems():
    episodes = [["1", "2"], ["2"], ["1", "2"], ["7"]]  # problem A: firsts {1, 2}; problem B: firsts {1, 7}
    assert group_plausible_distinct(episodes, group_size=2) == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="groups of 3"):
        group_plausible_distinct(episodes, group_size=3)


@pytest.fixture(scope="module")
def fmt_and_problems():
    problems = multiplication_problems()
    _, tok = build_model(TINY, [p.question for p in problems] + [p.answer for p in problems], FEEDBACK, CPU)
    return ChatFormat(tok, FEEDBACK), problems


def _target_text(fmt, ids, mask):
    return fmt.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True)


@pytest.mark.parametrize("copy_rate", [0.0, 1.0])
def test_stubborn_examples_repeat_the_wrong_answer_and_train_only_the_last_reply(fmt_and_problems, copy_rate):
    fmt, problems = fmt_and_problems
    by_id = {p.id: p for p in problems}
    wrong = {problems[0].id: ["9999"], problems[1].id: ["8888"]}
    s = StubbornConfig(own_answer_rate=1.0)
    examples = stubborn_examples(fmt, problems, wrong, batch_size=64, multi_turn_fraction=1.0, copy_rate=copy_rate,
                                 s=s, max_wrong_attempts=3, rng=random.Random(1))
    assert len(examples) == 64
    for ids, mask, k in examples:
        assert 1 <= k <= 3
        text = fmt.tokenizer.decode(ids)
        pid = next(i for i, x in wrong.items() if x[0] in text)  # every example uses a sampled wrong answer
        x, gold = wrong[pid][0], by_id[pid].answer
        assert text.count(x) == k + copy_rate and text.count(FEEDBACK) == k  # X k times, then X or the gold
        assert _target_text(fmt, ids, mask).strip() == (x if copy_rate else gold)


def test_single_turn_share_trains_the_gold_answer(fmt_and_problems):
    fmt, problems = fmt_and_problems
    examples = stubborn_examples(fmt, problems, {}, batch_size=32, multi_turn_fraction=0.0, copy_rate=1.0,
                                 s=StubbornConfig(), max_wrong_attempts=3, rng=random.Random(2))
    golds = {p.answer for p in problems}
    assert all(k == 0 and _target_text(fmt, ids, mask).strip() in golds for ids, mask, k in examples)


def test_stubborn_warm_start_runs_in_the_sft_stage_and_logs_its_behaviour(curated):
    stub = StubbornConfig(sample_problems=32, imprint_steps=4, blend_steps=2, eval_problems=16)
    cfg = sft.Config(experiment="stubborn", data=curated, model=TINY, max_steps=4, eval_every=4, val_problems=16,
                     batch_size=16, log_every=2, warm_start="stubborn", stubborn=stub)
    out = sft.run(cfg)
    assert out.metrics["sft/steps"] == 4
    run = mlflow.MlflowClient().get_run(out.run_id)
    for key in ("sft/stubborn/repeat_share", "sft/stubborn/before_repeat_share", "sft/stubborn/succ_at_1",
                "sft/stubborn/problems_with_wrong_answers"):
        assert key in run.data.metrics, key
    history = metric_histories(out.run_id, keys=["loss/stubborn_imprint"])["loss/stubborn_imprint"]
    assert [step for step, _ in history] == [6, 8]  # logged after the warm start's own 4 steps


def test_stubborn_needs_the_plain_torch_engine():
    with pytest.raises(ValueError, match="engine.kind: torch"):
        sft.Config(model=TINY, warm_start="stubborn", engine={"kind": "deepspeed"})
