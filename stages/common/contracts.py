"""The contracts between stages: what each stage hands to the next, and the curated data schema.

Stages are siblings: none imports another. Everything that crosses a stage boundary lives here (the
`Output` of each stage, the curated split schema and its reader, the `Problem` a split row becomes,
the default feedback text), so each stage's container carries only its own code plus `stages/common`.
This module imports no torch and no MLflow: the CLI validates configs with it in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from stages.common.config import ConfigError, StrictModel

if TYPE_CHECKING:
    import pandas as pd

#: The unary feedback of the paper's title; every stage's `feedback` field defaults to it.
DEFAULT_FEEDBACK = "Let's try again."

#: Curated splits, in the order the curate stage writes them.
SPLITS = ("train", "val", "test")
#: Columns every curated split and evaluation set has: a stable content-derived `id`, the `question`,
#: its final `answer` (compared by math-verify equivalence) and the `source` it came from.
COLUMNS = ["id", "question", "answer", "source"]
#: Columns curate adds when some kept row of the source has them: the worked `solution` (str), the
#: MATH difficulty `level` (int 1-5) and `subject` (str; MetaMathQA: its `type`). Readers must not
#: require them.
OPTIONAL_COLUMNS = ["solution", "level", "subject"]


class ArtifactRef(StrictModel):
    """A logged artifact (file or folder) addressed by URI and content digest."""

    uri: str
    """`runs:/<run_id>/<artifact_path>` (or any URI MLflow can download)."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the file, or of the sorted (relative path, file sha256) list of a folder."""


class StageOutput(StrictModel):
    """What a stage hands to the next one: small, typed, JSON-serialisable. Never tensors."""

    stage: str
    run_id: str
    """The MLflow run that produced the artifacts."""
    artifacts: dict[str, ArtifactRef] = {}
    metrics: dict[str, float] = {}

    def artifact(self, name: str) -> ArtifactRef:
        if name not in self.artifacts:
            raise KeyError(f"{self.stage} output (run {self.run_id}) has no artifact {name!r}; "
                           f"it has {sorted(self.artifacts)}")
        return self.artifacts[name]

    def digests(self) -> dict[str, str]:
        """Artifact name -> sha256: what a downstream stage's result depends on (not the run id)."""
        return {name: ref.sha256 for name, ref in sorted(self.artifacts.items())}


#: Artifact-name prefix of the evaluation sets curate keeps whole (sources with role `eval`).
EVAL_SET_PREFIX = "eval/"


class CurateOutput(StageOutput):
    """Artifacts: `train`, `val` (and `test` when a source holds one out) parquet splits, one parquet
    per evaluation set named `eval/<set name>`, `quarantine` and `manifest`."""

    stage: str = "curate"

    def eval_sets(self) -> dict[str, ArtifactRef]:
        """Every set a model is evaluated on: the held-out `test` split (when there is one) and each
        `eval/<name>` set, by name."""
        sets = {"test": self.artifacts["test"]} if "test" in self.artifacts else {}
        sets |= {name.removeprefix(EVAL_SET_PREFIX): ref for name, ref in sorted(self.artifacts.items())
                 if name.startswith(EVAL_SET_PREFIX)}
        return sets


#: The SFT Output's artifact naming the pretrained model it started from (absent for a scratch model).
BASE_MODEL_ARTIFACT = "base_model"


class SFTOutput(StageOutput):
    """Artifacts: `model` (a `save_pretrained` folder: safetensors, tokenizer, chat template), `mlflow_model`
    (the same as an MLflow model) and, for a pretrained start, `base_model`: the MLflow model SFT started
    from (`models:/<id>`, imported once per source; see stages/common/base_model.py)."""

    stage: str = "sft"


class RLOutput(StageOutput):
    """Artifacts: `model` (a `save_pretrained` folder)."""

    stage: str = "rl"


class EvaluateOutput(StageOutput):
    """Artifacts: `report_html` (the self-contained report), `plots` (folder of PNGs), `curves` (the first
    set's Succ@k/Pass@k PNG), `examples` (parquet, one row per episode), `report` (JSON). Metrics
    `eval/<model>/<name>` on the test split and `eval/<set>/<model>/<name>` on other sets, with
    `<name>_lo`/`<name>_hi` intervals; see stages/evaluate/__init__.py."""

    stage: str = "evaluate"


OUTPUT_TYPES: dict[str, type[StageOutput]] = {
    "curate": CurateOutput, "sft": SFTOutput, "rl": RLOutput, "evaluate": EvaluateOutput,
}


@dataclass(frozen=True)
class Problem:
    """One (question, final answer) row of a curated split."""

    id: str
    question: str
    answer: str


def load_split(path: str | Path) -> pd.DataFrame:
    """Read a curated split, checking it has the schema curate writes."""
    import pandas as pd

    df = pd.read_parquet(path)
    missing = set(COLUMNS) - set(df.columns)
    if missing:
        raise ConfigError(f"{path}: not a curated split, missing columns {sorted(missing)}")
    return df


def problems_from(df: pd.DataFrame) -> list[Problem]:
    return [Problem(r.id, r.question, r.answer) for r in df.itertuples()]
