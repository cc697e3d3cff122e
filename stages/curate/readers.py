"""Reading sources into Arrow, one normalised row per record read, through `datasets.map`.

Two roads, one row schema (`ROW_FEATURES`):
- line-based files (jsonl, and JSON arrays re-laid as lines): a byte-level plan cuts the file into
  ~4 MiB chunks at line ends; `datasets.map` with several processes reads each chunk, decodes and parses
  each line by itself, so one bad byte or one bad line quarantines that line (with its number) and
  nothing else;
- tabular sources (parquet, csv, arrow files and hub datasets): `datasets.load_dataset`, then
  `datasets.map` over its record batches.
Each record becomes a row with `status` ok/quarantined/filtered, the reason and where it came from
(file, line, row), the normalised fields, its hashes, its split and, for `train` sources, the eval item
it collides with (decontamination). No Python list ever holds a whole source (a JSON array's text is
the one thing read whole), and the rows land in Arrow files in the stage's scratch folder.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import datasets

from stages.common.config import ConfigError
from stages.curate import schemas
from stages.curate.config import Config, DataSource, MultiplicationSource
from stages.curate.schemas import Extracted, FilteredOut, Rejected
from stages.curate.text import hash64, ngrams, row_id, unit_hash, words

log = logging.getLogger("ufo.curate")

CHUNK_BYTES = 4 << 20
#: Sources with at least this many rows (or bytes / 1 KiB) are mapped with several processes.
PARALLEL_MIN_ROWS = 20_000
EXCERPT_CHARS = 200

ROW_FEATURES = datasets.Features({
    "status": datasets.Value("string"),     # ok | quarantined | filtered
    "reason": datasets.Value("string"),     # a schemas.REASONS name when quarantined
    "detail": datasets.Value("string"),
    "excerpt": datasets.Value("string"),    # the start of the raw record, quarantined rows only
    "file": datasets.Value("string"),
    "line": datasets.Value("int64"),        # 1-based line of a line-based file; null otherwise
    "row": datasets.Value("int64"),         # 0-based record index in the file / hub split
    "id": datasets.Value("string"),
    "question": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "solution": datasets.Value("string"),
    "level": datasets.Value("int64"),
    "subject": datasets.Value("string"),
    "source": datasets.Value("string"),
    "split": datasets.Value("string"),      # train | val | test | eval
    "key": datasets.Value("string"),        # normalised question, kept for eval rows only
    "key_hash": datasets.Value("int64"),    # hash64(normalised question): normalised dedup
    "q_hash": datasets.Value("int64"),      # hash64(question): exact dedup
    "contam_kind": datasets.Value("string"),  # exact | ngram, for a train row that meets an eval row
    "contam_set": datasets.Value("string"),
    "contam_id": datasets.Value("string"),
    "contam_ngram": datasets.Value("string"),
})


class Where(NamedTuple):
    """Where a record was read: its file (or "generated"), its 1-based line in a line-based file (None
    otherwise) and its 0-based record index in the file or hub split."""

    file: str
    line: int | None
    row: int


@dataclass(slots=True)
class Row:
    """One record read, as it lands in Arrow (`ROW_FEATURES`, the same columns in the same order)."""

    status: str
    """ok | quarantined | filtered"""
    reason: str | None = None
    """a schemas.REASONS name when quarantined"""
    detail: str | None = None
    excerpt: str | None = None
    """the start of the raw record, quarantined rows only"""
    file: str | None = None
    line: int | None = None
    row: int | None = None
    id: str | None = None
    question: str | None = None
    answer: str | None = None
    solution: str | None = None
    level: int | None = None
    subject: str | None = None
    source: str | None = None
    split: str | None = None
    """train | val | test | eval"""
    key: str | None = None
    """the normalised question, kept for eval rows only"""
    key_hash: int | None = None
    q_hash: int | None = None
    contam_kind: str | None = None
    """exact | ngram, for a train row that meets an eval row (`EvalIndex.match`)"""
    contam_set: str | None = None
    contam_id: str | None = None
    contam_ngram: str | None = None

    @classmethod
    def at(cls, where: Where, status: str, source: str, **fields) -> Row:
        return cls(status, file=where.file, line=where.line, row=where.row, source=source, **fields)

    def contaminated_by(self, hit: tuple[str, str, str, str | None] | None) -> Row:
        if hit is not None:
            self.contam_kind, self.contam_set, self.contam_id, self.contam_ngram = hit
        return self


assert [f.name for f in fields(Row)] == list(ROW_FEATURES), "Row and ROW_FEATURES must list the same columns"


@dataclass
class EvalIndex:
    """What train rows are checked against: every kept eval row's normalised question and word n-grams."""

    n: int
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    """normalised question -> (eval set, eval row id)"""
    grams: dict[tuple[str, ...], tuple[str, str]] = field(default_factory=dict)
    """word n-gram -> (eval set, eval row id) of its first owner"""

    def add(self, eval_set: str, row_id_: str, key: str) -> None:
        self.keys.setdefault(key, (eval_set, row_id_))
        for g in ngrams(key.split(), self.n):
            self.grams.setdefault(g, (eval_set, row_id_))

    def match(self, key: str, words: list[str]) -> tuple[str, str, str, str | None] | None:
        """(kind, eval set, eval id, n-gram) of the first collision of a normalised question (`key`, made
        of `words`), or None."""
        if (hit := self.keys.get(key)) is not None:
            return ("exact", *hit, None)
        if self.grams.keys().isdisjoint(ngrams(words, self.n)):  # C-speed; hits are rare
            return None
        g = next(g for g in ngrams(words, self.n) if g in self.grams)
        return ("ngram", *self.grams[g], " ".join(g))


