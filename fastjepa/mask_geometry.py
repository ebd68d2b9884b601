"""Which block sizes the multi-block mask sampler can draw, computed exactly (no torch: config uses it).

The official multi-block sampler (fastjepa.masks "parity") draws one r ~ U[0, 1) per batch for
the target blocks and another for the context blocks and computes a block size from it:
    keep = int(G*G * (s0 + r*(s1 - s0))),  ar = a0 + r*(a1 - a0)     (context: ar fixed to 1)
    h = round(sqrt(keep*ar)), w = round(sqrt(keep/ar)),  each clamped to G - 1     (G = crop_size // patch_size)
then places each block with its top-left corner in [0, G - h) x [0, G - w), so every block lies inside the
first G-1 rows and columns. A target block is redrawn until it has more than min_keep patches -- forever if its
size has h*w <= min_keep. A context block is redrawn until, cut by the target blocks, it keeps more than
min_keep patches; after 20 failures it drops one target's constraint, so it ends only if h*w > min_keep.
fastjepa's "fixed" mode draws scale and aspect ratio independently, clamps to G and places corners anywhere a
block fits (blocks span all G rows and columns); the checks follow the mode.
"""

import itertools
import math


def block_sizes(
    grid: int | tuple[int, int], scale: tuple[float, float], aspect_ratio: tuple[float, float], mode: str = "parity"
) -> set[tuple[int, int]]:
    """Every block size (h, w), in patches, that the sampler draws with nonzero probability on a patch grid
    (``G`` or ``(H, W)``): the official rule in "parity" mode, independent scale and ratio draws clamped to the
    grid in "fixed" mode.

    For each ``keep`` the size is piecewise constant in the ratio draw: pieces end where ``keep*ar`` or
    ``keep/ar`` crosses the square of a half-integer (where the rounding flips). One evaluation inside every
    piece gives the exact set.
    """
    grid_h, grid_w = (grid, grid) if isinstance(grid, int) else grid
    n = grid_h * grid_w
    (s0, s1), (a0, a1) = scale, aspect_ratio
    max_h, max_w = (grid_h - 1, grid_w - 1) if mode == "parity" else (grid_h, grid_w)

    def ratio(r: float) -> float:
        return a0 + r * (a1 - a0)

    def size(keep: int, r: float) -> tuple[int, int]:
        ar = ratio(r)
        return min(round(math.sqrt(keep * ar)), max_h), min(round(math.sqrt(keep / ar)), max_w)

    def r_of_ratio(ar: float) -> float:
        return (ar - a0) / (a1 - a0)

    sizes = set()
    for keep in range(int(n * s0), int(n * s1) + 1):
        lo, hi = 0.0, 1.0
        if s1 > s0:  # the scale draws for which int(n * s) == keep
            lo = max(lo, (keep / n - s0) / (s1 - s0))
            hi = min(hi, ((keep + 1) / n - s0) / (s1 - s0))
        if hi <= lo:
            continue
        if mode != "parity":  # the ratio draw is independent of the scale draw
            lo, hi = 0.0, 1.0
        cuts = {lo, hi}
        if a1 > a0 and keep > 0:
            ar_lo, ar_hi = ratio(lo), ratio(hi)
            for k in range(math.ceil(math.sqrt(keep * ar_lo) - 0.5), math.floor(math.sqrt(keep * ar_hi) - 0.5) + 1):
                cuts.add(r_of_ratio((k + 0.5) ** 2 / keep))
            for k in range(math.ceil(math.sqrt(keep / ar_hi) - 0.5), math.floor(math.sqrt(keep / ar_lo) - 0.5) + 1):
                cuts.add(r_of_ratio(keep / (k + 0.5) ** 2))
        cuts = sorted(c for c in cuts if lo <= c <= hi)
        sizes.update(size(keep, (x + y) / 2) for x, y in itertools.pairwise(cuts) if y > x)
    return sizes


def smallest_blocks(grid: int | tuple[int, int], pred_mask_scale: tuple[float, float],
                    enc_mask_scale: tuple[float, float], aspect_ratio: tuple[float, float],
                    mode: str = "parity") -> dict[str, tuple[int, int]]:
    """The smallest target block and context block (h, w) the sampler can draw, keyed by the setting that sets
    their size. A block is redrawn until it has more than min_keep patches: with ``h*w <= min_keep`` for either,
    sampling never ends (the official sampler hangs); config and collator both refuse that."""
    return {
        "pred_mask_scale": min(block_sizes(grid, pred_mask_scale, aspect_ratio, mode), key=lambda s: s[0] * s[1]),
        "enc_mask_scale": min(block_sizes(grid, enc_mask_scale, (1.0, 1.0), mode), key=lambda s: s[0] * s[1]),
    }
