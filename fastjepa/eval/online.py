"""The online k-NN probe (the ``eval`` config section): the target encoder's k-NN top-1 on a labelled split, every
``eval.every_epochs`` epochs while training, as stable-pretraining and solo-learn report it.

The evaluation images are decoded once, before the model is built (a wrong path stops the run then), and held in
memory as uint8 at the training resolution (``eval.max_samples`` per split). Every rank extracts the features of
all of them, so that FSDP2's per-block all-gathers see every rank in each forward; the set is small, and each
rank's k-NN vote is the same, rank 0's is logged.
"""

import time
from dataclasses import dataclass

import torch

from fastjepa.data import mean_std
from fastjepa.data.mnist import mnist_split
from fastjepa.data.transforms import EvalTransform
from fastjepa.eval.data import eval_batches, eval_source
from fastjepa.eval.knn import knn_top1
from fastjepa.eval.linear_probe import extract_features, resized, tensor_batches, to_float_images


@dataclass
class OnlineProbe:
    """In-memory ``(uint8 images, labels)`` for the memory bank (``train``) and the evaluated split (``val``)."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    crop_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 256

    @classmethod
    def from_config(cls, cfg) -> "OnlineProbe | None":
        """None when ``eval.every_epochs`` is 0; raises ``FileNotFoundError``/``ValueError`` for bad data."""
        e = cfg.eval
        if not e.every_epochs:
            return None
        if e.data == "mnist":
            digits = mnist_split()
            splits = {"train": digits["train"], "val": digits["test"]}
        else:
            splits = {split: _decoded(e.data, location, cfg, e.max_samples)
                      for split, location in (("train", e.train), ("val", e.val))}
        splits = {k: (x[:e.max_samples], y[:e.max_samples]) for k, (x, y) in splits.items()}
        return cls(splits["train"], splits["val"], cfg.data.crop_size, *mean_std(cfg), e.knn_k, e.knn_temperature,
                   cfg.data.batch_size)

    def __call__(self, encoder: torch.nn.Module, device: torch.device, autocast_dtype=None) -> dict[str, float]:
        """``{"knn_top1", "eval_seconds"}`` of ``encoder`` (features: its average-pooled tokens)."""
        tic = time.perf_counter()

        def preprocess(x: torch.Tensor) -> torch.Tensor:
            return resized(to_float_images(x, self.mean, self.std), self.crop_size)

        was_training = encoder.training
        with torch.no_grad():
            feats = [extract_features(encoder, tensor_batches(*split, self.batch_size), device=device,
                                      preprocess=preprocess, autocast_dtype=autocast_dtype)
                     for split in (self.train, self.val)]
        encoder.train(was_training)
        top1 = knn_top1(*feats[0], *feats[1], k=self.knn_k, temperature=self.knn_temperature, device=device)
        return {"knn_top1": top1, "eval_seconds": time.perf_counter() - tic}


def _decoded(kind: str, location: str, cfg, max_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``max_samples`` images of an ImageFolder or shards, centre-cropped at the training resolution."""
    transform = EvalTransform(cfg.data.crop_size, "L" if cfg.fastjepa.in_chans == 1 else "RGB")
    images, labels, count = [], [], 0
    for x, y in eval_batches(eval_source(kind, location), transform, batch_size=256, num_workers=2):
        images.append(x)
        labels.append(y)
        count += len(x)
        if count >= max_samples:
            break
    if not images:
        raise ValueError(f"eval.data={kind} {location}: no readable image")
    return torch.cat(images), torch.cat(labels)