@dataclass
class RowContext:
    """Everything the per-row function needs; pickled to each worker process."""

    source: str
    role: str
    extract: Any  # record -> Extracted
    seed: int
    val_fraction: float
    test_fraction: float
    max_chars: int
    max_tokens: int | None
    tokenizer: str | None
    index: EvalIndex | None


@lru_cache(maxsize=2)
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def tokenizer_file(path: str) -> str:
    """The tokenizer.json of a file or `save_pretrained` folder; never downloads."""
    p = Path(path)
    p = p / "tokenizer.json" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"tokenizer: {path}: no tokenizer.json there (a local file or model folder is required)")
    return str(p)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _split_of(ctx: RowContext, key: str) -> str:
    if ctx.role == "eval":
        return "eval"
    u = unit_hash(ctx.seed, key)
    return "test" if u < ctx.test_fraction else "val" if u < ctx.test_fraction + ctx.val_fraction else "train"


def finish_row(ctx: RowContext, ex: Extracted, where: Where) -> Row:
    """Checks every schema shares (question present and within budget), then keys, id, split and
    contamination. Raises Rejected for a question that is empty or too long."""
    question = ex.question.strip()
    if not question:
        raise Rejected(schemas.EMPTY_QUESTION, "the question is empty")
    if len(question) > ctx.max_chars:
        raise Rejected(schemas.QUESTION_TOO_LONG, f"{len(question)} chars > max_question_chars {ctx.max_chars}")
    answer = ex.answer.strip()
    for name, text in (("question", question), ("answer", answer), ("solution", ex.solution or "")):
        if not _encodable(text):  # a JSON "\ud800" escape decodes to a lone surrogate, which is no UTF-8
            raise Rejected(schemas.INVALID_UTF8, f"the {name} holds a lone surrogate (an invalid \\u escape)")
    question_words = words(question)
    key = " ".join(question_words)
    row = Row.at(where, "ok", ctx.source, id=row_id(ctx.source, question, answer), question=question, answer=answer,
                 solution=ex.solution, level=ex.level, subject=ex.subject, key_hash=hash64(key),
                 q_hash=hash64(question), split=_split_of(ctx, ex.group.strip() if ex.group else key))
    if ctx.role == "eval":
        row.key = key
    elif ctx.index is not None:
        row.contaminated_by(ctx.index.match(key, question_words))
    return row


def _quarantined(where: Where, ctx: RowContext, reason: str, detail: str, raw: str | None) -> Row:
    excerpt = raw[:EXCERPT_CHARS] if raw is not None else None
    return Row.at(where, "quarantined", ctx.source, reason=reason, detail=detail, excerpt=excerpt)


def process_record(ctx: RowContext, rec: Any, where: Where, raw: str | None) -> Row:
    """One record read -> one row (ok, quarantined or filtered). Never raises on bad data."""
    if not isinstance(rec, dict):
        return _quarantined(where, ctx, schemas.NOT_JSON, f"a JSON {type(rec).__name__}, not an object", raw)
    try:
        return finish_row(ctx, ctx.extract(rec), where)
    except Rejected as r:
        if raw is None:
            raw = json.dumps(rec, ensure_ascii=False, default=str)
        return _quarantined(where, ctx, r.reason, r.detail, raw)
    except FilteredOut:
        return Row.at(where, "filtered", ctx.source)


