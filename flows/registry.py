"""The registry gate: the pipeline's RL model becomes a version of a registered MLflow model with alias
`candidate`, and takes alias `champion` only when it beats the current champion on the same problems.

"Beats" means the paired 95% bootstrap interval of (RL - champion) on the headline metric (default
Succ@T on the test split) lies above 0. The flow asks `champion_to_evaluate` before evaluate runs and,
when there is a champion other than this very model, evaluates it beside SFT and RL (evaluate's
`models: {champion: models:/<name>/<version>}`, pinned to the version so evaluate's cache key changes
with the champion); after evaluate, `gate` registers, decides, moves the aliases and says why.

With no champion yet the first candidate becomes champion. The decision and its reason are tags on the
model version (`ufo.gate.*`) and, through the flow, on the pipeline run.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.config import PipelineConfig
from stages.common.contracts import RLOutput, StageOutput
from stages.common.tracking import MLFLOW_MODEL_ARTIFACT

CANDIDATE, CHAMPION = "candidate", "champion"
#: evaluate.models name under which the current champion is evaluated.
CHAMPION_MODEL = "champion"
TAG_DECISION = "ufo.gate.decision"
TAG_REASON = "ufo.gate.reason"


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str
    status: str = ""
    """`promoted`, `refused`, or `unchanged` (the candidate already is the champion)."""

    def __post_init__(self):
        if not self.status:
            object.__setattr__(self, "status", "promoted" if self.promote else "refused")


@dataclass(frozen=True)
class Decision:
    """What the gate did: registered model `name`, the candidate's `version`, the champion before/after."""

    name: str
    version: str
    status: str
    """`promoted`, `refused`, `unchanged` or `skipped` (no MLflow model to register)."""
    reason: str
    champion_before: str | None
    champion_after: str | None

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"

    def tags(self) -> dict[str, str]:
        """Tags for the pipeline run."""
        return {"ufo.registry.model": self.name, "ufo.registry.version": self.version,
                TAG_DECISION: self.status, TAG_REASON: self.reason[:4000]}

    def markdown(self) -> str:
        verdict = {"promoted": "**promoted to `champion`**", "refused": "**not promoted**",
                   "unchanged": "**already the champion**"}.get(self.status)
        if verdict is None:
            return f"Registry: `{self.name}` untouched ({self.status}). {self.reason}"
        return (f"Registry: `{self.name}` version {self.version} (`models:/{self.name}@{CANDIDATE}`) {verdict}; "
                f"champion is now version {self.champion_after}. {self.reason}")


def metric_key(eval_set: str, model: str, metric: str) -> str:
    """Evaluate's name for a metric: `eval/<model>/<metric>` on the test split, `eval/<set>/...` elsewhere."""
    return f"eval/{model}/{metric}" if eval_set == "test" else f"eval/{eval_set}/{model}/{metric}"


def verdict(metrics: dict[str, float], *, has_champion: bool, champion_version: str | None, eval_set: str,
            metric: str) -> Verdict:
    """Promote or not, and why, from evaluate's metrics (pure: unit-tested on hand-made numbers).

    Evaluate reports `champion_vs_rl` = champion - rl (a later model against an earlier one). Percentile
    bootstrap intervals are equivariant under negation, so rl - champion has the interval
    [-hi, -lo] of it, and the gate's condition "the lower end of rl - champion > 0" is "hi < 0".
    """
    if not has_champion:
        return Verdict(True, "No champion yet: the first candidate becomes champion.")
    diff = metric_key(eval_set, f"{CHAMPION_MODEL}_vs_rl", metric)
    missing = [k for k in (diff, f"{diff}_lo", f"{diff}_hi") if k not in metrics]
    if missing:
        return Verdict(False, f"No paired interval against champion version {champion_version}: evaluate logged no "
                              f"{missing[0]} (was the champion evaluated on set {eval_set!r}?). Kept the champion.")
    est, lo, hi = 0.0 - metrics[diff], 0.0 - metrics[f"{diff}_hi"], 0.0 - metrics[f"{diff}_lo"]  # no -0.000 shown
    rl = metrics.get(metric_key(eval_set, "rl", metric))
    champ = metrics.get(metric_key(eval_set, CHAMPION_MODEL, metric))
    values = "" if rl is None or champ is None else f" ({rl:.3f} vs {champ:.3f})"
    shown = f"{metric} on {eval_set}, rl - champion v{champion_version} = {est:+.3f} [{lo:+.3f}, {hi:+.3f}]{values}"
    if lo > 0:
        return Verdict(True, f"Better: {shown}; the paired interval lies above 0.")
    return Verdict(False, f"Not better: {shown}; the paired interval does not lie above 0 (lower end {lo:+.3f} "
                          "<= 0). Kept the champion.")


