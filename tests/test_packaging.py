"""fastjepa as users get it: a wheel installed in a fresh virtualenv and run from another folder (configs found by
name, the benchmark suite installed), an import and a training run without triton, and the declared torch range
holding the torch CI runs."""

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A fresh virtualenv holding only the built wheel; torch and the other dependencies come from this test's
    environment through a .pth file (no download)."""
    work = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(work / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (work / "dist").glob("fastjepa-*.whl")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--system-site-packages", str(work / "venv")], check=True, timeout=300)
    python = work / "venv" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    return wheel, work / "venv" / "bin", elsewhere


def run_in(bin_dir: Path, cwd: Path, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_configs_bench_and_licence(wheel_env):
    import zipfile

    names = zipfile.ZipFile(wheel_env[0]).namelist()
    assert "fastjepa/configs/in1k_vith14_ep300.yaml" in names and "fastjepa/configs/test_tiny.yaml" in names
    assert "fastjepa/bench/__main__.py" in names and "fastjepa/kernels/masked_gather.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names) and any(n.endswith("licenses/NOTICE") for n in names)
    assert not any("results/" in n for n in names)


def test_the_installed_commands_work_from_another_folder(wheel_env):
    _, bin_dir, cwd = wheel_env
    where = run_in(bin_dir, cwd, "python", "-c", "import fastjepa, fastjepa.kernels; print(fastjepa.__file__)")
    assert where.returncode == 0 and str(bin_dir.parent) in where.stdout, where.stdout + where.stderr
    version = run_in(bin_dir, cwd, "fastjepa", "--version")
    assert version.stdout.strip() == f"fastjepa {importlib.metadata.version('fastjepa')}"
    config = run_in(bin_dir, cwd, "fastjepa", "config", "in1k_vith14_ep300")
    assert config.returncode == 0 and "model_name: vit_huge" in config.stdout, config.stderr[-2000:]
    train = run_in(bin_dir, cwd, "fastjepa-train", "--config", "test_tiny", "meta.model_name=vit_micro",
                   "train.max_steps=2", f"logging.folder={cwd / 'run'}")
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert (cwd / "run" / "step_00000002").is_dir() and (cwd / "run" / "target_encoder_timm.safetensors").is_file()
    assert "Warning" not in train.stderr, train.stderr  # a normal single-process run is quiet
    bench = run_in(bin_dir, cwd, "fastjepa", "bench", "--suite", "kernels", "--quick", "--ops", "ema",
                   "--out", str(cwd / "bench"))
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-3000:]
    assert (cwd / "bench" / "kernels.md").is_file() and (cwd / "bench" / "kernels_ema.png").is_file()


def test_fastjepa_imports_and_trains_without_triton(tmp_path):
    code = f"""
import sys
sys.modules["triton"] = None  # as on a machine without triton: importing it raises ImportError
from fastjepa import config, train
from fastjepa.kernels import masked_gather
import fastjepa.models, fastjepa.modules
cfg = config.load("test_tiny", ["meta.model_name=vit_micro", "train.max_steps=2", "train.export=false",
                                "logging.folder={tmp_path}"])
print(sorted(train.run(cfg).losses))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[1, 2]"
    asked = subprocess.run([sys.executable, "-c", "import sys; sys.modules['triton'] = None\n"
                            "import torch\nfrom fastjepa.kernels.block_attention import block_attention\n"
                            "q = torch.randn(1, 6, 1, 8)\nblock_attention(q, q, q, 2, 2, backend='triton')"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert asked.returncode != 0 and "needs triton, which is not installed: install triton" in asked.stderr


def test_the_torch_ci_runs_is_within_the_declared_range():
    (spec,) = [req for req in map(Requirement, importlib.metadata.requires("fastjepa")) if req.name == "torch"]
    assert spec.specifier.contains(torch.__version__.split("+")[0]), (spec, torch.__version__)
