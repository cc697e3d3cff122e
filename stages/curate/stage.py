"""Curation: sources -> normalised rows -> quarantine, answer check, decontamination, dedup -> parquet
splits, eval sets, the tables of every row dropped and why, and a manifest; all logged to MLflow.

Order of the checks, each row landing in exactly one bucket (kept + quarantined + decontaminated +
deduplicated = read, per source, asserted before anything is logged):
1. read: each record parsed and type-checked by itself (readers.py); bad ones -> quarantined;
2. answers: every distinct final answer that is not a plain number must be readable by math-verify,
   the grader RL and evaluation use; unreadable -> quarantined (unparseable_answer);
3. eval sources: duplicates within each set dropped; what remains is `eval/<name>` and the index;
4. train sources: rows meeting an eval row (normalised exact match or a shared word n-gram) ->
   decontaminated, listed with that eval row; then exact and normalised duplicates within and across
   sources -> deduplicated (the first occurrence, in source order, is kept);
5. the rest goes to the train/val/test split its content hash chose.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.common.config import ConfigError
from stages.common.contracts import COLUMNS, EVAL_SET_PREFIX, OPTIONAL_COLUMNS, SPLITS, ArtifactRef
from stages.common.tracking import StageContext, log_artifact, log_dataset
from stages.curate import schemas
from stages.curate.config import Config, MultiplicationSource, Output
from stages.curate.readers import EvalIndex, SourceRead, multiplication_rows, read_source

log = logging.getLogger("ufo.curate")

KEPT, QUARANTINED, FILTERED = "kept", "quarantined", "filtered"
DECONTAMINATED, DEDUPLICATED = "decontaminated", "deduplicated"
#: Rows per parquet row group: a fixed size keeps a split's bytes (and digest) independent of how many
#: processes produced it.
ROW_GROUP = 65_536
_PLAIN_NUMBER = r"^-?[0-9]+(\.[0-9]+)?$"

QUARANTINE_COLUMNS = ["source", "file", "line", "row", "reason", "detail", "excerpt"]
DUPLICATE_COLUMNS = ["id", "source", "file", "line", "row", "question", "kind", "duplicate_of", "duplicate_of_source"]
SPLIT_CONTEXT = {"train": "training", "val": "validation", "test": "testing"}
CONTAMINATION_COLUMNS = ["id", "source", "file", "line", "row", "split", "question", "match", "eval_set", "eval_id",
                         "eval_question", "ngram"]


def _table(ds: datasets.Dataset) -> pa.Table:
    """The dataset's Arrow table, without `datasets`' schema metadata (it holds a random fingerprint that
    would otherwise make every output file's bytes differ from run to run)."""
    if ds._indices is not None:
        ds = ds.flatten_indices()
    return ds.data.table.replace_schema_metadata(None)


# ---------------------------------------------------------------------------------------------------
# Answer check


def _unreadable(answers: list[str]) -> list[str]:
    from stages.common.grading import equivalent

    # equivalent(a, a) is False exactly when math-verify cannot parse `a`: then no reply can ever match it.
    return [a for a in answers if not equivalent(a, a)]


def _unreadable_batch(batch: dict) -> dict:
    bad = set(_unreadable(batch["answer"]))
    return {"bad": [a in bad for a in batch["answer"]]}


def check_answers(table: pa.Table, num_proc: int) -> pa.Table:
    """Quarantine ok rows whose final answer math-verify cannot read. Each distinct answer is parsed once
    (MetaMathQA repeats answers across rephrasings); plain numbers are readable by construction."""
    ok = pc.equal(table["status"], "ok")
    answers = pc.unique(pc.filter(table["answer"], ok))
    todo = pc.filter(answers, pc.invert(pc.match_substring_regex(answers, _PLAIN_NUMBER)))
    if len(todo) == 0:
        return table
    t0 = time.perf_counter()
    if len(todo) >= 200 and num_proc > 1:
        ds = datasets.Dataset.from_dict({"answer": todo.to_pylist()})
        flags = ds.map(_unreadable_batch, batched=True, batch_size=64, num_proc=num_proc, remove_columns=["answer"],
                       keep_in_memory=True, new_fingerprint="answers")["bad"]
        bad = [a for a, f in zip(todo.to_pylist(), flags, strict=True) if f]
    else:
        bad = _unreadable(todo.to_pylist())
    log.info("answer check: %d distinct non-numeric answers parsed in %.1f s, %d unreadable",
             len(todo), time.perf_counter() - t0, len(bad))
    if not bad:
        return table
    hit = pc.and_(ok, pc.is_in(table["answer"], value_set=pa.array(bad, pa.string())))
    detail = pc.binary_join_element_wise("math-verify cannot read the final answer ", table["answer"], "")
    updates = {
        "status": pc.if_else(hit, "quarantined", table["status"]),
        "reason": pc.if_else(hit, schemas.UNPARSEABLE_ANSWER, table["reason"]),
        "detail": pc.if_else(hit, detail, table["detail"]),
        "excerpt": pc.if_else(hit, pc.utf8_slice_codeunits(table["question"], 0, 200), table["excerpt"]),
    }
    for name, col in updates.items():
        table = table.set_column(table.schema.get_field_index(name), name, col)
    return table


# ---------------------------------------------------------------------------------------------------
# Decontamination and dedup


def _bool(arr: Any) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def classify(table: pa.Table, decontaminate: bool) -> tuple[np.ndarray, np.ndarray]:
    """Final status of every row, and for each duplicate the index of the row it duplicates (-1 else).

    Decontamination comes before dedup, so every row that meets an eval item is listed as such.
    Duplicates: same normalised question (key_hash) as an earlier ok row; the first occurrence is kept.
    """
    n = len(table)
    status = table["status"].to_numpy(zero_copy_only=False).astype(object)
    ok = status == "ok"
    contaminated = ok & _bool(pc.is_valid(table["contam_kind"])) if decontaminate else np.zeros(n, bool)
    candidate = ok & ~contaminated
    idx = np.flatnonzero(candidate)
    keys = table["key_hash"].to_numpy(zero_copy_only=False)[idx]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    kept_of = idx[first][inverse]  # for each candidate: the index of the first row with its key
    duplicate_of = np.full(n, -1, dtype=np.int64)
    dup = kept_of != idx
    duplicate_of[idx[dup]] = kept_of[dup]
    final = np.where(status == "filtered", FILTERED, QUARANTINED).astype(object)
    final[contaminated] = DECONTAMINATED
    final[idx] = KEPT
    final[idx[dup]] = DEDUPLICATED
    return final, duplicate_of


def _take(table: pa.Table, mask: np.ndarray, columns: list[str]) -> pa.Table:
    return table.select(columns).filter(pa.array(mask))


def duplicates_table(table: pa.Table, final: np.ndarray, duplicate_of: np.ndarray) -> pa.Table:
    rows = np.flatnonzero(final == DEDUPLICATED)
    out = table.select(["id", "source", "file", "line", "row", "question", "q_hash"]).take(pa.array(rows))
    firsts = table.select(["id", "source", "q_hash"]).take(pa.array(duplicate_of[rows]))
    exact = pc.equal(out["q_hash"], firsts["q_hash"])
    out = out.drop_columns(["q_hash"])
    out = out.append_column("kind", pc.if_else(exact, "exact", "normalised"))
    out = out.append_column("duplicate_of", firsts["id"]).append_column("duplicate_of_source", firsts["source"])
    return out.select(DUPLICATE_COLUMNS)


def contamination_table(table: pa.Table, final: np.ndarray, eval_questions: dict[str, str]) -> pa.Table:
    hits = _take(table, final == DECONTAMINATED, ["id", "source", "file", "line", "row", "split", "question",
                                                   "contam_kind", "contam_set", "contam_id", "contam_ngram"])
    hits = hits.rename_columns(["id", "source", "file", "line", "row", "split", "question", "match", "eval_set",
                                "eval_id", "ngram"])
    eval_q = pa.array([eval_questions[i] for i in hits["eval_id"].to_pylist()], pa.string())
    return hits.append_column("eval_question", eval_q).select(CONTAMINATION_COLUMNS)


# ---------------------------------------------------------------------------------------------------
# Writing


class _SplitWriter:
    """Streams rows into a parquet file in row groups of exactly ROW_GROUP rows."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema, self.pending, self.n_pending, self.rows = path, schema, [], 0, 0
        self.writer = pq.ParquetWriter(path, schema)

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self.pending.append(batch)
            self.n_pending += batch.num_rows
            self.rows += batch.num_rows
        while self.n_pending >= ROW_GROUP:
            self._flush(ROW_GROUP)

    def _flush(self, n: int) -> None:
        table = pa.Table.from_batches(self.pending, self.schema)
        self.writer.write_table(table.slice(0, n), row_group_size=n)
        rest = table.slice(n)
        self.pending, self.n_pending = rest.to_batches(), len(rest)

    def close(self) -> None:
        if self.n_pending:
            self._flush(self.n_pending)
        self.writer.close()


def write_splits(table: pa.Table, final: np.ndarray, columns: list[str], paths: dict[str, Path]) -> dict[str, int]:
    """Write each split's kept rows (in source order) to its parquet file, batch by batch."""
    split = table["split"].to_numpy(zero_copy_only=False)
    kept = final == KEPT
    schema = table.select(columns).schema
    writers = {s: _SplitWriter(p, schema) for s, p in paths.items()}
    offset = 0
    for batch in table.select(columns).to_batches(max_chunksize=ROW_GROUP):
        sl = slice(offset, offset + batch.num_rows)
        for s, w in writers.items():
            w.write(batch.filter(pa.array(kept[sl] & (split[sl] == s))))
        offset += batch.num_rows
    for w in writers.values():
        w.close()
    return {s: w.rows for s, w in writers.items()}


def _write_table(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path, row_group_size=ROW_GROUP)
    return path


def _output_columns(table: pa.Table, kept: np.ndarray) -> list[str]:
    """COLUMNS, plus each optional column some kept row has a value in."""
    mask = pa.array(kept)
    optional = [c for c in OPTIONAL_COLUMNS if pc.any(pc.and_(pc.is_valid(table[c]), mask)).as_py()]
    return COLUMNS + optional


# ---------------------------------------------------------------------------------------------------
# The stage


def _counts(values: np.ndarray) -> dict[str, int]:
    keys, counts = np.unique(values.astype(str), return_counts=True)
    return {str(k): int(c) for k, c in zip(keys, counts, strict=True)}


def _value_counts(table: pa.Table, column: str, mask: np.ndarray | None = None) -> dict[str, int]:
    col = table[column] if mask is None else table[column].filter(pa.array(mask))
    if len(col) == 0:
        return {}
    vc = pc.value_counts(col)
    return dict(sorted(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)))


def _group_counts(table: pa.Table, by: str, column: str) -> dict[str, dict[str, int]]:
    """{by value: {column value: rows}}, counted by Arrow."""
    out: dict[str, dict[str, int]] = {}
    for r in table.group_by([by, column]).aggregate([([], "count_all")]).to_pylist():
        out.setdefault(r[by], {})[r[column]] = r["count_all"]
    return {k: dict(sorted(v.items())) for k, v in out.items()}


@dataclass
class Curated:
    """Sources of one role after every check: their rows, each row's final status, and for each
    duplicate the index of the row it duplicates."""

    reads: list[SourceRead]
    table: pa.Table
    final: np.ndarray
    duplicate_of: np.ndarray

    def report(self, name: str) -> dict:
        """One source's accounting; kept + quarantined + deduplicated + decontaminated = read, or it raises."""
        read = next(r for r in self.reads if r.name == name)
        mine = self.table["source"].to_numpy(zero_copy_only=False) == name
        n = {k: int(np.sum(mine & (self.final == k))) for k in (KEPT, QUARANTINED, DEDUPLICATED, DECONTAMINATED,
                                                                FILTERED)}
        n_read = int(np.sum(mine)) - n[FILTERED]
        if n[KEPT] + n[QUARANTINED] + n[DEDUPLICATED] + n[DECONTAMINATED] != n_read:
            raise AssertionError(f"curate accounting broke for source {name}: {n} vs {n_read} read")
        split = self.table["split"].to_numpy(zero_copy_only=False)
        return {
            "role": read.role, "origin": read.origin, "rows_in": n_read + n[FILTERED], "filtered_out": n[FILTERED],
            "read": n_read, "kept": n[KEPT], "quarantined": n[QUARANTINED], "deduplicated": n[DEDUPLICATED],
            "decontaminated": n[DECONTAMINATED],
            "quarantined_by_reason": _value_counts(self.table, "reason", mine & (self.final == QUARANTINED)),
            "deduplicated_by_kind": {},  # filled in from the duplicates table
            "decontaminated_by_eval_set": _value_counts(self.table, "contam_set",
                                                        mine & (self.final == DECONTAMINATED)),
            "kept_by_split": _counts(split[mine & (self.final == KEPT)]),
        }


