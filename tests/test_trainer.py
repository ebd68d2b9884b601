"""fastjepa.trainer (with resume.py and the checkpoint folder it drives), end to end through ``train.run``: a long
run is never lost or silently wrong: rollbacks start a new timeline, divergence never leaves a bad
checkpoint behind, damaged checkpoints are skipped, problems are found before the model is built, and two runs
never share a folder. Single-process cases here; world-size changes are in test_parallel.py."""

import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from test_train import KILL_AT, ROOT, TINY, cli, tiny_cfg

from fastjepa import checkpoint as ckpt
from fastjepa import train as fj_train
from fastjepa.checkpoint import CheckpointManager, RunLock, read_meta, verify
from fastjepa.ijepa import IJEPA, build_ijepa
from fastjepa.metrics import read_jsonl
from fastjepa.optim import build_optimizer
from fastjepa.spec import ModelSpec
from fastjepa.step import Stepper

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def steps_in(folder: Path) -> list[int]:
    return [ckpt.step_of(p) for p in CheckpointManager(folder).complete_checkpoints()]


# ---- 2. rolling back starts a new timeline ---------------------------------------------------------------------


def test_resuming_an_older_checkpoint_replaces_the_abandoned_timeline(tmp_path, caplog):
    fj_train.run(tiny_cfg(tmp_path, "train.max_steps=6", "train.checkpoint_steps=2", "train.keep_last=5"))
    assert steps_in(tmp_path) == [2, 4, 6]
    with caplog.at_level("WARNING", logger="fastjepa"):
        result = fj_train.run(tiny_cfg(tmp_path, "train.max_steps=5", "train.checkpoint_steps=1", "train.keep_last=5"),
                              resume=str(tmp_path / "step_00000002"))
    assert "abandoned timeline" in caplog.text and "step_00000004, step_00000006" in caplog.text
    (aside,) = tmp_path.glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000004", "step_00000006"]
    assert steps_in(tmp_path) == [2, 3, 4, 5]  # step 4 is the new timeline's, written again
    latest = CheckpointManager(tmp_path).latest()
    assert latest.name == "step_00000005" == (tmp_path / "latest").read_text()
    resumed = build_ijepa(ModelSpec.from_config(tiny_cfg(tmp_path)))
    CheckpointManager(tmp_path).load(latest, resumed, None)
    for name, p in result.model.encoder.state_dict().items():
        torch.testing.assert_close(resumed.encoder.state_dict()[name], p, rtol=0, atol=0, msg=name)


# ---- 3. divergence never leaves an unhealthy checkpoint ---------------------------------------------------------


def test_after_a_divergence_the_kept_checkpoint_is_healthy_and_metrics_stay_json(tmp_path, monkeypatch):
    """The weights blow up at step 3 (an update writes inf into them), every later loss is NaN: no checkpoint is
    written from step 3 on, pruning keeps the last healthy one, the message names it."""
    real_update, calls = IJEPA.update_target, {"n": 0}

    def exploding_update(self, momentum):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                next(self.encoder.parameters()).fill_(float("inf"))
        real_update(self, momentum)

    monkeypatch.setattr(IJEPA, "update_target", exploding_update)
    cfg = tiny_cfg(tmp_path, "train.max_steps=8", "train.checkpoint_steps=1", "train.keep_last=2",
                   "train.max_bad_steps=3")
    with pytest.raises(fj_train.TrainingDiverged, match="step_00000002") as info:
        fj_train.run(cfg)
    latest = CheckpointManager(tmp_path).latest()
    assert latest.name == "step_00000002" and str(latest) in str(info.value)
    assert steps_in(tmp_path) == [1, 2]  # nothing written after the blow-up, nothing healthy pruned
    assert math.isfinite(read_meta(latest)["loss"])
    model = build_ijepa(ModelSpec.from_config(cfg))
    CheckpointManager(tmp_path).load(latest, model, None)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda token: pytest.fail(f"bare {token} in metrics.jsonl"))
    assert any(r.get("loss") is None for r in read_jsonl(tmp_path / "metrics.jsonl"))


# ---- 4. another data.num_workers or batch size --------------------------------------------------------------------


