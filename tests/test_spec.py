"""The run's spec, derived once from the config: the sizes the models are built with, the parameter counts the
memory estimate uses (equal to the built models', without building one), the expected token counts and the
predictor's sequence shapes per layout."""

from pathlib import Path

import pytest
import torch
from test_train import tiny_cfg

from fastjepa import config
from fastjepa.ijepa import build_ijepa
from fastjepa.metrics import FlopModel, estimate_training_memory
from fastjepa.spec import ModelSpec, StepOptions, predictor_sequences

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides", [
    [], ["meta.model_name=vit_small", "fastjepa.in_chans=1", "meta.pred_depth=3", "meta.pred_emb_dim=96"],
    ["fastjepa.predictor_layout=shared", "meta.pred_emb_dim=64"],
])
def test_the_spec_describes_the_models_it_builds(tmp_path, overrides):
    cfg = tiny_cfg(tmp_path, *overrides)
    spec = ModelSpec.from_config(cfg)
    with torch.device("meta"):
        model = build_ijepa(ModelSpec.from_config(cfg))
    enc, pred = model.encoder, model.predictor
    assert (spec.embed_dim, spec.depth, spec.num_patches) == (enc.embed_dim, len(enc.blocks), enc.num_patches)
    assert (spec.pred_dim, spec.pred_depth, spec.layout) == (pred.predictor_embed.out_features,
                                                             len(pred.predictor_blocks), pred.layout)
    trained = sum(p.numel() for p in [*enc.parameters(), *pred.parameters()] if p.requires_grad)
    assert spec.parameter_counts() == (trained, sum(p.numel() for p in model.target_encoder.parameters()))


def test_parameter_counts_at_vit_huge_without_building_it():
    cfg = config.load(ROOT / "configs/in1k_vith14_ep300.yaml")
    trained, target = ModelSpec.from_config(cfg).parameter_counts()
    # ViT-H/14 (632M with its fixed positional embedding) and the 12-block, 384-wide predictor
    assert target == 630_762_240 and trained - (target - 256 * 1280) == 22_279_424
    need = estimate_training_memory(ModelSpec.from_config(cfg), shards=1, bf16=True)
    assert need["weights_and_optimizer"] == trained * 16 + target * 6


def test_expected_tokens_and_the_predictor_sequences_of_each_layout():
    spec = ModelSpec.from_config(config.load(ROOT / "configs/in1k_vith14_ep300.yaml"))
    context, target = spec.expected_tokens()
    assert (context, target) == (71, 44)  # 256 patches: 0.925 of them, less the 4 target blocks' 0.175 each
    assert spec.predictor_sequences(context, target) == (128 * 4, 71 + 44)  # repeat: one sequence per block
    shared = ModelSpec(**{**spec.__dict__, "layout": "shared"})
    assert shared.predictor_sequences(context, target) == (128, 71 + 4 * 44)
    rows, tokens = predictor_sequences("repeat", 2, torch.tensor([5, 7]), 3, 4)  # elementwise on counts
    assert rows == 8 and tokens.tolist() == [8, 10]


def test_step_options_are_the_configs():
    cfg = tiny_cfg(ROOT, "fastjepa.fp8=target", "train.clip_grad=1.0", "fastjepa.block_impl=compile")
    options = StepOptions.from_config(cfg)
    assert (options.fp8, options.clip_grad, options.block_impl, options.update_impl) == ("target", 1.0, "compile",
                                                                                         "auto")


@pytest.mark.parametrize("layout", ["repeat", "shared", "official"])
def test_the_flop_model_of_a_spec_is_the_flop_model_of_its_models(tmp_path, layout):
    cfg = tiny_cfg(tmp_path, f"fastjepa.predictor_layout={layout}")
    with torch.device("meta"):
        model = build_ijepa(ModelSpec.from_config(cfg))
    assert FlopModel.from_spec(ModelSpec.from_config(cfg)) == FlopModel.from_model(model)