def _num_proc(config: Config) -> int:
    return config.num_proc or min(os.cpu_count() or 1, 8)


def curate_eval_sets(config: Config, workdir: Path) -> tuple[list[Curated], EvalIndex, dict[str, str]]:
    """Each `eval` source read, answer-checked and deduplicated within itself; the index of its kept rows
    (what train rows are decontaminated against) and their questions by id."""
    index, questions, sets = EvalIndex(n=config.decontamination_ngram), {}, []
    for i, src in enumerate(config.sources):
        if src.role != "eval":
            continue
        t0 = time.perf_counter()
        read = read_source(src, i, config, None, workdir)
        table = _table(read.rows)
        if config.verify_answers:
            table = check_answers(table, _num_proc(config))
        final, duplicate_of = classify(table, decontaminate=False)
        kept = np.flatnonzero(final == KEPT)
        if len(kept) == 0:
            raise ConfigError(f"sources.{i}: eval source {read.name!r} has no usable row (see the quarantine table)")
        for rid, key, q in zip(*(table[c].take(pa.array(kept)).to_pylist() for c in ("id", "key", "question")),
                               strict=True):
            index.add(read.name, rid, key)
            questions[rid] = q
        sets.append(Curated([read], table, final, duplicate_of))
        log.info("eval set %s: %d rows read, %d kept (%.1f s)", read.name, int(np.sum(final != FILTERED)),
                 len(kept), time.perf_counter() - t0)
    return sets, index, questions