def test_a_checkpoint_continues_with_other_data_workers_and_refuses_another_batch_size(tmp_path, caplog):
    fj_train.run(tiny_cfg(tmp_path, "train.max_steps=3", "data.num_workers=0"))  # mid-epoch (8 per epoch)
    with caplog.at_level("INFO", logger="fastjepa"):
        result = fj_train.run(tiny_cfg(tmp_path, "train.max_steps=5", "data.num_workers=1"))
    assert sorted(result.losses) == [4, 5]
    assert "the data position in this epoch and the RNG are approximate" in caplog.text
    run = cli("-m", "fastjepa.train", "--config", "configs/test_tiny.yaml", *TINY, "train.max_steps=6",
              "data.batch_size=4", f"logging.folder={tmp_path}")
    assert run.returncode == 2, run.stderr
    assert "data.batch_size=8, this run has data.batch_size=4: set data.batch_size=8" in run.stderr
    assert "training" not in run.stdout


def test_a_checkpoint_of_another_model_is_refused_before_the_model_is_built_naming_every_difference(tmp_path):
    fj_train.run(tiny_cfg(tmp_path, "train.max_steps=2"))
    run = cli("-m", "fastjepa.train", "--config", "configs/test_tiny.yaml", *TINY, "train.max_steps=4",
              "meta.model_name=vit_mini", "meta.pred_depth=2", f"logging.folder={tmp_path}")
    assert run.returncode == 2, run.stderr
    assert "holds another model: it was written with meta.model_name=vit_micro (this run: vit_mini), " \
           "meta.pred_depth=1 (this run: 2)" in run.stderr
    assert "Set meta.model_name=vit_micro meta.pred_depth=1 to continue it" in run.stderr
    assert "training" not in run.stdout and "Traceback" not in run.stderr


# ---- 5. the epoch's skipped samples reach the training log ---------------------------------------------------------


def test_the_epoch_summary_of_bad_samples_is_in_the_training_log(tmp_path, caplog):
    from test_data import flat_jpeg, write_shards

    samples = [{"jpg": flat_jpeg(40 + i), "cls": b"0"} for i in range(62)] + [{"jpg": b"", "cls": b"0"}] * 2
    pattern = write_shards(tmp_path / "shards", samples, 16)
    cfg = tiny_cfg(tmp_path / "run", "data.source=webdataset", f"data.shards={pattern}", "data.max_bad_fraction=0.05")
    with caplog.at_level("INFO", logger="fastjepa"):
        fj_train.run(cfg)
    assert "epoch 0: skipped 2 bad samples of 64 read ({'empty_file': 2})" in caplog.text
    (record,) = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "data"]
    assert record["bad"] == 2 and record["bad_kinds"] == {"empty_file": 2}


# ---- 6. damaged checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_checkpoints_template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("three")
    fj_train.run(tiny_cfg(folder, "train.max_steps=3", "train.checkpoint_steps=1", "train.keep_last=5"))
    return folder


@pytest.fixture
def three_checkpoints(three_checkpoints_template, tmp_path):
    shutil.copytree(three_checkpoints_template, tmp_path / "run")
    return tmp_path / "run"


DAMAGE = {
    "truncated shard": lambda p: next(p.glob("*.distcp")).write_bytes(next(p.glob("*.distcp")).read_bytes()[:100]),
    "deleted shard": lambda p: next(p.glob("*.distcp")).unlink(),
    "no .metadata": lambda p: (p / ".metadata").unlink(),
    "no rank0.pt": lambda p: (p / "rank0.pt").unlink(),
    "no meta.json": lambda p: (p / "meta.json").unlink(),
    "invalid meta.json": lambda p: (p / "meta.json").write_text("{not json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_and_never_breaks_saving(three_checkpoints, damage, caplog):
    folder = three_checkpoints
    DAMAGE[damage](folder / "step_00000003")
    manager = CheckpointManager(folder, keep_last=2)
    with caplog.at_level("WARNING", logger="fastjepa"):
        assert manager.latest().name == "step_00000002"
    assert "step_00000003" in caplog.text and verify(folder / "step_00000003") in caplog.text
    # training resumes from the previous complete one, saves step 3 again over the damaged directory, and prunes
    result = fj_train.run(tiny_cfg(folder, "train.max_steps=4", "train.checkpoint_steps=1", "train.keep_last=2"))
    assert sorted(result.losses) == [3, 4]
    assert steps_in(folder) == [3, 4] and verify(folder / "step_00000003") is None


def flip_bytes(file: Path, offset: int = 64) -> None:
    data = bytearray(file.read_bytes())
    for i in range(offset, min(offset + 16, len(data))):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))  # same size: only the content check can tell


SAME_SIZE_DAMAGE = {
    "bytes flipped in a shard": lambda p: flip_bytes(next(p.glob("*.distcp"))),
    "random bytes in rank0.pt": lambda p: (p / "rank0.pt").write_bytes(os.urandom((p / "rank0.pt").stat().st_size)),
    "bytes flipped in .metadata": lambda p: flip_bytes(p / ".metadata", 8),
    "meta.json is []": lambda p: (p / "meta.json").write_text("[]"),
    "meta.json files is a string": lambda p: (p / "meta.json").write_text('{"step": 3, "files": "x"}'),
}


