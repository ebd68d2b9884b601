"""Multi-block mask sampler of I-JEPA, vectorised.

`MultiBlockMaskCollator` is a drop-in for the official `src.masks.multiblock.MaskCollator`: same constructor
arguments, called on a list of samples, returns `(default_collate(samples), masks_enc, masks_pred)` where
`masks_enc` is a list of `nenc` int64 tensors `[B, K_enc]` and `masks_pred` a list of `npred` int64 tensors
`[B, K_pred]` of row-major patch indices (ascending within each row).

Two modes:

- ``parity`` reproduces the official sampler's distribution, quirks included: one block size per batch, drawn
  from a `torch.Generator` seeded with the step counter exactly as the official one (so the block sizes of a step
  equal the official ones), with scale and aspect ratio taken from the same uniform draw (correlated); block
  height/width clamped to at most grid-1; top-left corners drawn with an exclusive upper bound (the last patch
  row/column is never a corner, so a block never touches it unless it spans the grid); the context block avoids
  that image's target blocks, and after 20 failed tries per level the last target is dropped from the
  constraints (level t keeps the first npred-t targets); a block is valid only with MORE than `min_keep` tokens;
  every context list is cut to the shortest context of the batch. Target blocks are whole blocks of the same
  size, so their lists never need cutting.
- ``fixed`` corrects the quirks: corners drawn with an inclusive bound (every position reachable), blocks up to
  the full grid, scale and aspect ratio drawn independently. Everything else is as in parity.

Positions (and, in fixed mode, block sizes) come from a counter-based Philox generator keyed by (seed, rank,
dataloader worker id, step): the masks are a deterministic function of those four numbers, and re-keying costs
~2 us where building a seeded numpy Generator costs ~20 us. The collator keeps one generator, so use one
collator per process or thread (as DataLoader workers do). The official draws positions from the
unseeded global RNG; the distribution is the same.

Step counter: `__call__` works like the official: a `multiprocessing.Value` shared by the dataloader workers
(they inherit it at fork/spawn), incremented under its lock at every call, so steps keep advancing across epochs
even when the workers are re-created; which worker gets which step is decided by the race between workers, as in
the official. `sample(batch_size, step, worker)` is the stateless entry point for loaders that know the batch's
position: fastjepa.data calls it with step = epoch * batches_per_epoch + batch index and worker 0, so its masks
do not depend on worker scheduling, and keeps the counter in step (state_dict) for resume. It returns the one
`Masks` value the models read, packed already for variable-length context (`truncate_context=False`), so the
packing runs in the loader's workers.

Vectorised: the hot path has no per-image or per-block Python loop. Target corners for all images are drawn at
once and a target's indices are its corner plus the block's row-major offsets (already sorted); each image's free
area is one scatter of all its target indices into a [B, H*W] boolean; the free-token count of every context
corner of every image comes from two small matmuls with band matrices (box sums); 20 i.i.d. candidate corners
per context block are drawn at once and the first valid one is taken (the first valid element of an i.i.d.
sequence has exactly the distribution of the official rejection loop). Only (context block, image) pairs with no
valid candidate go through the relaxation levels, looping over levels, not images. The cut to the batch minimum
K takes each row's first K kept tokens out of one `np.flatnonzero` of the kept mask, using the rows' offsets.
"""

import math
import multiprocessing

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

from fastjepa.choices import MASK_MODES
from fastjepa.config_sections import show
from fastjepa.mask_batch import Masks, PackedContext
from fastjepa.mask_geometry import range_problems, sampling_problem
from fastjepa.spec import ModelSpec

TRIES_PER_LEVEL = 20  # official timeout: failed context draws before one more target constraint is dropped


def _pair(value, name, cast):
    try:
        first, second = value
        return cast(first), cast(second)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None


def _argument(setting: str) -> str:
    """The constructor argument of a mask-recipe setting named as in fastjepa.mask_geometry."""
    return {"img_size": "input_size", "mask_mode": "mode", "num_enc_masks": "nenc",
            "num_pred_masks": "npred"}.get(setting, setting)


def official_kwargs(spec: ModelSpec) -> dict:
    """The official collator's constructor arguments for a run's spec (what the official ``train.py`` reads from
    its config)."""
    return dict(input_size=spec.img_size, patch_size=spec.patch_size, enc_mask_scale=spec.enc_mask_scale,
                pred_mask_scale=spec.pred_mask_scale, aspect_ratio=spec.aspect_ratio, nenc=spec.num_enc_masks,
                npred=spec.num_pred_masks, min_keep=spec.min_keep, allow_overlap=spec.allow_overlap)