def _apply_token_budget(ctx: RowContext, rows: list[Row]) -> None:
    """Quarantine questions over `max_tokens` (one batched encode for the whole batch)."""
    if ctx.max_tokens is None:
        return
    ok = [i for i, r in enumerate(rows) if r.status == "ok"]
    encodings = _tokenizer(ctx.tokenizer).encode_batch([rows[i].question for i in ok], add_special_tokens=False)
    for i, enc in zip(ok, encodings, strict=True):
        if len(enc.ids) > ctx.max_tokens:
            r = rows[i]
            rows[i] = Row.at(Where(r.file, r.line, r.row), "quarantined", r.source, reason=schemas.QUESTION_TOO_LONG,
                             detail=f"{len(enc.ids)} tokens > max_question_tokens {ctx.max_tokens}",
                             excerpt=r.question[:EXCERPT_CHARS])


def _columns(rows: list[Row]) -> dict[str, list]:
    """Rows as the column batch `datasets.map` takes back (`ROW_FEATURES`)."""
    return {name: [getattr(r, name) for r in rows] for name in ROW_FEATURES}


# ---------------------------------------------------------------------------------------------------
# Line-based files


def plan_chunks(path: Path, max_rows: int | None) -> list[dict]:
    """Cut a file into ~CHUNK_BYTES pieces at line ends, each with its first line number. Reads the file
    once at C speed (bytes.count); with `max_rows`, the plan stops after that many non-blank lines."""
    chunks: list[dict] = []
    line, start, rows = 1, 0, 0
    with open(path, "rb") as f:
        tail = b""
        while True:
            block = f.read(CHUNK_BYTES)
            data = tail + block
            if not data:
                break
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if cut == 0:  # no line end yet: read on
                tail = data
                continue
            piece, tail = data[:cut], data[cut:]
            if max_rows is not None:
                kept, n_lines = 0, 0
                for ln in piece.split(b"\n"):
                    if rows + kept >= max_rows:
                        break
                    n_lines += 1
                    kept += bool(ln.strip())
                if rows + kept >= max_rows:
                    piece = b"\n".join(piece.split(b"\n")[:n_lines]) + b"\n"
                rows += kept
            chunks.append({"start": start, "end": start + len(piece), "line": line})
            line += piece.count(b"\n")
            start += len(piece)
            if max_rows is not None and rows >= max_rows:
                break
    return chunks


def _parse_chunks(batch: dict, *, ctx: RowContext, path: str, file: str, line_based: bool) -> dict:
    """datasets.map body: a batch of chunk descriptors -> one row per non-blank line of those chunks."""
    rows: list[Row] = []
    with open(path, "rb") as f:
        for start, end, first_line in zip(batch["start"], batch["end"], batch["line"], strict=True):
            f.seek(start)
            data = f.read(end - start)
            try:  # the whole chunk decodes in one C call unless it holds a bad byte
                lines: list = data.decode("utf-8").split("\n")
            except UnicodeDecodeError:
                lines = data.split(b"\n")
            for offset, text in enumerate(lines):
                number = first_line + offset
                where = Where(file, number if line_based else None, number - 1)
                if isinstance(text, bytes):
                    try:
                        text = text.decode("utf-8")
                    except UnicodeDecodeError as err:
                        if not text.strip():
                            continue
                        raw = text.decode("utf-8", "replace")
                        rows.append(_quarantined(where, ctx, schemas.INVALID_UTF8,
                                                 f"invalid UTF-8 byte at column {err.start + 1}", raw))
                        continue
                if not text.strip():
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as err:
                    rows.append(_quarantined(where, ctx, schemas.NOT_JSON, f"not JSON ({err.msg} at column "
                                                                           f"{err.colno})", text))
                    continue
                except RecursionError:
                    rows.append(_quarantined(where, ctx, schemas.NOT_JSON, "JSON nested too deeply to read", text))
                    continue
                rows.append(process_record(ctx, rec, where, text))
    _apply_token_budget(ctx, rows)
    return _columns(rows)


_SPACE = re.compile(r"\s*")