@pytest.mark.parametrize("damage", list(SAME_SIZE_DAMAGE))
def test_same_size_damage_is_found_by_content_and_the_run_resumes_the_previous_checkpoint(three_checkpoints,
                                                                                          damage, caplog):
    folder = three_checkpoints
    SAME_SIZE_DAMAGE[damage](folder / "step_00000003")
    with caplog.at_level("WARNING", logger="fastjepa"):
        result = fj_train.run(tiny_cfg(folder, "train.max_steps=4", "train.checkpoint_steps=1",
                                       "train.keep_last=5"))
    assert sorted(result.losses) == [3, 4]  # resumed step 2, the newest checkpoint that verifies
    assert "step_00000003" in caplog.text and ("checksum" in caplog.text or "meta.json" in caplog.text)
    assert all(math.isfinite(v) for v in result.losses.values())


@pytest.mark.parametrize("file,content,error", [("rank0.pt", b"not a pickle" * 100, "UnpicklingError"),
                                                 ("__0_0.distcp", b"short", "CheckpointException")])
def test_a_checkpoint_that_verifies_but_does_not_load_falls_back_after_the_build(three_checkpoints, caplog, file,
                                                                                 content, error):
    """Its manifest matches its bytes (damaged before it was written, e.g. in memory): loading fails (torch.load,
    or DCP with its BaseException), the previous checkpoint is resumed with one warning naming the reason."""
    newest = three_checkpoints / "step_00000003"
    (newest / file).write_bytes(content)
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"][file] = {"bytes": len(content), "crc32": zlib.crc32(content)}
    (newest / "meta.json").write_text(json.dumps(meta))
    assert verify(newest, content=True) is None
    with caplog.at_level("WARNING", logger="fastjepa"):
        result = fj_train.run(tiny_cfg(three_checkpoints, "train.max_steps=4", "train.keep_last=5"))
    assert sorted(result.losses) == [3, 4]
    assert f"step_00000003 cannot be resumed ({error}" in caplog.text


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(tmp_path, caplog):
    folder = tmp_path / "run"
    fj_train.run(tiny_cfg(folder, "train.max_steps=2", "train.checkpoint_steps=1", "train.keep_last=5"))
    cfg = tiny_cfg(folder)
    model = build_ijepa(ModelSpec.from_config(cfg))
    CheckpointManager(folder).load(folder / "step_00000002", model, None)
    with torch.no_grad():
        next(model.predictor.parameters()).fill_(float("nan"))
    shutil.rmtree(folder / "step_00000002")
    CheckpointManager(folder).save(2, model, build_optimizer(model.encoder, model.predictor),
                                   torch.load(folder / "step_00000001" / "rank0.pt", weights_only=False),
                                   meta=read_meta(folder / "step_00000001"))
    with caplog.at_level("WARNING", logger="fastjepa"):
        result = fj_train.run(tiny_cfg(folder, "train.max_steps=3", "train.keep_last=5"))
    assert sorted(result.losses) == [2, 3] and "non-finite weights in predictor." in caplog.text


def test_a_folder_whose_every_checkpoint_is_damaged_stops_instead_of_starting_over(three_checkpoints):
    for step in (1, 2, 3):
        flip_bytes(next((three_checkpoints / f"step_0000000{step}").glob("*.distcp")))
    run = cli("-m", "fastjepa.train", "--config", "configs/test_tiny.yaml", *TINY, "train.max_steps=5",
              f"logging.folder={three_checkpoints}")
    assert run.returncode == 2 and "no usable checkpoint to resume" in run.stderr, run.stderr[-2000:]
    assert "training" not in run.stdout


def test_latest_can_only_name_a_checkpoint_of_its_own_folder(three_checkpoints, tmp_path_factory, caplog):
    other = tmp_path_factory.mktemp("other")
    shutil.copytree(three_checkpoints / "step_00000003", other / "step_00000009")  # complete: only the rule refuses
    (three_checkpoints / "latest").write_text(str(other / "step_00000009"))
    with caplog.at_level("WARNING", logger="fastjepa"):
        assert CheckpointManager(three_checkpoints).latest().name == "step_00000003"
    assert "which is not a checkpoint of this folder; ignored" in caplog.text


