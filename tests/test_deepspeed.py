"""DeepSpeed ZeRO over 2 CPU processes (gloo), launched by the SFT stage itself: the loss and gradient
norm after each step equal the single-process run's (relative tolerance 1e-4; the only difference is
the order of float sums), rank 0 logs each metric once, the stage logs one model, and a SIGTERM to the
stage stops its ranks.

The engine wrapper is checked in this process with one rank (fast); the tests that launch 2 ranks
(~15-25 s of start-up each on 2 cores) are marked slow: `pytest -m slow tests/test_deepspeed.py`, ~3 min. The first DeepSpeed run on a machine also
builds DeepSpeed's CPU communication op (~1-2 min, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
import torch
from safetensors.torch import load_file

from flows.config import PipelineConfig
from stages import sft
from stages.common.chat import build_char_tokenizer
from stages.common.config import load_config
from stages.common.engine import build_engine
from stages.common.model import new_scratch_model
from stages.common.model_spec import EngineConfig, ModelConfig
from stages.common.tracking import fetch_verified, tracking_uri
from tests.helpers import REPO, metric_history

pytest.importorskip("deepspeed")


def _sft_section(config_file: str, **update) -> sft.Config:
    cfg = load_config(PipelineConfig, REPO / "configs" / config_file).sft
    return sft.Config.model_validate({**cfg.model_dump(mode="json"), "experiment": "ds", **update})


def _compare(single: sft.Output, ranks: sft.Output, steps: int, log_every: int) -> None:
    for key in ("loss/sft", "loss/grad_norm", "train/lr"):
        one, two = metric_history(single.run_id, key), metric_history(ranks.run_id, key)
        assert len(one) == len(two) == steps // log_every, key  # logged once per step, by rank 0 only
        worst = max(abs(a - b) / abs(a) for a, b in zip(one, two, strict=True))
        print(f"{key}: 1 process {one[-1]:.6f}, 2 ranks {two[-1]:.6f} at the last step; max rel diff {worst:.2e}")
        assert two == pytest.approx(one, rel=1e-4), key
    assert metric_history(ranks.run_id, "loss/sft")[-1] < metric_history(ranks.run_id, "loss/sft")[0]


@pytest.mark.slow  # ~1 min on 2 busy cores: pytest -m slow tests/test_deepspeed.py
def test_tiny_zero2_two_ranks_match_the_single_process_run(curated, tmp_path):
    """configs/tiny-zero2.yaml's SFT (2 ranks, ZeRO-2) vs configs/tiny.yaml's (1 process), 20 steps."""
    short = {"data": curated.model_dump(mode="json"), "max_steps": 20, "eval_every": 20, "log_every": 2,
             "val_problems": 32}
    zero2 = _sft_section("tiny-zero2.yaml", **short)
    assert (zero2.engine.kind, zero2.engine.num_processes, zero2.engine.deepspeed.zero_stage) == ("deepspeed", 2, 2)
    single = sft.run(_sft_section("tiny.yaml", **short))
    ranks = sft.run(zero2)
    _compare(single, ranks, steps=20, log_every=2)
    assert set(ranks.artifacts) == {"model", "mlflow_model"} and ranks.metrics["sft/steps"] == 20
    a = load_file(fetch_verified(single.artifact("model"), tmp_path / "a") / "model.safetensors")
    b = load_file(fetch_verified(ranks.artifact("model"), tmp_path / "b") / "model.safetensors")
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-3, k
    run = mlflow.MlflowClient().get_run(ranks.run_id)
    assert run.info.status == "FINISHED"


@pytest.mark.slow  # ~50 s on 2 busy cores: pytest -m slow tests/test_deepspeed.py
def test_zero3_two_ranks_match_the_single_process_run(curated):
    """ZeRO-3 (weights partitioned too, gathered in every forward), packed micro-batches, 4 steps."""
    short = {"data": curated.model_dump(mode="json"), "max_steps": 4, "eval_every": 4, "log_every": 1,
             "val_problems": 16, "batching": "pack", "micro_batch_size": 32}
    single = sft.run(_sft_section("tiny.yaml", **short))
    ranks = sft.run(_sft_section("tiny-zero2.yaml", **short, engine={
        "kind": "deepspeed", "num_processes": 2, "deepspeed": {"zero_stage": 3, "offload_optimizer": True}}))
    _compare(single, ranks, steps=4, log_every=1)


@pytest.fixture
def one_rank_here():
    """A one-rank process group in this process (what a single-GPU DeepSpeed run uses). It stays up for
    the session (DeepSpeed keeps a handle on it: a second group would not be registered with it); the
    rank environment variables it set are removed."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(("stage", "lora"), [(2, False), (3, False), (3, True)])
