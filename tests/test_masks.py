"""fastjepa.masks.MultiBlockMaskCollator: official output format, the official sampler's behaviour in parity
mode (checked against its documented definition, not its code), the corrections of fixed mode, seeding, resume
and input validation."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from fastjepa.config import load as load_config
from fastjepa.masks import MultiBlockMaskCollator, official_kwargs
from fastjepa.spec import ModelSpec

# the official ViT-H/14 recipe
H14 = official_kwargs(ModelSpec.from_config(load_config(Path(__file__).resolve().parents[1] / "configs"
                                                        / "in1k_vith14_ep300.yaml")))
GRID = 16
OFFICIAL_TRIES_PER_LEVEL = 20  # failed context draws before the official drops one more target constraint
# an 8x8 grid where four 4x4-ish targets often leave a 6x6 context block with only a few (or no) corners
# keeping more than min_keep free tokens, so the 20 tries per level and the relaxation levels both matter
CROWDED = dict(
    input_size=128,
    patch_size=16,
    enc_mask_scale=(0.5, 0.6),
    pred_mask_scale=(0.25, 0.3),
    aspect_ratio=(0.75, 1.5),
    nenc=2,
    npred=4,
    min_keep=12,
    allow_overlap=False,
)


def token_sets(masks, grid=GRID):
    """list of [B, K] -> [B, H*W] bool per list entry (which tokens each image's block holds)."""
    out = []
    for m in masks:
        sets = torch.zeros(m.shape[0], grid * grid, dtype=torch.bool)
        sets.scatter_(1, m, True)
        out.append(sets)
    return out


def official_block_size(u, scale, ratio, grid):
    """The documented official rule: one uniform u gives both the scale and the aspect ratio; height and width
    rounded from sqrt(tokens * ratio) and sqrt(tokens / ratio) and clamped below the grid size."""
    tokens = int(grid * grid * (scale[0] + u * (scale[1] - scale[0])))
    r = ratio[0] + u * (ratio[1] - ratio[0])
    h, w = int(round(math.sqrt(tokens * r))), int(round(math.sqrt(tokens / r)))
    return min(h, grid - 1), min(w, grid - 1)


@pytest.mark.parametrize("mode", ["parity", "fixed"])
def test_output_format_matches_official(mode):
    collator = MultiBlockMaskCollator(**{**H14, "nenc": 2}, mode=mode)
    batch = [(torch.full((3, 4, 4), float(i)), i) for i in range(16)]
    collated, masks_enc, masks_pred = collator(batch)
    expected = default_collate(batch)
    assert torch.equal(collated[0], expected[0]) and torch.equal(collated[1], expected[1])
    assert isinstance(masks_enc, list) and isinstance(masks_pred, list)
    assert len(masks_enc) == 2 and len(masks_pred) == 4
    for m in masks_enc + masks_pred:
        assert m.dtype == torch.int64 and m.dim() == 2 and m.shape[0] == 16 and m.is_contiguous()
        assert m.min() >= 0 and m.max() < GRID * GRID
    assert len({m.shape[1] for m in masks_enc}) == 1 and len({m.shape[1] for m in masks_pred}) == 1


@pytest.mark.parametrize("mode", ["parity", "fixed"])
def test_rows_are_row_major_and_targets_are_whole_blocks(mode):
    collator = MultiBlockMaskCollator(**H14, mode=mode)
    for step in range(4):
        masks = collator.sample(32, step)
        for m in [*masks.enc, *masks.pred]:
            assert (m[:, 1:] > m[:, :-1]).all()
        ph, pw = masks.pred_size
        for m in masks.pred:
            block = m.reshape(-1, ph, pw)
            rows, cols = block // GRID, block % GRID
            assert (rows == rows[:, :, :1]).all() and (cols == cols[:, :1, :]).all()
            assert (rows[:, :, 0] == rows[:, :1, 0] + torch.arange(ph)).all()
            assert (cols[:, 0, :] == cols[:, 0, :1] + torch.arange(pw)).all()


@pytest.mark.parametrize("mode", ["parity", "fixed"])
def test_context_and_targets_disjoint_without_overlap(mode):
    # at H/14 four targets of <= 54 tokens cannot leave <= 10 tokens of the context block, so no relaxation
    collator = MultiBlockMaskCollator(**{**H14, "nenc": 2}, mode=mode)
    for step in range(5):
        masks = collator.sample(64, step)
        targets = torch.stack(token_sets(masks.pred)).any(0)
        for context in token_sets(masks.enc):
            assert not (context & targets).any()


def test_allow_overlap_keeps_whole_context_blocks():
    collator = MultiBlockMaskCollator(**{**H14, "allow_overlap": True})
    overlaps = 0
    for step in range(3):
        masks = collator.sample(32, step)
        eh, ew = masks.enc_size
        assert masks.enc[0].shape[1] == eh * ew
        targets = torch.stack(token_sets(masks.pred)).any(0)
        overlaps += int((token_sets(masks.enc)[0] & targets).any(1).sum())
    assert overlaps > 0


def test_allow_overlap_context_corner_uniform():
    # CROWDED step 0: a 6x6 context block on the 8x8 grid; parity corners in [0, 2) x [0, 2), each w.p. 1/4
    collator = MultiBlockMaskCollator(**{**CROWDED, "allow_overlap": True})
    masks = collator.sample(4000, 0)
    assert masks.enc_size == (6, 6)
    first = torch.cat(list(masks.enc))[:, 0]  # the corner token of a whole block
    freq = torch.stack([(first == top * 8 + left).double().mean() for top in (0, 1) for left in (0, 1)])
    assert freq.sum() == 1
    assert ((freq - 0.25).abs() < 4.5 * math.sqrt(0.25 * 0.75 / len(first))).all(), freq


@pytest.mark.parametrize("config", [H14, CROWDED], ids=["h14", "crowded"])
@pytest.mark.parametrize("mode", ["parity", "fixed"])
def test_min_keep_respected(config, mode):
    collator = MultiBlockMaskCollator(**config, mode=mode)
    for step in range(10):
        masks = collator.sample(32, step)
        assert (masks.context_counts > config["min_keep"]).all()
        for m in [*masks.enc, *masks.pred]:
            assert m.shape[1] > config["min_keep"]


def test_parity_context_is_cut_to_batch_minimum_in_row_major_order():
    # at H/14 the parity context block is always the 15x15 block at (0, 0): its size rounds to 15 or 16 and is
    # clamped to 15, and the corner is drawn from [0, 16 - 15) = {0}. So the full context of an image is that
    # block minus its targets, and the kept list must be its first K tokens, K = the batch minimum.
    collator = MultiBlockMaskCollator(**H14)
    block = torch.zeros(GRID, GRID, dtype=torch.bool)
    block[:15, :15] = True
    for step in range(4):
        masks = collator.sample(64, step)
        assert masks.enc_size == (15, 15)
        full = block.flatten() & ~torch.stack(token_sets(masks.pred)).any(0)
        assert masks.enc[0].shape[1] == full.sum(1).min() == masks.context_counts.min()
        assert torch.equal(masks.context_counts[0], full.sum(1))
        for row, kept in zip(full, masks.enc[0], strict=True):
            assert torch.equal(row.nonzero()[:, 0][: len(kept)], kept)


def test_parity_block_sizes_equal_official_seeded_generator():
    collator = MultiBlockMaskCollator(**H14)
    for step in range(300):
        gen = torch.Generator()
        gen.manual_seed(step)
        u_pred = torch.rand(1, generator=gen).item()
        u_enc = torch.rand(1, generator=gen).item()
        expected = (
            official_block_size(u_pred, H14["pred_mask_scale"], H14["aspect_ratio"], GRID),
            official_block_size(u_enc, H14["enc_mask_scale"], (1.0, 1.0), GRID),
        )
        assert collator.block_sizes(step) == expected, step
    masks = collator.sample(8, 17)
    assert (masks.pred_size, masks.enc_size) == collator.block_sizes(17)


def test_fixed_block_sizes_are_the_ones_sampled():
    collator = MultiBlockMaskCollator(**H14, mode="fixed")
    for step in range(20):
        masks = collator.sample(4, step)
        assert (masks.pred_size, masks.enc_size) == collator.block_sizes(step)
        assert masks.pred[0].shape[1] == masks.pred_size[0] * masks.pred_size[1]


def test_parity_statistics_at_h14():
    """Untruncated context tokens per image against their exact expectation, target tokens against the exact
    mean of the block-size rule, and the cut context length against the official collator's measured mean."""
    collator = MultiBlockMaskCollator(**H14)
    # targets: K_pred = h*w of the step's block; its mean over u ~ U[0, 1) by midpoint quadrature of the rule
    u = (np.arange(20_000) + 0.5) / 20_000
    expected_area = np.mean([np.prod(official_block_size(x, (0.15, 0.2), (0.75, 1.5), GRID)) for x in u])
    areas = np.array([np.prod(collator.block_sizes(step)[0]) for step in range(2000)])
    assert 43 < expected_area < 45  # the "4 x ~44 target tokens" of the recipe
    # 4 standard errors of the mean of 2000 i.i.d. per-step areas
    assert abs(areas.mean() - expected_area) < 4 * areas.std() / math.sqrt(len(areas))

    # context: per image, E[tokens] = sum over the 15x15 block's cells of P(no target covers it), with the four
    # target corners i.i.d. uniform on [0, 16 - h) x [0, 16 - w) (exclusive bound) and no relaxation at H/14
    diffs, variances, cut = [], [], []
    for step in range(60):
        masks = collator.sample(128, step)
        ph, pw = masks.pred_size
        cover_r = np.array([sum(t <= r < t + ph for t in range(GRID - ph)) for r in range(15)]) / (GRID - ph)
        cover_c = np.array([sum(t <= c < t + pw for t in range(GRID - pw)) for c in range(15)]) / (GRID - pw)
        expected = ((1 - np.outer(cover_r, cover_c)) ** H14["npred"]).sum()
        counts = masks.context_counts[0].numpy()
        diffs.append(counts.mean() - expected)
        variances.append(counts.var(ddof=1) / len(counts))
        cut.append(masks.enc[0].shape[1])
    # images are i.i.d. given the step's block size: 4 standard errors of the pooled mean difference
    assert abs(np.mean(diffs)) < 4 * math.sqrt(np.sum(variances)) / len(diffs)
    # the cut length (min over 128 images; the "~70 context tokens" of the recipe) against the official
    # collator run on this recipe: 68.08 +- 0.50 (mean +- s.e. over 400 batches of 128, torch.manual_seed(1));
    # tolerance 4 s.e. of the difference of the two means
    cut = np.array(cut)
    official_mean, official_se = 68.08, 0.50
    se = math.sqrt(official_se**2 + cut.var(ddof=1) / len(cut))
    assert abs(cut.mean() - official_mean) < 4 * se


def _reference_contexts(collator, pred_size, enc_size, n_images, rng):
    """The official sampler's definition, one image and one try at a time: targets anywhere (exclusive upper
    bound); context corners drawn until the block keeps more than min_keep tokens outside the first npred - t
    targets, t growing by one after every OFFICIAL_TRIES_PER_LEVEL failures. Returns each context's token count."""
    grid, (ph, pw), (eh, ew) = collator.height, pred_size, enc_size
    counts = []
    for _ in range(n_images):
        covered = []
        for _ in range(collator.npred):
            t, l_ = rng.integers(0, grid - ph), rng.integers(0, grid - pw)
            target = np.zeros((grid, grid), dtype=bool)
            target[t : t + ph, l_ : l_ + pw] = True
            covered.append(target)
        for _ in range(collator.nenc):
            failures = 0
            while True:
                t, l_ = rng.integers(0, grid - eh), rng.integers(0, grid - ew)
                context = np.zeros((grid, grid), dtype=bool)
                context[t : t + eh, l_ : l_ + ew] = True
                for target in covered[: max(collator.npred - failures // OFFICIAL_TRIES_PER_LEVEL, 0)]:
                    context &= ~target
                if context.sum() > collator.min_keep:
                    counts.append(int(context.sum()))
                    break
                failures += 1
    return np.array(counts)


def test_parity_relaxation_matches_reference_sampler():
    collator = MultiBlockMaskCollator(**CROWDED)
    step = 0
    pred_size, enc_size = collator.block_sizes(step)
    ours = np.concatenate([collator.sample(1000, step, worker=w).context_counts.ravel() for w in range(5)])
    ref = _reference_contexts(collator, pred_size, enc_size, 3000, np.random.default_rng(123))
    # relaxation is exercised here, and drops the LAST targets first: a context overlaps target k only at
    # level >= npred - k, so overlaps get rarer towards target 0 (which is dropped only when all are)
    masks = collator.sample(2000, step)
    targets = token_sets(masks.pred, collator.height)
    overlaps = [sum(int((c & t).any(1).sum()) for c in token_sets(masks.enc, collator.height)) for t in targets]
    assert overlaps[-1] > 100 and overlaps == sorted(overlaps) and overlaps[0] < overlaps[-1] / 2, overlaps
    # per-value frequencies of the context size: 4.5 binomial standard errors of the difference
    values = np.arange(collator.height**2 + 1)
    p_ours = (ours[:, None] == values).mean(0)
    p_ref = (ref[:, None] == values).mean(0)
    pooled = (p_ours * len(ours) + p_ref * len(ref)) / (len(ours) + len(ref))
    se = np.sqrt(pooled * (1 - pooled) * (1 / len(ours) + 1 / len(ref)))
    assert (np.abs(p_ours - p_ref) <= 4.5 * se + 1e-12).all()


def _last_row_or_col_used(masks):
    return any(((m // GRID == GRID - 1) | (m % GRID == GRID - 1)).any() for m in masks)


def test_parity_never_reaches_last_row_and_column_fixed_does():
    parity = MultiBlockMaskCollator(**H14, mode="parity")
    fixed = MultiBlockMaskCollator(**H14, mode="fixed")
    parity_hits = [_last_row_or_col_used(parity.sample(128, step).pred) for step in range(4)]
    fixed_hits = [_last_row_or_col_used(fixed.sample(128, step).pred) for step in range(4)]
    assert not any(parity_hits)
    assert all(fixed_hits)


def test_fixed_reaches_full_grid_blocks():
    config = {**H14, "enc_mask_scale": (0.99, 1.0)}  # 253..256 tokens -> 16x16, the whole grid
    assert MultiBlockMaskCollator(**config, mode="parity").sample(4, 0).enc_size == (15, 15)
    assert MultiBlockMaskCollator(**config, mode="fixed").sample(4, 0).enc_size == (16, 16)


def test_fixed_draws_scale_and_aspect_ratio_independently():
    def correlation(mode):
        collator = MultiBlockMaskCollator(**H14, mode=mode)
        sizes = np.array([collator.sample(1, step).pred_size for step in range(800)], dtype=float)
        return np.corrcoef(sizes[:, 0] * sizes[:, 1], sizes[:, 0] / sizes[:, 1])[0, 1]

    # parity: area and h/w both grow with the shared draw; fixed: independent, so |r| within 4/sqrt(n) of 0
    assert correlation("parity") > 0.5
    assert abs(correlation("fixed")) < 4 / math.sqrt(800)


@pytest.mark.parametrize("mode", ["parity", "fixed"])
def test_deterministic_per_seed_rank_worker_step(mode):
    def masks(seed=0, rank=0, worker=0, step=3):
        out = MultiBlockMaskCollator(**H14, mode=mode, seed=seed, rank=rank).sample(32, step, worker=worker)
        return torch.cat([m.flatten() for m in [*out.enc, *out.pred]])

    base = masks()
    assert torch.equal(base, masks())
    for changed in (dict(seed=1), dict(rank=1), dict(worker=1), dict(step=4)):
        other = masks(**changed)
        assert other.shape != base.shape or not torch.equal(other, base), changed


def test_step_counter_and_resume():
    first = MultiBlockMaskCollator(**H14)
    batch = list(range(8))
    assert first.step() == 0 and first.state_dict() == {"step": 0}
    first(batch)
    state = first.state_dict()
    assert state == {"step": 1}
    expected = first(batch)
    resumed = MultiBlockMaskCollator(**H14)
    resumed.load_state_dict(state)
    got = resumed(batch)
    for a, b in zip(expected[1] + expected[2], got[1] + got[2], strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="step"):
        resumed.load_state_dict({})


def test_the_collator_of_a_spec_reads_its_mask_recipe():
    cfg = load_config("in1k_vith14_ep300", ["fastjepa.mode=fixed"])
    collator = MultiBlockMaskCollator.from_spec(ModelSpec.from_config(cfg), seed=7, rank=3)
    assert (collator.height, collator.width, collator.npred, collator.nenc) == (16, 16, 4, 1)
    assert (collator.mode, collator.seed, collator.rank, collator.min_keep) == ("fixed", 7, 3, 10)
    assert collator.pred_mask_scale == (0.15, 0.2)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(mode="exact"), "mode"),
        (dict(enc_mask_scale=(0.0, 0.5)), "enc_mask_scale"),
        (dict(pred_mask_scale=(0.2, 1.5)), "pred_mask_scale"),
        (dict(pred_mask_scale=(0.3, 0.2)), "pred_mask_scale"),
        (dict(aspect_ratio=(1.5, 0.75)), "aspect_ratio"),
        (dict(aspect_ratio=0.5), "aspect_ratio"),
        (dict(npred=0), "npred"),
        (dict(nenc=1.0), "nenc"),
        (dict(min_keep=-1), "min_keep"),
        (dict(input_size=8), "input_size"),
        (dict(patch_size=0), "patch_size"),
        # no target block can keep more than 200 tokens: the official would loop forever
        (dict(min_keep=200), r"pred_mask_scale=\[0.15, 0.2\]: .* target blocks.* min_keep=200 patches"),
        # context blocks of 25..49 tokens, targets of >= 35: only the context can never be valid
        (dict(enc_mask_scale=(0.1, 0.2), min_keep=30), r"enc_mask_scale=\[0.1, 0.2\]: .* context blocks.*min_keep=30 "),
    ],
)
def test_constructor_validation(change, match):
    with pytest.raises(ValueError, match=match):
        MultiBlockMaskCollator(**{**H14, **change})


def test_min_keep_limit_is_the_smallest_reachable_block():
    # the smallest H/14 target block over u in [0, 1): min_keep just below it is accepted, at it rejected
    u = (np.arange(20_000) + 0.5) / 20_000
    smallest = min(np.prod(official_block_size(x, (0.15, 0.2), (0.75, 1.5), GRID)) for x in u)
    assert smallest == 35  # u -> 0: 38 tokens at ratio 0.75 -> 5 x 7
    MultiBlockMaskCollator(**{**H14, "min_keep": int(smallest) - 1})
    with pytest.raises(ValueError, match="min_keep"):
        MultiBlockMaskCollator(**{**H14, "min_keep": int(smallest)})


def test_bench_masks_runs(capsys):
    from bench.bench_masks import main

    main(["--batch", "16", "--repeats", "2", "--no-csv"])
    out = capsys.readouterr().out
    assert "fastjepa-parity" in out and "fastjepa-fixed" in out and "cpu clock" in out


def test_step_counter_shared_by_dataloader_workers_across_epochs():
    from torch.utils.data import DataLoader

    collator = MultiBlockMaskCollator(**H14)
    loader = DataLoader(
        list(range(32)), batch_size=8, collate_fn=collator, num_workers=2, multiprocessing_context="fork"
    )
    sizes = [p[0].shape[1] for _ in range(2) for _, _, p in loader]
    # 8 batches over 2 epochs and 2 (re-created) workers: steps 0..7, each used once, as with the official Value
    assert collator.state_dict() == {"step": 7}
    expected = [math.prod(collator.block_sizes(step)[0]) for step in range(8)]
    assert sorted(sizes) == sorted(expected)


# test_tiny: 8x8 grid, official mask scales; the smallest target block is 3x3 in parity mode and 4x2 in fixed
# mode (independent scale and ratio draws reach the low scale with the high ratio).
@pytest.mark.parametrize("mode, smallest", [("parity", 9), ("fixed", 8)])
def test_config_and_collator_agree_at_the_min_keep_boundary(mode, smallest):
    from fastjepa.config import ConfigError, load

    spec = ModelSpec.from_config(load("configs/test_tiny.yaml", [f"fastjepa.mode={mode}",
                                                                 f"mask.min_keep={smallest - 1}"]))
    MultiBlockMaskCollator.from_spec(spec)
    with pytest.raises(ConfigError, match="min_keep"):
        load("configs/test_tiny.yaml", [f"fastjepa.mode={mode}", f"mask.min_keep={smallest}"])
    with pytest.raises(ValueError, match=f"more than min_keep={smallest} patches: it would loop forever"):
        MultiBlockMaskCollator.from_spec(dataclasses.replace(spec, min_keep=smallest))


def test_config_and_collator_agree_when_context_and_targets_cannot_be_kept_apart():
    from fastjepa.config import ConfigError, load

    # test_tiny's 8x8 grid: a 6x6 context and 6x6 targets in the first 7 rows/columns keep at most 11 patches
    overrides = ["mask.enc_mask_scale=[0.5,0.6]", "mask.pred_mask_scale=[0.5,0.6]"]
    spec = ModelSpec.from_config(load("configs/test_tiny.yaml", overrides + ["mask.min_keep=10"]))
    MultiBlockMaskCollator.from_spec(spec)
    with pytest.raises(ConfigError, match="keeps at most 11 patches.*Fix: .*set mask.allow_overlap=true"):
        load("configs/test_tiny.yaml", overrides + ["mask.min_keep=11"])
    with pytest.raises(ValueError, match="^min_keep=11: .*keeps at most 11 patches.*Fix: .*set allow_overlap=true"):
        MultiBlockMaskCollator.from_spec(dataclasses.replace(spec, min_keep=11))
    MultiBlockMaskCollator.from_spec(dataclasses.replace(spec, min_keep=11, allow_overlap=True))
