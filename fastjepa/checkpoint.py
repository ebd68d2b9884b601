"""Sharded, atomic training checkpoints (torch.distributed.checkpoint).

A run folder holds ``step_00000120/``-style checkpoint directories and a ``latest`` file naming the newest
complete one. A save writes everything into ``.tmp-step_.../`` first (DCP shards of model + optimizer, one
``rank{r}.pt`` per rank with that rank's RNG and data position, ``meta.json`` last), renames it into place and only
then rewrites ``latest``; a crash at any point leaves the previous checkpoint as the latest. Works with and without
an initialised process group, and with plain, DDP- or FSDP2-wrapped models (DCP reshards on load).
"""

import json
import os
import random
import shutil
import time
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

LATEST = "latest"
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


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


class CheckpointManager:
    """Periodic, atomic, keep-last-N checkpoints in ``folder`` (every rank calls every method)."""

    def __init__(self, folder: str | os.PathLike, keep_last: int = 3):
        if keep_last < 0:
            raise ValueError(f"train.keep_last must be >= 0 (0 keeps all), got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last

    def remove_partial_saves(self) -> None:
        """Delete ``.tmp-*`` directories left by a save that crashed (rank 0; call before training)."""
        if _rank() == 0 and self.folder.is_dir():
            for tmp in self.folder.glob(f"{_TMP_PREFIX}{_PREFIX}*"):
                shutil.rmtree(tmp, ignore_errors=True)
        _barrier()

    def complete_checkpoints(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.glob(f"{_PREFIX}*") if (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the one ``latest`` names, else the highest complete step directory."""
        pointer = self.folder / LATEST
        if pointer.is_file():
            target = self.folder / pointer.read_text().strip()
            if (target / "meta.json").is_file():
                return target
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, rank_state: dict,
             meta: dict | None = None, permanent: bool = False) -> Path:
        """Write checkpoint ``step``; returns its directory. ``rank_state`` is this rank's picklable extra state;
        a ``permanent`` checkpoint is never pruned (the others: the newest ``keep_last`` are kept)."""
        final = self.folder / step_dir_name(step)
        if (final / "meta.json").is_file():
            return final  # this step is already saved (e.g. a preemption signal right after a periodic save)
        tmp = self.folder / f"{_TMP_PREFIX}{final.name}"
        t0 = time.perf_counter()
        if _rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        dcp.save({"train": ModelAndOptimizer(model, optimizer)}, checkpoint_id=str(tmp))
        torch.save(rank_state, tmp / f"rank{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            world = dist.get_world_size() if _distributed() else 1
            meta = {"step": step, "world_size": world, "time": time.time(), "permanent": permanent, **(meta or {})}
            _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
            os.replace(tmp, final)
            _write_atomic(self.folder / LATEST, final.name)
            self._prune(keep=final)
        _barrier()
        self.last_save_seconds = time.perf_counter() - t0
        return final

    def _prune(self, keep: Path) -> None:
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
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{path} is not a complete fastjepa checkpoint (no meta.json)")
        dcp.load({"train": ModelAndOptimizer(model, optimizer)}, checkpoint_id=str(path))
        own = path / f"rank{_rank()}.pt"
        state = torch.load(own if own.is_file() else path / "rank0.pt", map_location="cpu", weights_only=False)
        state["exact"] = own.is_file()
        return state


def read_meta(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def load_model_weights(path: str | os.PathLike, model: nn.Module, prefix: str = "") -> None:
    """Load the weights under ``prefix`` (e.g. ``"target_encoder."``) of a checkpoint into an unwrapped module,
    in a single process (used by evaluation and export)."""
    path = Path(path)
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    dcp.load({"train": {"model": state}}, checkpoint_id=str(path),
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items()})


def full_model_state(model: nn.Module) -> dict:
    """Unsharded CPU state dict of a (possibly FSDP2-sharded) module; a collective: every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
