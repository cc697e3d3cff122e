"""Models from GGUF files (stages/common/base_model.py), on a tiny GGUF the test writes itself: the
file becomes a safetensors folder with the file's tokenizer and chat template and weights equal to the
model it was written from (up to Q8_0 rounding); the import is logged once as an MLflow model and found
again by later runs; a package's data file is found without importing the package; SFT starts from the
imported copy and evaluate evaluates it as `base`. Bad input is refused naming the field."""

from __future__ import annotations

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from stages import curate, evaluate, sft
from stages.common.base_model import TAG_KEY, TAG_SHA256, convert, gguf_path, import_base_model
from stages.common.config import ConfigError
from stages.common.contracts import BASE_MODEL_ARTIFACT
from stages.common.model import checkpoint_dirs, load_pretrained
from stages.common.model_spec import GGUFSource, ModelConfig
from stages.common.tracking import configure, fetch_verified, sha256_file
from tests.tiny_gguf import write_tiny_gguf

TEXTS = [f"{a}*{b}" for a in range(100, 200) for b in range(2, 10)] + [str(a * b) for a in range(100, 200)
                                                                       for b in range(2, 10)]
# The pipeline's chat format with a short system prompt instead of the template's default one.
SHORT_SYSTEM = ("{%- for m in messages -%}{%- if loop.first and m['role'] != 'system' -%}"
                "{{ '<|im_start|>system\\nAnswer with just the number.<|im_end|>\\n' }}{%- endif -%}"
                "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0-mixed.gguf"
    model, tokenizer = write_tiny_gguf(path, TEXTS, context=512)
    return path, model, tokenizer


def _spec(path, **kw) -> ModelConfig:
    return ModelConfig(init="gguf", gguf=GGUFSource(path=str(path)), **kw)


def test_a_gguf_file_becomes_a_safetensors_folder_with_its_tokenizer_and_template(tiny_gguf, tmp_path):
    path, original, tokenizer = tiny_gguf
    folder = convert(_spec(path), path, tmp_path / "model")
    files = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    model, tok = load_pretrained(folder, torch.device("cpu"))
    assert "quantization_config" not in model.config.to_dict()
    assert tok.chat_template == tokenizer.chat_template and tok.eos_token == "<|im_end|>"
    assert tok.get_vocab() == tokenizer.get_vocab()
    text = "123*4 = 492, Let's try again."
    assert tok.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    # Weights: F32 tensors exactly (after llama.cpp's q/k permutation is undone), the Q8_0 one within rounding.
    got, want = load_file(folder / "model.safetensors"), original.state_dict()
    for name, w in want.items():
        if name == "lm_head.weight":  # tied: saved once, as the embedding
            continue
        tol = 0.01 * float(w.abs().max()) if "up_proj" in name else 0.0
        assert torch.allclose(got[name], w, atol=tol, rtol=0), name
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - original(input_ids=ids).logits).abs().max()
    assert 0 < diff < 1e-2  # Q8_0 rounding, nothing more


