"""The offline install (tools/wheelhouse.py, `make install-offline`), on this machine's Python.

The end-to-end test plays both machines: the online one builds a wheelhouse for this Python and
platform from a `pip freeze` of this virtual environment (the "node image"), so only what the
image lacks is downloaded (the project's build backend, about 1 MB); the node is a fresh virtual
environment that sees this one's packages, where `make install-offline` runs with no index.
"""

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "wheelhouse.py"

_spec = importlib.util.spec_from_file_location("wheelhouse", TOOL)
wheelhouse = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wheelhouse)


def item(name: str, version: str, *requires: str) -> dict:
    """One entry of pip's `--report` install list, as `select` reads it."""
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


ENV = wheelhouse.target_env("3.12", "manylinux_2_28_x86_64")
ITEMS = [
    item("reasoning-gym", "0.1.25", "tabulate==0.9.0", "pyyaml>=6"),
    item("tabulate", "0.9.0"),
    item("pyyaml", "6.0.2"),
    item("transformers", "5.24.0", "pyyaml>=5.1"),
    item("trl", "1.16.0", "transformers>=4.56"),
]
ROOTS = [Requirement(r) for r in ("reasoning-gym==0.1.25", "trl==1.16.0")]


def test_skip_leaves_the_node_what_kept_packages_pin():
    """A skipped package that a kept one pins is the node's to provide, checked at its version;
    the project's own pin on a skipped package is not (SKIP means: use the node's copy)."""
    kept, dropped, needs = wheelhouse.select(ITEMS, ROOTS, {"tabulate", "transformers"}, {}, ENV)
    assert sorted(kept) == ["pyyaml", "reasoning-gym", "trl"]
    assert dropped == {"tabulate": "skipped", "transformers": "skipped"}
    assert {n: [(by, str(r)) for by, r in reqs] for n, reqs in needs.items()} == {
        "tabulate": [("reasoning-gym", "tabulate==0.9.0")],
        "transformers": [("trl", "transformers>=4.56")],
    }
    node = {"tabulate": Version("0.9.1"), "transformers": Version("5.17.0")}
    assert wheelhouse.unmet(needs, node) == ["tabulate 0.9.1 (reasoning-gym needs tabulate==0.9.0)"]
    assert wheelhouse.unmet(needs, {"tabulate": Version("0.9.0")}) == [
        "transformers missing (trl needs transformers>=4.56)"
    ]


def test_installed_drops_what_fits_and_keeps_the_node_to_it():
    installed = {"pyyaml": Version("6.0.1"), "tabulate": Version("0.8.10")}
    kept, dropped, needs = wheelhouse.select(ITEMS, ROOTS, set(), installed, ENV)
    assert "pyyaml" not in kept and "tabulate" in kept  # 0.8.10 misses reasoning-gym's pin
    assert dropped == {"pyyaml": "installed on the target (6.0.1)"}
    assert sorted(by for by, _ in needs["pyyaml"]) == ["reasoning-gym", "transformers"]
    assert wheelhouse.unmet(needs, installed) == []


def test_check_names_what_the_node_lacks_in_one_line(tmp_path):
    manifest = {
        "node_requirements": {
            "packaging": [["transformers", "packaging>=20"]],
            "tabulate": [["reasoning-gym", "tabulate==0.0.1"]],
            "no-such-package-here": [["mtrl", "no-such-package-here>=1"]],
        }
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--check", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    problems = lines[0].split("versions of them: ")[1].split(". Rebuild")[0]
    assert problems == (
        f"tabulate {version('tabulate')} (reasoning-gym needs tabulate==0.0.1); "
        "no-such-package-here missing (mtrl needs no-such-package-here>=1)"
    )
    assert "--installed freeze.txt" in lines[0]


def _manylinux_platform() -> str:
    """This interpreter's newest manylinux tag: the wheelhouse's target is this machine."""
    tags = [t.platform for t in sys_tags() if t.platform.startswith("manylinux_")]
    assert tags, "the offline-install test builds for a manylinux platform: run it on Linux"
    return tags[0]


def _node(path: Path) -> Path:
    """A fresh virtual environment that sees this one's packages: a node with its image.

    `venv --system-site-packages` from inside a virtual environment links the *base*
    interpreter's site-packages, not this environment's, so a .pth file adds those instead. Its
    plain path lines do not run the .pth files found there: this environment's editable
    install of mtrl stays invisible, so only the offline install can make `import mtrl` work.
    pip, too, comes from this environment (the node's pip).
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "node_image.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    return python


@pytest.mark.slow
def test_make_install_offline_with_no_index(tmp_path):
    freeze = tmp_path / "freeze.txt"  # `python -m pip freeze` on the node; --all as on 3.12+
    freeze.write_text(
        subprocess.run(
            [sys.executable, "-m", "pip", "freeze", "--all"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    wheels = tmp_path / "wheelhouse"
    # On the online machine (PyPI here). No extras and no reasoning-gym: deepspeed and
    # reasoning-gym's dependencies are built from source, which takes long; this venv has them.
    built = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--python-version",
            f"{sys.version_info.major}.{sys.version_info.minor}",
            "--platform",
            _manylinux_platform(),
            "--extras",
            "",
            "--without",
            "reasoning-gym",
            "--installed",
            str(freeze),
            "--out",
            str(wheels),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    carried = sorted(w.name for w in wheels.glob("*.whl"))
    assert any(w.startswith("setuptools-") for w in carried), carried
    size = sum(w.stat().st_size for w in wheels.glob("*.whl"))
    assert size < 5e6, f"{size / 1e6:.1f} MB: {carried}"  # only what the image lacks

    # The checkout, copied to the node: what `pip install .` builds and the Makefile.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("Makefile", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, checkout / name)
    for name in ("mtrl", "pbs", "tools"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    python = _node(tmp_path / "node")
    not_yet = subprocess.run([str(python), "-c", "import mtrl"], cwd=tmp_path, capture_output=True)
    assert not_yet.returncode, "mtrl is importable on the node before the install"

    # No index, no proxy that works, no pip configuration or PIP_* variable (find-links
    # included): the wheelhouse is the only source, and any download attempt fails.
    dead = "http://127.0.0.1:9"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
        "PIP_INDEX_URL": f"{dead}/simple",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "http_proxy": dead,
        "https_proxy": dead,
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
    }
    proc = subprocess.run(
        [
            "make",
            "-C",
            str(checkout),
            "install-offline",
            f"PYTHON={python}",
            f"WHEELHOUSE={wheels}",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mtrl installed offline" in proc.stdout
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import mtrl, sysconfig; print(mtrl.__file__, sysconfig.get_path('purelib'))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0].startswith(where[1]), where  # installed into the node, not found elsewhere
