"""Gather the wheels an offline machine needs to install this project: `make wheelhouse`.

    python tools/wheelhouse.py --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --installed freeze.txt --out wheelhouse [--skip "torch transformers ..."] [--dry-run]

with freeze.txt from `python -m pip freeze > freeze.txt` on the offline machine; then there
(only that folder is read):

    make install-offline WHEELHOUSE=wheelhouse

which first runs `python tools/wheelhouse.py --check wheelhouse` there: the packages the folder
does not carry but needs from the node are checked against the node's installed versions.

How it works, in order:

1. The requirements are the project's runtime dependencies plus the requested extras
   (default: `gpu`), read from pyproject.toml. `--swap mlflow=mlflow-skinny` (the default)
   replaces a requirement by another at the same version: the full `mlflow` (server, UI, pandas,
   scikit-learn...) is only needed where an MLflow server runs, not on training nodes.
   `--add` (default: sqlalchemy and alembic at full mlflow's bounds) adds requirements: the
   skinny client has no SQL tracking store, which `tracking.uri: sqlite:///...` needs.
2. deepspeed ships no wheel, only a source distribution whose setup.py imports torch. It is
   built here once as a pure-Python wheel (`DS_BUILD_OPS=0 pip wheel --no-deps
   --no-build-isolation`, needs torch in *this* Python, any build, CPU is fine). Its ops are
   then compiled just in time on the target, so the wheel works for any target platform.
3. pip resolves the whole dependency closure *for the target*, not for this machine:
   `pip install --dry-run --ignore-installed --report` with `--python-version`, `--platform`
   (every manylinux tag up to the one given: pip matches tags exactly) and
   `--only-binary=:all:`, with the deepspeed wheel on `--find-links`.
4. Packages the target already has are dropped: each `--skip` name, and every dependency
   reached *only* through skipped packages (torch's nvidia-* wheels, for instance). A
   dependency that a kept package also needs stays, since the target's copy may be too old
   (pip picks the installed one when it fits). `--installed FILE` (a `pip freeze` of the
   target) drops more: any package whose installed version satisfies every requirement on it,
   and stops with a one-line error where a kept package needs a skipped one at a version the
   target does not have (reasoning-gym's `tabulate==0.9.0`, say). What the folder leaves to
   the node, and who needs it at which versions, goes to manifest.json for `--check`.
   The project's build backend (pyproject.toml's `build-system.requires`: setuptools) is
   always carried, whatever the target has: `pip install .` builds the project in an isolated
   environment, which sees only the folder, never the target's own setuptools.
5. The kept pins are downloaded with `pip download --no-deps` for the same target, and
   `requirements.txt` (the top-level requirements, less the skipped ones) and `manifest.json`
   are written next to them. At install time pip's resolver picks from the folder, so versions
   already installed on the target are kept when they satisfy the requirements.

`--without NAMES` leaves out project requirements that the target's runs never import, and
what only they need: `--without reasoning-gym` for nodes that train on math data only
(reasoning-gym brings matplotlib and pillow, about 33 MB).

`--dry-run` does steps 1-4 (the deepspeed wheel goes to a temporary folder) and prints what it
would download.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # `--check` runs on a node before anything is installed: pip's own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def norm(name: str) -> str:
    return canonicalize_name(name)


def platform_tags(platform: str) -> list[str]:
    """`manylinux_2_28_x86_64` -> every manylinux tag it accepts (pip matches tags exactly)."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        legacy = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
        m2 = re.fullmatch(r"(manylinux2014|manylinux2010|manylinux1)_(\w+)", platform)
        if not m2:
            return [platform]
        m = (None, legacy[m2.group(1)], m2.group(2))
        glibc, arch = m[1], m[2]
    else:
        glibc, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{n}_{arch}" for n in range(glibc, 4, -1)]
    for alias, n in (("manylinux2014", 17), ("manylinux2010", 12), ("manylinux1", 5)):
        if glibc >= n:
            tags.append(f"{alias}_{arch}")
    return tags


