"""The official I-JEPA step restated as plain functions over state dicts: the oracle that fastjepa's modules are
tested against, and the "official-style" baseline of the benchmarks.

It is written from the official code's behaviour (facebookresearch/ijepa), keeping what costs time there:
attention scores materialised with a separate softmax, ``apply_masks`` building a repeated ``[B, K, D]`` int64
index, ``repeat_interleave_batch`` copies, a full-sequence LayerNorm on the targets, a per-parameter EMA loop.
Parameters are read from a dict with the official names (no ``module.`` prefix), so gradients can be taken with
respect to the very tensors a fastjepa model holds.
"""

import torch
import torch.nn.functional as F


def apply_masks(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    out = []
    for m in masks:
        index = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        out.append(torch.gather(x, dim=1, index=index))
    return torch.cat(out, dim=0)


def repeat_interleave_batch(x: torch.Tensor, batch_size: int, repeat: int) -> torch.Tensor:
    groups = len(x) // batch_size
    return torch.cat(
        [torch.cat([x[i * batch_size:(i + 1) * batch_size]] * repeat, dim=0) for i in range(groups)], dim=0
    )


def _linear(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def _layer_norm(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-6)


def _block(p: dict, name: str, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, N, C = x.shape
    qkv = _linear(p, f"{name}.attn.qkv", _layer_norm(p, f"{name}.norm1", x))
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (C // num_heads) ** -0.5).softmax(dim=-1)
    x = x + _linear(p, f"{name}.attn.proj", (attn @ v).transpose(1, 2).reshape(B, N, C))
    hidden = F.gelu(_linear(p, f"{name}.mlp.fc1", _layer_norm(p, f"{name}.norm2", x)))
    return x + _linear(p, f"{name}.mlp.fc2", hidden)


def _depth(p: dict, prefix: str) -> int:
    return len({k.split(".")[1] for k in p if k.startswith(prefix + ".")})


def encoder_forward(p: dict, images: torch.Tensor, num_heads: int, masks: list[torch.Tensor] | None = None):
    patch = p["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(images, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + p["pos_embed"]
    if masks is not None:
        x = apply_masks(x, masks)
    for i in range(_depth(p, "blocks")):
        x = _block(p, f"blocks.{i}", x, num_heads)
    return _layer_norm(p, "norm", x)


def predictor_forward(p: dict, x: torch.Tensor, masks_x: list[torch.Tensor], masks: list[torch.Tensor],
                      num_heads: int) -> torch.Tensor:
    batch = len(x) // len(masks_x)
    x = _linear(p, "predictor_embed", x)
    x = x + apply_masks(p["predictor_pos_embed"].repeat(batch, 1, 1), masks_x)
    num_context = x.shape[1]
    pos = apply_masks(p["predictor_pos_embed"].repeat(batch, 1, 1), masks)
    pos = repeat_interleave_batch(pos, batch, repeat=len(masks_x))
    tokens = p["mask_token"].repeat(pos.size(0), pos.size(1), 1) + pos
    x = torch.cat([x.repeat(len(masks), 1, 1), tokens], dim=1)
    for i in range(_depth(p, "predictor_blocks")):
        x = _block(p, f"predictor_blocks.{i}", x, num_heads)
    x = _layer_norm(p, "predictor_norm", x)
    return _linear(p, "predictor_proj", x[:, num_context:])


def loss(encoder: dict, predictor: dict, target_encoder: dict, images: torch.Tensor,
         masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor], num_heads: int) -> torch.Tensor:
    """The official training loss for one batch (``forward_target``, ``forward_context``, ``loss_fn``)."""
    with torch.no_grad():
        h = encoder_forward(target_encoder, images, num_heads)
        h = F.layer_norm(h, (h.size(-1),))
        h = repeat_interleave_batch(apply_masks(h, masks_pred), len(h), repeat=len(masks_enc))
    z = encoder_forward(encoder, images, num_heads, masks_enc)
    z = predictor_forward(predictor, z, masks_enc, masks_pred, num_heads)
    return F.smooth_l1_loss(z, h)


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float) -> None:
    for param_k, param_q in zip(target, online, strict=True):
        param_k.mul_(momentum).add_((1.0 - momentum) * param_q.detach())
