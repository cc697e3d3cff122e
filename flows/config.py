"""The pipeline config: the four stage configs under `curate`, `sft`, `rl`, `evaluate`, plus what the
flow itself needs (launcher, per-stage retries, cache, timeout and resources), with the invariants
that span stages checked at load time.

Imports only the stages' `config` modules (pydantic, no torch, no MLflow): `ufo` answers a bad config
in well under a second.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from flows.resources import Resources
from stages.common.config import StrictModel
from stages.curate import config as curate_config
from stages.evaluate import config as evaluate_config
from stages.rl import config as rl_config
from stages.sft import config as sft_config

STAGES = ("curate", "sft", "rl", "evaluate")
StageName = Literal["curate", "sft", "rl", "evaluate"]
#: The upstream Outputs each stage's config receives from the flow: field -> producing stage.
UPSTREAM: dict[str, dict[str, str]] = {
    "curate": {},
    "sft": {"data": "curate"},
    "rl": {"data": "curate", "sft": "sft"},
    "evaluate": {"data": "curate", "sft": "sft", "rl": "rl"},
}


#: The stages that train on ranks (`<stage>.engine`), so can span several nodes.
TRAINED_ON_RANKS = ("sft", "rl")


def _raw_nodes(flow: Any, stage: str) -> Any:
    """`flow.<stage>.resources.nodes` as written (before validation), or None when unset."""
    if isinstance(flow, FlowConfig):
        return flow.stage(stage).resources.nodes
    settings = flow.get(stage) if isinstance(flow, dict) else None
    if isinstance(settings, StageSettings):
        return settings.resources.nodes
    resources = settings.get("resources") if isinstance(settings, dict) else None
    if isinstance(resources, Resources):
        return resources.nodes
    return resources.get("nodes") if isinstance(resources, dict) else None


class StageSettings(StrictModel):
    """How the flow runs one stage. The stage itself never sees these."""

    retries: int = Field(0, ge=0)
    """Rerun a failed stage this many times (each attempt is its own MLflow run; failed ones end FAILED)."""
    cache: bool = True
    """Reuse a FINISHED run of this stage with the same cache key (config, input digests, code) instead
    of running it again. `ufo run --force` turns the cache off for every stage."""
    timeout_seconds: float | None = Field(None, gt=0)
    """Stop the stage (SIGTERM, then SIGKILL after `flow.stop_grace_seconds`) once it runs longer
    than this, whether or not it prints; None = `flow.stage_timeout_seconds`."""
    resources: Resources = Resources()
    """CPUs, memory, shared memory, GPUs, node selector, tolerations (docker and deployment launchers)."""


#: Metrics the registry gate may compare on: higher is better for each (not avg_turns, not invalid_rate).
GATE_METRICS = re.compile(r"(succ_at_\d+|pass_at_\d+|succ_auc|greedy_accuracy|effective_answer_ratio|"
                          r"self_correction_at_\d+)")


class RegistryConfig(StrictModel):
    """The registry gate after evaluate (flows/registry.py): the RL model becomes a version of a registered
    model with alias `candidate`, and takes alias `champion` only if it beats the current champion."""

    enabled: bool = True
    """Register and gate the RL model. Costs: registering takes well under a second; while a champion
    exists (and is not this very model) evaluate evaluates it beside SFT and RL, one model's evaluation
    more (~1/2 of evaluate's time with two models). Needs a database-backed MLflow store (the default
    SQLite one, or a tracking server), not a file store."""
    model_name: str | None = Field(None, min_length=1, max_length=256)
    """Registered model name; None = `<experiment>-rl`."""
    metric: str | None = None
    """Headline metric of the gate, as named in evaluate's metrics (higher is better): `succ_at_<k>`,
    `pass_at_<k>`, `succ_auc`, `greedy_accuracy`, `effective_answer_ratio`, `self_correction_at_<k>`.
    None = `succ_at_<T>` with T = evaluate.max_turns."""
    eval_set: str = "test"
    """The evaluation set the gate compares on: `test` (the held-out split) or the name of an `eval/<name>`
    set of the curate output. Must be among `evaluate.sets` when those are given."""

    def name_for(self, experiment: str) -> str:
        return self.model_name or f"{experiment}-rl"


class FlowConfig(StrictModel):
    launcher: Literal["local", "docker", "deployment"] = "local"
    """How each stage runs. `local`: a process on this machine (the default; needs no Docker).
    `docker`: a container of the stage's image (`make images`) through the Docker engine.
    `deployment`: a Prefect deployment on a work pool (`ufo deploy`), run by that pool's worker.
    `docker` and `deployment` need an MLflow tracking server that serves artifacts (`ufo stack up`)."""
    image_prefix: str = "ufo"
    """Stage images are `<image_prefix>-<stage>:<image_tag>` (what `make images` builds)."""
    image_tag: str = "latest"
    """Tag of the stage images."""
    deployment_flow: str = "ufo-stage"
    """Flow name of the per-stage deployments (`ufo deploy` names them `<deployment_flow>/<stage>`)."""
    retry_delay_seconds: float = Field(5.0, ge=0)
    """Wait between a failed attempt and its retry."""
    stage_timeout_seconds: float | None = Field(None, gt=0)
    """Default timeout of every stage; a stage's own `timeout_seconds` wins. None = no limit."""
    stop_grace_seconds: float = Field(10.0, ge=0)
    """On a timeout or an interrupt, a stage gets SIGTERM and this long to end its run before SIGKILL."""
    tracking_retry_seconds: float = Field(180.0, gt=0)
    """How long each MLflow call (of the flow and of every stage) retries an MLflow server that does not
    answer before it gives up: a stage then fails naming the server, and the runs nobody could close are
    closed by the next `ufo` command once the server is back. A restart shorter than this goes unnoticed."""
    deployment_claim_seconds: float = Field(60.0, gt=0)
    """`deployment` launcher: a stage's flow run still Scheduled, Late or Pending this long after it was
    created, while no worker of its pool has sent a heartbeat for as long (nor for two of its heartbeat
    intervals), is marked Crashed and the stage fails, naming the work pool. A live but busy worker is
    waited for. Workers poll every 10 s by default (PREFECT_WORKER_QUERY_SECONDS)."""
    curate: StageSettings = StageSettings()
    sft: StageSettings = StageSettings()
    rl: StageSettings = StageSettings()
    evaluate: StageSettings = StageSettings()
    registry: RegistryConfig = RegistryConfig()
    """The registry gate: register the RL model, promote it to `champion` only when it beats the current one."""

    def stage(self, name: str) -> StageSettings:
        return getattr(self, name)

    def timeout(self, name: str) -> float | None:
        own = self.stage(name).timeout_seconds
        return own if own is not None else self.stage_timeout_seconds

    def image(self, name: str) -> str:
        return f"{self.image_prefix}-{name}:{self.image_tag}"


