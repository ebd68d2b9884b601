"""Labelled images for evaluation, read like the training data (the same sources and JPEG decoding) and cut to the
evaluation view (``fastjepa.data.transforms.EvalTransform``): every sample once, in batches of uint8 images,
decoded in DataLoader workers; unreadable samples are skipped and counted, never given another sample's label."""

from collections import Counter

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fastjepa.data.loader import classify_decode_error
from fastjepa.data.sources import BadSample, ImageFolderSource, ShardSource
from fastjepa.data.transforms import EvalTransform


def eval_source(kind: str, location: str, index: str | None = None):
    """An ImageFolder tree (``root/<class>/<image>``) or WebDataset shards (a brace pattern, with their index)."""
    if kind == "imagefolder":
        return ImageFolderSource(location)
    if kind == "webdataset":
        return ShardSource(location, index)
    raise ValueError(f"unknown evaluation source {kind!r}: imagefolder or webdataset")


class _EvalStream(IterableDataset):
    def __init__(self, source, transform: EvalTransform, batch_size: int):
        self.source, self.transform, self.batch_size = source, transform, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        n = self.source.num_samples
        lo, hi = n * worker // workers, n * (worker + 1) // workers
        images, labels, bad = [], [], Counter()
        for item in self.source.read(0, 0, lo, hi):
            if isinstance(item, BadSample):
                bad[item.kind] += 1
                continue
            try:
                images.append(self.transform(item.image))
            except Exception as exn:  # whatever the bytes make the decoder raise, it is one bad sample
                bad[classify_decode_error(item.image, exn)] += 1
                continue
            labels.append(item.label)
            if len(images) == self.batch_size:
                yield _batch(images, labels), dict(bad)
                images, labels, bad = [], [], Counter()
        if images or bad:
            yield (_batch(images, labels) if images else None), dict(bad)


def _batch(images, labels):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64)


def eval_batches(source, transform: EvalTransform, batch_size: int = 256, num_workers: int = 4, skipped=None):
    """``(uint8 [B, C, H, W], labels [B])`` batches over every sample of ``source``; the kinds of skipped samples
    are counted into the ``skipped`` Counter."""
    workers = min(num_workers, max(1, source.num_samples // batch_size))
    loader = DataLoader(_EvalStream(source, transform, batch_size), batch_size=None, num_workers=workers,
                        pin_memory=torch.cuda.is_available())
    for batch, bad in loader:
        if skipped is not None:
            skipped.update(bad)
        if batch is not None:
            yield batch
