"""Fixed 2-D sin-cos positional embeddings, as in MAE and the official I-JEPA."""

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[M]`` positions -> ``[M, dim]``: sines of every frequency, then cosines (float64)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """``[grid_h * grid_w, dim]`` float32, tokens in row-major order. The first half encodes the column and the
    second half the row, the order the official code produces (its meshgrid puts width first)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return emb.float()
