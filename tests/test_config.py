"""Configs: every file in configs/ validates; bad input exits non-zero naming the field path, and
`ufo run` creates nothing (no MLflow store, no Prefect home) before the config is valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.config import PipelineConfig
from stages.common.config import ConfigError, apply_overrides, load_config
from tests.helpers import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def ufo(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "UFO_HOME": str(home), "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_validates(path):
    cfg = load_config(PipelineConfig, path)
    assert cfg.evaluate.max_turns == cfg.rl.max_turns  # copied from rl unless set
    assert cfg.sft.feedback == cfg.rl.feedback == cfg.evaluate.feedback


def test_configs_folder_has_the_default():
    assert REPO / "configs" / "tiny.yaml" in CONFIGS


def test_shared_values_propagate_and_overrides_apply():
    cfg = load_config(PipelineConfig, REPO / "configs/tiny.yaml",
                      ["seed=7", "rl.max_turns=3", "rl.feedback=Try again.", "sft.max_wrong_attempts=2"])
    assert (cfg.curate.seed, cfg.sft.seed, cfg.rl.seed, cfg.evaluate.seed) == (7, 7, 7, 7)
    assert cfg.evaluate.max_turns == 3
    assert cfg.sft.feedback == cfg.evaluate.feedback == "Try again."


def test_a_stage_on_several_nodes_knows_its_world_size():
    cfg = load_config(PipelineConfig, REPO / "configs/tiny-zero2.yaml",
                      ["flow.launcher=docker", "flow.rl.resources.nodes=2", "flow.sft.resources.nodes=2"])
    assert (cfg.rl.engine.nodes, cfg.rl.engine.num_processes, cfg.rl.engine.world_size) == (2, 2, 4)
    assert cfg.sft.engine.world_size == 4 and cfg.sft.micro_steps == 1  # 128 examples: 32 on each rank


def test_override_values_are_typed_yaml():
    data = apply_overrides({}, ["a.b=3", "a.c=[1, 2]", "d=true", "e=x=y"])
    assert data == {"a": {"b": 3, "c": [1, 2]}, "d": True, "e": "x=y"}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["novalue"])


@pytest.mark.parametrize(("overrides", "expected"), [
    (["rl.max_tursn=3"], "rl.max_tursn: unknown key"),
    (["sft.lr=fast"], "sft.lr: Input should be a valid number"),
    (["rl.group_size=7"], "rl.minibatch_size: 256 must divide problems_per_step * group_size"),
    (["rl.max_turns=9", "evaluate.num_samples=9"], "rl.max_turns: an episode of 9 turns can take"),
    (["rl.max_turns=6", "evaluate.num_samples=5"], "evaluate.num_samples: 5 must be >= max_turns (6)"),
    (["sft.model.num_heads=3"], "sft.model.num_heads: 3 must divide hidden_size"),
    (["rl.max_turns=3"], "sft.max_wrong_attempts: 4 must be < the longest episode"),
    (["sft.data.run_id=abc"], "sft.data"),
    # several nodes (flow.<stage>.resources.nodes)
    (["flow.rl.resources.nodes=2", "rl.engine.kind=deepspeed"], "flow.rl.resources.nodes: 2 nodes need "
                                                                "flow.launcher 'docker'"),
    (["flow.launcher=docker", "flow.rl.resources.nodes=2"], "rl.engine.kind: 2 nodes need kind 'deepspeed'"),
    (["flow.launcher=docker", "flow.evaluate.resources.nodes=2"], "flow.evaluate.resources.nodes: evaluate runs "
                                                                  "in one process"),
    (["rl.engine.nodes=2", "rl.engine.kind=deepspeed"], "rl.engine.nodes: 2, but flow.rl.resources.nodes is 1"),
    (["flow.launcher=docker", "flow.sft.resources.nodes=3", "sft.engine.kind=deepspeed"],
     "sft.batch_size: 128 must be a multiple of micro_batch_size * engine.world_size (126)"),
    (["flow.rl.resources.gpus=1", "rl.engine.kind=deepspeed", "rl.engine.num_processes=2"],
     "rl.engine.num_processes: 2 ranks per node, but flow.rl.resources.gpus gives each node 1 GPU(s)"),
])
def test_bad_config_names_the_field(tmp_path, monkeypatch, capsys, overrides, expected):
    monkeypatch.setenv("UFO_HOME", str(tmp_path / "ws"))
    sets = [a for o in overrides for a in ("--set", o)]
    for command in (["config", "validate"], ["run"]):
        assert main([*command, str(REPO / "configs/tiny.yaml"), *sets]) == 2
        err = capsys.readouterr().err
        assert expected in err, err
    assert not (tmp_path / "ws").exists(), "a rejected config must not create the MLflow store or anything else"


@pytest.mark.parametrize(("overrides", "expected"), [
    (["curate.sourcse=[]"], "curate.sourcse: unknown key"),
    (["rl.gamma=high"], "rl.gamma: Input should be a valid number"),
    (["rl.max_turns=9", "evaluate.num_samples=9"], "rl.max_turns: an episode of 9 turns can take"),
])
def test_ufo_run_exits_nonzero_and_creates_no_mlflow_run(tmp_path, overrides, expected):
    """The real console entry point, in its own process: misspelt key, wrong type, broken invariant."""
    home = tmp_path / "ws"
    proc = ufo("run", "configs/tiny.yaml", *[a for o in overrides for a in ("--set", o)], home=home)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert not home.exists(), "a rejected config must not create the MLflow store or anything else"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl:\n  max_turns: 5\n  gamma: [0.5\n")
    proc = ufo("config", "validate", str(bad), home=tmp_path / "ws")
    assert proc.returncode == 2
    assert f"{bad}:4" in proc.stderr and "invalid YAML" in proc.stderr


def test_missing_config_file(tmp_path):
    proc = ufo("run", "configs/nope.yaml", home=tmp_path / "ws")
    assert proc.returncode == 2 and "no such config file" in proc.stderr


def test_stage_cli_rejects_bad_stage_config(tmp_path):
    cfg = tmp_path / "rl.yaml"
    cfg.write_text("gama: 0.5\n")
    proc = subprocess.run([sys.executable, "-m", "stages.rl", "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "gama: unknown key" in proc.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_config_dumped_in_full_validates_again(path, monkeypatch):
    """The flow hands each stage its config dumped in full (every default written out); it must
    validate again to the same config, whatever the file left unset."""
    monkeypatch.setenv("UFO_DATA", "/data")
    cfg = load_config(PipelineConfig, path)
    again = PipelineConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg
