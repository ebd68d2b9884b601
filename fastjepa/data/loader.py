"""The pretraining loader: equal batch counts on every rank, exactly-once epochs, deterministic, resumable.

Plan of an epoch (all ranks compute it alone, from (seed, epoch), no communication):
- the source's global order for the epoch (a permutation of samples, or of shards);
- `per_rank = (N // (world_size * B)) * B` samples per rank, rank r taking positions [r * per_rank, ...): every
  rank has exactly `len(loader)` batches, and the < world_size * B samples left over are the epoch's drop_last;
- inside a rank, DataLoader worker w takes a contiguous run of whole batches, the first `batches_per_rank % K`
  workers one batch more. The DataLoader visits workers round-robin, so after c batches worker w has produced
  ceil((c - w) / K) of them: that is what makes the position resumable.

Why not webdataset's split_by_node / split_by_worker / WebDataset pipeline: they split whole shards, so ranks get
different sample counts (an FSDP job hangs on the uneven tail) unless every shard has the same size and the
shard count divides by world_size * workers, and they have no position to resume from. The tar streaming
itself, url opening (pipe:, http, local) and brace expansion are webdataset's (sources.py), as is the shuffle
buffer (webdataset.filters.shuffle).

Each position yields one item; a broken one is counted per kind, logged with its shard and key, and skipped.
A worker that has not filled its batches at the end of its positions goes over them again (same order, new
augmentation draws) until it has: batch counts never change, and nothing is padded with a mismatched label.
`data.max_bad_fraction` is a share of the epoch: a rank stops (`BadDataError`, with the counts per kind) as soon
as its own bad samples exceed that share of the whole epoch, and the trainer checks the share over all ranks at the
end of the epoch; an epoch below the budget never stops.

Determinism: sample at raw position p of worker w gets its augmentation from Generator(seed, epoch, rank, w, p);
masks come from the collator's `sample(B, step, worker=0)` with step = epoch * len(loader) + batch index, so the
whole stream is a function of (seed, epoch, rank, num_workers) and is reproduced exactly after a resume.
"""

import itertools
import logging
import math
import time
from collections import Counter

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from fastjepa.data.sources import BAD_KINDS, BadSample

logger = logging.getLogger(__name__)

MAX_LOGGED_PER_KIND = 20  # per worker and epoch; the counts keep going


class BadDataError(RuntimeError):
    """More of an epoch's samples are unusable than data.max_bad_fraction allows."""

    def __init__(self, rank, epoch, bad: Counter, seen: int, fraction: float):
        kinds = ", ".join(f"{k}={bad[k]}" for k in BAD_KINDS if bad[k])
        super().__init__(
            f"rank {rank} epoch {epoch}: {sum(bad.values())} of {seen} samples read are bad ({kinds}), more "
            f"than data.max_bad_fraction={fraction} of the epoch allows. The warnings above name the shards/files "
            "and keys; fix or drop them, or raise data.max_bad_fraction to train on")


def rank_plan(num_samples, batch_size, world_size, num_workers):
    """-> (batches per rank, [batches per worker]) for one epoch."""
    per_rank_batches = num_samples // (world_size * batch_size)
    k = max(num_workers, 1)
    return per_rank_batches, [per_rank_batches // k + (w < per_rank_batches % k) for w in range(k)]


def produced_by(worker, consumed, num_workers):
    """Batches worker `worker` has delivered after the loader yielded `consumed` (round-robin order)."""
    return max(0, math.ceil((consumed - worker) / max(num_workers, 1)))


def classify_decode_error(data, exn):
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data) == 0:
        return "empty_file"
    if isinstance(exn, UnidentifiedImageError):
        return "not_image"
    return "corrupt_image"


class _EpochStream(IterableDataset):
    """Runs inside each DataLoader worker (or the main process when num_workers=0); yields (batch, report)."""

    def __init__(self, source, transform, collator, batch_size, seed, rank, world_size, num_workers,
                 shuffle_buffer):
        self.source = source
        self.transform = transform
        self.collator = collator
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_rank, self.worker_batches = rank_plan(source.num_samples, batch_size, world_size, num_workers)
        self.epoch = 0
        self.start_batch = 0  # batches already consumed this epoch (resume)
        self.start_positions = {}  # logical worker -> raw position to continue from

    def _positions(self, logical):
        """[lo, hi) of this worker in the epoch's global order."""
        b = self.batch_size
        lo = self.rank * self.batches_per_rank * b + sum(self.worker_batches[:logical]) * b
        return lo, lo + self.worker_batches[logical] * b

    def _raw_items(self, logical, start):
        """(position, item) from raw position `start` on, over endless passes of the worker's positions (each pass
        in the same order), so a worker short of good samples can go round again."""
        lo, hi = self._positions(logical)
        span = hi - lo
        for n in itertools.count(start // span):
            offset = start - n * span if start > n * span else 0
            if self.shuffle_buffer > 1:
                seed = int(np.random.SeedSequence([self.seed, self.epoch, self.rank, logical, 1]).generate_state(1)[0])
                stage = shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed)
                items = stage(iter(self.source.read(self.epoch, self.seed, lo, hi)))
                items = itertools.islice(items, offset, None)  # the buffer's order needs the skipped items read
            else:
                items = self.source.read(self.epoch, self.seed, lo + offset, hi)
            yield from zip(itertools.count(n * span + offset), items)

    def __iter__(self):
        info = get_worker_info()
        k = max(self.num_workers, 1)
        worker_id = 0 if info is None else info.id
        # after a resume at batch c the DataLoader starts its round-robin at worker 0: rotate the roles so worker 0
        # plays the worker that owes batch c, which keeps the order of the uninterrupted run
        logical = (worker_id + self.start_batch) % k
        done = produced_by(logical, self.start_batch, k)
        if done >= self.worker_batches[logical]:
            return
        lo, hi = self._positions(logical)
        span = hi - lo
        bad, logged, seen = Counter(), Counter(), 0
        images, labels = [], []
        good_in_pass = Counter()
        start = self.start_positions.get(logical, 0)
        for position, item in self._raw_items(logical, start):
            n = position // span
            if n >= 1 and position % span == 0 and position - span >= start and good_in_pass[n - 1] == 0:
                raise RuntimeError(f"rank {self.rank} worker {logical}: not one usable sample in its {span} "
                                   f"positions of epoch {self.epoch} (bad this batch: {dict(bad)}); check the data "
                                   f"(the warnings above name the shards/files and keys)")
            if isinstance(item, BadSample):
                result = item
            else:
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, logical, position])
                try:
                    result = self.transform(item.image, rng)
                except Exception as exn:  # whatever the bytes make PIL raise, it is one bad sample
                    result = BadSample(classify_decode_error(item.image, exn), item.origin, item.key, repr(exn))
            if n == 0:
                seen += 1  # later passes repeat positions already counted
            if isinstance(result, BadSample):
                if n == 0:
                    bad[result.kind] += 1
                    if logged[result.kind] < MAX_LOGGED_PER_KIND:
                        logged[result.kind] += 1
                        logger.warning("skipping bad sample (%s) shard/file=%s key=%s: %s", result.kind,
                                       result.origin, result.key, result.detail)
                continue
            good_in_pass[n] += 1
            images.append(result)
            labels.append(item.label)
            if len(images) == self.batch_size:
                batch_index = done * k + logical
                step = self.epoch * self.batches_per_rank + batch_index
                yield self._collate(images, labels, step), {
                    "worker": logical, "batch": batch_index, "position": position + 1, "seen": seen,
                    "bad": dict(bad)}
                images, labels = [], []
                bad.clear()
                seen = 0
                done += 1
                if done == self.worker_batches[logical]:
                    return

    def _collate(self, images, labels, step):
        # [B, C, H, W] with channels-last strides: no transpose on the worker's core; normalize_on_device makes it
        # contiguous on the device, where the transpose is nearly free
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        targets = torch.tensor(labels, dtype=torch.int64)
        return (batch, targets), self.collator.sample(len(images), step, worker=0)