def test_dtype_and_chat_template_are_applied(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    folder = convert(_spec(path, dtype="bfloat16", chat_template=SHORT_SYSTEM), path, tmp_path / "bf16")
    model, tok = load_pretrained(folder, torch.device("cpu"), _spec(path, dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    rendered = tok.apply_chat_template([{"role": "user", "content": "7*8"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\nAnswer with just the number.<|im_end|>\n<|im_start|>user\n7*8<|im_end|>\n" \
                       "<|im_start|>assistant\n"


def test_the_import_is_logged_once_and_found_again(tiny_gguf, workspace, tmp_path):
    """The first run converts and logs the model; a later run (another experiment too) downloads that
    MLflow copy (same model id, digest verified); another dtype or template is another import."""
    path, _, _ = tiny_gguf
    configure("gguf-a")
    with mlflow.start_run() as first:
        folder, ref = import_base_model(_spec(path), tmp_path / "a")
    logged = mlflow.get_logged_model(ref.uri.removeprefix("models:/"))
    assert logged.source_run_id == first.info.run_id and logged.name == "base"
    assert logged.tags[TAG_SHA256] == ref.sha256 and TAG_KEY in logged.tags
    assert fetch_verified(ref, tmp_path / "check") and checkpoint_dirs(folder)[0].name == "model"
    configure("gguf-b")
    with mlflow.start_run():
        _, again = import_base_model(_spec(path), tmp_path / "b")
        _, other = import_base_model(_spec(path, chat_template=SHORT_SYSTEM), tmp_path / "c")
    assert again == ref
    assert other.uri != ref.uri
    models = mlflow.search_logged_models(experiment_ids=[e.experiment_id for e in mlflow.search_experiments()],
                                         output_format="list")
    assert sorted(m.tags[TAG_KEY] == logged.tags[TAG_KEY] for m in models) == [False, True]


def test_a_pinned_digest_finds_the_imported_copy_on_a_machine_without_the_file(tiny_gguf, workspace, tmp_path):
    """What a stage container or a work pool's pod does: the config pins the file's sha256, the file is not
    there, the model an earlier run imported is found and used; without a pin the file is required."""
    path, _, _ = tiny_gguf
    copy_ = tmp_path / "copy.gguf"
    copy_.write_bytes(path.read_bytes())
    pinned = ModelConfig(init="gguf", gguf=GGUFSource(path=str(copy_), sha256=sha256_file(copy_)), dtype="bfloat16")
    configure("gguf-pin")
    with mlflow.start_run():
        _, first = import_base_model(pinned, tmp_path / "a")
    copy_.unlink()
    with mlflow.start_run():
        folder, again = import_base_model(pinned, tmp_path / "b")
        assert again == first and (checkpoint_dirs(folder)[0] / "model.safetensors").is_file()
        with pytest.raises(ConfigError, match="model.gguf.path: .* is not a file"):
            import_base_model(pinned.model_copy(update={"gguf": GGUFSource(path=str(copy_))}), tmp_path / "c")


def test_a_package_data_file_is_found_without_importing_the_package(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf
    site = tmp_path / "site"
    (site / "fake_models").mkdir(parents=True)
    (site / "fake_models" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (site / "fake_models" / "tiny.gguf").write_bytes(path.read_bytes())
    info = site / "fake_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-models\nVersion: 0.1\n")
    (info / "RECORD").write_text("fake_models/__init__.py,,\nfake_models/tiny.gguf,,\nfake_models-0.1.dist-info/RECORD,,\n")
    monkeypatch.syspath_prepend(str(site))
    found = gguf_path(GGUFSource(package="fake-models", file="tiny.gguf"))
    assert found == site / "fake_models" / "tiny.gguf"
    with pytest.raises(ConfigError, match=r"model.gguf.file: fake-models 0.1 ships no file.*'tiny.gguf'"):
        gguf_path(GGUFSource(package="fake-models", file="other.gguf"))
    with pytest.raises(ConfigError, match=r"model.gguf.package: .*'not-installed-models' is not installed; `make models`"):
        gguf_path(GGUFSource(package="not-installed-models", file="x.gguf"))


def test_bad_gguf_sources_are_refused_naming_the_field(tiny_gguf, tmp_path, workspace):
    path, _, _ = tiny_gguf
    with pytest.raises(ValueError, match="exactly one of"):
        GGUFSource(path=str(path), package="x", file="y")
    with pytest.raises(ValueError, match="gguf: required when init is 'gguf'"):
        ModelConfig(init="gguf")
    with pytest.raises(ConfigError, match="model.gguf.path: .* is not a file"):
        gguf_path(GGUFSource(path=str(tmp_path / "missing.gguf")))
    wrong = "0" * 64
    configure("gguf-bad")
    with mlflow.start_run(), pytest.raises(ConfigError, match=f"model.gguf.sha256: .* not the configured {wrong}"):
        import_base_model(ModelConfig(init="gguf", gguf=GGUFSource(path=str(path), sha256=wrong)), tmp_path)
    assert sha256_file(path) != wrong


def test_sft_starts_from_the_imported_model_and_evaluate_evaluates_it(tiny_gguf, workspace, tmp_path):
    path, _, _ = tiny_gguf
    curated = curate.run(curate.Config(experiment="gguf-stages"))
    spec = _spec(path, chat_template=SHORT_SYSTEM)
    out = sft.run(sft.Config(experiment="gguf-stages", data=curated, model=spec, max_steps=2, eval_every=2,
                             val_problems=8, batch_size=8, lr=1e-3))
    base = out.artifact(BASE_MODEL_ARTIFACT)
    assert base.uri.startswith("models:/") and set(out.artifacts) == {"model", "mlflow_model", BASE_MODEL_ARTIFACT}
    before = load_file(checkpoint_dirs(fetch_verified(base, tmp_path / "base"))[0] / "model.safetensors")
    after = load_file(fetch_verified(out.artifact("model"), tmp_path / "sft") / "model.safetensors")
    assert before.keys() == after.keys() and any(not before[k].equal(after[k]) for k in before)
    ev = evaluate.run(evaluate.Config(experiment="gguf-stages", data=curated, sft=out, base=True, max_problems=8,
                                      num_samples=5))
    logged = mlflow.MlflowClient().get_run(ev.run_id).data
    assert logged.params["models.base.sha256"] == base.sha256
    for name in ("succ_at_5", "repeat_share", "effective_answer_ratio"):
        assert f"eval/base/{name}" in logged.metrics and f"eval/sft_vs_base/{name}_lo" in logged.metrics
    with pytest.raises(ConfigError, match="evaluate.base: the SFT Output has no `base_model`"):
        evaluate.run(evaluate.Config(experiment="gguf-stages", data=curated,
                                     sft=out.model_copy(update={"artifacts": {"model": out.artifact("model")}}),
                                     base=True, max_problems=8, num_samples=5))
