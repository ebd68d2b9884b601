"""What a run trains and how its step runs, derived once from a validated ``Config``: the encoder and predictor
sizes, the patch grid, the mask recipe and the objective (``ModelSpec``, holding an ``Objective``), and the step's
precision, compilation and implementation choices (``StepOptions``). Everything below the trainer (the models'
builder, the step, parallelism, the FLOP and memory models, the benchmark's setups) reads these typed values, never
the config. Their defaults are the config's (a spec built without a config runs the official recipe).

The predictor's attention layout decides how many sequences of how many tokens its blocks see
(``predictor_sequences``): the one place that arithmetic is written.
"""

from dataclasses import dataclass

from fastjepa.choices import VIT_SIZES
from fastjepa.config_sections import FastJepa, Mask, Meta, SIGRegSettings, Train


def predictor_sequences(layout: str, contexts, context_len, target_len, num_target_blocks: int):
    """The predictor's attention sequences for ``contexts`` (nenc*B) context blocks of ``context_len`` tokens and M
    target blocks of ``target_len``: ``(sequences, tokens per sequence)``. ``shared``: one per context block,
    ``[context; block 1; ...; block M]``; the other layouts (and the packed path): M per context block,
    ``[context; block m]``. Works elementwise on arrays of token counts."""
    if layout == "shared":
        return contexts, context_len + num_target_blocks * target_len
    return contexts * num_target_blocks, context_len + target_len


@dataclass(frozen=True)
class Objective:
    """What the loss compares beyond the official smooth-L1: where the targets come from (an EMA copy, or the
    online encoder itself) and the SIGReg term (LeJEPA) with the seed that picks its directions."""

    online_target: bool = FastJepa.target_encoder == "online"
    sigreg_weight: float = SIGRegSettings.weight  # 0: no SIGReg (the official method)
    sigreg_slices: int = SIGRegSettings.slices
    sigreg_points: int = SIGRegSettings.points
    sigreg_t_max: float = SIGRegSettings.t_max
    sigreg_tokens: bool = SIGRegSettings.samples == "tokens"  # every context token, not one mean per block
    seed: int = FastJepa.seed

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        reg = cfg.fastjepa.sigreg
        return cls(online_target=cfg.fastjepa.target_encoder == "online", sigreg_weight=reg.weight,
                   sigreg_slices=reg.slices, sigreg_points=reg.points, sigreg_t_max=reg.t_max,
                   sigreg_tokens=reg.samples == "tokens", seed=cfg.fastjepa.seed)


