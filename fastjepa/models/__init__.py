"""ViT encoder and predictor (official I-JEPA structure and names)."""

from fastjepa.choices import VIT_SIZES
from fastjepa.models.predictor import VisionTransformerPredictor
from fastjepa.models.vit import (
    VisionTransformer,
    vit_base,
    vit_giant,
    vit_huge,
    vit_large,
    vit_micro,
    vit_mini,
    vit_small,
    vit_tiny,
)


def build_models(cfg) -> tuple[VisionTransformer, VisionTransformerPredictor]:
    """Encoder and predictor for a (validated) config, as the official ``init_model`` builds them."""
    dim, depth, heads, mlp_ratio = VIT_SIZES[cfg.meta.model_name]
    backend = cfg.fastjepa.attn_backend
    encoder = VisionTransformer(
        img_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size, in_chans=cfg.fastjepa.in_chans,
        embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, attn_backend=backend,
    )
    predictor = VisionTransformerPredictor(
        encoder.grid, embed_dim=dim, predictor_embed_dim=cfg.meta.pred_emb_dim, depth=cfg.meta.pred_depth,
        num_heads=heads, attn_backend=backend, layout=cfg.fastjepa.predictor_layout,
    )
    return encoder, predictor


__all__ = [
    "VIT_SIZES", "VisionTransformer", "VisionTransformerPredictor", "build_models",
    "vit_micro", "vit_mini", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant",
]
