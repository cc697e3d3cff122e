"""The stage cache: a stage whose result is already in MLflow is not computed again.

A stage's key is the sha256 of (stage name, its resolved config minus `NON_RESULT_FIELDS`, the
content digests of its inputs in place of the upstream runs' ids, and the digest of its code). A
FINISHED run tagged with the same key in the same experiment is reused: the new pipeline gets a
child run tagged `ufo.cache.hit=true` and `ufo.cache.source_run=<id>` that points at it, so the MLflow
UI shows both the hit and where the result came from.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from flows.config import UPSTREAM

TAG_CACHE_KEY = "ufo.cache_key"
TAG_CACHE_HIT = "ufo.cache.hit"
TAG_CACHE_SOURCE = "ufo.cache.source_run"
TAG_CODE = "ufo.code_digest"

#: Config fields that cannot change a stage's result, per stage ("*": every stage).
#: `experiment` only says where the run is filed. Everything else stays in the key, including
#: `device` (CPU and GPU kernels give different numbers).
NON_RESULT_FIELDS: dict[str, tuple[str, ...]] = {"*": ("experiment",)}

STAGES_ROOT = Path(__file__).resolve().parents[1] / "stages"
#: In an image: every stage's code digest, computed from the full checkout at build time. An image
#: holds only its own stage's package, but the flow it may run (a deployed pipeline) keys the cache
#: on every stage's code.
RECORDED_DIGESTS = STAGES_ROOT.parent / "code-digests.json"


@cache
def code_digest(stage: str, root: Path = STAGES_ROOT) -> str:
    """sha256 over the stage's own sources and the shared code it imports (`stages/common`).

    The same digest is stamped on the stage's image (label `ai.ufo.code-digest`), so a stale image is
    refused rather than silently run under a key that claims newer code.
    """
    if root == STAGES_ROOT and RECORDED_DIGESTS.is_file():
        return json.loads(RECORDED_DIGESTS.read_text())[stage]
    files = sorted([*(root / "common").rglob("*.py"), *(root / stage).rglob("*.py"), root / "__init__.py"])
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def cache_key(stage: str, config: dict[str, Any], code: str | None = None) -> str:
    """The stage's cache key from its resolved config (as JSON, upstream Outputs included)."""
    cfg = dict(config)
    for f in (*NON_RESULT_FIELDS.get("*", ()), *NON_RESULT_FIELDS.get(stage, ())):
        cfg.pop(f, None)
    for f in UPSTREAM[stage]:
        upstream = cfg.get(f)
        if upstream is not None:  # the bytes it hands over matter, not which run produced them
            cfg[f] = {name: ref["sha256"] for name, ref in sorted(upstream["artifacts"].items())}
    payload = {"stage": stage, "config": cfg, "code": code or code_digest(stage)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
