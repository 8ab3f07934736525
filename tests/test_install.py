"""The package as a regular install (issue 11, item 7): `pip wheel .` (C++ extension only), the
wheel installed into a temporary directory, then used from a fresh interpreter that cannot see the
source tree or the editable install of the development environment.

The wheel is built from a copy of the source tree (less what .gitignore names), so the build
leaves no build/ or *.egg-info behind in the checkout.
"""

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "nonlocal_kernels"

# Runs under `python -S`: no site module, so no .pth file runs (in particular not the editable
# install's, which puts a finder for the source tree on sys.meta_path) and sys.path is PYTHONPATH:
# the wheel's install directory first, then the directories torch, numpy and triton are in.
CHILD = r"""
import importlib, importlib.util, json, os, pkgutil, sys

site = os.path.realpath(sys.argv[1])
assert "__editable__" not in repr(sys.meta_path), sys.meta_path

import nonlocal_kernels as nk
from nonlocal_kernels.testing import assert_all_ok, compare_with_oracle, make_inputs

cpu = {b["name"]: b for b in nk.available_backends()}["cpu"]
assert cpu["available"], f"backend cpu unavailable: {cpu['reason']}"
assert_all_ok(compare_with_oracle(*make_inputs(2, 37, 19, 8, 5), backend="cpu"))

# Every module of the package, imported; modules that need triton may fail only without triton.
modules = {}
for info in pkgutil.walk_packages(nk.__path__, "nonlocal_kernels."):
    try:
        modules[info.name] = importlib.import_module(info.name).__file__
    except ModuleNotFoundError as exc:
        if exc.name != "triton" or importlib.util.find_spec("triton") is not None:
            raise
        modules[info.name] = None
modules["nonlocal_kernels"] = nk.__file__
print(json.dumps({"site": site, "modules": modules,
                  "editable": [m for m in sys.modules if "__editable__" in m]}))
"""


def _gitignore_filter(root: Path):
    """shutil.copytree's ignore= for .git and the patterns in root/.gitignore (a pattern with a
    slash is matched against the path from root, any other against the name)."""
    patterns = [".git"]
    for line in (root / ".gitignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            patterns.append(line.rstrip("/"))

    def ignore(directory, names):
        rel = Path(directory).relative_to(root)
        return {n for n in names for p in patterns
                if fnmatch.fnmatch((rel / n).as_posix() if "/" in p else n, p)}

    return ignore


def _run(what, cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, (f"{what} exited {out.returncode}\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


def _source_modules(src: Path) -> set:
    pkg = src / PACKAGE
    names = set()
    for f in pkg.rglob("*.py"):
        parts = f.relative_to(src).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.slow
def test_wheel_installs_and_imports_outside_the_source_tree(tmp_path):
    if importlib.util.find_spec("pip") is None:
        pytest.skip(f"pip is not installed for {sys.executable}")

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_gitignore_filter(ROOT))
    wheels, site, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "run"
    cwd.mkdir()
    # C++ extension only; this interpreter's bin/ first on PATH (ninja), as in an active venv.
    env = dict(os.environ, NONLOCAL_KERNELS_CUDA="0", NONLOCAL_KERNELS_EMU="0",
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip"]
    _run("pip wheel", pip + ["wheel", ".", "--no-build-isolation", "--no-deps", "-w", str(wheels)],
         cwd=src, env=env)

    (wheel,) = wheels.glob(f"{PACKAGE}-*.whl")
    _run("pip install", pip + ["install", "--no-deps", "--no-index", "--target", str(site),
                               str(wheel)], cwd=cwd, env=env)

    deps = []
    for name in ("torch", "numpy", "triton"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            deps.append(str(Path(spec.origin).parent.parent))
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + list(dict.fromkeys(deps)))
    out = _run("the check of the installed package", [sys.executable, "-S", "-c", CHILD, str(site)],
               cwd=cwd, env=env)
    report = json.loads(out.stdout.strip().splitlines()[-1])

    assert not report["editable"], report["editable"]
    expected = _source_modules(src) | {f"{PACKAGE}._C"}
    assert set(report["modules"]) == expected, (
        f"modules in the installed package differ from the source tree: "
        f"missing {sorted(expected - set(report['modules']))}, "
        f"extra {sorted(set(report['modules']) - expected)}")
    site_prefix = os.path.join(report["site"], PACKAGE) + os.sep
    outside = {m: f for m, f in report["modules"].items()
               if f is not None and not os.path.realpath(f).startswith(site_prefix)}
    assert not outside, f"imported from outside the wheel's install ({site}): {outside}"
    installed = {n for n in os.listdir(site) if not n.endswith(".dist-info")}
    assert installed == {PACKAGE}, f"the wheel installs more than {PACKAGE}: {sorted(installed)}"


OLD_SETUPTOOLS = r"""
import json, os, sys, sysconfig, tempfile
import setuptools
import setuptools.build_meta as meta

out = {"setuptools": setuptools.__version__, "file": setuptools.__file__}
for hook in ("prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable"):
    d = tempfile.mkdtemp()
    info = getattr(meta, hook)(d)
    out[hook] = open(os.path.join(d, info, "METADATA")).read()
print(json.dumps(out))
"""


def test_metadata_is_valid_for_the_setuptools_a_fresh_venv_brings(tmp_path):
    # pip install --no-build-isolation -e . on the GPU image uses whatever setuptools is there
    # (unknown, no network). Python 3.11's venv brings setuptools 65.5, which rejected the SPDX
    # string form of project.license (setuptools >= 77) before a single file compiled. Here:
    # such a venv, torch reachable through a .pth after its own site-packages (its setuptools
    # first), and both PEP 517 metadata hooks on a copy of the tree. (scripts/compat_check.sh
    # builds the editable install and a wheel in such a venv, offline.)
    venv = tmp_path / "venv"
    _run("python -m venv", [sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    own = _run("site-packages", [str(py), "-c", "import sysconfig; "
                                 "print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    if not list(Path(own).glob("setuptools-*")):
        pytest.skip(f"the venv of {sys.executable} brings no setuptools (Python >= 3.12)")
    torch_site = Path(importlib.util.find_spec("torch").origin).parent.parent
    (Path(own) / "zz_torch.pth").write_text(f"{torch_site}\n")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_gitignore_filter(ROOT))
    env = dict(os.environ, NONLOCAL_KERNELS_CUDA="0", NONLOCAL_KERNELS_EMU="0")
    env.pop("PYTHONPATH", None)
    report = json.loads(_run("the metadata hooks", [str(py), "-c", OLD_SETUPTOOLS], cwd=src,
                             env=env).stdout.strip().splitlines()[-1])
    assert report["file"].startswith(own), report["file"]
    assert int(report["setuptools"].split(".")[0]) < 77, report["setuptools"]
    for hook in ("prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable"):
        assert re.search(r"^Name: nonlocal[-_]kernels$", report[hook], re.M), report[hook]
        assert "License: BSD-3-Clause" in report[hook], report[hook]
