"""Multi-GPU plumbing that CI can check without GPUs: the accelerate configs, the offline
wheelhouse resolution, and a 2-process (gloo) CPU run of the smoke experiment."""

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "launch" / "accelerate"
sys.path.insert(0, str(ROOT / "tools"))

import wheelhouse  # noqa: E402

EXPECTED = {  # file: (distributed type, processes, ZeRO stage, offload)
    "single_gpu.yaml": ("NO", 1, None, False),
    "ddp.yaml": ("MULTI_GPU", 8, None, False),
    "zero2.yaml": ("DEEPSPEED", 8, 2, False),
    "zero3.yaml": ("DEEPSPEED", 8, 3, False),
    "zero3_offload.yaml": ("DEEPSPEED", 8, 3, True),
}


def ds_settings(cfg) -> dict:
    """The DeepSpeed settings a config yields: its own keys, or its JSON file's."""
    ds = dict(cfg.deepspeed_config or {})
    if "deepspeed_config_file" in ds:
        data = json.loads((ROOT / ds["deepspeed_config_file"]).read_text())
        zero = data["zero_optimization"]
        return {
            "stage": zero["stage"],
            "offload": {
                zero.get("offload_optimizer", {}).get("device", "none"),
                zero.get("offload_param", {}).get("device", "none"),
            },
        }
    return {
        "stage": ds.get("zero_stage"),
        "offload": {
            ds.get("offload_optimizer_device", "none"),
            ds.get("offload_param_device", "none"),
        },
    }


def test_every_config_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_parses_with_sane_values(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / name))
    assert isinstance(cfg, ClusterConfig)
    kind, processes, stage, offload = EXPECTED[name]
    assert str(getattr(cfg.distributed_type, "value", cfg.distributed_type)) == kind
    assert cfg.num_processes == processes
    assert cfg.num_machines == 1 and cfg.machine_rank == 0
    assert not cfg.use_cpu
    if kind == "DEEPSPEED":
        ds = ds_settings(cfg)
        assert ds["stage"] == stage
        assert (ds["offload"] != {"none"}) == offload, ds
        if offload:
            assert ds["offload"] == {"cpu"}
        assert cfg.deepspeed_config.get("deepspeed_multinode_launcher") == "standard"
    else:
        assert not cfg.deepspeed_config
    if "deepspeed_config_file" not in (cfg.deepspeed_config or {}):
        assert (
            str(getattr(cfg.mixed_precision, "value", cfg.mixed_precision)) == "bf16"
        )  # else the DeepSpeed JSON decides ("auto")
    if processes > 1:
        assert cfg.main_process_port and cfg.rdzv_backend == "static"


@pytest.mark.parametrize("name", ["zero2.yaml", "zero3.yaml", "zero3_offload.yaml"])
def test_deepspeed_plugin_accepts_config(name):
    """accelerate's DeepSpeedPlugin builds the DeepSpeed config these files describe."""
    pytest.importorskip("deepspeed")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    keys = dict(load_config_from_file(str(CONFIGS / name)).deepspeed_config)
    keys.pop("deepspeed_multinode_launcher")
    if "deepspeed_config_file" in keys:
        keys["hf_ds_config"] = str(ROOT / keys.pop("deepspeed_config_file"))
    plugin = DeepSpeedPlugin(**keys)
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == EXPECTED[name][2]
    assert plugin.zero3_init_flag == (zero["stage"] == 3)
    if EXPECTED[name][3]:
        assert plugin.deepspeed_config["optimizer"]["type"] == "AdamW"  # CPU Adam under offload