def json_array_as_lines(path: Path, workdir: Path, where: str) -> Path:
    """A JSON array file (e.g. MetaMathQA-395K.json) re-laid as one record per line, decoded element by
    element (the file's text is held once, never a list of all records). surrogateescape keeps invalid
    UTF-8 bytes as they were, so the line road quarantines exactly the records holding them. A syntax
    error in the array itself means the file does not parse: a ConfigError naming line and column."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    decoder = json.JSONDecoder()
    out = workdir / f"{uuid.uuid4().hex}.jsonl"
    try:
        i = _SPACE.match(text).end()
        if text[i:i + 1] != "[":
            raise json.JSONDecodeError("expected '[' (a .json source is a JSON array of records, or JSON lines)",
                                       text, i)
        i = _SPACE.match(text, i + 1).end()
        with open(out, "w", encoding="utf-8", errors="surrogateescape") as f:
            while text[i:i + 1] != "]":
                record, i = decoder.raw_decode(text, i)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                i = _SPACE.match(text, i).end()
                if text[i:i + 1] == ",":
                    i = _SPACE.match(text, i + 1).end()
                elif text[i:i + 1] != "]":
                    raise json.JSONDecodeError("expected ',' or ']'", text, i)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}.path: {path}: not a JSON array ({err.msg} at line {err.lineno}, column "
                          f"{err.colno})") from None
    except RecursionError:
        raise ConfigError(f"{where}.path: {path}: a record of the JSON array is nested too deeply to read") from None
    return out


def _first_char(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head[:1]


# ---------------------------------------------------------------------------------------------------
# Tabular sources (parquet, csv, arrow files; hub datasets)


def _parse_table(batch: dict, indices: list[int], *, ctx: RowContext, file: str) -> dict:
    """datasets.map body: a batch of raw records -> one row each."""
    names = list(batch)
    rows = [process_record(ctx, dict(zip(names, values, strict=True)), Where(file, None, i), None)
            for i, values in zip(indices, zip(*batch.values(), strict=True), strict=True)]
    _apply_token_budget(ctx, rows)
    return _columns(rows)


def _csv_kwargs(path: Path) -> dict:
    """CSV has no types: every column is read as its raw text (a number stays "42"); bad UTF-8 bytes are
    replaced and the rows holding them quarantined afterwards."""
    import csv

    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise ConfigError(f"{path}: empty CSV file (no header row)")
    return {"keep_default_na": False,
            "features": datasets.Features({c: datasets.Value("string") for c in header}),
            "encoding_errors": "replace"}


def _utf8_clean(path: Path) -> bool:
    """Whether the whole file decodes as UTF-8 (checked block by block at C speed)."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                dec.decode(block)
            dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _quarantine_replaced_bytes(batch: dict, *, reason_detail: str) -> dict:
    """After a CSV read with replaced bytes: rows holding U+FFFD become invalid_utf8."""
    bad = [s == "ok" and any("\ufffd" in (batch[c][i] or "") for c in ("question", "answer", "solution"))
           for i, s in enumerate(batch["status"])]
    for i, b in enumerate(bad):
        if b:
            raw = batch["question"][i]
            for c in ROW_FEATURES:
                if c not in ("file", "line", "row", "source"):
                    batch[c][i] = None
            batch["status"][i], batch["reason"][i] = "quarantined", schemas.INVALID_UTF8
            batch["detail"][i], batch["excerpt"][i] = reason_detail, (raw or "")[:EXCERPT_CHARS]
    return batch


# ---------------------------------------------------------------------------------------------------
# Sources


@dataclass
class SourceRead:
    """One source after reading: its rows, and what the manifest says about where they came from."""

    name: str
    role: str
    rows: datasets.Dataset
    origin: dict


def _num_proc(config: Config, n_units: int, big: bool) -> int:
    procs = config.num_proc or min(os.cpu_count() or 1, 8)
    return max(1, min(procs, n_units)) if big else 1


def _map(ds: datasets.Dataset, fn, *, num_proc: int, workdir: Path, desc: str, **kwargs) -> datasets.Dataset:
    """datasets.map into the stage's scratch folder (never the user's HF cache), with a progress bar
    only when the work is spread over several processes (large sources)."""
    if num_proc > 1:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    try:
        return ds.map(fn, batched=True, num_proc=num_proc if num_proc > 1 else None, features=ROW_FEATURES,
                      remove_columns=ds.column_names, cache_file_name=str(workdir / f"{uuid.uuid4().hex}.arrow"),
                      new_fingerprint=uuid.uuid4().hex, load_from_cache_file=False, desc=desc, **kwargs)
    finally:
        datasets.disable_progress_bars()