def curate_train_pool(config: Config, index: EvalIndex, workdir: Path) -> Curated:
    """Every `train` source read (and checked against the eval index as it is read), answer-checked,
    decontaminated and deduplicated within and across sources."""
    reads = []
    for i, src in enumerate(config.sources):
        if src.role != "train":
            continue
        t0 = time.perf_counter()
        eval_index = index if index.keys else None
        if isinstance(src, MultiplicationSource):
            reads.append(multiplication_rows(src, config.seed, eval_index))
        else:
            reads.append(read_source(src, i, config, eval_index, workdir))
        log.info("source %s: %d records in %.1f s", reads[-1].name, len(reads[-1].rows), time.perf_counter() - t0)
    table = pa.concat_tables([_table(r.rows) for r in reads])
    if config.verify_answers:
        table = check_answers(table, _num_proc(config))
    t0 = time.perf_counter()
    final, duplicate_of = classify(table, decontaminate=True)
    log.info("decontamination and dedup of %d rows: %.1f s", len(table), time.perf_counter() - t0)
    return Curated(reads, table, final, duplicate_of)


def curate(config: Config, ctx: StageContext) -> Output:
    t_start = time.perf_counter()
    datasets.disable_progress_bars()
    workdir, out = ctx.workdir / "work", ctx.workdir / "out"
    workdir.mkdir()
    (out / "eval").mkdir(parents=True)
    eval_sets, index, eval_questions = curate_eval_sets(config, workdir)
    pool = curate_train_pool(config, index, workdir)

    # Every file is written (and the accounting checked) before anything is logged.
    kept = pool.final == KEPT
    split_col = pool.table["split"].to_numpy(zero_copy_only=False)
    present = [s for s in SPLITS if np.any(kept & (split_col == s))]
    for s in ("train", "val"):
        if s not in present:
            raise ConfigError(f"sources: the {s} split is empty (no train-role row was kept for it; see the manifest)")
    t0 = time.perf_counter()
    split_rows = write_splits(pool.table, pool.final, _output_columns(pool.table, kept),
                              {s: out / f"{s}.parquet" for s in present})
    log.info("wrote splits %s in %.1f s", split_rows, time.perf_counter() - t0)
    eval_files: dict[str, tuple[Path, int]] = {}
    for es in eval_sets:
        ekept = es.final == KEPT
        path = out / "eval" / f"{es.reads[0].name}.parquet"
        _write_table(_take(es.table, ekept, _output_columns(es.table, ekept)), path)
        eval_files[es.reads[0].name] = (path, int(ekept.sum()))
    tables = {
        "quarantine": pa.concat_tables([_take(c.table, c.final == QUARANTINED, QUARANTINE_COLUMNS)
                                        for c in (pool, *eval_sets)]),
        "duplicates": pa.concat_tables([duplicates_table(c.table, c.final, c.duplicate_of) for c in (pool, *eval_sets)]),
        "decontamination": contamination_table(pool.table, pool.final, eval_questions),
    }
    report = {r.name: c.report(r.name) for c in (pool, *eval_sets) for r in c.reads}
    for name, by_kind in _group_counts(tables["duplicates"], "source", "kind").items():
        report[name]["deduplicated_by_kind"] = by_kind
    report = {src.source_name: report[src.source_name] for src in config.sources}  # config order

    t0 = time.perf_counter()
    artifacts: dict[str, ArtifactRef] = {}
    manifest: dict[str, Any] = {"seed": config.seed, "sources": report, "splits": {}, "eval_sets": {}}
    train_sources = pool.table["source"].to_numpy(zero_copy_only=False)
    for s in present:
        path = out / f"{s}.parquet"
        schema = pq.read_schema(path)
        artifacts[s] = log_artifact(path, "data")
        log_dataset(s, artifacts[s], path, SPLIT_CONTEXT[s])
        manifest["splits"][s] = {"rows": split_rows[s], "sha256": artifacts[s].sha256, "columns": schema.names,
                                 "by_source": _counts(train_sources[kept & (split_col == s)])}
    for name, (path, rows) in eval_files.items():
        schema = pq.read_schema(path)
        ref = artifacts[EVAL_SET_PREFIX + name] = log_artifact(path, "data/eval")
        log_dataset(EVAL_SET_PREFIX + name, ref, path, "evaluation")
        manifest["eval_sets"][name] = {"artifact": EVAL_SET_PREFIX + name, "rows": rows, "sha256": ref.sha256,
                                       "columns": schema.names, "origin": report[name]["origin"]}
    for name, table in tables.items():
        artifacts[name] = log_artifact(_write_table(table, out / f"{name}.parquet"), "data")
    totals = {k: sum(r[k] for r in report.values()) for k in ("read", "kept", "quarantined", "deduplicated",
                                                               "decontaminated", "filtered_out")}
    manifest["totals"] = totals
    manifest["quarantine"] = {"rows": len(tables["quarantine"]), "sha256": artifacts["quarantine"].sha256,
                              "by_reason": _value_counts(tables["quarantine"], "reason"),
                              "reasons": list(schemas.REASONS)}
    manifest["duplicates"] = {"rows": len(tables["duplicates"]), "sha256": artifacts["duplicates"].sha256,
                              "by_kind": _value_counts(tables["duplicates"], "kind")}
    manifest["decontamination"] = {
        "ngram": config.decontamination_ngram, "eval_sets": list(eval_files), "rows": len(tables["decontamination"]),
        "sha256": artifacts["decontamination"].sha256, "by_match": _value_counts(tables["decontamination"], "match"),
        "by_eval_set": _value_counts(tables["decontamination"], "eval_set")}
    manifest["checks"] = {"max_question_chars": config.max_question_chars,
                          "max_question_tokens": config.max_question_tokens, "tokenizer": config.tokenizer,
                          "verify_answers": config.verify_answers}
    mpath = out / "manifest.json"
    mpath.write_text(json.dumps(manifest, indent=2))
    artifacts["manifest"] = log_artifact(mpath, "data")
    log.info("tables, manifest and MLflow logging: %.1f s", time.perf_counter() - t0)

    seconds = time.perf_counter() - t_start
    metrics = {f"data/{s}_rows": float(split_rows[s]) for s in present}
    metrics |= {f"data/eval/{name}_rows": float(rows) for name, (_, rows) in eval_files.items()}
    metrics |= {f"data/{k}_rows": float(v) for k, v in totals.items()}
    metrics |= {"perf/curate_seconds": seconds, "perf/rows_per_second": totals["read"] / max(seconds, 1e-9)}
    mlflow.log_metrics(metrics)
    log.info("curated %d rows in %.1f s: splits %s, eval sets %s, quarantined %d, deduplicated %d, "
             "decontaminated %d", totals["read"], seconds, split_rows, {k: v[1] for k, v in eval_files.items()},
             totals["quarantined"], totals["deduplicated"], totals["decontaminated"])
    return Output(run_id=ctx.run_id, artifacts=artifacts, metrics=metrics)