def test_setup_installs_the_gpu_extras_deepspeed():
    """`make setup` builds DeepSpeed itself (source only); its pin must be the `gpu` extra's."""
    pin = re.search(r"^DEEPSPEED \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert pin in project["optional-dependencies"]["gpu"]


def test_platform_tags_cover_older_manylinux():
    tags = wheelhouse.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags


def item(name, version, *requires):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


def test_select_drops_skipped_and_their_exclusive_dependencies():
    items = [
        item("trl", "1.0", "transformers>=5", "datasets"),
        item("transformers", "5.0", "numpy", "tokenizers"),
        item("tokenizers", "0.2"),
        item("numpy", "2.0"),
        item("datasets", "5.0", "numpy>=1.17", "pyarrow", "extra-only; extra == 'dev'"),
        item("pyarrow", "20.0"),
        item("extra-only", "1.0"),
        item("linux-only", "1.0"),
        item("deepspeed", "0.1", "linux-only; sys_platform == 'win32'"),
    ]
    env = wheelhouse.target_env("3.12", "manylinux_2_28_x86_64")
    roots = [Requirement("trl"), Requirement("deepspeed")]
    kept, dropped = wheelhouse.select(items, roots, {"transformers"}, {}, env)
    # numpy stays: datasets needs it too; tokenizers is transformers' alone.
    assert set(kept) == {"trl", "datasets", "numpy", "pyarrow", "deepspeed"}
    assert dropped["transformers"] == "skipped"
    assert dropped["tokenizers"].startswith("needed only by")
    # An installed version that satisfies every requirement on it is not fetched.
    kept, dropped = wheelhouse.select(
        items, roots, {"transformers"}, {"pyarrow": wheelhouse.Version("21.0")}, env
    )
    assert "pyarrow" not in kept and dropped["pyarrow"].startswith("installed")
    # --skip-deps: the skipped packages' whole closure counts as present.
    skip = wheelhouse.closure(items, {"transformers"}, env)
    kept, _ = wheelhouse.select(items, roots, skip, {}, env)
    assert "numpy" not in kept and "datasets" in kept


@pytest.mark.slow
def test_wheelhouse_dry_run_resolves_for_target_and_honours_skip():
    """Needs PyPI (CI has it): resolves for CPython 3.12 manylinux_2_28, downloads nothing."""
    skip = ["torch", "triton", "transformers", "accelerate", "peft"]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "wheelhouse.py"),
            "--dry-run",
            "--python-version",
            "3.12",
            "--platform",
            "manylinux_2_28_x86_64",
            "--skip",
            " ".join(skip),
            "--without",
            "reasoning-gym",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("would fetch"))
    # "  name==version", or "  name-version-py3-none-any.whl (built here ...)"
    tokens = [line.split()[0] for line in lines[start + 1 :]]
    fetched = {wheelhouse.norm(t.split("==")[0] if "==" in t else t.split("-")[0]) for t in tokens}
    for name in ["trl", "omegaconf", "mlflow-skinny", "datasets", "math-verify", "deepspeed"]:
        assert name in fetched, (name, fetched)
    for name in skip + ["mlflow", "reasoning-gym", "matplotlib"]:
        assert name not in fetched
    assert not any(n.startswith("nvidia-") for n in fetched)  # torch's CUDA wheels: torch's alone
    dropped = "\n".join(lines[:start])
    assert "  torch: skipped" in dropped
    assert "nvidia-" in dropped and "needed only by skipped" in dropped
    assert "deepspeed-0.19.8-py3-none-any.whl (built here" in proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_run_of_the_smoke_experiment(tmp_path):
    """`accelerate launch --cpu` starts one process whatever --num_processes says; two gloo
    processes on CPUs take the multi-process launcher (the config sets `use_cpu` itself)."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(ROOT / "launch" / "train.py"), str(ROOT / "experiments" / "smoke.yaml"),
        f"train.output_dir={out}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    checkpoint = out / "checkpoint-2"
    # One RNG state per rank: both processes trained.
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (out / "model.safetensors").is_file()
    import sqlite3

    runs = sqlite3.connect(tmp_path / "mlflow.db").execute("select status from runs").fetchall()
    assert runs == [("FINISHED",)]  # one MLflow run, from the main process only