def test_resume_path_of_a_damaged_checkpoint_says_what_is_wrong(three_checkpoints):
    (three_checkpoints / "step_00000002" / "rank0.pt").unlink()
    with pytest.raises(fj_train.SetupError, match="step_00000002: rank0.pt is missing"):
        fj_train.run(tiny_cfg(three_checkpoints), resume=str(three_checkpoints / "step_00000002"))


# ---- 7. errors found before the model is built (exit 2), or at the save -------------------------------------------


def run_cli_errors(tmp_path, *overrides):
    run = cli("-m", "fastjepa.train", "--config", "configs/test_tiny.yaml", *TINY, *overrides, timeout=120)
    assert run.returncode == 2, run.stdout[-1500:] + run.stderr[-1500:]
    assert "Traceback" not in run.stderr and "training" not in run.stdout
    return run.stderr


def test_setup_problems_stop_before_the_model_is_built(tmp_path):
    err = run_cli_errors(tmp_path, "logging.folder=/sys/fastjepa_run")
    assert "logging.folder=/sys/fastjepa_run is not writable" in err
    err = run_cli_errors(tmp_path, "train.parallel=ddp", f"logging.folder={tmp_path}")
    assert "train.parallel=ddp needs several processes: launch with torchrun" in err
    if not torch.cuda.is_available():
        err = run_cli_errors(tmp_path, "train.device=cuda", f"logging.folder={tmp_path}")
        assert "train.device=cuda but no CUDA GPU is visible" in err
    err = run_cli_errors(tmp_path, "meta.model_name=vit_huge", "data.batch_size=128", "data.crop_size=224",
                         "mask.patch_size=14", "mask.min_keep=10", "data.synthetic_samples=256",
                         f"logging.folder={tmp_path / 'huge'}")
    assert "this run needs about" in err and "GiB per rank" in err and "lower data.batch_size" in err


def test_a_shard_missing_from_disk_is_named_before_training(tmp_path):
    from test_data import labelled_shards

    pattern = labelled_shards(tmp_path / "shards", 32, 8)
    (tmp_path / "shards" / "s-0002.tar").unlink()
    err = run_cli_errors(tmp_path, "data.source=webdataset", f"data.shards={pattern}",
                         f"logging.folder={tmp_path / 'run'}")
    assert "1 of the 4 shards in data.shards do not exist" in err and "s-0002.tar" in err


def file_size_limit(limit: int):
    """For a child process: the kernel refuses to grow any file past ``limit`` bytes (EFBIG: what a full disk or a
    quota looks like to the writer), with SIGXFSZ ignored so the write fails instead of killing the process."""

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


@pytest.mark.parametrize("limit,writer", [(8_000, "torch.save's zip writer (rank0.pt)"),
                                          (1_000_000, "DCP's file writer (the shards)")])