def test_deepspeed_engine_steps_like_the_torch_engine(one_rank_here, tmp_path, stage, lora):
    """The engine wrapper itself, one rank in-process: 3 AdamW steps of 2 accumulated micro-batches each
    give the torch engine's losses, gradient norms and learning rates (rel 1e-5), and the same export
    (with LoRA: merged from ZeRO-3's gathered state)."""
    tok = build_char_tokenizer(["123*4"], "Let's try again.")
    adapters = {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}} if lora else {}

    def run(spec: EngineConfig, name: str) -> tuple[list[float], dict]:
        torch.manual_seed(0)
        model = new_scratch_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
        engine = build_engine(model, spec, lr=1e-2, weight_decay=0.01, grad_clip=1.0, lr_lambda=lambda s: 1 / (s + 1),
                              micro_steps=2)
        data = torch.Generator().manual_seed(0)
        seen = []
        for _ in range(3):
            for _ in range(2):
                ids = torch.randint(0, len(tok), (4, 10), generator=data)
                loss = engine.module(input_ids=ids, labels=ids).loss / 2
                engine.backward(loss)
                seen.append(loss.item())
            seen += [engine.step(), engine.lr()]
        folder = engine.export(tok, tmp_path / name)
        return seen, load_file(folder / "model.safetensors")

    reference, ref_weights = run(EngineConfig(**adapters), "torch")
    got, weights = run(EngineConfig(kind="deepspeed", deepspeed={"zero_stage": stage}, **adapters), "ds")
    assert got == pytest.approx(reference, rel=1e-5)
    assert reference[2] != reference[8]  # the steps did change the model
    assert weights.keys() == ref_weights.keys() and not any("lora" in k for k in weights)
    for k, w in ref_weights.items():
        torch.testing.assert_close(weights[k], w, rtol=1e-4, atol=1e-6, msg=k)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:  # exited meanwhile (a zombie until its parent reaps it)
        return []


@pytest.mark.slow  # ~40 s on 2 busy cores: pytest -m slow tests/test_deepspeed.py
def test_sigterm_to_the_stage_stops_its_ranks(curated, tmp_path):
    cfg = _sft_section("tiny-zero2.yaml", data=curated.model_dump(mode="json"), max_steps=100_000,
                       eval_every=100_000)
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    stage = subprocess.Popen([sys.executable, "-m", "stages.sft", "--config", str(path)], cwd=REPO,
                             env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        ranks: list[psutil.Process] = []
        while time.monotonic() < deadline and len(ranks) < 2:
            time.sleep(0.5)
            ranks = [p for p in _descendants(stage.pid)
                     if "stages.sft.stage:fit_rank" in _cmdline(p) and "torch.distributed.run" not in _cmdline(p)]
        assert len(ranks) == 2, "the stage did not start 2 ranks"
        everything = _descendants(stage.pid)
        time.sleep(3)  # let the ranks get into training
        stage.send_signal(signal.SIGTERM)
        out, _ = stage.communicate(timeout=60)
        assert stage.returncode == 128 + signal.SIGTERM, out[-3000:]
        gone, alive = psutil.wait_procs(everything, timeout=30)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    finally:
        for p in [*_descendants(stage.pid), psutil.Process(stage.pid)] if stage.poll() is None else []:
            p.kill()
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`ufo.stage` = 'sft'",
                              output_format="list")
    assert max(runs, key=lambda r: r.info.start_time).info.status == "KILLED"
