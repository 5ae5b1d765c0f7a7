"""Load or run scripts that are not package modules (bench/*.py, launch/*.py) in tests."""

import importlib.util
import os
import subprocess
import sys


def load_script(path, name: str, search=None):
    """A script that is not a package module (bench/*.py, launch/*.py) as a module named `name`;
    `search`: a folder on sys.path while it imports (for scripts that import their neighbours)."""
    if search is not None:
        sys.path.insert(0, str(search))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        if search is not None:
            sys.path.remove(str(search))
    return module


def run_interpreted(script, *args: str, cwd) -> subprocess.CompletedProcess:
    """``python script *args`` in `cwd` with Triton's interpreter on one thread (the benches'
    CPU runs); fails the test with the end of stderr unless it exits 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