class PretrainLoader:
    """Iterable over ((images uint8 [B, C, H, W], labels int64 [B]), Masks); see the module doc. The collator is a
    ``MultiBlockMaskCollator`` (anything with its ``sample``, ``state_dict`` and ``load_state_dict``);
    ``max_bad_fraction`` is ``data.max_bad_fraction``, a share in [0, 1] that the config checks."""

    def __init__(self, source, transform, collator, batch_size, *, shuffle_buffer: int, max_bad_fraction: float,
                 rank=0, world_size=1, num_workers=0, seed=0, pin_memory=False, prefetch_factor=2,
                 multiprocessing_context=None):
        if source.num_samples < world_size * batch_size:
            raise ValueError(f"the dataset has {source.num_samples} samples, fewer than world_size x batch_size = "
                             f"{world_size} x {batch_size}: no rank would get a full batch. Use more data or a "
                             f"smaller data.batch_size")
        self.source = source
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.max_bad_fraction = max_bad_fraction
        self.collator = collator
        self.stream = _EpochStream(source, transform, collator, batch_size, seed, rank, world_size, num_workers,
                                   shuffle_buffer)
        empty = [w for w, n in enumerate(self.stream.worker_batches) if n == 0]
        if empty:
            logger.warning("rank %d: %d batches per epoch for %d workers: workers %s stay idle; use fewer "
                           "data.num_workers", rank, self.stream.batches_per_rank, num_workers, empty)
        self._loader_kwargs = dict(batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                   multiprocessing_context=multiprocessing_context if num_workers else None,
                                   prefetch_factor=prefetch_factor if num_workers else None)
        self.epoch = 0
        self.consumed = 0
        self.positions = {}
        self.bad = Counter()
        self.seen = 0

    def __len__(self):
        return self.stream.batches_per_rank

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self.consumed, self.positions = int(epoch), 0, {}
            self.bad, self.seen = Counter(), 0

    def state_dict(self):
        return {"epoch": self.epoch, "batches": self.consumed, "positions": dict(self.positions),
                "bad": dict(self.bad), "seen": self.seen, "num_workers": self.num_workers,
                "world_size": self.world_size, "batch_size": self.batch_size, "collator": self.collator.state_dict()}

    def load_state_dict(self, state) -> bool:
        """Continue an epoch where ``state_dict()`` left it. Returns True when the position is exact (same world
        size, data.batch_size and data.num_workers); otherwise the loader continues at the same share of the epoch,
        approximately (this epoch may repeat or skip a few samples; the next epoch is exact) and returns False."""
        self.epoch = int(state["epoch"])
        exact = all(state[key] == getattr(self, key) for key in ("num_workers", "world_size", "batch_size"))
        if exact:
            self.consumed = int(state["batches"])
            self.positions = {int(w): int(p) for w, p in state["positions"].items()}
            self.bad, self.seen = Counter(state["bad"]), int(state["seen"])
        else:
            # the same number of samples of the epoch behind us, over the new plan of ranks and workers
            done = int(state["batches"]) * int(state["batch_size"]) * int(state["world_size"])
            self.consumed = min(done // (self.batch_size * self.world_size), len(self))
            k = max(self.num_workers, 1)
            self.positions = {w: produced_by(w, self.consumed, k) * self.batch_size for w in range(k)}
            self.bad, self.seen = Counter(), self.consumed * self.batch_size
        if exact and "collator" in state:
            self.collator.load_state_dict(state["collator"])
        return exact

    def __iter__(self):
        if self.consumed >= len(self):
            logger.warning("epoch %d was already fully consumed; call set_epoch(next epoch) before iterating",
                           self.epoch)
            return
        stream = self.stream
        stream.epoch, stream.start_batch, stream.start_positions = self.epoch, self.consumed, dict(self.positions)
        loader = DataLoader(stream, **self._loader_kwargs)
        t0 = time.perf_counter()
        for batch, report in loader:
            self.positions[report["worker"]] = report["position"]
            self.seen += report["seen"]
            self.bad.update(report["bad"])
            self.consumed += 1
            self.collator.load_state_dict({"step": self.epoch * len(self) + report["batch"]})
            self._check_bad()
            yield batch
        if self.bad:
            logger.info("rank %d epoch %d: %d bad samples of %d read (%s) in %.0f s", self.rank, self.epoch,
                        sum(self.bad.values()), self.seen, dict(self.bad), time.perf_counter() - t0)

    @property
    def epoch_samples(self) -> int:
        """Samples of one epoch over all ranks (what data.max_bad_fraction is a share of)."""
        return len(self) * self.batch_size * self.world_size

    def _check_bad(self):
        # Stop as soon as this rank's bad samples alone exceed the whole epoch's budget: the epoch's share is then
        # certain to be above data.max_bad_fraction (a budget of 0 stops at the first bad sample). The share over
        # all ranks is checked at the end of the epoch (fastjepa.trainer).
        n_bad = sum(self.bad.values())
        if n_bad > self.max_bad_fraction * self.epoch_samples:
            raise BadDataError(self.rank, self.epoch, self.bad, self.seen, self.max_bad_fraction)

    def bad_counts(self):
        return dict(self.bad)