@dataclass(frozen=True)
class ModelSpec:
    """The model and masks of a run (per process: ``batch_size`` images a step)."""

    model_name: str
    img_size: int
    patch_size: int
    in_chans: int
    pred_dim: int
    pred_depth: int
    layout: str = FastJepa.predictor_layout  # the predictor's attention layout (fastjepa.models.predictor)
    attn_backend: str = FastJepa.attn_backend
    batch_size: int = 1
    num_enc_masks: int = Mask.num_enc_masks
    num_pred_masks: int = Mask.num_pred_masks
    enc_mask_scale: tuple[float, float] = Mask.enc_mask_scale
    pred_mask_scale: tuple[float, float] = Mask.pred_mask_scale
    aspect_ratio: tuple[float, float] = Mask.aspect_ratio  # of the target blocks
    min_keep: int = Mask.min_keep
    allow_overlap: bool = Mask.allow_overlap
    mask_mode: str = FastJepa.mode  # the sampler's distribution: the official one, quirks included, or "fixed"
    varlen_context: bool = FastJepa.varlen_context  # every image keeps its whole context (packed), not cut
    objective: Objective = Objective()

    @classmethod
    def from_config(cls, cfg) -> "ModelSpec":
        """The spec of a config that ``Config.check`` validated (sizes, scales and names are not checked again)."""
        mask = cfg.mask
        return cls(model_name=cfg.meta.model_name, img_size=cfg.data.crop_size, patch_size=mask.patch_size,
                   in_chans=cfg.fastjepa.in_chans, pred_dim=cfg.meta.pred_emb_dim, pred_depth=cfg.meta.pred_depth,
                   layout=cfg.fastjepa.predictor_layout, attn_backend=cfg.fastjepa.attn_backend,
                   batch_size=cfg.data.batch_size, num_enc_masks=mask.num_enc_masks, num_pred_masks=mask.num_pred_masks,
                   enc_mask_scale=tuple(mask.enc_mask_scale), pred_mask_scale=tuple(mask.pred_mask_scale),
                   aspect_ratio=tuple(mask.aspect_ratio), min_keep=mask.min_keep, allow_overlap=mask.allow_overlap,
                   mask_mode=cfg.fastjepa.mode, varlen_context=cfg.fastjepa.varlen_context,
                   objective=Objective.from_config(cfg))

    @property
    def embed_dim(self) -> int:
        return VIT_SIZES[self.model_name][0]

    @property
    def depth(self) -> int:
        return VIT_SIZES[self.model_name][1]

    @property
    def num_heads(self) -> int:
        return VIT_SIZES[self.model_name][2]

    @property
    def mlp_ratio(self) -> float:
        return VIT_SIZES[self.model_name][3]

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (rows, columns)."""
        return self.img_size // self.patch_size, self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def expected_tokens(self) -> tuple[int, int]:
        """(context, target) tokens per block a step typically has: the middle of the mask scales, the context cut
        by the M target blocks it must avoid (ViT-H/14: about 70 and 44)."""
        grid = self.num_patches
        target = grid * sum(self.pred_mask_scale) / 2
        context = grid * sum(self.enc_mask_scale) / 2
        if not self.allow_overlap:
            context *= max(0.0, 1 - self.num_pred_masks * target / grid)
        return max(int(context), self.min_keep + 1), max(int(target), 1)

    def predictor_sequences(self, context_len, target_len) -> tuple:
        """``predictor_sequences`` of this run's layout for one step's ``batch_size * num_enc_masks`` contexts."""
        return predictor_sequences(self.layout, self.batch_size * self.num_enc_masks, context_len, target_len,
                                   self.num_pred_masks)

    def parameter_counts(self) -> tuple[int, int]:
        """(trained, target) parameter counts: the encoder's and predictor's that the optimizer updates (their
        sin-cos positional embeddings are fixed), and the target encoder's (its positional embedding included)."""
        dim, depth, pd = self.embed_dim, self.depth, self.pred_dim

        def blocks(width: int, num: int) -> int:
            hidden = int(width * self.mlp_ratio)
            # two LayerNorms, qkv, proj, fc1, fc2 (with biases)
            return num * (4 * width + 3 * width * (width + 1) + width * (width + 1) + hidden * (width + 1)
                          + width * (hidden + 1))

        encoder = self.in_chans * self.patch_size**2 * dim + dim + blocks(dim, depth) + 2 * dim
        # predictor_embed, mask token, blocks, predictor_norm, predictor_proj
        predictor = dim * pd + pd + pd + blocks(pd, self.pred_depth) + 2 * pd + pd * dim + dim
        return encoder + predictor, encoder + self.num_patches * dim


@dataclass(frozen=True)
class StepOptions:
    """How the step runs (the config's precision, compilation, parallelism and implementation choices), derived
    once from a validated ``Config``."""

    bf16: bool = Meta.use_bfloat16  # takes effect on CUDA only
    fp8: str = FastJepa.fp8
    compile: bool | None = Train.compile  # None compiles the blocks on CUDA
    activation_checkpointing: bool = Train.activation_checkpointing
    shard_size: int = Train.shard_size  # HSDP
    block_impl: str = FastJepa.block_impl
    update_impl: str = FastJepa.update_impl
    clip_grad: float = Train.clip_grad

    @classmethod
    def from_config(cls, cfg) -> "StepOptions":
        return cls(bf16=bool(cfg.meta.use_bfloat16), fp8=cfg.fastjepa.fp8, compile=cfg.train.compile,
                   activation_checkpointing=cfg.train.activation_checkpointing, shard_size=cfg.train.shard_size,
                   block_impl=cfg.fastjepa.block_impl, update_impl=cfg.fastjepa.update_impl,
                   clip_grad=cfg.train.clip_grad)