def target_env(python_version: str, platform: str) -> dict[str, str]:
    """The marker environment of the target, for evaluating `; python_version < ...` etc."""
    env = default_environment()
    major_minor = ".".join(python_version.split(".")[:2])
    env.update(
        python_version=major_minor,
        python_full_version=f"{major_minor}.0" if python_version.count(".") < 2 else python_version,
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    if "linux" in platform:
        arch = platform.rsplit("_", 1)[-1] if "x86_64" not in platform else "x86_64"
        env.update(sys_platform="linux", platform_system="Linux", os_name="posix")
        env["platform_machine"] = "x86_64" if "x86_64" in platform else arch
    return env


def build_requirements() -> list[Requirement]:
    """The project's build backend, which `pip install --no-index .` needs from the folder."""
    return [Requirement(s) for s in PYPROJECT["build-system"]["requires"]]


def project_requirements(extras: list[str], swaps: dict[str, str]) -> list[Requirement]:
    meta = PYPROJECT["project"]
    specs = list(meta["dependencies"])
    for extra in extras:
        specs += meta.get("optional-dependencies", {}).get(extra, [])
    reqs: dict[str, Requirement] = {}
    for spec in specs:
        req = Requirement(spec)
        if norm(req.name) in swaps:
            req = Requirement(str(req).replace(req.name, swaps[norm(req.name)], 1))
        reqs.setdefault(norm(req.name), req)
    return list(reqs.values())


class PipError(RuntimeError):
    def __init__(self, stderr: str):
        super().__init__(stderr)
        self.stderr = stderr


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    """Run pip quietly; its errors raise PipError (local index folders' warnings are dropped)."""
    cmd = [sys.executable, "-m", "pip", "-q", *args]
    shown = " ".join(a for a in cmd if not a.startswith("manylinux"))
    print("+", shown if len(shown) < 300 else shown[:300] + " ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
    stderr = "".join(
        line for line in proc.stderr.splitlines(True) if not line.startswith("WARNING: Location")
    )
    if proc.returncode:
        raise PipError(stderr)
    sys.stderr.write(stderr)


def build_deepspeed(req: Requirement, out: Path) -> Path:
    """deepspeed's pure-Python wheel from its sdist (ops compile just in time on the target)."""
    existing = [
        w
        for w in out.glob("deepspeed-*-py3-none-any.whl")
        if req.specifier.contains(w.name.split("-")[1], prereleases=True)
    ]
    if existing:
        return existing[0]
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(
            "error: building deepspeed's wheel runs its setup.py, which imports torch: install "
            "torch (the CPU build is enough) into this Python first"
        )
    env = {**os.environ, "DS_BUILD_OPS": "0", "DS_BUILD_STRING": ""}
    try:
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(req), env=env)
    except PipError as exc:
        sys.exit(f"error: deepspeed's wheel did not build:\n{exc.stderr}")
    built = sorted(out.glob("deepspeed-*-py3-none-any.whl"))
    if not built:
        sys.exit("error: deepspeed's build made no pure-Python (py3-none-any) wheel")
    return built[-1]


def resolve(reqs: list[str], args: argparse.Namespace, find_links: Path) -> list[dict]:
    """pip's resolution of `reqs` for the target: the report's `install` items.

    A dependency published only as a source distribution (reasoning-gym's cellpylib, say)
    stops a binary-only resolution: it is built here into a wheel (`pip wheel --no-deps`),
    accepted only if pure Python (py3-none-any), and the resolution is tried again.
    """
    built: set[str] = set()
    while True:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            try:
                pip(
                    "install",
                    "--dry-run",
                    "--ignore-installed",
                    "--report",
                    str(report),
                    "--find-links",
                    str(find_links),
                    *target_args(args),
                    *reqs,
                )
                return json.loads(report.read_text())["install"]
            except PipError as exc:
                m = re.search(r"No matching distribution found for (\S+)", exc.stderr)
                if not m or m.group(1) in built:
                    sys.exit(f"error: pip could not resolve for the target:\n{exc.stderr}")
                spec = m.group(1)
                built.add(spec)
                print(f"{spec}: no wheel for the target; building one from source", file=sys.stderr)
                build_wheel(spec, find_links, args)


def build_wheel(spec: str, out: Path, args: argparse.Namespace) -> None:
    """A wheel for the target from `spec`'s source distribution.

    Pure Python builds anywhere. A compiled one (pycosat, from reasoning-gym) is built with a
    Python of the target's version found here (`python3.12` on PATH, or --build-python), for
    this machine's architecture: its `linux_x86_64` wheel is linked against this machine's
    glibc, so the target's glibc must not be older (else install that package there by hand).
    """
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pip("wheel", "--no-deps", "--no-binary", ":all:", "-w", tmp, spec)
        except PipError as exc:
            sys.exit(f"error: {spec} has no wheel for the target and did not build:\n{exc.stderr}")
        wheel = next(Path(tmp).glob("*.whl"))
        if not re.search(r"-py[23.]*-none-any\.whl$", wheel.name):
            wheel.unlink()
            python = find_python(args)
            arch = args.platform.rsplit("_", 1)[-1] if "_" in args.platform else ""
            if (
                not python
                or not args.platform.startswith("manylinux")
                or arch not in os.uname().machine
            ):
                sys.exit(
                    f"error: {spec} has no wheel for the target and is not pure Python; "
                    f"a python{short(args.python_version)} on this {os.uname().machine} machine "
                    "could build it (--build-python), or skip it and install it on the target"
                )
            cmd = [python, "-m", "pip", "-q", "wheel", "--no-deps", "--no-binary", ":all:"]
            print("+", " ".join(cmd + ["-w", tmp, spec]), file=sys.stderr, flush=True)
            subprocess.run(cmd + ["-w", tmp, spec], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
        shutil.move(str(wheel), out / wheel.name)


def find_python(args: argparse.Namespace) -> str | None:
    """A working interpreter of the target's Python version on this machine, if any."""
    version = short(args.python_version)
    candidates = [args.build_python, shutil.which(f"python{version}")]
    candidates += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}*/bin/python"))
    for python in filter(None, candidates):
        probe = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return python
    return None


def short(python_version: str) -> str:
    return ".".join(python_version.split(".")[:2])


def target_args(args: argparse.Namespace) -> list[str]:
    out = ["--only-binary=:all:", "--implementation", "cp", "--python-version", args.python_version]
    tags = platform_tags(args.platform)
    if args.platform.startswith("manylinux"):  # wheels built here for this machine (build_wheel)
        tags.append("linux_" + args.platform.split("_", 3)[-1])
    for tag in tags:
        out += ["--platform", tag]
    return out


def read_installed(path: str | None) -> dict[str, Version]:
    if not path:
        return {}
    installed = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            try:
                installed[norm(name)] = Version(version.split()[0])
            except ValueError:
                continue
    return installed


def closure(items: list[dict], names: set[str], env: dict[str, str]) -> set[str]:
    """Every resolved package that `names` need, directly or not (`names` included)."""
    by_name = {norm(i["metadata"]["name"]): i for i in items}
    seen: set[str] = set()
    stack = [n for n in names if n in by_name]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for spec in by_name[name]["metadata"].get("requires_dist") or []:
            dep = Requirement(spec)
            if dep.marker is None or dep.marker.evaluate({**env, "extra": ""}):
                if norm(dep.name) in by_name:
                    stack.append(norm(dep.name))
    return seen


# What the folder leaves to the node: name -> [(who needs it, the requirement)]; "mtrl" is us.
NodeNeeds = dict[str, list[tuple[str, Requirement]]]


def select(
    items: list[dict],
    roots: list[Requirement],
    skip: set[str],
    installed: dict[str, Version],
    env: dict[str, str],
) -> tuple[dict[str, dict], dict[str, str], NodeNeeds]:
    """Kept resolved items by name, why each dropped one was dropped, and what the node must have.

    The node must have each skipped or installed package that a kept one requires, at a version
    that fits. The project's own pin on a skipped package is not among them: naming a package
    in SKIP means using the node's copy instead (transformers 5.17 where we pin 5.24, say).
    """
    by_name = {norm(i["metadata"]["name"]): i for i in items}
    provided: set[str] = set()
    while True:
        kept: dict[str, dict] = {}
        wanted: dict[str, list[tuple[str, Requirement]]] = {}
        seen: set[tuple[str, frozenset]] = set()
        stack: list[tuple[Requirement, str]] = [(r, "mtrl") for r in roots]
        while stack:
            req, by = stack.pop()
            name = norm(req.name)
            if name not in by_name:
                continue
            asks = wanted.setdefault(name, [])
            if all((b, r.specifier) != (by, req.specifier) for b, r in asks):  # not per marker
                asks.append((by, req))
            if name in skip or name in provided:
                continue
            key = (name, frozenset(req.extras))
            if key in seen:
                continue
            seen.add(key)
            kept[name] = by_name[name]
            for spec in by_name[name]["metadata"].get("requires_dist") or []:
                dep = Requirement(spec)
                if dep.marker is not None:
                    envs = [{**env, "extra": e} for e in (req.extras or {""})]
                    if not any(dep.marker.evaluate(e) for e in envs):
                        continue
                stack.append((dep, by_name[name]["metadata"]["name"]))
        newly = {
            n
            for n, reqs in wanted.items()
            if n in installed
            and n not in provided | skip
            and all(r.specifier.contains(installed[n], prereleases=True) for _, r in reqs)
        }
        if not newly:
            break
        provided |= newly
    dropped = {}
    for name in by_name:
        if name in kept:
            continue
        if name in skip:
            dropped[name] = "skipped"
        elif name in provided:
            dropped[name] = f"installed on the target ({installed[name]})"
        else:
            dropped[name] = "needed only by skipped or installed packages"
    needs = {
        name: [(by, r) for by, r in reqs if name in provided or by != "mtrl"]
        for name, reqs in sorted(wanted.items())
        if name not in kept
    }
    return kept, dropped, {n: r for n, r in needs.items() if r}


def unmet(needs: NodeNeeds, version_of: dict[str, Version | None]) -> list[str]:
    """Each package of `needs` that the node lacks or has at a version some requirer rejects."""
    problems = []
    for name, reqs in needs.items():
        have = version_of.get(name)
        bad = [(by, r) for by, r in reqs if have is None or not r.specifier.contains(have, True)]
        if bad:
            asks = ", ".join(f"{by} needs {r.name}{r.specifier or ''}" for by, r in bad)
            problems.append(f"{name} {have or 'missing'} ({asks})")
    return problems


def check_node(folder: Path) -> int:
    """`--check FOLDER`, run by `make install-offline` on the node before it installs anything."""
    from importlib.metadata import PackageNotFoundError, version

    manifest = folder / "manifest.json"
    if not manifest.is_file():
        sys.exit(f"error: {manifest} not found: is {folder} a folder made by `make wheelhouse`?")
    meta = json.loads(manifest.read_text())
    needs = {
        name: [(by, Requirement(spec)) for by, spec in reqs]
        for name, reqs in meta["node_requirements"].items()
    }
    have: dict[str, Version | None] = {}
    for name in needs:
        try:
            have[name] = Version(version(name))
        except PackageNotFoundError:
            have[name] = None
    problems = unmet(needs, have)
    if problems:
        sys.exit(
            f"error: {folder}/ does not carry these and {sys.executable} lacks or has other "
            f"versions of them: {'; '.join(problems)}. Rebuild the wheelhouse from this node's "
            "packages: `python -m pip freeze > freeze.txt` here, then on the online machine "
            'make wheelhouse ... WHEELHOUSE_ARGS="--installed freeze.txt"'
        )
    print(f"{folder}/: the {len(needs)} packages it leaves to this Python fit")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default="3.12", help="target Python, e.g. 3.12")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64", help="target platform tag")
    parser.add_argument("--out", default="wheelhouse", help="folder for the wheels")
    parser.add_argument(
        "--skip", default="", help="packages the target already has (space or comma separated)"
    )
    parser.add_argument("--extras", default="gpu", help="project extras to include (comma list)")
    parser.add_argument(
        "--swap",
        default="mlflow=mlflow-skinny",
        help="OLD=NEW replacements of requirements, comma separated ('' for none)",
    )
    parser.add_argument(
        "--add",
        # mlflow-skinny leaves out the SQL tracking store that tracking.uri defaults to
        # (sqlite:///mlflow.db); these are full mlflow 3.17.2's own bounds for it.
        default="sqlalchemy>=1.4.0,<3 alembic!=1.10.0,<2",
        help="requirements added to the project's (space separated; '' for none)",
    )
    parser.add_argument("--installed", help="a `pip freeze` of the target: drop what it satisfies")
    parser.add_argument(
        "--skip-deps",
        action="store_true",
        help="also count every dependency of the skipped packages as present on the target "
        "(true where they were installed by pip; a too-old one then fails the offline install)",
    )
    parser.add_argument(
        "--without",
        default="",
        help="project requirements the target's runs never import (reasoning-gym where no run "
        "uses its tasks): left out, with what only they need",
    )
    parser.add_argument(
        "--build-python", help="a Python of the target's version, for sdists that compile"
    )
    parser.add_argument("--dry-run", action="store_true", help="resolve and print, download none")
    parser.add_argument(
        "--check",
        metavar="FOLDER",
        help="on the node: check that this Python has what FOLDER leaves to it, then exit",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check_node(Path(args.check))
    if args.installed and not Path(args.installed).is_file():
        sys.exit(f"error: --installed {args.installed}: no such file")

    skip = {norm(s) for s in re.split(r"[\s,]+", args.skip) if s}
    without = {norm(s) for s in re.split(r"[\s,]+", args.without) if s}
    swaps = dict(
        (norm(a), b.strip()) for a, b in (s.split("=", 1) for s in args.swap.split(",") if s)
    )
    extras = [e for e in args.extras.split(",") if e]
    env = target_env(args.python_version, args.platform)
    reqs = project_requirements(extras, swaps) + [Requirement(a) for a in args.add.split()]
    roots = [
        r
        for r in reqs
        if norm(r.name) not in skip | without and (r.marker is None or r.marker.evaluate(env))
    ]
    build_roots = build_requirements()

    out = Path(args.out)
    # Wheels built here (deepspeed, sdist-only dependencies) are kept in a cache for the next run.
    tag = f"py{short(args.python_version)}-{args.platform}"
    build_dir = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mtrl-wheelhouse" / tag
    )
    build_dir.mkdir(parents=True, exist_ok=True)
    ds = [r for r in reqs if norm(r.name) == "deepspeed"]
    if ds and "deepspeed" not in skip:
        build_deepspeed(ds[0], build_dir)
    # Only what is kept is asked for: a skipped package is resolved (to find what only it
    # needs) when a kept one depends on it, at whatever version fits, never at its own pin,
    # which may not even fit this target (a CUDA torch pins its own triton). The build backend
    # is resolved together with the rest, so that one version serves both where a runtime
    # dependency needs setuptools too.
    items = resolve([str(r) for r in roots + build_roots], args, build_dir)
    installed = read_installed(args.installed)
    if args.skip_deps:  # what the skipped packages need is on the target too
        skip = skip | closure(items, skip, env)
    kept, dropped, needs = select(items, roots, skip, installed, env)
    # The build backend is carried whatever the target has: pip's isolated build sees only the
    # folder. Its own dependencies (none for setuptools today) come with it.
    for name in sorted(closure(items, {norm(r.name) for r in build_roots}, env)):
        kept[name] = next(i for i in items if norm(i["metadata"]["name"]) == name)
        dropped.pop(name, None)
        needs.pop(name, None)
    if args.installed:
        problems = unmet(needs, {n: installed.get(n) for n in needs})
        if problems:
            sys.exit(
                f"error: SKIP leaves packages to the target that {args.installed} shows it "
                f"lacks or has at other versions: {'; '.join(problems)}. Take them out of SKIP "
                "(--installed alone drops whatever the target has that fits)"
            )
    local = sorted(
        w
        for w in build_dir.glob("*.whl")
        if norm(w.name.split("-")[0]) in kept
        and Version(w.name.split("-")[1])
        == Version(kept[norm(w.name.split("-")[0])]["metadata"]["version"])
    )
    local_names = {norm(w.name.split("-")[0]) for w in local}
    pins = sorted(
        f"{i['metadata']['name']}=={i['metadata']['version']}"
        for n, i in kept.items()
        if n not in local_names
    )
    print(f"target: Python {args.python_version}, {args.platform}")
    print(f"skipped ({len(skip)}): {' '.join(sorted(skip)) or '-'}")
    print(f"without ({len(without)}): {' '.join(sorted(without)) or '-'}")
    print(f"dropped ({len(dropped)}):")
    for name, why in sorted(dropped.items()):
        print(f"  {name}: {why}")
    unchecked = {n: r for n, r in needs.items() if n not in installed}
    if unchecked:  # known only on the node: `make install-offline` checks them there first
        print(f"left to the target, checked there by `make install-offline` ({len(unchecked)}):")
        for name, reqs in unchecked.items():
            print(f"  {name}: " + ", ".join(f"{by} needs {r.specifier or 'any'}" for by, r in reqs))
    print(f"{'would fetch' if args.dry_run else 'fetching'} ({len(pins) + len(local)}):")
    for pin in pins:
        print(f"  {pin}")
    for wheel in local:
        print(f"  {wheel.name} (built here from its source distribution)")
    if args.dry_run:
        return 0

    out.mkdir(parents=True, exist_ok=True)
    for wheel in local:
        shutil.copy2(wheel, out / wheel.name)
    if pins:
        pip("download", "--no-deps", "-d", str(out), *target_args(args), *pins)
    (out / "requirements.txt").write_text(
        "# The project's requirements for this target, less those it already has.\n"
        + "".join(f"{r}\n" for r in roots)
    )
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "python_version": args.python_version,
                "platform": args.platform,
                "skip": sorted(skip),
                "without": sorted(without),
                "swaps": swaps,
                "extras": extras,
                "requirements": [str(r) for r in roots],
                "build_requirements": [str(r) for r in build_roots],
                "wheels": pins + [w.name for w in local],
                "dropped": dropped,
                "node_requirements": {
                    n: [[by, str(r)] for by, r in reqs] for n, reqs in needs.items()
                },
            },
            indent=2,
        )
        + "\n"
    )
    wheels = sorted(out.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels[:10]:
        print(f"  {w.stat().st_size / 1e6:8.2f} MB  {w.name}")
    print(f"{len(wheels)} wheels, {total / 1e6:.1f} MB ({total / 2**20:.1f} MiB) in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
