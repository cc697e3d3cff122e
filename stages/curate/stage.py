"""Curation: sources -> rows (id, question, answer, source, split) -> quarantine, dedup,
decontamination -> parquet splits + manifest, logged to the stage's MLflow run."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import mlflow
import pandas as pd

from stages.common.config import ConfigError
from stages.common.contracts import COLUMNS, SPLITS
from stages.common.tracking import StageContext, log_artifact
from stages.curate.config import Config, GSM8KSource, MultiplicationSource, Output

log = logging.getLogger("ufo.curate")


# ---------------------------------------------------------------------------------------------------
# Sources -> rows with a split each


def _multiplication_rows(src: MultiplicationSource, seed: int) -> list[dict]:
    problems = [(a, b) for a in range(src.a_min, src.a_max + 1) for b in range(src.b_min, src.b_max + 1)]
    # Split by unordered problem: {a, b} lands in exactly one split whichever way it is written.
    keys = sorted({tuple(sorted(p)) for p in problems})
    random.Random(seed).shuffle(keys)
    n_test = round(len(keys) * src.test_fraction)
    n_val = round(len(keys) * src.val_fraction)
    split_of = {k: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, k in enumerate(keys)}
    return [
        {"id": f"mul/{a}x{b}", "question": f"{a}*{b}", "answer": str(a * b), "source": "multiplication",
         "split": split_of[tuple(sorted((a, b)))]}
        for a, b in problems
    ]


def _gsm8k_final(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def _gsm8k_rows(src: GSM8KSource, seed: int, quarantine: list[dict]) -> list[dict]:
    folder = Path(src.path)
    rows: list[dict] = []
    for file_split in ("train", "test"):
        path = folder / f"{file_split}.jsonl"
        if not path.is_file():
            raise ConfigError(f"sources[gsm8k].path: {path} not found")
        file_rows = []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            rid = f"gsm8k/{file_split}/{line_no}"
            try:
                raw = json.loads(line)
                question, answer = raw["question"], raw["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                quarantine.append({"id": rid, "reason": f"{path}:{line_no}: unreadable row ({err})"})
                continue
            if "####" not in answer:
                quarantine.append({"id": rid, "reason": f"{path}:{line_no}: no '#### <final>' in answer"})
                continue
            file_rows.append({"id": rid, "question": question.strip(), "answer": _gsm8k_final(answer),
                              "source": "gsm8k", "split": file_split})
        rng = random.Random(seed)
        rng.shuffle(file_rows)
        if src.max_rows:
            file_rows = file_rows[: src.max_rows]
        if file_split == "train":
            n_val = round(len(file_rows) * src.val_fraction)
            for r in file_rows[:n_val]:
                r["split"] = "val"
        rows += file_rows
    return rows


def _normalise(question: str) -> str:
    return re.sub(r"\s+", " ", question).strip().lower()


def _clean(rows: list[dict], cfg: Config, quarantine: list[dict]) -> pd.DataFrame:
    """Quarantine unusable rows, drop duplicates, and decontaminate train/val against test."""
    from stages.common.grading import extract_answer

    kept = []
    for r in rows:
        if not r["question"]:
            quarantine.append({"id": r["id"], "reason": "empty question"})
        elif len(r["question"]) > cfg.max_question_chars:
            quarantine.append({"id": r["id"], "reason": f"question longer than {cfg.max_question_chars} chars"})
        elif extract_answer(r["answer"]) is None:
            quarantine.append({"id": r["id"], "reason": f"final answer {r['answer']!r} is not a readable value"})
        else:
            kept.append(r)
    df = pd.DataFrame(kept, columns=[*COLUMNS, "split"])
    df["key"] = df["question"].map(_normalise)
    test_keys = set(df.loc[df.split == "test", "key"])
    contaminated = (df.split != "test") & df.key.isin(test_keys)
    for rid in df.loc[contaminated, "id"]:
        quarantine.append({"id": rid, "reason": "question also in test split (decontaminated)"})
    df = df[~contaminated]
    dup = df.duplicated("key", keep="first")
    for rid in df.loc[dup, "id"]:
        quarantine.append({"id": rid, "reason": "duplicate question"})
    return df[~dup].drop(columns="key")


def curate(config: Config, ctx: StageContext) -> Output:
    quarantine: list[dict] = []
    rows: list[dict] = []
    for src in config.sources:
        if isinstance(src, MultiplicationSource):
            rows += _multiplication_rows(src, config.seed)
        else:
            rows += _gsm8k_rows(src, config.seed, quarantine)
    df = _clean(rows, config, quarantine)
    if df.id.duplicated().any():
        raise ConfigError(f"sources: duplicate row ids, e.g. {df.id[df.id.duplicated()].iloc[0]}")

    artifacts = {}
    manifest: dict = {"splits": {}, "quarantined": len(quarantine), "sources": sorted(df.source.unique().tolist())}
    for split in SPLITS:
        part = df[df.split == split][COLUMNS].reset_index(drop=True)
        if part.empty:
            raise ConfigError(f"sources: the {split} split is empty")
        path = ctx.workdir / f"{split}.parquet"
        part.to_parquet(path, index=False)
        artifacts[split] = log_artifact(path, "data")
        manifest["splits"][split] = {"rows": len(part), "sha256": artifacts[split].sha256,
                                     "by_source": part.source.value_counts().to_dict()}
    qpath = ctx.workdir / "quarantine.parquet"
    pd.DataFrame(quarantine, columns=["id", "reason"]).to_parquet(qpath, index=False)
    artifacts["quarantine"] = log_artifact(qpath, "data")
    mpath = ctx.workdir / "manifest.json"
    mpath.write_text(json.dumps(manifest, indent=2))
    artifacts["manifest"] = log_artifact(mpath, "data")
    metrics = {f"data/{s}_rows": float(manifest["splits"][s]["rows"]) for s in SPLITS}
    metrics["data/quarantined_rows"] = float(len(quarantine))
    mlflow.log_metrics(metrics)
    log.info("curated %s (quarantined %d)", {s: manifest["splits"][s]["rows"] for s in SPLITS}, len(quarantine))
    return Output(run_id=ctx.run_id, artifacts=artifacts, metrics=metrics)
