"""The curate stage: sources (hub cache, local files in five formats, the synthetic generator), built-in
schemas and the generic mapping, quarantine of every kind of bad row with file and line, exact and
normalised dedup, decontamination against eval sets, content-hash splits, the manifest's accounting and
the MLflow outputs. Real files, a real `datasets` cache and a real SQLite MLflow store; no mocks."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import curate
from stages.common.config import ConfigError, load_config, validate
from stages.common.tracking import fetch_verified
from stages.curate import schemas
from stages.curate.readers import EvalIndex
from stages.curate.text import normalise, row_id, unit_hash
from tests.helpers import REPO, SHARED_DATA

# Real GSM8K / MATH-500 files: next to the repository (main checkout) or next to its worktree folder.
DATA = next((p for p in (SHARED_DATA, REPO.parent.parent / "shared" / "data")
             if (p / "gsm8k" / "test.jsonl").is_file()), SHARED_DATA)
needs_data = pytest.mark.skipif(not (DATA / "gsm8k" / "test.jsonl").is_file() or
                                not (DATA / "math500" / "test.jsonl").is_file(),
                                reason=f"{DATA} holds no gsm8k/ and math500/ (never committed)")


def _run(*sources, **kwargs) -> curate.Output:
    return curate.run(curate.Config(experiment="curate-tests", sources=list(sources), **kwargs))


def _frame(out: curate.Output, name: str, tmp: Path) -> pd.DataFrame:
    return pd.read_parquet(fetch_verified(out.artifact(name), tmp / uuid.uuid4().hex))


def _manifest(out: curate.Output, tmp: Path) -> dict:
    return json.loads(fetch_verified(out.artifact("manifest"), tmp / uuid.uuid4().hex).read_text())


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _gsm8k_rows(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"Tom has {i} apples and buys {i + 3} more. How many apples does Tom have now?",
             "answer": f"He has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3} apples.\n#### {2 * i + 3:,}"}
            for i in range(start, start + n)]


def _check_accounting(manifest: dict) -> None:
    for name, s in manifest["sources"].items():
        assert s["kept"] + s["quarantined"] + s["deduplicated"] + s["decontaminated"] == s["read"], name
        assert s["read"] + s["filtered_out"] == s["rows_in"], name
        assert sum(s["quarantined_by_reason"].values()) == s["quarantined"], name


# ---------------------------------------------------------------------------------------------------
# Pure functions against hand-computed values


@pytest.mark.parametrize(("a", "b"), [
    ("What is 1,000 + 2.5?", "what is 1000+2.5"),
    ("  Tom's  CAT: has 3 legs!", "toms cat has 3 legs"),
    ("Compute $\\frac{1}{2}$.", "COMPUTE \\FRAC{1}{2}"),
    ("Ｔｏｍ has ３ cats", "tom has 3 cats"),  # full-width letters and digits (NFKC)
])
def test_normalise_folds_case_whitespace_punctuation(a, b):
    assert normalise(a) == normalise(b)


@pytest.mark.parametrize(("a", "b"), [("2+3", "2-3"), ("12*34", "1234"), ("1.5", "15"), ("x_1", "x 2")])
def test_normalise_keeps_numbers_and_math_symbols(a, b):
    assert normalise(a) != normalise(b)


def test_normalise_exact_values():
    assert normalise("What is 1,000 + 2.5?") == "what is 1000 + 2.5"
    assert normalise("Find $x^2$, please.") == "find x ^ 2 please"


def test_final_answer_extraction():
    assert schemas.gsm8k_final("so 2,125 in all\n#### 2,125") == "2125"
    assert schemas.gsm8k_final("#### -3") == "-3"
    assert schemas.gsm8k_final("no marker") is None
    assert schemas.last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}}.") == "\\frac{1}{\\sqrt{2}}"
    assert schemas.last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert schemas.last_boxed("so $\\boxed 5$") == "5"
    assert schemas.last_boxed("\\boxed{unclosed") is None
    assert schemas.metamath_final("So x = 3.\nThe answer is: \\frac{3}{4}") == "\\frac{3}{4}"
    assert schemas.metamath_final("The answer is 7") == "7"


def test_ids_and_split_hashes_are_content_derived():
    assert row_id("s", "q", "1") == row_id("s", "q", "1") != row_id("s", "q", "2")
    assert unit_hash(0, "k") == unit_hash(0, "k") != unit_hash(1, "k")
    assert 0 <= unit_hash(0, "k") < 1


def test_eval_index_exact_and_ngram_hits():
    index = EvalIndex(n=5)
    index.add("gsm8k", "e1", normalise("A plane travels 1200 miles in 3 hours. How far in 5 hours?"))
    key = normalise("a PLANE travels 1200 miles in 3 hours!!! how far in 5 hours")
    assert index.match(key, key.split()) == ("exact", "gsm8k", "e1", None)
    key = normalise("Yesterday a plane travels 1200 miles in 3 hours; what then?")
    assert index.match(key, key.split()) == ("ngram", "gsm8k", "e1", "a plane travels 1200 miles")
    key = normalise("A plane travels 1300 miles in 3 hours.")  # one number changed: no 5-gram in common
    assert index.match(key, key.split()) is None


# ---------------------------------------------------------------------------------------------------
# The synthetic default (the `curated` fixture the stage tests start from)


def test_synthetic_splits_are_disjoint_and_verified(curated, tmp_path):
    frames = {s: _frame(curated, s, tmp_path) for s in curate.SPLITS}
    assert {s: len(f) for s, f in frames.items()} == {"train": 5760, "val": 720, "test": 720}
    keys = {s: set(f.question) for s, f in frames.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"] and not keys["val"] & keys["test"]
    assert list(frames["train"].columns) == ["id", "question", "answer", "source"]
    for row in frames["test"].itertuples():
        a, b = map(int, row.question.split("*"))
        assert int(row.answer) == a * b
    manifest = _manifest(curated, tmp_path)
    assert manifest["splits"]["test"]["sha256"] == curated.artifact("test").sha256
    assert manifest["sources"]["multiplication"]["read"] == 7200
    _check_accounting(manifest)
    assert curated.eval_sets().keys() == {"test"}


def test_synthetic_same_seed_same_splits(curated):
    again = curate.run(curate.Config(experiment="curate-tests"))
    assert again.artifact("test").sha256 == curated.artifact("test").sha256
    other = curate.run(curate.Config(experiment="curate-tests", seed=1))
    assert other.artifact("test").sha256 != curated.artifact("test").sha256


def test_splits_are_logged_as_mlflow_inputs_with_full_content_digests(curated):
    run = mlflow.MlflowClient().get_run(curated.run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    for split, d in inputs.items():
        tags = {t.key: t.value for t in d.tags}
        assert tags["ufo.sha256"] == curated.artifact(split).sha256
        assert d.dataset.digest == curated.artifact(split).sha256[:32]
        assert json.loads(d.dataset.source) == {"uri": curated.artifact(split).uri}
    assert {t.key: t.value for t in inputs["val"].tags}["ufo.rows"] == "720"


def test_stage_imports_no_torch():
    code = "import sys, stages.curate.stage; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
# Real data


@needs_data
def test_gsm8k_and_math500_curate_with_every_row_accounted_for(module_workspace, tmp_path, monkeypatch):
    """The shipped real-model config's curate section (GSM8K train as `train`, GSM8K test and MATH-500 as
    `eval`), reading the files from $UFO_DATA."""
    from flows.config import PipelineConfig

    monkeypatch.setenv("UFO_DATA", str(DATA))
    config = load_config(PipelineConfig, REPO / "configs" / "qwen2.5-3b-gsm8k.yaml").curate
    out = curate.run(config.model_copy(update={"experiment": "curate-tests"}))
    manifest = _manifest(out, tmp_path)
    _check_accounting(manifest)
    assert set(out.eval_sets()) == {"gsm8k", "math500"}
    assert manifest["eval_sets"]["gsm8k"]["artifact"] == "eval/gsm8k"
    inputs = mlflow.MlflowClient().get_run(out.run_id).inputs.dataset_inputs
    assert {d.dataset.name: d.dataset.digest for d in inputs} == {
        "train": out.artifact("train").sha256[:32], "val": out.artifact("val").sha256[:32],
        "eval/gsm8k": out.artifact("eval/gsm8k").sha256[:32], "eval/math500": out.artifact("eval/math500").sha256[:32]}
    assert manifest["sources"]["gsm8k"]["read"] == 1319 and manifest["sources"]["math500"]["read"] == 500
    assert manifest["sources"]["gsm8k-train"]["read"] == 7473

    # Every eval row kept, each answer the reference final computed here independently.
    gsm = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    ref = {g["question"].strip(): g["answer"].split("####")[-1].strip().replace(",", "") for g in gsm}
    got = _frame(out, "eval/gsm8k", tmp_path)
    assert len(got) == 1319 and dict(zip(got.question, got.answer, strict=True)) == ref
    assert "2125" in set(got.answer)  # "2,125" in the file
    math = [json.loads(line) for line in (DATA / "math500" / "test.jsonl").read_text().splitlines()]
    got = _frame(out, "eval/math500", tmp_path)
    assert len(got) == 500 and dict(zip(got.question, got.answer, strict=True)) == \
        {m["problem"].strip(): m["answer"] for m in math}
    assert {"solution", "level", "subject"} <= set(got.columns) and set(got.level) == {1, 2, 3, 4, 5}

    train = pd.concat([_frame(out, "train", tmp_path), _frame(out, "val", tmp_path)])
    gsm_train = [json.loads(line) for line in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    ref_train = {g["question"].strip(): g["answer"].split("####")[-1].strip().replace(",", "") for g in gsm_train}
    assert all(ref_train[q] == a for q, a in zip(train.question, train.answer, strict=True))
    assert len(train) == manifest["sources"]["gsm8k-train"]["kept"]
    hits = _frame(out, "decontamination", tmp_path)
    assert len(hits) == manifest["sources"]["gsm8k-train"]["decontaminated"]
    assert not set(train.question) & set(ref)


@needs_data
def test_planted_gsm8k_test_questions_are_all_removed_and_listed(module_workspace, tmp_path):
    gsm = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    planted = gsm[::40]  # 33 questions
    mangled = []
    for i, g in enumerate(planted):
        q = g["question"].upper() if i % 2 else g["question"].lower()
        q = "  " + q.replace(" ", "   ").replace("?", " ?!").replace(". ", " ; ") + " ..."
        mangled.append({"question": q, "answer": g["answer"]})
    embedded = {"question": "A warm-up first. " + gsm[7]["question"] + " Explain each step.", "answer": "#### 1"}
    unrelated = _gsm8k_rows(60)
    pool = _jsonl(tmp_path / "pool.jsonl", unrelated[:30] + mangled + [embedded] + unrelated[30:])
    out = _run(curate.GSM8KSource(path=str(pool), name="pool"),
               curate.GSM8KSource(path=str(DATA / "gsm8k" / "test.jsonl"), role="eval"))
    hits = _frame(out, "decontamination", tmp_path)
    assert len(hits) == len(planted) + 1
    assert list(hits.line) == list(range(31, 32 + len(planted)))
    assert list(hits.eval_question) == [g["question"] for g in planted] + [gsm[7]["question"]]
    assert set(hits.eval_set) == {"gsm8k"} and list(hits.match) == ["exact"] * len(planted) + ["ngram"]
    assert hits.ngram.iloc[-1] in normalise(gsm[7]["question"]) and len(hits.ngram.iloc[-1].split()) == 13
    eval_ids = dict(zip(*(_frame(out, "eval/gsm8k", tmp_path)[c] for c in ("question", "id")), strict=True))
    assert list(hits.eval_id) == [eval_ids[g["question"]] for g in [*planted, gsm[7]]]
    kept = pd.concat([_frame(out, "train", tmp_path), _frame(out, "val", tmp_path)])
    assert len(kept) == 60 and set(kept.answer) == {str(2 * i + 3) for i in range(60)}  # no unrelated row lost


# ---------------------------------------------------------------------------------------------------
# Formats, schemas, the generic mapping, the hub cache


def test_metamathqa_with_type_filter(module_workspace, tmp_path):
    rows = []
    for k in range(12):
        original = f"What is the sum of the first {k + 2} positive odd integers?"
        for kind in ("MATH_AnsAug", "MATH_Rephrased", "GSM_AnsAug", "GSM_FOBAR"):
            rows.append({"type": kind, "query": f"[{kind}] {original}", "original_question": original,
                         "response": f"The sum is {(k + 2) ** 2}.\nThe answer is: {(k + 2) ** 2}"})
    rows.append({"type": "MATH_SV", "query": "What is x if x + 1 = 3?", "original_question": "x + 1 = 3",
                 "response": "x is 2, so there."})  # no "The answer is"
    path = _jsonl(tmp_path / "MetaMathQA-395K.jsonl", rows)
    out = _run(curate.MetaMathQASource(path=str(path), types=["MATH_*"], val_fraction=0.3))
    manifest = _manifest(out, tmp_path)
    src = manifest["sources"]["metamathqa"]
    assert (src["rows_in"], src["filtered_out"], src["read"], src["kept"]) == (49, 24, 25, 24)
    assert src["quarantined_by_reason"] == {"unparseable_answer": 1}
    frames = {s: _frame(out, s, tmp_path) for s in ("train", "val")}
    both = pd.concat(frames.values())
    assert both.question.str.startswith("[MATH_").all() and len(both) == 24
    assert all(a == str(int(q.split("first ")[1].split()[0]) ** 2) for q, a in zip(both.question, both.answer,
                                                                                      strict=True))
    assert set(both.subject) == {"MATH_AnsAug", "MATH_Rephrased"} and both.solution.notna().all()
    # Rephrasings of one original question share a split (no leak from train into val).
    for s, other in (("train", "val"), ("val", "train")):
        originals = {q.split("] ")[1] for q in frames[s].question}
        assert not originals & {q.split("] ")[1] for q in frames[other].question}
    _check_accounting(manifest)


def test_every_file_format_reads_the_same_rows(module_workspace, tmp_path):
    """The same 40 GSM8K records as jsonl, a JSON array, parquet, arrow and csv: each file reads 40 rows and
    the last four are exact duplicates of the first, row for row."""
    records = _gsm8k_rows(40)
    _jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records, indent=2))
    table = pa.Table.from_pylist(records)
    pq.write_table(table, tmp_path / "c.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with open(tmp_path / "e.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["question", "answer"])
        w.writeheader()
        w.writerows(records)
    names = ["a.jsonl", "b.json", "c.parquet", "d.arrow", "e.csv"]
    out = _run(*(curate.GSM8KSource(path=str(tmp_path / n), name=n.replace(".", "-")) for n in names))
    manifest = _manifest(out, tmp_path)
    assert [manifest["sources"][n.replace(".", "-")]["read"] for n in names] == [40] * 5
    assert manifest["sources"]["a-jsonl"]["kept"] == 40
    dups = _frame(out, "duplicates", tmp_path)
    assert len(dups) == 160 and set(dups.kind) == {"exact"} and set(dups.duplicate_of_source) == {"a-jsonl"}
    # Content-derived ids: the same record has the same digest whichever file it came from.
    assert {i.split("/")[1] for i in dups.id} == {i.split("/")[1] for i in dups.duplicate_of}
    _check_accounting(manifest)


def test_exact_and_normalised_duplicates_within_and_across_sources(module_workspace, tmp_path):
    rows = _gsm8k_rows(20)
    a = _jsonl(tmp_path / "a.jsonl", [*rows, rows[3], {**rows[4], "question": rows[4]["question"].upper() + "!!"}])
    b = _jsonl(tmp_path / "b.jsonl", [*_gsm8k_rows(5, start=100), rows[5],
                                      {**rows[6], "question": "  " + rows[6]["question"].replace(" ", "   ")}])
    out = _run(curate.GSM8KSource(path=str(a), name="a", val_fraction=0.2),
               curate.GSM8KSource(path=str(b), name="b", val_fraction=0.2))
    dups = _frame(out, "duplicates", tmp_path).sort_values(["source", "line"])
    ids = {s: dict(zip(f.question, f.id, strict=True)) for s, f in (("train", _frame(out, "train", tmp_path)),
                                                                    ("val", _frame(out, "val", tmp_path)))}
    first = ids["train"] | ids["val"]
    assert list(zip(dups.source, dups.line, dups.kind, strict=True)) == [
        ("a", 21, "exact"), ("a", 22, "normalised"), ("b", 6, "exact"), ("b", 7, "normalised")]
    assert list(dups.duplicate_of) == [first[rows[i]["question"]] for i in (3, 4, 5, 6)]
    manifest = _manifest(out, tmp_path)
    assert manifest["sources"]["a"]["deduplicated_by_kind"] == {"exact": 1, "normalised": 1}
    assert manifest["sources"]["b"]["kept"] == 5
    _check_accounting(manifest)


def test_generic_mapping_curates_an_unseen_shape(module_workspace, tmp_path):
    """A reading-comprehension CSV the project has never seen: the question is a template over two
    columns, the final answer a regex over a free-text column."""
    path = tmp_path / "riddles.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["passage", "ask", "verdict", "notes"])
        for i in range(30):
            w.writerow([f"A farmer keeps {i + 2} hens; each lays 2 eggs.", "How many eggs a day?",
                        f"Result: {2 * (i + 2)} eggs (checked)", "x"])
        w.writerow(["A passage.", "A question with no result?", "nobody knows", "x"])
    with open(path, "ab") as f:
        f.write(b"A farmer keeps \xff hens.,How many eggs?,Result: 7 eggs,x\r\n")
    out = _run(curate.GenericSource(path=str(path), question="{passage}\n\n{ask}", answer="verdict",
                                    answer_regex=r"Result:\s*(-?\d+)", val_fraction=0.2))
    both = pd.concat([_frame(out, "train", tmp_path), _frame(out, "val", tmp_path)])
    assert len(both) == 30 and set(both.source) == {"riddles"}
    assert set(zip(both.question, both.answer, strict=True)) == {
        (f"A farmer keeps {i + 2} hens; each lays 2 eggs.\n\nHow many eggs a day?", str(2 * (i + 2)))
        for i in range(30)}
    q = _frame(out, "quarantine", tmp_path)
    assert list(q.reason) == ["unparseable_answer", "invalid_utf8"] and q.row.tolist() == [30, 31]
    assert set(q.file) == {str(path)}


def _cached_hub_dataset(cache: Path, repo: str, commit: str, records: list[dict]) -> None:
    """Write `records` into a `datasets` cache exactly where `load_dataset(repo, revision=commit)` stores a
    hub download (<cache>/<org>___<name>/default/0.0.0/<commit>/), using the packaged json builder the
    hub path uses; no network."""
    from datasets.packaged_modules.json.json import Json

    org, name = repo.split("/")
    src = _jsonl(cache.parent / f"{name}-src.jsonl", records)
    builder = Json(cache_dir=str(cache.parent / "staging"), dataset_name=name, config_name="default",
                   config_id="default", hash=commit, data_files={"test": [str(src)]})
    builder.download_and_prepare()
    target = cache / f"{org}___{name}" / "default" / "0.0.0"
    target.mkdir(parents=True)
    Path(builder.cache_dir).rename(target / commit)


def test_hub_dataset_from_the_offline_cache_at_its_pinned_revision(module_workspace, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # What HF_HUB_OFFLINE=1 sets; both libraries read the variable once, at import.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    records = [{"problem": f"What is ${i}+{i}$?", "solution": f"It is $\\boxed{{{2 * i}}}$.", "level": "Level 2",
                "type": "Algebra"} for i in range(25)]
    cache = tmp_path / "hf-cache"
    _cached_hub_dataset(cache, "ufo-tests/tiny-math", commit, records)
    hub = {"hf": "ufo-tests/tiny-math", "split": "test", "cache_dir": str(cache), "role": "eval", "name": "tiny"}
    out = _run(curate.MultiplicationSource(a_max=120), curate.MATHSource(**hub, revision=commit))
    got = _frame(out, "eval/tiny", tmp_path)
    assert sorted(got.answer.astype(int)) == [2 * i for i in range(25)]
    assert set(got.level) == {2} and set(got.subject) == {"Algebra"}
    origin = _manifest(out, tmp_path)["eval_sets"]["tiny"]["origin"]
    assert out.eval_sets().keys() == {"test", "tiny"}
    assert origin["revision"] == commit and commit in origin["cache_files"][0]

    with pytest.raises(ConfigError, match="sources.1.revision: .* not the pinned commit f{40}"):
        _run(curate.MultiplicationSource(a_max=120), curate.MATHSource(**hub, revision="f" * 40))
    with pytest.raises(ConfigError, match="sources.1.hf: cannot load ufo-tests/absent.*HF_HUB_OFFLINE is set"):
        _run(curate.MultiplicationSource(a_max=120),
             curate.MATHSource(**{**hub, "hf": "ufo-tests/absent"}, revision=commit))


def test_question_token_budget_with_a_local_tokenizer(module_workspace, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    rows = _gsm8k_rows(20) + [{"question": "word " * 40 + "?", "answer": "#### 1"}]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    out = _run(curate.GSM8KSource(path=str(path), val_fraction=0.2), max_question_tokens=30,
               tokenizer=str(tmp_path))
    q = _frame(out, "quarantine", tmp_path)
    assert list(q.reason) == ["question_too_long"] and list(q.line) == [21]
    assert q.detail[0] == "41 tokens > max_question_tokens 30"


def test_adding_a_source_does_not_move_rows_between_splits(module_workspace, tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _gsm8k_rows(200))
    b = _jsonl(tmp_path / "b.jsonl", _gsm8k_rows(200, start=1000))
    one = _run(curate.GSM8KSource(path=str(a), name="a", val_fraction=0.2))
    two = _run(curate.GSM8KSource(path=str(b), name="b", val_fraction=0.2),
               curate.GSM8KSource(path=str(a), name="a", val_fraction=0.2))
    split_of = {}
    for out, tag in ((one, "one"), (two, "two")):
        for s in ("train", "val"):
            for q in _frame(out, s, tmp_path).query("source == 'a'").question:
                split_of.setdefault(q, {})[tag] = s
    assert len(split_of) == 200 and all(v["one"] == v["two"] for v in split_of.values())
    assert 20 < sum(v["one"] == "val" for v in split_of.values()) < 60


def test_parallel_map_gives_the_same_bytes_as_one_process(module_workspace, tmp_path, monkeypatch):
    from stages.curate import readers

    path = _jsonl(tmp_path / "p.jsonl", _gsm8k_rows(3000))
    monkeypatch.setattr(readers, "CHUNK_BYTES", 64 << 10)  # ~5 chunks
    monkeypatch.setattr(readers, "PARALLEL_MIN_ROWS", 1)
    src = curate.GSM8KSource(path=str(path), val_fraction=0.1)
    serial, parallel = _run(src, num_proc=1), _run(src, num_proc=2)
    assert serial.digests() == parallel.digests()
    assert len(_frame(parallel, "train", tmp_path)) + len(_frame(parallel, "val", tmp_path)) == 3000


# ---------------------------------------------------------------------------------------------------
# Bad input


def _planted_bad_file(folder: Path) -> tuple[Path, dict[int, str]]:
    """GSM8K-format lines with one bad row of every kind; returns the file and {line: reason}."""
    good = [json.dumps(r).encode() for r in _gsm8k_rows(36)]
    bad = {
        b'{"question": "What is 2+\xff2?", "answer": "#### 4"}': "invalid_utf8",
        json.dumps({"question": 17, "answer": "#### 3"}).encode(): "wrong_type",
        json.dumps({"question": "What is 3+3?", "answer": 6}).encode(): "wrong_type",
        b'{"question": "What is 4+4?", "answer": "#### 8"': "not_json",
        b'[1, 2, 3]': "not_json",
        json.dumps({"question": "What is 5+5?"}).encode(): "missing_answer",
        json.dumps({"question": "   ", "answer": "#### 1"}).encode(): "empty_question",
        json.dumps({"question": "x" * 100_000 + "?", "answer": "#### 1"}).encode(): "question_too_long",
        json.dumps({"question": "What is 6+6?", "answer": "twelve, I think"}).encode(): "unparseable_answer",
        json.dumps({"answer": "#### 1"}).encode(): "missing_question",
        b'{"question": "What is \\ud800?", "answer": "#### 1"}': "invalid_utf8",  # a lone surrogate escape
        b"[" * 100_000 + b"]" * 100_000: "not_json",  # nested past what the parser can read
    }
    lines, where = [], {}
    for i, (line, reason) in enumerate(bad.items()):
        lines += good[3 * i:3 * i + 3]
        lines.append(line)
        where[len(lines)] = reason
    lines += [b"", *good[3 * len(bad):]]  # a blank line is not a row
    path = folder / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, where


def test_planted_bad_rows_are_quarantined_with_reason_and_line_by_the_stage_cli(module_workspace, tmp_path):
    path, where = _planted_bad_file(tmp_path)
    config = tmp_path / "curate.yaml"
    config.write_text(f"experiment: curate-tests\nsources:\n  - kind: gsm8k\n    path: {path}\n    val_fraction: 0.2\n")
    result = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "stages.curate", "--config", str(config), "--output", str(result)],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = curate.Output.model_validate_json(result.read_text())
    q = _frame(out, "quarantine", tmp_path)
    assert dict(zip(q.line, q.reason, strict=True)) == where
    assert set(q.file) == {str(path)} and q.detail.notna().all()
    assert q.set_index("line").loc[list(where)[0], "detail"] == "invalid UTF-8 byte at column 25"
    kept = pd.concat([_frame(out, "train", tmp_path), _frame(out, "val", tmp_path)])
    assert sorted(kept.answer.astype(int)) == sorted(2 * i + 3 for i in range(36))  # every good row, nothing else
    manifest = _manifest(out, tmp_path)
    src = manifest["sources"]["gsm8k"]
    assert src["read"] == 48 and src["kept"] == 36 and src["quarantined"] == 12
    assert src["quarantined_by_reason"] == {"empty_question": 1, "invalid_utf8": 2, "missing_answer": 1,
                                            "missing_question": 1, "not_json": 3, "question_too_long": 1,
                                            "unparseable_answer": 1, "wrong_type": 2}
    assert manifest["quarantine"]["by_reason"] == src["quarantined_by_reason"]
    _check_accounting(manifest)


def test_missing_file_is_a_config_error_naming_it(module_workspace, tmp_path):
    config = tmp_path / "curate.yaml"
    config.write_text(f"sources:\n  - kind: gsm8k\n    path: {tmp_path}/nope.jsonl\n")
    proc = subprocess.run([sys.executable, "-m", "stages.curate", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 2
    assert f"sources.0.path: {tmp_path}/nope.jsonl: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("name", "content", "match"), [
    ("garbage.parquet", b"not a parquet file at all", r"sources.0.path: .*garbage.parquet: cannot be read as parquet"),
    ("table.jsonl", b"a,b\n1,2\n", r"sources.0.path: .*table.jsonl: no line parses as a JSON record"),
    ("scalar.json", b'"just a string"', r"scalar.json: no line parses as a JSON record \(line 1: a JSON str, not an object\)"),
    ("broken.json", b'[{"question": "q", "answer": "#### 1"},\n {"question": ]', r"broken.json: not a JSON array \(Expecting value at line 2, column 15\)"),
    ("notes.txt", b"hello", r"sources.0.format: cannot tell the format of .*notes.txt from its suffix"),
])
def test_a_file_that_does_not_parse_at_all_is_a_config_error(module_workspace, tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        _run(curate.GSM8KSource(path=str(tmp_path / name)))


def test_paths_expand_home_and_environment_variables(module_workspace, tmp_path, monkeypatch):
    _jsonl(tmp_path / "data.jsonl", _gsm8k_rows(20))
    monkeypatch.delenv("UFO_TEST_DATA", raising=False)
    source = curate.GSM8KSource(path="${UFO_TEST_DATA}/data.jsonl", val_fraction=0.2)
    with pytest.raises(ConfigError, match="sources.0.path: .* uses the environment variable UFO_TEST_DATA, which is "
                                          "not set"):
        _run(source)
    monkeypatch.setenv("UFO_TEST_DATA", str(tmp_path))
    assert _run(source).metrics["data/kept_rows"] == 20
    with pytest.raises(ConfigError, match=f"sources.0.path: {tmp_path} is a folder; name its files"):
        _run(curate.GSM8KSource(path=str(tmp_path)))


@pytest.mark.parametrize(("source", "error"), [
    ({"kind": "gsm8k"}, "give exactly one of `hf`"),
    ({"kind": "gsm8k", "hf": "openai/gsm8k"}, "revision: a hub dataset needs the 40-hex commit sha"),
    ({"kind": "gsm8k", "hf": "openai/gsm8k", "revision": "main"}, "got 'main'"),
    ({"kind": "gsm8k", "path": "a.jsonl", "revision": "0" * 40}, "revision: only for hub datasets"),
    ({"kind": "gsm8k", "path": "a.jsonl", "role": "eval", "val_fraction": 0.1}, "val_fraction: an eval source"),
    ({"kind": "generic", "path": "a.csv", "question": "no fields", "answer": "a"}, "name columns in braces"),
    ({"kind": "generic", "path": "a.csv", "question": "{q}", "answer": "a", "answer_regex": "("}, "not a valid regex"),
    ({"kind": "tsv", "path": "a.tsv"}, "does not match any of the expected tags"),
])
def test_bad_source_configs_name_the_field(source, error):
    with pytest.raises(ConfigError, match="sources.0") as err:
        validate(curate.Config, {"sources": [source]})
    assert error in str(err.value)


def test_config_level_checks():
    with pytest.raises(ConfigError, match=r"sources.1.name: 'gsm8k' is already the name of sources.0"):
        validate(curate.Config, {"sources": [{"kind": "gsm8k", "path": "a.jsonl"},
                                             {"kind": "gsm8k", "path": "b.jsonl", "role": "eval"}]})
    with pytest.raises(ConfigError, match="sources: at least one source needs role `train`"):
        validate(curate.Config, {"sources": [{"kind": "gsm8k", "path": "b.jsonl", "role": "eval"}]})
    with pytest.raises(ConfigError, match="tokenizer: max_question_tokens and tokenizer go together"):
        validate(curate.Config, {"max_question_tokens": 10})
