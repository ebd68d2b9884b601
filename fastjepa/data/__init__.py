"""Input pipeline for I-JEPA pretraining: sources, official augmentations on PIL/numpy, the distributed loader.

    loader = build_pretrain_loader(cfg, rank=rank, world_size=world_size)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for (images, labels), masks in loader:      # images: uint8 [B, C, H, W]; masks: fastjepa.mask_batch.Masks
            images = normalize_on_device(images.to(device, non_blocking=True), mean, std, torch.bfloat16)

`len(loader)` is the same on every rank; `loader.state_dict()` goes into the checkpoint and
`loader.load_state_dict()` continues the epoch where it stopped. Workers ship uint8 (a quarter of the float32
bytes) and the normalisation runs on the device.
"""

import logging
import os

import torch

from fastjepa.choices import DATA_SOURCES as SOURCES
from fastjepa.data.loader import PretrainLoader
from fastjepa.data.sources import ImageFolderSource, MnistSource, ShardSource, SyntheticSource
from fastjepa.data.transforms import PretrainTransform, build_transform
from fastjepa.masks import MultiBlockMaskCollator
from fastjepa.spec import ModelSpec

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)

__all__ = ["build_pretrain_loader", "build_source", "Normalize", "normalize_on_device", "mean_std", "PretrainLoader",
           "PretrainTransform", "ImageFolderSource", "ShardSource", "SyntheticSource", "MnistSource", "SOURCES"]


def build_source(cfg):
    """The source of a validated config (``fastjepa.config`` checks the source name, the shards and the flip)."""
    d = cfg.data
    if d.source == "imagefolder":
        # the official layout: root_path/image_folder/train/<class>/<image>
        return ImageFolderSource(os.path.join(d.root_path or "", d.image_folder or "", "train"))
    if d.source == "webdataset":
        return ShardSource(d.shards, d.shard_index or None)
    if d.source == "synthetic":
        return SyntheticSource(d.synthetic_samples, tuple(d.synthetic_image_size), seed=cfg.fastjepa.seed)
    return MnistSource()


def build_pretrain_loader(cfg, *, rank=0, world_size=1, collator=None):
    """The pretraining loader of a Config: source from `data.source`, official augmentations, the multi-block
    mask collator (built from the config unless given). Yields ((images uint8 [B,C,H,W], labels [B]), Masks);
    see fastjepa.data.loader for the epoch plan, resume and bad-data handling."""
    if collator is None:
        collator = MultiBlockMaskCollator.from_spec(ModelSpec.from_config(cfg), seed=cfg.fastjepa.seed, rank=rank)
    d = cfg.data
    source = build_source(cfg)
    shards = getattr(source, "urls", None)
    num_workers = int(d.num_workers)
    if shards is not None and len(shards) < world_size * max(num_workers, 1):
        logging.getLogger(__name__).warning(
            "%d shards for %d ranks x %d workers: it works (workers split shards by sample), but every worker "
            "reads past the samples of the workers before it in a shared shard; write at least %d shards "
            "(make_shards --shard-size %d) to read each byte once", len(shards), world_size, max(num_workers, 1),
            world_size * max(num_workers, 1), max(1, source.num_samples // (world_size * max(num_workers, 1))))
    return PretrainLoader(
        source, build_transform(cfg), collator, d.batch_size, rank=rank, world_size=world_size,
        num_workers=num_workers, seed=cfg.fastjepa.seed, shuffle_buffer=d.shuffle_buffer if shards is not None else 0,
        max_bad_fraction=d.max_bad_fraction, pin_memory=d.pin_mem and torch.cuda.is_available())


def mean_std(cfg):
    """Normalisation constants for a Config: MNIST's for the mnist source, else ImageNet's (the official)."""
    if cfg.data.source == "mnist":
        mean, std = MNIST_MEAN, MNIST_STD
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    in_chans = cfg.fastjepa.in_chans
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return mean, std


class Normalize:
    """uint8 ``[B, C, H, W]`` (already on the device) -> contiguous ``(x / 255 - mean) / std`` in ``dtype``, one
    fp32 multiply-add (scale = 1 / (255 std), shift = -mean / std) and one cast. The constants are made on the
    device once, so normalising a batch copies nothing from the host. The loader's batches have channels-last
    strides (the workers skip the transpose); it is done here, on the uint8 bytes."""

    def __init__(self, mean, std, device, dtype: torch.dtype = torch.float32):
        if len(mean) != len(std):
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries; give one per channel")
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std_t)).to(device)
        self.shift = (-mean_t / std_t).to(device)
        self.channels, self.dtype = len(mean), dtype

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"normalize expects uint8 [B, C, H, W], got {images_uint8.dtype} "
                             f"{tuple(images_uint8.shape)}")
        if images_uint8.shape[1] != self.channels:
            raise ValueError(f"mean/std have {self.channels} entries for {images_uint8.shape[1]} channels")
        return torch.addcmul(self.shift, images_uint8.contiguous().float(), self.scale).to(self.dtype)


def normalize_on_device(images_uint8, mean, std, dtype=torch.float32):
    """One batch through ``Normalize`` (build a ``Normalize`` once to normalise many)."""
    return Normalize(mean, std, images_uint8.device, dtype)(images_uint8)
