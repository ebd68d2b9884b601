"""Official I-JEPA checkpoints in and out, and encoder export under timm's ViT names.

An official checkpoint (``src/train.py``'s ``save_checkpoint``) is a dict with ``encoder``, ``predictor``,
``target_encoder`` (state dicts whose keys carry DDP's ``module.`` prefix), ``opt``, ``scaler``, ``epoch``,
``loss``, ``batch_size``, ``world_size`` and ``lr``. fastjepa's parameter names are the official ones, and its
optimizer groups are built in the official order, so both load as they are.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastjepa import config
from fastjepa.config import Config
from fastjepa.ijepa import IJEPA, build_ijepa
from fastjepa.spec import ModelSpec

_REQUIRED_KEYS = ("encoder", "predictor", "target_encoder", "epoch")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state_dict: dict) -> dict:
    """Remove DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


@dataclass
class OfficialCheckpoint:
    model: IJEPA
    optimizer_state: dict | None
    epoch: int
    config: Config
    extra: dict = field(default_factory=dict)  # loss, batch_size, world_size, lr, scaler as saved


def _load_strict(module: nn.Module, state_dict: dict, what: str, checkpoint: Path) -> None:
    result = module.load_state_dict(strip_prefixes(state_dict), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{checkpoint}: the '{what}' weights do not fit the model built from the config "
            f"(missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}). Use the YAML the "
            "checkpoint was trained with (meta.model_name, mask.patch_size, data.crop_size, meta.pred_depth, "
            "meta.pred_emb_dim must match)."
        )


def load_official(checkpoint_path: str | os.PathLike, cfg: Config | str | os.PathLike,
                  map_location: str | torch.device = "cpu") -> OfficialCheckpoint:
    """Load an official I-JEPA checkpoint together with the config it was trained with (a ``Config``, or the path
    of its official YAML).

    Returns the ``IJEPA`` model with encoder, predictor and target encoder loaded, the optimizer state (loadable
    into ``fastjepa.optim.build_optimizer(model.encoder, model.predictor)``) and the epoch to resume from.
    """
    checkpoint_path = Path(checkpoint_path)
    if not isinstance(cfg, Config):
        cfg = config.load(cfg)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {checkpoint_path}")
    ckpt = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{checkpoint_path} is not an official I-JEPA checkpoint: it lacks {missing} "
                         f"(has {sorted(ckpt)[:8]})")
    model = build_ijepa(ModelSpec.from_config(cfg))
    # a teacher-free model (fastjepa.target_encoder: online) continues from the online encoder; no EMA target
    for what in ("encoder", "predictor") + (() if model.online_target else ("target_encoder",)):
        _load_strict(getattr(model, what), ckpt[what], what, checkpoint_path)
    extra = {k: ckpt[k] for k in ("loss", "batch_size", "world_size", "lr", "scaler") if k in ckpt}
    return OfficialCheckpoint(model, ckpt.get("opt"), int(ckpt["epoch"]), cfg, extra)


def save_official(path: str | os.PathLike, model: IJEPA, optimizer: torch.optim.Optimizer | None, epoch: int,
                  *, loss: float = 0.0, batch_size: int = 0, world_size: int = 1, lr: float = 0.0) -> None:
    """Write a checkpoint in the official format (``module.`` prefixes included), atomically."""

    def ddp_names(module: nn.Module) -> dict:
        return {f"module.{k}": v for k, v in strip_prefixes(module.state_dict()).items()}

    payload = {
        "encoder": ddp_names(model.encoder),
        "predictor": ddp_names(model.predictor),
        "target_encoder": ddp_names(model.target_encoder),
        "opt": None if optimizer is None else optimizer.state_dict(),
        "scaler": None,
        "epoch": epoch,
        "loss": loss,
        "batch_size": batch_size,
        "world_size": world_size,
        "lr": lr,
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def export_timm(encoder: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save an encoder's weights under timm's ViT names as ``<path>.safetensors``, with what it takes to rebuild it
    in the metadata (format, patch and image size, channels, width, depth, heads, MLP ratio, grid).

    fastjepa's encoder names are timm's already; the file loads with ``strict=True`` into
    ``timm.create_model("vit_huge_patch14_224", class_token=False, global_pool="avg", fc_norm=False,
    num_classes=0)`` (or the size/patch/resolution of the encoder).
    """
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in strip_prefixes(encoder.state_dict()).items()}
    meta = {"format": "timm-vit", "class_token": "false", **(metadata or {})}
    if hasattr(encoder, "patch_size"):
        grid_h, grid_w = encoder.grid
        conv = encoder.patch_embed.proj
        mlp_ratio = encoder.blocks[0].mlp.fc1.out_features / encoder.embed_dim
        meta.update(patch_size=str(encoder.patch_size), img_size=f"{grid_h * encoder.patch_size}x"
                    f"{grid_w * encoder.patch_size}", in_chans=str(conv.in_channels), grid=f"{grid_h}x{grid_w}",
                    embed_dim=str(encoder.embed_dim), depth=str(len(encoder.blocks)),
                    num_heads=str(encoder.num_heads), mlp_ratio=f"{mlp_ratio:g}")
    path = Path(path).with_suffix(".safetensors")
    save_file(state, str(path), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors writes through a private temporary file (0600): the folder's default
    return path