def test_a_full_disk_at_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, limit, writer):
    """A real write failure from the kernel, not a patched torch.save: every form torch raises it in (a RuntimeError
    from the zip writer, an OSError through DCP) is exit 2 with the message, the partial save removed."""
    first = cli("-m", "fastjepa.train", "--config", "configs/test_tiny.yaml", *TINY, "train.max_steps=1",
                f"logging.folder={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "fastjepa.train", "--config", "configs/test_tiny.yaml", *TINY,
                          "train.max_steps=3", "train.checkpoint_steps=1", f"logging.folder={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=240, preexec_fn=file_size_limit(limit))
    assert run.returncode == 2, (writer, run.stdout[-1500:], run.stderr[-3000:])
    assert "could not write checkpoint" in run.stderr and "step_00000002" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "the previous checkpoint" in run.stderr
    assert CheckpointManager(tmp_path).latest().name == "step_00000001"
    assert not list(tmp_path.glob(".tmp-*"))


def test_running_out_of_device_memory_ends_with_what_to_change_and_keeps_the_checkpoint(tmp_path, monkeypatch,
                                                                                        capsys):
    real_step, calls = Stepper.__call__, {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Stepper, "__call__", step)
    code = fj_train.main(["--config", "configs/test_tiny.yaml", *TINY, "train.max_steps=6",
                          "train.checkpoint_steps=1", f"logging.folder={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 5, err
    assert "step 3 ran out of device memory on cpu" in err and "Tried to allocate 2.00 GiB" in err
    assert "set train.activation_checkpointing=true" in err and "lower data.batch_size (now 8 per rank)" in err
    assert "The last checkpoint is kept:" in err and "step_00000002" in err and "Traceback" not in err
    assert CheckpointManager(tmp_path).latest().name == "step_00000002"


def test_a_second_signal_stops_a_step_that_does_not_end(tmp_path):
    hang = KILL_AT.replace("os.kill(os.getpid(), signal.{sig})", "import time; time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", hang, "--config", "configs/test_tiny.yaml", *TINY,
                             "train.max_steps=6", f"logging.folder={tmp_path}"], cwd=ROOT,
                            env={**os.environ, "KILL_AT_CALL": "2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    time.sleep(1.0)  # inside step 2's endless forward
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None  # the first signal waits for the end of the step
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == -signal.SIGTERM


# ---- 8. one run per folder -------------------------------------------------------------------------------------


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()  # this process is alive: a live run holds the folder
    try:
        err = run_cli_errors(tmp_path, f"logging.folder={tmp_path}")
        assert f"logging.folder={tmp_path} is in use by another run (host" in err and f"pid {os.getpid()}" in err
    finally:
        lock.release()


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "started": "x"}))
    with caplog.at_level("WARNING", logger="fastjepa"):
        fj_train.run(tiny_cfg(tmp_path, "train.max_steps=1"))
    assert "taking over the stale lock" in caplog.text and "no longer exists" in caplog.text
    assert not (tmp_path / ".lock").exists()  # released at the end


def _contend(folder, barrier, holders):
    lock = RunLock(folder, heartbeat_s=3600)
    barrier.wait()
    try:
        lock.acquire()
    except Exception:  # noqa: BLE001 -- refused: the folder is held
        return
    holders.put(os.getpid())
    time.sleep(0.2)  # hold it while the others look
    lock.release()


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_three_processes_racing_for_the_lock_give_exactly_one_holder(tmp_path, stale):
    """30 trials each, free folder and stale lock (a dead pid): the lock used to be visible empty between its
    creation and its content, and two racers could both take over a stale one."""
    ctx = multiprocessing.get_context("fork")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for trial in range(30):
        folder = tmp_path / str(trial)
        folder.mkdir()
        if stale:
            (folder / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))
        barrier, holders = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(folder, barrier, holders)) for _ in range(3)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(30)
        got = []
        while not holders.empty():
            got.append(holders.get())
        assert len(got) == 1, (trial, got)


def test_the_lock_heartbeat_beats_during_a_run_without_checkpoints(tmp_path, monkeypatch):
    beats = []
    real_refresh = RunLock.refresh

    def refresh(self):
        beats.append(threading.current_thread().name)
        real_refresh(self)

    monkeypatch.setattr(RunLock, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(RunLock, "refresh", refresh)
    fj_train.run(tiny_cfg(tmp_path, "train.max_steps=4", "train.checkpoint_steps=0"))
    assert beats.count("fastjepa-lock-heartbeat") >= 2, beats
    assert not (tmp_path / ".lock").exists()


# ---- asynchronous checkpoints ------------------------------------------------------------------------------------

HANG_ASYNC_SAVE = textwrap.dedent("""
    import sys, time
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from fastjepa.train import main
    real = FileSystemWriter.write_data
    def write_data(self, plan, planner):
        if "step_00000004" in str(self.path):
            time.sleep(600)  # the background writer of step 4 never finishes: the process is killed meanwhile
        return real(self, plan, planner)
    FileSystemWriter.write_data = write_data
    sys.exit(main(sys.argv[1:]))
""")


def test_a_kill_during_an_asynchronous_save_resumes_exactly_from_the_previous_checkpoint(tmp_path):
    """Training goes on while step 4's save is written in the background; killed then, the run resumes from
    step 2 (step 4 never became a checkpoint) and reproduces the uninterrupted losses."""
    overrides = [*TINY, "train.max_steps=6", "train.checkpoint_steps=2", "train.async_checkpoint=true"]
    reference = fj_train.run(tiny_cfg(tmp_path / "ref", *overrides[len(TINY):])).losses
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HANG_ASYNC_SAVE, "--config", "configs/test_tiny.yaml", *overrides,
                             f"logging.folder={folder}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not any(r["step"] == 5 for r in (read_jsonl(folder / "metrics.jsonl")
                                           if (folder / "metrics.jsonl").exists() else [])):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    assert (folder / ".tmp-step_00000004").is_dir()  # step 5 ran while step 4 was being written
    proc.kill()
    proc.wait()
    assert CheckpointManager(folder).latest().name == "step_00000002"
    resumed = fj_train.run(tiny_cfg(folder, *overrides[len(TINY):]))
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    for step, loss in resumed.losses.items():
        assert abs(loss - reference[step]) <= 1e-6, (step, loss, reference[step])
    assert CheckpointManager(folder).latest().name == "step_00000006"
