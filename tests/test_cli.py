"""Every subcommand as solid as ``fastjepa train``: a user mistake ends with one line naming the problem and the
fix, exit 2, no traceback, before any expensive work; ``fastjepa`` alone lists the commands."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastjepa.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]


def fastjepa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastjepa", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(run: subprocess.CompletedProcess, *needles: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stdout[-1000:], run.stderr[-2000:])
    assert "Traceback" not in run.stderr + run.stdout, run.stderr[-2000:]
    for needle in needles:
        assert needle in run.stderr, (needle, run.stderr[-2000:])


def test_fastjepa_alone_lists_the_commands():
    run = fastjepa()
    assert run.returncode == 2
    for command in ("train", "demo", "probe", "config", "make-shards", "bench"):
        assert f"  {command} " in run.stderr, run.stderr


def test_make_shards_names_a_missing_or_empty_source(tmp_path):
    assert_one_line_error(fastjepa("make-shards", str(tmp_path / "nope"), str(tmp_path / "out")),
                          f"fastjepa make-shards: SRC {tmp_path / 'nope'}: not found")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(fastjepa("make-shards", str(tmp_path / "empty"), str(tmp_path / "out")),
                          "has no class sub-directories: an ImageFolder is")
    assert_one_line_error(fastjepa("make-shards", str(tmp_path / "empty"), str(tmp_path / "out"), "--shard-size",
                                   "0"), "--shard-size 0: must be at least 1")
    assert not (tmp_path / "out").exists()  # refused: nothing left behind


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    from fastjepa import config
    from fastjepa.ijepa import build_ijepa

    folder = tmp_path_factory.mktemp("probe")
    cfg = config.load(ROOT / "configs/test_tiny.yaml", ["meta.model_name=vit_micro", f"logging.folder={folder}"])
    cfg.dump(folder / "config.yaml")
    torch.save(build_ijepa(ModelSpec.from_config(cfg)).target_encoder.state_dict(), folder / "target_encoder.pt")
    return folder / "target_encoder.pt"


@pytest.mark.parametrize("extra,needle", [
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible here"),
    (["--batch-size", "-1"], "--batch-size -1: must be at least 1"),
    (["--knn-k", "0"], "--knn-k 0: must be at least 1"),
    (["--knn-temperature", "0"], "--knn-temperature 0.0: must be positive"),
    (["--data", "imagefolder", "--train", "/nope/train", "--val", "/nope/val"], "--train /nope/train: no such folder"),
], ids=["device", "batch", "knn-k", "temperature", "train-folder"])
def test_probe_refuses_bad_flags_before_any_work(encoder_file, extra, needle):
    args = ["probe", "--checkpoint", str(encoder_file), "--data", "mnist", *extra]
    if torch.cuda.is_available() and extra[0] == "--device":
        pytest.skip("a GPU is visible")
    assert_one_line_error(fastjepa(*args), needle)


def test_probe_says_not_found_for_a_missing_checkpoint(tmp_path):
    assert_one_line_error(fastjepa("probe", "--checkpoint", str(tmp_path / "nope"), "--data", "mnist"),
                          f"--checkpoint {tmp_path / 'nope'}: not found")


def test_train_messages_carry_the_command_s_name():
    run = fastjepa("train", "--config", "test_tiny", "optimization.lrr=0.1")
    assert_one_line_error(run, "fastjepa train: config error:")


@pytest.mark.parametrize("reason,overrides", [
    ("data", ["data.source=imagefolder", "data.root_path=/nope"]),
    ("memory", ["data.batch_size=100000", "data.source=synthetic"]),
])
def test_a_refused_run_leaves_no_folder_behind(tmp_path, reason, overrides):
    folder = tmp_path / "new" / "run"
    run = fastjepa("train", "--config", "test_tiny", "train.device=cpu", *overrides, f"logging.folder={folder}")
    assert_one_line_error(run, "fastjepa train:")
    assert not (tmp_path / "new").exists(), list((tmp_path / "new").rglob("*"))
    # a folder that was there before the refused run stays, with what it held
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    run = fastjepa("train", "--config", "test_tiny", "train.device=cpu", *overrides,
                   f"logging.folder={tmp_path / 'kept'}")
    assert run.returncode == 2 and sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]


BLOCKED = "import sys; sys.modules['triton'] = None; sys.modules['matplotlib'] = None; import runpy; "


@pytest.mark.slow
def test_the_bench_runs_without_triton_and_matplotlib(tmp_path):
    """A plain install: the Triton providers are skipped with one line, the charts with one hint; every result
    file is still written."""
    kernels = subprocess.run([sys.executable, "-c", BLOCKED + "sys.argv = ['fastjepa bench', '--suite', 'kernels', "
                              f"'--quick', '--ops', 'masked_gather,ema', '--out', {str(tmp_path / 'k')!r}]; "
                              "runpy.run_module('bench', run_name='__main__')"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert kernels.returncode == 0 and "Traceback" not in kernels.stderr, kernels.stderr[-3000:]
    assert kernels.stderr.count("triton providers skipped: triton is not installed") == 1, kernels.stderr
    assert kernels.stderr.count("charts skipped: matplotlib is not installed") == 1, kernels.stderr
    with (tmp_path / "k" / "kernels.csv").open() as f:
        providers = {(r["op"], r["provider"]) for r in csv.DictReader(f)}
    assert ("masked_gather", "reference") in providers and ("ema", "foreach_lerp") in providers
    assert not any(provider == "triton" for _, provider in providers)
    assert (tmp_path / "k" / "kernels.md").is_file() and not list((tmp_path / "k").glob("*.png"))
    step = subprocess.run([sys.executable, "-c", BLOCKED + "sys.argv = ['bench_step', '--quick', '--compile', "
                           f"'eager', '--providers', 'official', '--out', {str(tmp_path / 's')!r}]; "
                           "runpy.run_module('bench.bench_step', run_name='__main__')"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert step.returncode == 0 and "Traceback" not in step.stderr, step.stderr[-3000:]
    assert "charts skipped" in step.stderr and (tmp_path / "s" / "train_step.md").is_file()