def _alias(client: MlflowClient, name: str, alias: str):
    try:
        # The model first: MLflow's auth app answers an alias lookup on a model that does not exist with 403
        # (it finds no model to check the permission on), not 404, so a first pipeline would fail there.
        client.get_registered_model(name)
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _model_uri(rl: StageOutput) -> str | None:
    """The RL Output's MLflow model URI; None for an Output made before RL logged one (`--from-run` of an old
    run): the gate then skips, with the reason, rather than fail a pipeline whose stages all finished."""
    ref = rl.artifacts.get(MLFLOW_MODEL_ARTIFACT)
    return None if ref is None else ref.uri


def champion_to_evaluate(client: MlflowClient, cfg: PipelineConfig, rl: RLOutput) -> dict[str, str]:
    """`{champion: models:/<name>/<version>}` for evaluate.models when a champion exists and is not the RL
    model itself (a cached rerun of the same RL run), else `{}`."""
    name = cfg.flow.registry.name_for(cfg.experiment)
    uri = _model_uri(rl)
    champ = None if uri is None else _alias(client, name, CHAMPION)
    if champ is None or champ.source == uri:  # the version's source is the `models:/<model_id>` it was made from
        return {}
    return {CHAMPION_MODEL: f"models:/{name}/{champ.version}"}


def _create_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="RL models of the UFO pipeline. Alias `champion`: the best "
                                                         "so far by the registry gate (flows/registry.py); "
                                                         "`candidate`: the newest.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another pipeline created it meanwhile
            raise


def gate(client: MlflowClient, cfg: PipelineConfig, rl: RLOutput, metrics: dict[str, float],
         champion_evaluated: str | None) -> Decision:
    """Register the RL model (once: a cached RL run keeps its version), alias it `candidate`, and give it
    `champion` when `verdict` says so.

    Args:
        metrics: the evaluate Output's.
        champion_evaluated: the URI evaluate got as `models.champion` (`champion_to_evaluate`), or None.
            When the alias has moved since (another pipeline promoted its model meanwhile), the pair
            evaluate measured is not against today's champion: refused, with that reason.
    """
    reg = cfg.flow.registry
    name = reg.name_for(cfg.experiment)
    uri = _model_uri(rl)
    if uri is None:
        return Decision(name, "-", "skipped", f"The RL output (run {rl.run_id}) holds no MLflow model "
                        f"({MLFLOW_MODEL_ARTIFACT!r}): it was made before the RL stage logged one. Nothing registered; "
                        "rerun RL to gate it.", None, None)
    model_id = uri.removeprefix("models:/")
    try:
        # Asked first: creating a model that exists fails in the store (a unique-key error in PostgreSQL's
        # log for every pipeline after the first), though MLflow answers it as RESOURCE_ALREADY_EXISTS.
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        _create_registered_model(client, name)
    same = client.search_model_versions(f"name = '{name}'")
    # Matched on the source URI: the SQLite store does not return a version's model_id.
    version = next((v for v in same if v.source == uri), None)
    if version is None:
        version = client.create_model_version(name, uri, run_id=rl.run_id, model_id=model_id,
                                              description=f"RL model of run {rl.run_id}")
    number = str(version.version)  # an int from some stores, a str from others
    client.set_registered_model_alias(name, CANDIDATE, number)
    champ = _alias(client, name, CHAMPION)
    before = None if champ is None else str(champ.version)
    if before == number:
        v = Verdict(False, f"Version {number} is already the champion (the same RL run); nothing to compare.",
                    "unchanged")
    elif before is not None and champion_evaluated != f"models:/{name}/{before}":
        v = Verdict(False, f"The champion is version {before}, but evaluate compared RL against "
                           f"{champion_evaluated or 'no champion'} (the alias moved during this run). Kept the "
                           "champion; rerun the pipeline to compare against it.")
    else:
        v = verdict(metrics, has_champion=before is not None, champion_version=before, eval_set=reg.eval_set,
                    metric=cfg.gate_metric)
    if v.promote:
        client.set_registered_model_alias(name, CHAMPION, number)
    client.set_model_version_tag(name, number, TAG_DECISION, v.status)
    client.set_model_version_tag(name, number, TAG_REASON, v.reason[:4000])
    return Decision(name, number, v.status, v.reason, before, number if v.promote else before)
