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
from fastjepa.spec import ModelSpec


def build_models(spec: ModelSpec) -> tuple[VisionTransformer, VisionTransformerPredictor]:
    """Encoder and predictor of a run's spec (``ModelSpec.from_config``), as the official ``init_model`` builds
    them."""
    encoder = VisionTransformer(
        img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans, embed_dim=spec.embed_dim,
        depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, attn_backend=spec.attn_backend,
    )
    predictor = VisionTransformerPredictor(
        encoder.grid, embed_dim=spec.embed_dim, predictor_embed_dim=spec.pred_dim, depth=spec.pred_depth,
        num_heads=spec.num_heads, attn_backend=spec.attn_backend, layout=spec.layout,
    )
    return encoder, predictor


__all__ = [
    "VIT_SIZES", "VisionTransformer", "VisionTransformerPredictor", "build_models",
    "vit_micro", "vit_mini", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant",
]