_ENV_VAR = re.compile(r"\$(\w+|\{\w+\})")


def resolve_paths(src: DataSource, where: str) -> list[Path]:
    """The files a `path:` source names: `~` and $VARS expanded, globs matched (sorted), each checked to
    be a readable file in a known format; anything else is a ConfigError naming the path."""
    files: list[Path] = []
    for given in src.paths:
        pattern = os.path.expandvars(os.path.expanduser(given))
        if unset := _ENV_VAR.findall(pattern):
            raise ConfigError(f"{where}.path: {given!r} uses the environment variable {unset[0].strip('{}')}, "
                              "which is not set")
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"{where}.path: {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                raise ConfigError(f"{where}.path: {p} is a folder; name its files (e.g. {p}/*.jsonl)")
            if not p.is_file():
                raise ConfigError(f"{where}.path: {p}: no such file")
            if src.file_format(str(p)) is None:
                raise ConfigError(f"{where}.format: cannot tell the format of {p} from its suffix; set format to "
                                  "one of jsonl, json, parquet, csv, arrow")
            files.append(p)
    return files


def read_file(src: DataSource, path: Path, ctx: RowContext, config: Config, workdir: Path,
              where: str) -> datasets.Dataset:
    fmt = src.file_format(str(path))
    if fmt in ("jsonl", "json"):
        line_based = True
        if fmt == "json" and _first_char(path) == b"[":
            line_based, lines_path = False, json_array_as_lines(path, workdir, where)
        else:
            lines_path = path
        plan = plan_chunks(lines_path, src.max_rows)
        chunks = datasets.Dataset.from_dict({k: [c[k] for c in plan] for k in ("start", "end", "line")},
                                            features=datasets.Features({k: datasets.Value("int64")
                                                                        for k in ("start", "end", "line")}))
        big = lines_path.stat().st_size >= PARALLEL_MIN_ROWS * 1024
        n = _num_proc(config, len(plan), big)
        rows = _map(chunks, _parse_chunks, num_proc=n, workdir=workdir, batch_size=1,
                    desc=f"curate {ctx.source}: {path.name}",
                    fn_kwargs={"ctx": ctx, "path": str(lines_path), "file": str(path), "line_based": line_based})
        # Quarantine is for bad rows of a good file; a file none of whose lines is JSON is the wrong file.
        if len(rows) and set(rows.unique("reason")) <= {schemas.NOT_JSON, schemas.INVALID_UTF8}:
            first = rows[0]
            at = f"line {first['line']}" if first["line"] is not None else f"record {first['row']}"
            raise ConfigError(f"{where}.path: {path}: no line parses as a JSON record ({at}: {first['detail']}); "
                              f"is it really {fmt}?")
        return rows
    kwargs: dict = {}
    if fmt == "csv":
        kwargs = _csv_kwargs(path)
    builder = {"parquet": "parquet", "csv": "csv", "arrow": "arrow"}[fmt]
    try:
        raw = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(workdir / "hf"),
                                    **kwargs)
    except Exception as err:  # any reader error means the file does not parse as `fmt`
        raise ConfigError(f"{where}.path: {path}: cannot be read as {fmt} ({type(err).__name__}: "
                          f"{_first_line(err)})") from None
    if src.max_rows is not None:
        raw = raw.select(range(min(src.max_rows, len(raw))))
    rows = _map(raw, _parse_table, num_proc=_num_proc(config, len(raw), len(raw) >= PARALLEL_MIN_ROWS),
                workdir=workdir, with_indices=True, desc=f"curate {ctx.source}: {path.name}",
                fn_kwargs={"ctx": ctx, "file": str(path)})
    if fmt == "csv" and not _utf8_clean(path):
        rows = rows.map(_quarantine_replaced_bytes, batched=True, features=ROW_FEATURES,
                        cache_file_name=str(workdir / f"{uuid.uuid4().hex}.arrow"), new_fingerprint=uuid.uuid4().hex,
                        fn_kwargs={"reason_detail": "invalid UTF-8 bytes in the row"})
    return rows


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def read_hub(src: DataSource, ctx: RowContext, config: Config, workdir: Path, where: str) -> tuple[datasets.Dataset, dict]:
    """A hub dataset through `datasets.load_dataset` at the pinned revision. Offline (HF_HUB_OFFLINE=1)
    `datasets` serves the newest cached copy, whatever its commit: the cache folder it came from must be
    the pinned commit's, else the run stops rather than train on other data."""
    label = f"{src.hf}@{src.revision}" + (f" ({src.config})" if src.config else "")
    try:
        raw = datasets.load_dataset(src.hf, src.config, split=src.split, revision=src.revision,
                                    cache_dir=src.cache_dir)
    except Exception as err:
        offline = datasets.config.HF_HUB_OFFLINE
        hint = (" HF_HUB_OFFLINE is set and it is not in the local HF cache "
                f"({src.cache_dir or datasets.config.HF_DATASETS_CACHE}); load it once with network access"
                if offline else "")
        raise ConfigError(f"{where}.hf: cannot load {label} split {src.split!r}: {type(err).__name__}: "
                          f"{_first_line(err)}.{hint}") from None
    cached = [f["filename"] for f in raw.cache_files]
    commits = {part for f in cached for part in Path(f).parts if re.fullmatch(r"[0-9a-f]{40}", part)}
    if src.revision not in commits:
        raise ConfigError(f"{where}.revision: {src.hf} was served from {cached[0] if cached else 'memory'}, "
                          f"which is not the pinned commit {src.revision} (offline, datasets falls back to the "
                          f"newest cached copy); fetch the pinned revision or pin the cached one")
    if src.max_rows is not None:
        raw = raw.select(range(min(src.max_rows, len(raw))))
    file = f"hf://datasets/{src.hf}@{src.revision}/{src.config or 'default'}/{src.split}"
    rows = _map(raw, _parse_table, num_proc=_num_proc(config, len(raw), len(raw) >= PARALLEL_MIN_ROWS),
                workdir=workdir, with_indices=True, desc=f"curate {ctx.source}: {src.hf}",
                fn_kwargs={"ctx": ctx, "file": file})
    origin = {"hf": src.hf, "config": src.config, "split": src.split, "revision": src.revision,
              "fingerprint": raw._fingerprint, "cache_files": cached}
    return rows, origin


def read_source(src: DataSource, index: int, config: Config, eval_index: EvalIndex | None,
                workdir: Path) -> SourceRead:
    """Read one `hf`/`path` source into normalised rows (ok, quarantined or filtered)."""
    from stages.common.tracking import sha256_file

    where = f"sources.{index}"
    ctx = RowContext(source=src.source_name, role=src.role, extract=schemas.extractor(src), seed=config.seed,
                     val_fraction=src.val_fraction, test_fraction=src.test_fraction,
                     max_chars=config.max_question_chars, max_tokens=config.max_question_tokens,
                     tokenizer=tokenizer_file(config.tokenizer) if config.tokenizer else None,
                     index=eval_index if src.role == "train" else None)
    if src.hf is not None:
        rows, origin = read_hub(src, ctx, config, workdir, where)
    else:
        parts, files = [], []
        for path in resolve_paths(src, where):
            parts.append(read_file(src, path, ctx, config, workdir, where))
            files.append({"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size})
        rows = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        origin = {"files": files}
    return SourceRead(src.source_name, src.role, rows, origin)


def multiplication_rows(src: MultiplicationSource, seed: int, eval_index: EvalIndex | None) -> SourceRead:
    """The synthetic generator, as before: every a*b, split by unordered problem with a seeded shuffle."""
    import random

    problems = [(a, b) for a in range(src.a_min, src.a_max + 1) for b in range(src.b_min, src.b_max + 1)]
    # Split by unordered problem: {a, b} lands in exactly one split whichever way it is written.
    keys = sorted({tuple(sorted(p)) for p in problems})
    random.Random(seed).shuffle(keys)
    n_test = round(len(keys) * src.test_fraction)
    n_val = round(len(keys) * src.val_fraction)
    split_of = {k: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, k in enumerate(keys)}
    rows = []
    for i, (a, b) in enumerate(problems):
        question = f"{a}*{b}"
        key_words = words(question)
        key = " ".join(key_words)
        row = Row.at(Where("generated", None, i), "ok", src.name, id=f"mul/{a}x{b}", question=question,
                     answer=str(a * b), split=split_of[tuple(sorted((a, b)))], key_hash=hash64(key),
                     q_hash=hash64(question))
        if eval_index is not None:
            row.contaminated_by(eval_index.match(key, key_words))
        rows.append(row)
    origin = {"generator": src.model_dump(mode="json")}
    return SourceRead(src.name, "train", datasets.Dataset.from_dict(_columns(rows), features=ROW_FEATURES), origin)