class PipelineConfig(StrictModel):
    experiment: str = "ufo"
    """MLflow experiment of the pipeline run and its stage runs (copied into each stage)."""
    seed: int = 0
    """Seed of every stage, unless a stage sets its own."""
    flow: FlowConfig = FlowConfig()
    """Orchestration settings; stages never see them."""
    curate: curate_config.Config = curate_config.Config()
    """Data curation (stages/curate/)."""
    sft: sft_config.Config = sft_config.Config()
    """SFT warmup (stages/sft/)."""
    rl: rl_config.Config = rl_config.Config()
    """Multi-turn RL with unary feedback (stages/rl/)."""
    evaluate: evaluate_config.Config = evaluate_config.Config()
    """Evaluation of the SFT and RL models (stages/evaluate/)."""

    @model_validator(mode="before")
    @classmethod
    def _propagate(cls, data: Any) -> Any:
        """Fill shared values into the stages that did not set them: experiment and seed everywhere,
        and the episode protocol (feedback text, T) from `rl` into `sft` and `evaluate`."""
        if not isinstance(data, dict):
            return data
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
        rl_cfg = data.get("rl") if isinstance(data.get("rl"), dict) else {}
        for name in STAGES:
            stage = data.setdefault(name, {})
            if not isinstance(stage, dict):
                continue
            for key in ("experiment", "seed"):
                if key in data:
                    stage.setdefault(key, data[key])
            if name in ("sft", "evaluate") and "feedback" in rl_cfg:
                stage.setdefault("feedback", rl_cfg["feedback"])
        if isinstance(data["evaluate"], dict) and "max_turns" in rl_cfg:
            data["evaluate"].setdefault("max_turns", rl_cfg["max_turns"])
        for name in TRAINED_ON_RANKS:  # the ranks must know how many machines they span
            nodes = _raw_nodes(data.get("flow"), name)
            if nodes is not None and isinstance(data[name], dict) and isinstance(data[name].get("engine", {}), dict):
                data[name]["engine"] = {"nodes": nodes, **data[name].get("engine", {})}
        return data

    @model_validator(mode="after")
    def _invariants(self) -> PipelineConfig:
        for stage, fields in UPSTREAM.items():
            for f in fields:
                if getattr(getattr(self, stage), f) is not None:
                    raise ValueError(f"{stage}.{f}: set by the flow from the upstream stage's output; remove it "
                                     "(to reuse an earlier stage, use `ufo run --from-run RUN_ID --only STAGE`)")
        model = self.sft.model
        # A scratch model's context length is known at load time; a pretrained one's only once loaded.
        if not model.pretrained and self.rl.max_episode_tokens > model.max_position_embeddings:
            raise ValueError(
                f"rl.max_turns: an episode of {self.rl.max_turns} turns can take {self.rl.max_episode_tokens} tokens "
                f"(rl.max_prompt_tokens + max_turns * (rl.max_new_tokens + 1) + (max_turns - 1) * "
                f"rl.max_feedback_tokens), more than sft.model.max_position_embeddings = "
                f"{model.max_position_embeddings}")
        if self.evaluate.max_turns > self.rl.max_turns and not model.pretrained:
            eval_tokens = self.rl.model_copy(update={"max_turns": self.evaluate.max_turns}).max_episode_tokens
            if eval_tokens > model.max_position_embeddings:
                raise ValueError(f"evaluate.max_turns: {self.evaluate.max_turns} turns do not fit "
                                 f"sft.model.max_position_embeddings = {model.max_position_embeddings}")
        if self.evaluate.base and not model.pretrained:
            raise ValueError("evaluate.base: evaluates the pretrained model SFT started from, but sft.model.init is "
                             f"{model.init!r} (a model built here has no base worth evaluating)")
        # SFT prepares the model for the conversations it will have: RL's episodes, and evaluation's (a
        # single-turn RL arm, T=1, is still evaluated over T=5 turns with feedback).
        longest = max(self.rl.max_turns, self.evaluate.max_turns)
        if self.sft.max_wrong_attempts >= longest:
            raise ValueError(f"sft.max_wrong_attempts: {self.sft.max_wrong_attempts} must be < the longest episode, "
                             f"max(rl.max_turns, evaluate.max_turns) = {longest}: SFT would teach longer "
                             "conversations than any episode has")
        self._check_nodes()
        self._check_registry()
        return self

    def _check_nodes(self) -> None:
        for name in STAGES:
            nodes = self.flow.stage(name).resources
            if name not in TRAINED_ON_RANKS:
                if nodes.nodes > 1:
                    raise ValueError(f"flow.{name}.resources.nodes: {name} runs in one process; only "
                                     f"{' and '.join(TRAINED_ON_RANKS)} train on several nodes")
                continue
            engine = getattr(self, name).engine
            if engine.nodes != nodes.nodes:
                raise ValueError(f"{name}.engine.nodes: {engine.nodes}, but flow.{name}.resources.nodes is "
                                 f"{nodes.nodes}; set flow.{name}.resources.nodes only (the flow copies it)")
            if nodes.nodes > 1 and self.flow.launcher == "local":
                raise ValueError(f"flow.{name}.resources.nodes: {nodes.nodes} nodes need flow.launcher 'docker' (a "
                                 "container per node on a Docker network) or 'deployment' (a Kubernetes work pool); "
                                 "the local launcher runs each stage as one process tree on this machine")
            if nodes.gpus and engine.num_processes > nodes.gpus:
                raise ValueError(f"{name}.engine.num_processes: {engine.num_processes} ranks per node, but "
                                 f"flow.{name}.resources.gpus gives each node {nodes.gpus} GPU(s), one per rank")

    def _check_registry(self) -> None:
        reg, ev = self.flow.registry, self.evaluate
        if not reg.enabled:
            return
        if reg.metric is not None and not GATE_METRICS.fullmatch(reg.metric):
            raise ValueError(f"flow.registry.metric: {reg.metric!r} is not a higher-is-better metric of evaluate "
                             f"(one of {GATE_METRICS.pattern})")
        k = re.search(r"_(\d+)$", self.gate_metric)
        first = 2 if self.gate_metric.startswith("self_correction") else 1  # turn 1 follows no wrong answer
        if k and not first <= int(k.group(1)) <= ev.max_turns:
            raise ValueError(f"flow.registry.metric: {self.gate_metric} needs k in {first}..evaluate.max_turns "
                             f"= {ev.max_turns}")
        if ev.sets is not None and reg.eval_set not in ev.sets:
            raise ValueError(f"flow.registry.eval_set: {reg.eval_set!r} is not evaluated (evaluate.sets = {ev.sets})")
        if "feedback" not in ev.inference:
            raise ValueError("flow.registry: the gate compares models evaluated with feedback; add `feedback` to "
                             "evaluate.inference (or set flow.registry.enabled: false)")
        if "champion" in ev.models:
            raise ValueError("evaluate.models.champion: the name is taken by the registry gate, which evaluates the "
                             "current champion under it (rename the model, or set flow.registry.enabled: false)")

    @property
    def gate_metric(self) -> str:
        """The registry gate's metric, resolved: `flow.registry.metric`, else Succ@T."""
        return self.flow.registry.metric or f"succ_at_{self.evaluate.max_turns}"
