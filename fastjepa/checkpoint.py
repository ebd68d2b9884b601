"""Sharded, atomic, verified training checkpoints (torch.distributed.checkpoint) and the run folder's lock.

A run folder holds ``step_00000120/``-style checkpoint directories and a ``latest`` file naming the newest save of
the current timeline. A save writes everything into ``.tmp-step_.../`` first (DCP shards of model + optimizer, one
``rank{r}.pt`` per rank with that rank's RNG and data position, ``meta.json`` last with a manifest of every file
and its size), renames it into place and only then rewrites ``latest``: a crash at any point leaves the previous
checkpoint as the latest. A checkpoint is verified against its manifest before use; a damaged one is skipped with
a warning naming what is wrong, and never breaks saving or pruning. Resuming from an older step starts a new
timeline: the newer checkpoints of the abandoned one are moved aside (``abandoned-<time>/``), so they can never
be resumed by mistake. Works with and without an initialised process group, and with plain, DDP- or
FSDP2-wrapped models (DCP reshards on load).
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import random
import re
import shutil
import socket
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger("fastjepa")

LATEST = "latest"
_PREFIX = "step_"
_NAME = re.compile(rf"{_PREFIX}\d{{8}}")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (a full disk, a read-only folder) or used (damaged, wrong config)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns at every save and load that torch.distributed is not initialised: in a single process that is
    the expected case, not news."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class ModelAndOptimizer(Stateful):
    """DCP view of the trained module and its optimizer (DDP/FSDP2/compile wrappers resolved by DCP's helpers)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"])
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(Path(path).name[len(_PREFIX):])


def read_meta(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def verify(path: str | os.PathLike, content: bool = False) -> str | None:
    """None when checkpoint ``path`` is complete (every file of its manifest there, at its size; with ``content``
    also matching its CRC32, which finds same-size damage at the cost of reading every byte), else what is wrong
    with it, in words."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        return f"{path.name}: no meta.json (a save that did not finish, or a damaged checkpoint)"
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return f"{path.name}: meta.json is unreadable ({e})"
    if not isinstance(meta, dict) or not isinstance(meta.get("files") or {}, dict):
        return f"{path.name}: meta.json holds no checkpoint record (damaged)"
    # Checkpoints written before manifests existed: their DCP metadata and rank 0's state at least.
    files = meta.get("files") or {".metadata": None, "rank0.pt": None}
    expected = {}
    for name, entry in files.items():
        size, crc = (entry.get("bytes"), entry.get("crc32")) if isinstance(entry, dict) else (entry, None)
        file = path / name
        if not file.is_file():
            return f"{path.name}: {name} is missing"
        if size is not None and file.stat().st_size != size:
            return f"{path.name}: {name} has {file.stat().st_size} bytes, the manifest says {size} (truncated?)"
        if content and crc is not None:
            expected[file] = crc
    for (file, crc), got in zip(expected.items(), _crc32s(list(expected)), strict=True):
        if got != crc:
            return f"{path.name}: {file.name} does not match its checksum (damaged on disk or in transit)"
    return None


def _crc32(file: Path) -> int:
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _crc32s(files: list[Path]) -> list[int]:
    """CRC32 of each file, several at a time (zlib releases the GIL)."""
    if len(files) <= 1:
        return [_crc32(f) for f in files]
    with ThreadPoolExecutor(min(8, len(files))) as pool:
        return list(pool.map(_crc32, files))


def _manifest(folder: Path) -> dict[str, dict]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "crc32": crc}
            for p, crc in zip(files, _crc32s(files), strict=True)}


# What a full disk, a quota, a file-size limit or a read-only folder look like to the writers: an OSError (the
# file system writer, DCP wrapping it in a CheckpointException that carries only its text), or torch.save's zip
# writer failing a short write ("unexpected pos", "failed writing file").
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)
_DISK_TEXTS = {f"[Errno {code}]": code for code in _DISK_ERRNOS} | {
    "No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT, "File too large": errno.EFBIG,
    "unexpected pos": errno.ENOSPC, "PytorchStreamWriter failed writing file": errno.ENOSPC}


def _is_disk_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` if it is a write failure a user can fix (space, quota, size limit, permissions),
    whatever form the writer raised it in."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    code = next((code for marker, code in _DISK_TEXTS.items() if marker in text), None)
    if code is None:
        return None
    return OSError(code, f"{os.strerror(code)}" + ("" if "Errno" in text or "No space" in text else
                                                   ": the writer could not write a file (disk full, quota or "
                                                   "file size limit)"))


class CheckpointManager:
    """Periodic, atomic, keep-last-N checkpoints in ``folder`` (every rank calls every method)."""

    def __init__(self, folder: str | os.PathLike, keep_last: int = 3):
        if keep_last < 0:
            raise ValueError(f"train.keep_last must be >= 0 (0 keeps all), got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last
        self._pending = None  # (future, commit arguments) of the asynchronous save in flight
        self._group = None
        # the resumed checkpoint of an older step numbering: kept, and ``latest``, until the new timeline's first
        # checkpoint is complete (moving it aside at resume lost the run to a crash before that save)
        self._superseded: Path | None = None

    def remove_partial_saves(self) -> None:
        """Delete ``.tmp-*`` directories left by a save that crashed (rank 0; call before training)."""
        if _rank() == 0 and self.folder.is_dir():
            for tmp in self.folder.glob(f"{_TMP_PREFIX}{_PREFIX}*"):
                shutil.rmtree(tmp, ignore_errors=True)
        _barrier()

    def checkpoints(self) -> list[Path]:
        """Every ``step_XXXXXXXX`` directory, complete or not, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)), key=step_of)

    def complete_checkpoints(self) -> list[Path]:
        """The checkpoints that pass ``verify``, oldest first."""
        return [p for p in self.checkpoints() if verify(p) is None]

    def latest(self) -> Path | None:
        """The newest usable checkpoint: the one ``latest`` names if it verifies, else the newest that does (a
        warning names what is wrong with each newer one). ``latest`` only ever names a directory of this folder."""
        pointer = self.folder / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            if _NAME.fullmatch(name):
                problem = verify(self.folder / name)
                if problem is None:
                    return self.folder / name
                logger.warning(f"checkpoint {self.folder / name} is not usable: {problem}; falling back to the "
                               "previous complete checkpoint")
            else:
                logger.warning(f"{pointer} holds {name[:200]!r}, which is not a checkpoint of this folder; ignored")
        for path in reversed(self.checkpoints()):
            problem = verify(path)
            if problem is None:
                return path
            logger.warning(f"skipping damaged checkpoint: {problem}")
        return None

    def verified(self, path: Path, fall_back: bool = True) -> Path:
        """``path`` if its content verifies (rank 0 reads every byte, every rank learns the verdict); else, with
        ``fall_back``, the newest older checkpoint of this folder that does, after one warning line per rejected
        checkpoint naming the file and the reason. Raises ``CheckpointError`` when none does: a run that has
        checkpoints never restarts from step 0 on its own."""
        tried = []
        while path is not None:
            problem = agreed(verify(path, content=True) if _rank() == 0 else None)
            if problem is None:
                return path
            tried.append(problem)
            if not fall_back:
                break
            path = self.previous(path)
            logger.warning(f"checkpoint {tried[-1]}: not usable; " + (f"falling back to {path}" if path else
                                                                        "no older checkpoint to fall back to"))
        raise CheckpointError(f"no usable checkpoint to resume ({'; '.join(tried)}): restore a copy of the run "
                              f"folder, pass --resume with a good checkpoint, or start over in a new logging.folder")

    def previous(self, path: Path) -> Path | None:
        """The newest complete checkpoint of this folder from a step before ``path``'s."""
        older = [p for p in self.complete_checkpoints() if step_of(p) < step_of(path)]
        return older[-1] if older else None

    def start_timeline(self, step: int, keep: Path | None = None) -> list[Path]:
        """Before training continues from ``step`` (-1: from scratch), move every checkpoint of this folder from a
        later step (or from the same step) aside into ``abandoned-<time>/``, except ``keep``, the one resumed, and
        point ``latest`` at ``keep`` when it is in this folder: the saves of the new timeline then replace the
        abandoned ones, and an auto-resume can never pick those again. A ``keep`` from a later step (a resume that
        renumbered the steps) stays until the new timeline's first checkpoint is complete, so that a crash before
        that save resumes it again instead of starting over. Returns the moved paths."""
        moved = []
        _barrier()  # every rank has finished reading the checkpoint it resumed (which may be one moved here)
        keep = None if keep is None else Path(keep).resolve()
        if keep is not None and step_of(keep) > step and keep.parent == self.folder.resolve():
            self._superseded = keep
        if _rank() == 0 and self.folder.is_dir():
            stale = [p for p in self.checkpoints() if step_of(p) >= step and p.resolve() != keep]
            if stale:
                moved = self._abandon(stale, f"continuing from step {step}")
            if keep is not None and keep.parent == self.folder.resolve():
                _write_atomic(self.folder / LATEST, keep.name)
        _barrier()
        return moved

    def _abandon(self, paths: list[Path], why: str) -> list[Path]:
        """Rank 0: move checkpoints of an abandoned timeline into ``abandoned-<time>/``; returns their new paths."""
        aside = self.folder / time.strftime("abandoned-%Y%m%d-%H%M%S")
        aside.mkdir(exist_ok=True)
        for path in paths:
            os.replace(path, aside / path.name)
        logger.warning(f"{why}: moved the checkpoints of the abandoned timeline aside to {aside}: "
                       f"{', '.join(p.name for p in paths)}")
        return [aside / p.name for p in paths]

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, rank_state: dict,
             meta: dict | None = None, permanent: bool = False, asynchronous: bool = False) -> Path:
        """Write checkpoint ``step``; returns its directory. ``rank_state`` is this rank's picklable extra state;
        a ``permanent`` checkpoint is never pruned (the others: the newest ``keep_last`` are kept). A full disk or
        an unwritable folder raises ``CheckpointError`` naming the folder; the previous checkpoint stays.

        ``asynchronous``: the state is staged to CPU memory and written by DCP's background thread while training
        goes on; the save becomes ``latest`` only once fully written, when ``poll`` (or ``wait``) sees it finished.
        At most one save is in flight: a new one waits for the previous one first."""
        self.wait()
        final = self.folder / step_dir_name(step)
        if verify(final) is None and final.resolve() != self._superseded:
            # this step is already saved in this timeline (e.g. a preemption signal right after a periodic save)
            if _rank() == 0:
                _write_atomic(self.folder / LATEST, final.name)
            _barrier()
            return final
        tmp = self.folder / f"{_TMP_PREFIX}{final.name}"
        state = {"train": ModelAndOptimizer(model, optimizer)}
        commit = (tmp, final, step, meta, permanent)
        with self._writing(final, tmp):
            if _rank() == 0:
                self.folder.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            _barrier()
            torch.save(rank_state, tmp / f"rank{_rank()}.pt")
            with _quiet_single_process():
                if asynchronous:
                    future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group())
                    self._pending = (future, commit)
                    return final
                dcp.save(state, checkpoint_id=str(tmp))
            _barrier()
            self._commit(*commit)
            _barrier()
        self._superseded = None
        return final

    def poll(self) -> Path | None:
        """Commit the in-flight asynchronous save if its writing has finished; returns it then."""
        if self._pending is None or not self._pending[0].done():
            return None
        return self.wait()

    def wait(self) -> Path | None:
        """Wait for the in-flight asynchronous save (if any) and commit it; returns its directory."""
        if self._pending is None:
            return None
        future, commit = self._pending
        self._pending = None
        with self._writing(commit[1], commit[0]):
            future.result()
            if _rank() == 0:  # every rank's shards are written once rank 0's save (which gathers them) returns
                self._commit(*commit)
        self._superseded = None
        return commit[1]

    @contextlib.contextmanager
    def _writing(self, final: Path, tmp: Path):
        """A full disk or an unwritable folder as a ``CheckpointError`` naming them; the partial save removed
        whatever failed."""
        try:
            yield
        except (Exception, dcp.CheckpointException) as e:  # DCP's is a BaseException: it carries the writers' errors
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            disk = _is_disk_error(e)
            if disk is None:
                raise
            raise CheckpointError(
                f"could not write checkpoint {final} ({disk.strerror or disk}): free space on {self.folder} or set "
                f"logging.folder to a writable disk with room, then restart; the previous checkpoint "
                f"{self.latest() or '(none)'} is kept") from e

    def _async_group(self):
        """Background saves talk over a gloo group of their own, never the training's communicator."""
        if not _distributed():
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _commit(self, tmp: Path, final: Path, step: int, meta: dict | None, permanent: bool) -> None:
        """Rank 0: the manifest, then the rename into place, then ``latest``, then pruning."""
        if _rank() != 0:
            return
        world = dist.get_world_size() if _distributed() else 1
        meta = {"step": step, "world_size": world, "time": time.time(), "permanent": permanent, **(meta or {}),
                "files": _manifest(tmp)}
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
        if self._superseded is not None and self._superseded.exists():  # the new timeline has its first checkpoint
            self._abandon([self._superseded], f"checkpoint {final.name} of the new step numbering is complete")
        if final.exists():  # a damaged directory of this step (it failed verify): out of the way
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(self.folder / LATEST, final.name)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        """Delete the oldest rolling checkpoints beyond ``keep_last``; never ``keep`` (the newest save), never a
        permanent one; damaged directories are left alone (a warning named them)."""
        if self.keep_last == 0:
            return
        rolling = [p for p in self.complete_checkpoints() if not read_meta(p).get("permanent", False)]
        for old in rolling[: max(0, len(rolling) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Load model (+ optimizer) in place from checkpoint ``path``; returns this rank's extra state.

        A checkpoint written by a different number of ranks loads too (DCP reshards); a rank with no state file
        of its own takes rank 0's (its data position and RNG are then approximate, which the caller reports).
        """
        path = Path(path)
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"{path} cannot be loaded: {problem}")
        with _quiet_single_process():
            dcp.load({"train": ModelAndOptimizer(model, optimizer)}, checkpoint_id=str(path))
        own = path / f"rank{_rank()}.pt"
        state = torch.load(own if own.is_file() else path / "rank0.pt", map_location="cpu", weights_only=False)
        state["exact"] = own.is_file() and read_meta(path).get("world_size", 1) == (
            dist.get_world_size() if _distributed() else 1)
        return state


class RunLock:
    """One run per folder: ``folder/.lock`` holds the owner's host, pid and start time, and its modification time
    is the owner's heartbeat, refreshed every ``heartbeat_s`` by a thread of its own (whatever the checkpoint
    cadence). A second run refuses to start; a lock whose owner is gone (a dead pid on this host, or no heartbeat
    for ``stale_after_s`` from another host) is taken over with a warning.

    The lock is created with its content in one step (a hard link from a complete temporary file): a reader never
    sees it empty. Checking and taking over happen under an ``flock`` on the folder itself, so processes on one
    host never both judge a lock stale and both take it."""

    HEARTBEAT_S = 60.0

    def __init__(self, folder: str | os.PathLike, stale_after_s: float = 900.0, heartbeat_s: float | None = None):
        self.path = Path(folder) / ".lock"
        self.stale_after_s = stale_after_s
        self.heartbeat_s = self.HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.held = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with self._guard():
            for _ in range(3):
                if self._create(me):
                    self.held = True
                    self._start_heartbeat()
                    return
                owner, why_stale = self._stale()
                if why_stale is None:
                    raise CheckpointError(
                        f"logging.folder={self.path.parent} is in use by another run ({owner}); two runs in one "
                        "folder would overwrite each other's checkpoints. Wait for it to finish, stop it, or use "
                        f"another logging.folder (if that run is dead, delete {self.path})")
                logger.warning(f"taking over the stale lock {self.path} ({owner}): {why_stale}")
                self.path.unlink(missing_ok=True)
        raise CheckpointError(f"could not take the lock {self.path}: another run keeps taking it")

    @contextlib.contextmanager
    def _guard(self):
        """An exclusive ``flock`` on the run folder itself for the check-and-take: one process of this host at a
        time, and no file of its own left in the folder."""
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _create(self, owner: dict) -> bool:
        """Create the lock holding ``owner``, atomically; False if it exists."""
        tmp = self.path.with_name(f".lock.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(owner, f)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _stale(self) -> tuple[str, str | None]:
        try:
            owner = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return "unreadable lock", "the lock file is unreadable"
        if not isinstance(owner, dict):
            return "unreadable lock", f"the lock file holds {type(owner).__name__}, not its owner"
        who = f"host {owner.get('host')}, pid {owner.get('pid')}, started {owner.get('started')}"
        if owner.get("host") == socket.gethostname():
            try:
                os.kill(int(owner.get("pid", -1)), 0)
            except ProcessLookupError:
                return who, "that process no longer exists"
            except (PermissionError, ValueError, OverflowError, TypeError):  # another user's live process, no pid
                return who, None
            return who, None
        return who, (f"no heartbeat for {age:.0f} s" if age > self.stale_after_s else None)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="fastjepa-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except OSError as e:  # a full or unreachable disk: the run itself will say more
                logger.warning(f"could not refresh the lock {self.path}: {e}")

    def refresh(self) -> None:
        if self.held:
            os.utime(self.path)

    def release(self) -> None:
        if self.held:
            self._stop.set()
            if self._beat is not None:
                self._beat.join()
            self.path.unlink(missing_ok=True)
            self.held = False


def load_model_weights(path: str | os.PathLike, model: nn.Module, prefix: str = "") -> None:
    """Load the weights under ``prefix`` (e.g. ``"target_encoder."``) of a checkpoint into an unwrapped module,
    in a single process (used by evaluation and export)."""
    path = Path(path)
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"{path} cannot be loaded: {problem}")
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    with _quiet_single_process():
        dcp.load({"train": {"model": state}}, checkpoint_id=str(path),
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items()})


def full_model_state(model: nn.Module) -> dict:
    """Unsharded CPU state dict of a (possibly FSDP2-sharded) module; a collective: every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def agreed(problem: str | None) -> str | None:
    """Every rank's verdict combined (the first problem any rank found), so that all ranks act alike."""
    if not _distributed():
        return problem
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, problem)
    return next((v for v in verdicts if v is not None), None)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