class MultiBlockMaskCollator:
    """I-JEPA multi-block collator; see the module docstring for the two modes and the seeding."""

    def __init__(
        self,
        input_size=(224, 224),
        patch_size=16,
        enc_mask_scale=(0.2, 0.8),
        pred_mask_scale=(0.2, 0.8),
        aspect_ratio=(0.3, 3.0),
        nenc=1,
        npred=2,
        min_keep=4,
        allow_overlap=False,
        mode="parity",
        seed=0,
        rank=0,
        truncate_context=True,
    ):
        if mode not in MASK_MODES:
            raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
        input_size = _pair((input_size, input_size) if isinstance(input_size, int) else input_size, "input_size", int)
        enc_mask_scale = _pair(enc_mask_scale, "enc_mask_scale", float)
        pred_mask_scale = _pair(pred_mask_scale, "pred_mask_scale", float)
        aspect_ratio = _pair(aspect_ratio, "aspect_ratio", float)
        for name, value, bits in (("patch_size", patch_size, 16), ("nenc", nenc, 16), ("npred", npred, 16),
                                  ("min_keep", min_keep, 32), ("seed", seed, 64), ("rank", rank, 16)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**bits:
                raise ValueError(f"{name} must be an int in [0, 2**{bits}), got {value!r}")
        if not truncate_context and mode != "fixed":
            raise ValueError("truncate_context=False (variable-length context) is a fixed-mode correction: the "
                             "official sampler cuts every context to the batch minimum; use mode='fixed'")
        recipe = dict(enc_mask_scale=enc_mask_scale, pred_mask_scale=pred_mask_scale, aspect_ratio=aspect_ratio,
                      min_keep=min_keep)
        problem = next(range_problems(**recipe, num_enc_masks=nenc, num_pred_masks=npred, patch_size=patch_size),
                       None) or sampling_problem(input_size, patch_size, **recipe, allow_overlap=bool(allow_overlap),
                                                 mode=mode, name=_argument)
        if problem:
            raise ValueError(f"{_argument(problem.setting)}={show(problem.value)}: {problem.problem}. "
                             f"Fix: {problem.fix}")

        self.mode = mode
        self.patch_size = patch_size
        self.height, self.width = input_size[0] // patch_size, input_size[1] // patch_size
        self.enc_mask_scale = enc_mask_scale
        self.pred_mask_scale = pred_mask_scale
        self.aspect_ratio = aspect_ratio
        self.nenc, self.npred = nenc, npred
        self.min_keep = min_keep
        self.allow_overlap = bool(allow_overlap)
        self.seed, self.rank = seed, rank
        # False: context lists keep every token, padded with -1 to the longest (fastjepa.models.varlen packs them)
        self.truncate_context = bool(truncate_context)
        # parity: corners in [0, grid - block) and blocks at most grid - 1, as the official
        self._corner_span = 0 if mode == "parity" else 1
        self._max_hw = (self.height - 1, self.width - 1) if mode == "parity" else (self.height, self.width)
        # shared with dataloader workers, as the official counter; made in a spawn context so that spawn and
        # forkserver workers can unpickle it too (fork workers inherit it either way)
        self._itr_counter = multiprocessing.get_context("spawn").Value("q", -1)
        self._bits = np.random.Philox(0)
        self._rng = np.random.Generator(self._bits)

    @classmethod
    def from_spec(cls, spec: ModelSpec, seed: int = 0, rank: int = 0) -> "MultiBlockMaskCollator":
        """The sampler of a run's spec (``ModelSpec.from_config``): its mask recipe, mode and context format."""
        return cls(**official_kwargs(spec), mode=spec.mask_mode, seed=seed, rank=rank,
                   truncate_context=not spec.varlen_context)

    def step(self):
        """Advance the shared step counter and return the new step (0 on the first call)."""
        with self._itr_counter.get_lock():
            self._itr_counter.value += 1
            return self._itr_counter.value

    def state_dict(self):
        return {"step": self._itr_counter.value}

    def load_state_dict(self, state):
        if "step" not in state:
            raise ValueError(f"collator state needs a 'step' entry (from state_dict()), got keys {sorted(state)}")
        with self._itr_counter.get_lock():
            self._itr_counter.value = int(state["step"])

    def __call__(self, batch):
        collated = default_collate(batch)
        info = get_worker_info()
        masks = self.sample(len(batch), self.step(), worker=0 if info is None else info.id)
        return collated, list(masks.enc), list(masks.pred)

    def block_sizes(self, step, rng=None):
        """(target (h, w), context (h, w)) of a step. Parity: from a torch.Generator seeded with `step`, one
        uniform draw per block kind shared by scale and aspect ratio. Fixed: independent draws from `rng`, by
        default the generator of worker 0 at this step (so this equals `sample(B, step).pred_size/enc_size`)."""
        if self.mode == "parity":
            gen = torch.Generator()
            gen.manual_seed(step)
            u_pred, u_enc = torch.rand(2, generator=gen).tolist()  # the same numbers as two rand(1) calls
            return (
                self._block_size(u_pred, u_pred, self.pred_mask_scale, self.aspect_ratio),
                self._block_size(u_enc, u_enc, self.enc_mask_scale, (1.0, 1.0)),
            )
        rng = self._keyed_rng(0, step) if rng is None else rng
        u_scale_pred, u_ratio_pred, u_scale_enc = rng.random(3).tolist()
        return (
            self._block_size(u_scale_pred, u_ratio_pred, self.pred_mask_scale, self.aspect_ratio),
            self._block_size(u_scale_enc, 0.0, self.enc_mask_scale, (1.0, 1.0)),
        )

    def _block_size(self, u_scale, u_ratio, scale, ratio):
        # same float operations, in the same order, as the official rule, so parity sizes match bit for bit
        tokens = int(self.height * self.width * (scale[0] + u_scale * (scale[1] - scale[0])))
        r = ratio[0] + u_ratio * (ratio[1] - ratio[0])
        h = int(round(math.sqrt(tokens * r)))
        w = int(round(math.sqrt(tokens / r)))
        return min(h, self._max_hw[0]), min(w, self._max_hw[1])

    def sample(self, batch_size, step, worker=0):
        """Masks for one batch, a deterministic function of (seed, rank, worker, step)."""
        rng = self._keyed_rng(worker, step)
        (ph, pw), (eh, ew) = self.block_sizes(step, rng)
        grid_w, span = self.width, self._corner_span
        n_img, n_pred, n_enc = batch_size, self.npred, self.nenc

        # targets: whole blocks of ph*pw tokens (never cut); corner + row-major offsets -> [npred, B, ph*pw]
        n_top, n_left = self.height - ph + span, grid_w - pw + span
        top, left = np.divmod(rng.integers(0, n_top * n_left, size=(n_pred, n_img)), n_left)
        pred = (top * grid_w + left)[..., None] + self._block_offsets(ph, pw)

        # context corners, numbered corner = left * n_top + top
        n_top, n_left = self.height - eh + span, grid_w - ew + span
        level = np.zeros((n_enc, n_img), dtype=np.int64)
        if self.allow_overlap:  # no constraint: the first draw is valid (block area > min_keep was checked)
            corner = rng.integers(0, n_top * n_left, size=(n_enc, n_img))
        else:
            free = self._free(pred)
            valid = self._valid_corners(free, eh, ew, n_top, n_left)
            found, corner = self._first_valid(rng, np.tile(valid, (n_enc, 1)))
            corner = corner.reshape(n_enc, n_img)
            enc, img = np.nonzero(~found.reshape(n_enc, n_img))  # pairs that fall back to the relaxation levels
            for lvl in range(1, n_pred + 1):
                if len(img) == 0:
                    break
                relaxed = self._valid_corners(self._free(pred[: n_pred - lvl, img]), eh, ew, n_top, n_left)
                found, first = self._first_valid(rng, relaxed)
                corner[enc[found], img[found]] = first[found]
                level[enc[found], img[found]] = lvl
                enc, img = enc[~found], img[~found]

        c_left, c_top = np.divmod(corner, n_top)
        context = (c_top * grid_w + c_left)[..., None] + self._block_offsets(eh, ew)  # [nenc, B, eh*ew]
        if self.allow_overlap:
            counts = np.full((n_enc, n_img), eh * ew)
            index = context
        else:
            kept = self._gather(free, context)  # block tokens outside the excluded targets
            for lvl in np.unique(level[level > 0]).tolist():
                enc, img = np.nonzero(level == lvl)
                kept[enc, img] = self._gather(self._free(pred[: n_pred - lvl, img]), context[enc, img])
            counts = np.count_nonzero(kept, axis=-1)
            # first `keep` kept tokens of every row: offsets of the rows' runs in the flat list of kept tokens;
            # untruncated, every row keeps all its tokens and is padded with -1 to the longest
            keep = counts.min() if self.truncate_context else counts.max()
            starts = np.cumsum(counts.ravel()) - counts.ravel()
            slot = starts[:, None] + np.arange(keep)
            kept_tokens = np.flatnonzero(kept)
            first_k = kept_tokens[np.minimum(slot, len(kept_tokens) - 1)]
            index = context.reshape(-1)[first_k]
            if not self.truncate_context:
                index = np.where(np.arange(keep) < counts.reshape(-1, 1), index, -1)
            index = index.reshape(n_enc, n_img, keep)
        enc, pred = torch.from_numpy(index), torch.from_numpy(pred)
        num_patches = self.height * self.width
        packed = None if self.truncate_context else PackedContext.from_padded(enc, n_pred, ph * pw, num_patches)
        return Masks(enc, pred, packed, context_counts=torch.from_numpy(counts), pred_size=(ph, pw),
                     enc_size=(eh, ew))

    def _keyed_rng(self, worker, step):
        """The generator re-keyed to (seed, rank, worker, step): Philox streams of distinct keys are independent."""
        if not (0 <= worker < 2**16 and 0 <= step < 2**32):
            raise ValueError(f"worker={worker} must be in [0, 2**16) and step={step} in [0, 2**32)")
        self._bits.state = {
            "bit_generator": "Philox",
            "state": {
                "counter": np.zeros(4, np.uint64),
                "key": np.array([self.seed, self.rank << 48 | worker << 32 | step], np.uint64),
            },
            "buffer": np.zeros(4, np.uint64),
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._rng

    def _block_offsets(self, h, w):
        """Row-major flat offsets of an h x w block from its top-left token."""
        return (np.arange(h)[:, None] * self.width + np.arange(w)).ravel()

    def _free(self, pred):
        """[k, n, K] target indices -> [n, H*W] bool: tokens outside all k targets of each image."""
        n_img, n_tokens = pred.shape[1], self.height * self.width
        covered = np.zeros(n_img * n_tokens, dtype=bool)
        covered[(pred + np.arange(n_img)[:, None] * n_tokens).ravel()] = True
        return ~covered.reshape(n_img, n_tokens)

    @staticmethod
    def _gather(rows, index):
        """rows [n, M], index [..., n, K] -> rows[i, index[..., i, :]] as one flat take (fancy 2-D indexing
        is several times slower)."""
        n, m = rows.shape
        return rows.reshape(-1)[index + (np.arange(n) * m)[:, None]]

    def _valid_corners(self, free, eh, ew, n_top, n_left):
        """[n, H*W] free tokens -> [n, n_left*n_top] bool: corners whose eh x ew block keeps MORE than min_keep
        free tokens. Box sums as two small matmuls with band matrices (exact in fp32 for counts < 2^24)."""
        rows, cols = np.arange(self.height)[:, None], np.arange(self.width)[:, None]
        row_band = ((rows >= np.arange(n_top)) & (rows < np.arange(n_top) + eh)).astype(np.float32)  # [H, n_top]
        col_band = ((cols >= np.arange(n_left)) & (cols < np.arange(n_left) + ew)).astype(np.float32)
        n = len(free)
        by_col = free.reshape(n * self.height, self.width).astype(np.float32) @ col_band  # [n*H, n_left]
        by_col = by_col.reshape(n, self.height, n_left).transpose(0, 2, 1).reshape(n * n_left, self.height)
        return (by_col @ row_band > self.min_keep).reshape(n, n_left * n_top)

    def _first_valid(self, rng, valid):
        """valid [n, corners] -> (found [n], corner [n]): the first valid of TRIES_PER_LEVEL i.i.d. uniform
        corners per row, i.e. the outcome of that many rounds of the official rejection loop."""
        if valid.shape[-1] == 1:  # a single corner (e.g. parity at H/14): every draw would be that corner
            return valid[:, 0], np.zeros(len(valid), dtype=np.int64)
        cand = rng.integers(0, valid.shape[-1], size=(len(valid), TRIES_PER_LEVEL))
        ok = self._gather(valid, cand)
        return ok.any(-1), self._gather(cand, ok.argmax(-1)[:, None])[:, 0]
