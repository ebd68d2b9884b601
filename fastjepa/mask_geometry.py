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
from collections.abc import Callable, Iterator
from typing import NamedTuple


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


class Problem(NamedTuple):
    """Why a mask recipe cannot be sampled: the setting at fault (a ``ModelSpec`` field name), its value, what
    goes wrong and the fix. Other settings are named in the text through the caller's ``name`` (the config's dotted
    keys, or the collator's arguments)."""

    setting: str
    value: object
    problem: str
    fix: str


def _identity(setting: str) -> str:
    return setting


def range_problems(enc_mask_scale: tuple[float, float], pred_mask_scale: tuple[float, float],
                   aspect_ratio: tuple[float, float], min_keep: int, num_enc_masks: int, num_pred_masks: int,
                   patch_size: int) -> Iterator[Problem]:
    """The recipe's values that are out of range on their own (block areas are fractions of the patch grid)."""
    for setting, scale, example in (("enc_mask_scale", enc_mask_scale, "[0.85, 1.0]"),
                                    ("pred_mask_scale", pred_mask_scale, "[0.15, 0.2]")):
        if not 0 < scale[0] <= scale[1] <= 1:
            yield Problem(setting, scale, "must be [min, max] with 0 < min <= max <= 1 (fractions of the patch grid)",
                          f"set it within those bounds, e.g. {example}")
    if not 0 < aspect_ratio[0] <= aspect_ratio[1]:
        yield Problem("aspect_ratio", aspect_ratio, "must be [min, max] with 0 < min <= max (height / width)",
                      "set it within those bounds, e.g. [0.75, 1.5]")
    for setting, value, low in (("min_keep", min_keep, 0), ("num_enc_masks", num_enc_masks, 1),
                                ("num_pred_masks", num_pred_masks, 1), ("patch_size", patch_size, 1)):
        if value < low:
            yield Problem(setting, value, f"must be >= {low}", f"set it to {low} or more")


def sampling_problem(img_size: int | tuple[int, int], patch_size: int, enc_mask_scale: tuple[float, float],
                     pred_mask_scale: tuple[float, float], aspect_ratio: tuple[float, float], min_keep: int,
                     allow_overlap: bool, mode: str = "parity",
                     name: Callable[[str], str] = _identity) -> Problem | None:
    """Why the sampler could never finish (or never keep context and targets apart) with this in-range recipe on
    the ``img_size // patch_size`` grid, or None. The config and the collator both refuse what this finds."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    grid = height // patch_size, width // patch_size
    if min(grid) < 1:
        return Problem("img_size", img_size, f"smaller than {name('patch_size')}={patch_size}: no patch grid",
                       f"use images of at least {patch_size} pixels a side, or a smaller {name('patch_size')}")
    shown_size = img_size if isinstance(img_size, int) else list(img_size)
    where = (f"on the {grid[0]}x{grid[1]} patch grid ({name('img_size')}={shown_size} / {name('patch_size')}="
             f"{patch_size}, {name('mask_mode')}={mode})")
    for setting, scale, ratio, kind in (("pred_mask_scale", pred_mask_scale, aspect_ratio, "target"),
                                        ("enc_mask_scale", enc_mask_scale, (1.0, 1.0), "context")):
        h, w = min(block_sizes(grid, scale, ratio, mode), key=lambda s: s[0] * s[1])
        if h * w <= min_keep:
            shape = f" ({name('aspect_ratio')}={list(aspect_ratio)})" if kind == "target" else ""
            return Problem(setting, scale, f"{where} the sampler can draw {h}x{w} = {h * w}-patch {kind} blocks"
                           f"{shape}, and it redraws a {kind} block until it has more than {name('min_keep')}="
                           f"{min_keep} patches: it would loop forever",
                           f"lower {name('min_keep')} to {max(h * w - 1, 0)} or less, raise {name(setting)}[0], "
                           f"or use a finer patch grid (larger {name('img_size')} or smaller {name('patch_size')})")
    if allow_overlap:
        return None
    # Targets are placed independently and may all coincide, so the best case for the context removes one target
    # block placed to overlap it least; both lie inside the first `span` rows/columns (G-1 in parity, G in fixed),
    # so they overlap by at least max(0, hc + ht - span) rows and max(0, wc + wt - span) columns. If even that
    # best case leaves <= min_keep patches, keeping the context apart from the targets is impossible for that
    # pair of draws.
    span = (grid[0] - 1, grid[1] - 1) if mode == "parity" else grid
    targets = block_sizes(grid, pred_mask_scale, aspect_ratio, mode)
    contexts = block_sizes(grid, enc_mask_scale, (1.0, 1.0), mode)

    def best_kept(c: tuple[int, int], t: tuple[int, int]) -> int:
        return c[0] * c[1] - max(0, c[0] + t[0] - span[0]) * max(0, c[1] + t[1] - span[1])

    c, t = min(((c, t) for c in contexts for t in targets), key=lambda ct: best_kept(*ct))
    kept = best_kept(c, t)
    if kept > min_keep:
        return None
    return Problem("min_keep", min_keep,
                   f"{where} a {c[0]}x{c[1]} context block ({name('enc_mask_scale')}={list(enc_mask_scale)}) cut by "
                   f"{t[0]}x{t[1]} target blocks ({name('pred_mask_scale')}={list(pred_mask_scale)}) keeps at most "
                   f"{kept} patches, not more than {name('min_keep')}={min_keep}; with {name('allow_overlap')}=false "
                   "the sampler then gives up keeping context and targets apart",
                   f"lower {name('min_keep')} to {max(kept - 1, 0)} or less, raise {name('enc_mask_scale')}[0], "
                   f"lower {name('pred_mask_scale')}[1], or set {name('allow_overlap')}=true")
