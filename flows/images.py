"""Build the four stage images (`make images`, i.e. `ufo images`).

    ufo images [--base-image IMAGE] [--torch-wheels DIR] [--tag TAG] [--prefix ufo]

Targets of containers/Dockerfile, sharing layers (python -> base -> curate; base -> torch -> sft, rl,
evaluate). Each image is labelled with its stage, the project version, the git commit and the digest
of the stage's code (the `docker` launcher refuses an image whose code digest is not this
checkout's). With no registry at hand, the default base image `ufo/debian:bookworm` is made locally:
`debootstrap --variant=minbase bookworm` into a folder, then `docker import` (needs root and the
`debootstrap` package). torch is installed from a local wheel folder when one is given or found in
pip's configured find-links, else from the package index.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from flows.cache import code_digest
from flows.launchers import LABEL_CODE, LABEL_STAGE
from stages.common.config import ConfigError
from stages.common.processes import REPO_ROOT

STAGE_TARGETS = ("curate", "sft", "rl", "evaluate")
DEFAULT_BASE = "ufo/debian:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BUILD_DIR = REPO_ROOT / "containers" / ".build"


def docker_client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as err:
        raise ConfigError(f"no Docker engine answers ({err}); start one (`dockerd`, see containers/README.md) "
                          "or set DOCKER_HOST") from None
    return client


def ensure_debian_base(client, name: str = DEFAULT_BASE) -> None:
    """Make `name` from a debootstrapped minimal Debian if it is not there yet (~30 s)."""
    import docker

    try:
        client.images.get(name)
        return
    except docker.errors.ImageNotFound:
        pass
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        raise ConfigError(f"base image {name} is missing and cannot be made here: it needs root and "
                          "`debootstrap` (apt-get install debootstrap), or pass --base-image IMAGE")
    with tempfile.TemporaryDirectory(prefix="ufo-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        print(f"making {name}: debootstrap --variant=minbase bookworm ({DEBIAN_MIRROR})", flush=True)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR], check=True,
                       stdout=subprocess.DEVNULL)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", name], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrapped rootfs failed")


def _pip_config() -> configparser.ConfigParser:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    cfg = configparser.ConfigParser()
    for line in out.splitlines():
        key, _, value = line.partition("=")
        section, _, option = key.partition(".")
        if option:
            if not cfg.has_section(section):
                cfg.add_section(section)
            cfg.set(section, option, value.strip().strip("'\""))
    return cfg


def prepare_context(torch_wheels: Path | None) -> None:
    """containers/.build/: the CA bundle pip trusts here (PIP_CERT or pip's `cert`) and torch wheels."""
    if BUILD_DIR.exists():
        shutil.rmtree(BUILD_DIR)
    (BUILD_DIR / "wheels").mkdir(parents=True)
    pip = _pip_config()
    cert = os.environ.get("PIP_CERT") or next(
        (pip.get(s, "cert") for s in pip.sections() if pip.has_option(s, "cert")), None)
    digests = {stage: code_digest(stage) for stage in STAGE_TARGETS}
    (BUILD_DIR / "code-digests.json").write_text(json.dumps(digests, indent=2))
    (BUILD_DIR / "ca.pem").write_bytes(Path(cert).read_bytes() if cert and Path(cert).is_file() else b"")
    if torch_wheels is None:  # pip's configured find-links (where this machine keeps its CPU torch wheel)
        for s in pip.sections():
            if pip.has_option(s, "find-links"):
                for link in pip.get(s, "find-links").split():
                    if list(Path(link).glob("torch-*.whl")):
                        torch_wheels = Path(link)
    if torch_wheels is not None:
        for wheel in Path(torch_wheels).glob("torch-*.whl"):
            shutil.copy2(wheel, BUILD_DIR / "wheels" / wheel.name)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(client, stage: str, tag: str, base_image: str) -> None:
    labels = {
        LABEL_STAGE: stage, LABEL_CODE: code_digest(stage),
        "org.opencontainers.image.title": tag.split(":")[0],
        "org.opencontainers.image.description": f"ufo-pipeline {stage} stage: python -m stages.{stage}",
        "org.opencontainers.image.version": version("ufo-pipeline"),
        "org.opencontainers.image.revision": git_commit(),
        "org.opencontainers.image.source": "ufo-pipeline",
    }
    t0 = time.time()
    for chunk in client.api.build(path=str(REPO_ROOT), dockerfile="containers/Dockerfile", target=stage, tag=tag,
                                  buildargs={"BASE_IMAGE": base_image}, labels=labels, rm=True, decode=True):
        if "stream" in chunk and chunk["stream"].strip():
            print(f"[{stage}] {chunk['stream'].rstrip()}", flush=True)
        if "error" in chunk:
            raise RuntimeError(f"building {tag} failed: {chunk['error'].strip()}")
    print(f"[{stage}] built {tag} in {time.time() - t0:.0f} s", flush=True)


# Dockerfile instructions that change only the image's metadata: they add no filesystem layer.
_METADATA_ONLY = re.compile(r"#\(nop\)\s+(LABEL|ENV|WORKDIR|USER|ENTRYPOINT|CMD|ARG|EXPOSE|SHELL|STOPSIGNAL|"
                            r"VOLUME|HEALTHCHECK|ONBUILD|MAINTAINER)\b")


def _layer_sizes(client, tag: str) -> dict[str, int]:
    """Bytes of each filesystem layer of an image, by layer digest (history lists them newest first)."""
    img = client.images.get(tag)
    sizes = [h["Size"] for h in client.api.history(tag) if not _METADATA_ONLY.search(h["CreatedBy"])]
    layers = img.attrs["RootFS"]["Layers"]
    return dict(zip(reversed(layers), sizes, strict=False))


def report_sizes(client, tags: list[str]) -> None:
    """Each image's size and how much of it is its own; then what all of them take on disk together."""
    layers = {tag: _layer_sizes(client, tag) for tag in tags}
    counts: dict[str, int] = {}
    for ls in layers.values():
        for digest in ls:
            counts[digest] = counts.get(digest, 0) + 1
    print(f"{'image':<28}{'size':>10}{'own':>10}")
    for tag, ls in layers.items():
        own = sum(size for digest, size in ls.items() if counts[digest] == 1)
        print(f"{tag:<28}{sum(ls.values()) / 1e6:>8.0f}MB{own / 1e6:>9.2f}MB")
    total = sum(size for ls in layers.values() for size in ls.values()) / 1e6
    shared = {d: s for ls in layers.values() for d, s in ls.items()}
    print(f"together on disk {sum(shared.values()) / 1e6:.0f} MB (the sum of their sizes would be {total:.0f} MB)")


def check_curate_has_no_torch(client, tag: str) -> None:
    out = client.containers.run(tag, entrypoint=["python", "-c",
                                                 "import importlib.util as u; print(u.find_spec('torch') is None)"],
                                remove=True).decode().strip()
    if out != "True":
        raise RuntimeError(f"{tag} contains torch; the curate image must not")
    print(f"{tag}: `import torch` fails, as it must (no torch in the curate image)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ufo images", description="Build the four stage images.")
    p.add_argument("--base-image", default=os.environ.get("BASE_IMAGE", DEFAULT_BASE),
                   help=f"base of every image (default {DEFAULT_BASE}, made locally with debootstrap); "
                        "a CUDA PyTorch image on GPU hosts")
    p.add_argument("--torch-wheels", type=Path, default=os.environ.get("TORCH_WHEELS") or None,
                   help="folder with a torch wheel to install (default: pip's find-links, if it has one)")
    p.add_argument("--prefix", default="ufo", help="images are PREFIX-<stage>:TAG (flow.image_prefix)")
    p.add_argument("--tag", default="latest", help="image tag (flow.image_tag)")
    p.add_argument("--stage", action="append", choices=STAGE_TARGETS, help="build only this stage (repeatable)")
    args = p.parse_args(argv)
    client = docker_client()
    if args.base_image == DEFAULT_BASE:
        ensure_debian_base(client)
    prepare_context(args.torch_wheels)
    tags = []
    for stage in args.stage or STAGE_TARGETS:
        tag = f"{args.prefix}-{stage}:{args.tag}"
        build(client, stage, tag, args.base_image)
        tags.append(tag)
    report_sizes(client, tags)
    if f"{args.prefix}-curate:{args.tag}" in tags:
        check_curate_has_no_torch(client, f"{args.prefix}-curate:{args.tag}")
    return 0
