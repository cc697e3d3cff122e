"""The registry gate (flows/registry.py) on a real local SQLite registry with the real evaluate stage:
the first candidate becomes champion; a better model is promoted and a worse one refused, each with its
reason. The models are real tiny ones: one trained here until it answers its 8 problems (~10 s on 2
cores), one left at its random start; both logged as MLflow transformers models by the helper the SFT
and RL stages use. Then the verdict against hand-made intervals, and the config checks. ~15 s."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.config import PipelineConfig
from flows.registry import champion_to_evaluate, gate, verdict
from stages import evaluate
from stages.common.chat import ChatFormat, build_char_tokenizer
from stages.common.config import ConfigError, validate
from stages.common.contracts import CurateOutput, RLOutput
from stages.common.model import new_scratch_model
from stages.common.model_spec import ModelConfig
from stages.common.tracking import MLFLOW_MODEL_ARTIFACT, configure, fetch_verified, log_artifact, log_model
from tests.helpers import FEEDBACK, multiplication_problems

EXPERIMENT = "registry-tests"
PROBLEMS = multiplication_problems(8)
T = 3


def _tiny_model(seed: int, train_steps: int):
    """A tiny scratch model; `train_steps` > 0 fits it to answer PROBLEMS (plain cross-entropy on the answer
    tokens, single-turn: enough to make it better than a random start on exactly these problems)."""
    tokenizer = build_char_tokenizer([p.question for p in PROBLEMS], FEEDBACK)
    fmt = ChatFormat(tokenizer, FEEDBACK)
    torch.manual_seed(seed)
    model = new_scratch_model(ModelConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128), tokenizer)
    examples = [fmt.sft_example(p.question, [], p.answer) for p in PROBLEMS]
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), fmt.pad_id)  # [B, L]
    labels = torch.full_like(ids, -100)  # [B, L]
    for i, (x, mask) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(x)] = torch.where(torch.tensor(mask) == 1, torch.tensor(x), -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(train_steps):
        loss = model(input_ids=ids, attention_mask=(ids != fmt.pad_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tokenizer


def _rl_output(model, tokenizer, tmp_path, tag: str) -> RLOutput:
    """What the RL stage hands on: the plain `model` folder and the MLflow model, from one run."""
    folder = tmp_path / tag
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with mlflow.start_run(run_name=f"rl-{tag}") as run:
        refs = {"model": log_artifact(folder, "model"), MLFLOW_MODEL_ARTIFACT: log_model(folder, name="rl",
                                                                                 description=f"test model {tag}")}
    return RLOutput(run_id=run.info.run_id, artifacts=refs)


@pytest.fixture(scope="module")
def setup(module_workspace, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    configure(EXPERIMENT)
    path = tmp / "test.parquet"
    pd.DataFrame({"id": [p.id for p in PROBLEMS], "question": [p.question for p in PROBLEMS],
                  "answer": [p.answer for p in PROBLEMS], "source": "mul"}).to_parquet(path)
    with mlflow.start_run(run_name="curate") as run:
        data = CurateOutput(run_id=run.info.run_id, artifacts={"test": log_artifact(path, "data")})
    random_model = _rl_output(*_tiny_model(seed=0, train_steps=0), tmp, "random")
    trained = _tiny_model(seed=0, train_steps=150)
    return data, random_model, _rl_output(*trained, tmp, "trained"), trained, tmp


def _cfg(**registry) -> PipelineConfig:
    return PipelineConfig.model_validate({"experiment": EXPERIMENT, "rl": {"max_turns": T}, "sft": {"max_wrong_attempts": T - 1},
                                          "flow": {"registry": registry}})


def _pipeline_step(data: CurateOutput, rl: RLOutput, cfg: PipelineConfig):
    """What the flow does from evaluate on: evaluate RL (beside the champion, if any), then gate."""
    client = MlflowClient()
    models = champion_to_evaluate(client, cfg, rl)
    out = evaluate.run(evaluate.Config(experiment=EXPERIMENT, data=data, rl=rl, models=models, max_turns=T,
                                       num_samples=T, max_new_tokens=4, bootstrap_samples=200, transcripts=0,
                                       inference=["feedback"]))
    return models, out, gate(client, cfg, rl, out.metrics, models.get("champion"))


def test_first_candidate_then_better_promoted_then_worse_refused(setup):
    data, random_model, trained_model, _, _ = setup
    cfg = _cfg()
    client = MlflowClient()
    name = f"{EXPERIMENT}-rl"

    # 1. No champion yet: the random model is registered and becomes champion without a comparison.
    models, _, first = _pipeline_step(data, random_model, cfg)
    assert models == {}
    assert (first.name, first.version, first.status, first.champion_before) == (name, "1", "promoted", None)
    assert first.reason == "No champion yet: the first candidate becomes champion."
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    # 2. The trained model, evaluated beside champion v1 on the same problems: its interval lies above 0.
    models, out, better = _pipeline_step(data, trained_model, cfg)
    assert models == {"champion": f"models:/{name}/1"}
    m = out.metrics
    assert m[f"eval/rl/succ_at_{T}"] > m[f"eval/champion/succ_at_{T}"]
    assert m[f"eval/champion_vs_rl/succ_at_{T}_hi"] < 0
    assert (better.version, better.status, better.champion_before, better.champion_after) == ("2", "promoted", "1", "2")
    assert better.reason.startswith(f"Better: succ_at_{T} on test, rl - champion v1 = +")
    assert "the paired interval lies above 0" in better.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "2"

    # 3. The random model again (a new RL run) against champion v2: refused, the champion stays.
    worse_rl = _rl_output(*_tiny_model(seed=1, train_steps=0), setup[4], "random-2")
    models, out, worse = _pipeline_step(data, worse_rl, cfg)
    assert models == {"champion": f"models:/{name}/2"}
    assert (worse.version, worse.status, worse.champion_after) == ("3", "refused", "2")
    assert worse.reason.startswith(f"Not better: succ_at_{T} on test, rl - champion v2 = -")
    assert "Kept the champion." in worse.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "3"
    version = client.get_model_version(name, "3")  # tags hold the decision and its reason
    assert version.tags["ufo.gate.decision"] == "refused" and version.tags["ufo.gate.reason"] == worse.reason

    # 4. The pair evaluate measured is not against today's champion (the alias moved meanwhile): refused.
    moved = gate(client, cfg, worse_rl, out.metrics, champion_evaluated=f"models:/{name}/1")
    assert (moved.version, moved.status, moved.champion_after) == ("3", "refused", "2")
    assert moved.reason.startswith(f"The champion is version 2, but evaluate compared RL against models:/{name}/1")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"

    # 5. The champion's own RL run again (a cached rerun): no new version, nothing evaluated beside it.
    models, _, again = _pipeline_step(data, trained_model, cfg)
    assert models == {}
    assert (again.version, again.status) == ("2", "unchanged")
    assert len(client.search_model_versions(f"name = '{name}'")) == 3


def test_the_logged_model_loads_with_mlflow_and_matches_the_checkpoint(setup, tmp_path):
    _, _, trained_model, (model, tokenizer), _ = setup
    ref = trained_model.artifact(MLFLOW_MODEL_ARTIFACT)
    assert ref.uri.startswith("models:/m-")
    fetch_verified(ref, tmp_path)  # the digest is that of the uploaded MLflow model folder
    loaded = mlflow.transformers.load_model(ref.uri, return_type="components")
    ids = torch.tensor([tokenizer.encode("123*3")])
    with torch.no_grad():
        assert torch.equal(loaded["model"](input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded["tokenizer"].encode("123*3") == tokenizer.encode("123*3")
    logged = mlflow.get_logged_model(ref.uri.removeprefix("models:/"))
    assert logged.name == "rl" and logged.source_run_id == trained_model.run_id


def _interval(est, lo, hi, key="eval/champion_vs_rl/succ_at_5"):
    return {key: est, f"{key}_lo": lo, f"{key}_hi": hi}


@pytest.mark.parametrize(("champion_minus_rl", "promote", "shown"), [
    ((-0.10, -0.15, -0.05), True, "rl - champion v4 = +0.100 [+0.050, +0.150]"),
    ((-0.02, -0.06, 0.01), False, "rl - champion v4 = +0.020 [-0.010, +0.060]"),  # straddles 0
    ((0.00, 0.00, 0.00), False, "rl - champion v4 = +0.000 [+0.000, +0.000]"),  # lower end 0 is not above 0
    ((0.10, 0.05, 0.15), False, "rl - champion v4 = -0.100 [-0.150, -0.050]"),
])
def test_verdict_reads_the_paired_interval_of_rl_minus_champion(champion_minus_rl, promote, shown):
    v = verdict(_interval(*champion_minus_rl), has_champion=True, champion_version="4", eval_set="test",
                metric="succ_at_5")
    assert v.promote is promote and shown in v.reason


def test_verdict_on_another_set_and_without_the_pair():
    key = "eval/math500/champion_vs_rl/pass_at_1"
    v = verdict(_interval(-0.2, -0.3, -0.1, key), has_champion=True, champion_version="2", eval_set="math500",
                metric="pass_at_1")
    assert v.promote and "pass_at_1 on math500" in v.reason
    v = verdict({}, has_champion=True, champion_version="2", eval_set="math500", metric="pass_at_1")
    assert not v.promote and f"evaluate logged no {key}" in v.reason


@pytest.mark.parametrize(("overrides", "message"), [
    ({"flow": {"registry": {"metric": "avg_turns"}}}, "flow.registry.metric: 'avg_turns' is not a higher-is-better"),
    ({"flow": {"registry": {"metric": "succ_at_9"}}}, "needs k in 1..evaluate.max_turns = 5"),
    ({"flow": {"registry": {"metric": "self_correction_at_1"}}}, "needs k in 2..evaluate.max_turns = 5"),
    ({"evaluate": {"sets": ["math500"]}}, "flow.registry.eval_set: 'test' is not evaluated"),
    ({"evaluate": {"models": {"champion": "models:/x@champion"}}}, "evaluate.models.champion: the name is taken"),
    ({"evaluate": {"inference": ["no_feedback"]}}, "add `feedback` to evaluate.inference"),
])
def test_config_refuses_a_gate_it_could_not_run(overrides, message):
    with pytest.raises(ConfigError, match="flow.registry|evaluate.models") as err:
        validate(PipelineConfig, overrides, "cfg.yaml")
    assert message in str(err.value)
    validate(PipelineConfig, {**overrides, "flow": {"registry": {"enabled": False}}}, "cfg.yaml")


def test_default_name_and_metric():
    cfg = PipelineConfig.model_validate({"experiment": "exp", "rl": {"max_turns": 4}, "sft": {"max_wrong_attempts": 3}})
    assert cfg.flow.registry.name_for(cfg.experiment) == "exp-rl" and cfg.gate_metric == "succ_at_4"


def test_an_rl_output_without_an_mlflow_model_is_skipped_with_its_reason(setup):
    """`--from-run` of an RL run made before RL logged MLflow models: no champion is evaluated, nothing is
    registered, and the pipeline is told why instead of failing after all its stages finished."""
    data, random_model, _, _, _ = setup
    old = RLOutput(run_id=random_model.run_id, artifacts={"model": random_model.artifact("model")})
    cfg = _cfg(model_name="registry-tests-old-rl")
    assert champion_to_evaluate(MlflowClient(), cfg, old) == {}
    decision = gate(MlflowClient(), cfg, old, {}, None)
    assert decision.status == "skipped" and "holds no MLflow model ('mlflow_model')" in decision.reason
    assert MlflowClient().search_registered_models("name = 'registry-tests-old-rl'") == []
    assert "untouched (skipped)" in decision.markdown()
