"""Benchmark: curate 400,000 MetaMathQA-shaped rows, deduplicated and decontaminated against the GSM8K
test set and MATH-500, through the real stage (datasets.map workers, a local SQLite MLflow store).

    python benchmarks/curate.py [--rows 400000] [--num-proc N] [--data DIR]

The rows are generated first (not timed) into one jsonl file in MetaMathQA's schema (`query`,
`response` ending "The answer is: X", `type`, `original_question`), ~1.2 KB a row like the real set:
~10 rephrasings per original question, 75% integer answers, 10% decimals, 15% LaTeX answers drawn
from 1,000 distinct forms; 2% exact and 1% normalised (case/punctuation) duplicates; 300 GSM8K test
and 100 MATH-500 questions planted with changed case, whitespace and punctuation. The run must drop
at least the planted duplicates and every planted eval question; the script checks that.

The last line reads: curated N rows in S s, R rows/s, peak RSS M MiB  (N = rows read, the eval sets'
included; S = wall time of `curate.run` on an existing MLflow store, logging included; M = the stage
process, whose memory-mapped Arrow files count in it; workers and CPU time on the line before).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCABULARY = ("the a of is what how many if and to in find value total each more than less number times she he they "
              "has have had bought sold left after before every day week year apples books dollars miles hours "
              "minutes students class teacher garden cookies boxes price cost sum product difference ratio percent "
              "triangle circle square area perimeter radius angle degrees integer positive negative real root "
              "equation function polynomial coefficient probability choose ways arrange digits remainder divisible "
              "prime factor multiple greatest least common sequence term series geometric arithmetic")
WORDS = VOCABULARY.split()
TYPES = ["GSM_AnsAug", "GSM_Rephrased", "GSM_SV", "GSM_FOBAR", "MATH_AnsAug", "MATH_Rephrased", "MATH_SV",
         "MATH_FOBAR"]


def shared_data(arg: str | None) -> Path:
    for cand in (arg, os.environ.get("UFO_SHARED_DATA"), REPO.parent / "shared" / "data",
                 REPO.parent.parent / "shared" / "data"):
        if cand and (Path(cand) / "gsm8k" / "test.jsonl").is_file():
            return Path(cand)
    sys.exit("error: GSM8K/MATH-500 not found; pass --data DIR (the folder holding gsm8k/ and math500/)")


def _mangle(q: str, rng: random.Random) -> str:
    """Change case, whitespace and punctuation, keep the words and numbers."""
    q = q.upper() if rng.random() < 0.5 else q.lower()
    q = re.sub(r"([.,])(?!\d)", r" \1 ", q.replace(" ", "  ").replace("?", " ?"))
    return "  " + q.rstrip(" ?.") + "!!"


def generate(path: Path, rows: int, data: Path, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    latex = [rng.choice([f"\\frac{{{a}}}{{{b}}}", f"\\sqrt{{{a}}}", f"{a}\\sqrt{{{b}}}", f"\\frac{{{a}\\pi}}{{{b}}}",
                         f"({a},{b})", f"{a}^\\circ"]) for a, b in
             ((rng.randint(1, 99), rng.randint(2, 97)) for _ in range(1000))]
    gsm = [json.loads(line)["question"] for line in (data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    math = [json.loads(line)["problem"] for line in (data / "math500" / "test.jsonl").read_text().splitlines()]
    planted = [(q, "GSM_AnsAug") for q in rng.sample(gsm, 300)] + [(q, "MATH_AnsAug") for q in rng.sample(math, 100)]
    plant_at = set(rng.sample(range(rows), len(planted)))
    n_exact = n_norm = 0
    recent: list[dict] = []
    with open(path, "w") as f:
        original = ""
        for i in range(rows):
            if i in plant_at:
                q, kind = planted.pop()
                rec = {"query": _mangle(q, rng), "response": "Planted. The answer is: 1", "type": kind,
                       "original_question": q}
            elif recent and rng.random() < 0.03:
                rec = dict(rng.choice(recent))
                if rng.random() < 2 / 3:
                    n_exact += 1
                else:
                    n_norm += 1
                    rec["query"] = rec["query"].upper().replace("?", " ?!")
            else:
                if i % 10 == 0:
                    original = " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 60))) + "?"
                query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 60))) + \
                    f" {rng.randint(2, 5000)} {rng.choice(WORDS)}?"
                u = rng.random()
                answer = str(rng.randint(-50, 10000)) if u < 0.75 else f"{rng.randint(0, 999)}.{rng.randint(1, 99)}" \
                    if u < 0.85 else rng.choice(latex)
                steps = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 160)))
                rec = {"query": query.capitalize(), "response": f"{steps} = {rng.randint(1, 999)}.\nThe answer is: {answer}",
                       "type": rng.choice(TYPES), "original_question": original}
                recent = (recent + [rec])[-50:]
            f.write(json.dumps(rec) + "\n")
    return {"planted_eval": 400, "exact_duplicates": n_exact, "normalised_duplicates": n_norm}


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the datasets.map workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--num-proc", type=int, default=None, help="datasets.map processes (default: all cores)")
    p.add_argument("--data", help="folder holding gsm8k/test.jsonl and math500/test.jsonl")
    args = p.parse_args()
    data = shared_data(args.data)
    with tempfile.TemporaryDirectory(prefix="ufo-bench-curate-") as tmp:
        tmp = Path(tmp)
        os.environ.update({"UFO_HOME": str(tmp / "ws"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
                           "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
        src = tmp / "metamathqa.jsonl"
        t0 = time.perf_counter()
        planted = generate(src, args.rows, data)
        print(f"generated {args.rows} rows ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s "
              f"(not timed): {planted}", flush=True)

        import logging

        from stages import curate  # after the environment is set
        from stages.common.tracking import configure

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)

        config = curate.Config(experiment="bench-curate", num_proc=args.num_proc, sources=[
            curate.MetaMathQASource(path=str(src)),
            curate.GSM8KSource(path=str(data / "gsm8k" / "test.jsonl"), role="eval"),
            curate.MATHSource(path=str(data / "math500" / "test.jsonl"), role="eval", name="math500"),
        ])
        configure("bench-curate")  # create the MLflow store first: a one-off per workspace, not curation
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        out = curate.run(config)
        seconds = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
        m = out.metrics
        read = int(m["data/read_rows"])
        print(f"kept {m['data/kept_rows']:.0f} (train {m['data/train_rows']:.0f}, val {m['data/val_rows']:.0f}), "
              f"quarantined {m['data/quarantined_rows']:.0f}, deduplicated {m['data/deduplicated_rows']:.0f}, "
              f"decontaminated {m['data/decontaminated_rows']:.0f}; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores")
        if m["data/decontaminated_rows"] < planted["planted_eval"]:
            sys.exit(f"error: only {m['data/decontaminated_rows']:.0f} of {planted['planted_eval']} planted eval "
                     "questions were removed")
        if m["data/deduplicated_rows"] < planted["exact_duplicates"] + planted["normalised_duplicates"]:
            sys.exit("error: fewer duplicates removed than planted")
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"CPU time of the run (stage process and its workers): {cpu:.1f} s; peak RSS of the largest "
              f"datasets.map worker: {workers:.0f} MiB")
        print(f"curated {read} rows in {seconds:.1f} s, {read / seconds:.0f} rows/s, peak RSS {own:.0f} MiB")


if __name__ == "__main__":
    main()
