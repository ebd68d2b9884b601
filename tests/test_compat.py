import os
import stat
from pathlib import Path

import pytest
import torch

from fastjepa import config
from fastjepa.compat.ijepa import export_timm, load_official, save_official, strip_prefixes
from fastjepa.ijepa import build_ijepa
from fastjepa.mask_batch import Masks
from fastjepa.optim import build_optimizer
from fastjepa.schedules import build as build_schedules
from fastjepa.spec import ModelSpec

CONFIG = Path(__file__).parents[1] / "configs" / "test_tiny.yaml"
# The fused ops have their own tests against these same references (tests/kernels/, test_fused_convergence.py).
pytestmark = pytest.mark.usefixtures("reference_ops")


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, n = 2, (cfg.data.crop_size // cfg.mask.patch_size) ** 2
    images = torch.randn(B, cfg.fastjepa.in_chans, cfg.data.crop_size, cfg.data.crop_size, generator=g)
    masks_enc = [torch.stack([torch.randperm(n, generator=g)[: n // 2] for _ in range(B)])]
    masks_pred = [torch.stack([torch.randperm(n, generator=g)[:4] for _ in range(B)]) for _ in range(2)]
    return images, Masks.from_lists(masks_enc, masks_pred)


def _step(model, opt, sched, i, batch):
    sched.apply(opt, i)
    loss = model(*batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.update_target(sched.momentum(i))
    return loss.item()


def test_official_checkpoint_round_trip_resumes_identically(tmp_path):
    cfg = config.load(CONFIG)
    torch.manual_seed(0)
    model = build_ijepa(ModelSpec.from_config(cfg))
    opt = build_optimizer(model.encoder, model.predictor)
    sched = build_schedules(cfg.optimization, iterations_per_epoch=10)
    _step(model, opt, sched, 0, _batch(cfg, 0))

    path = tmp_path / "jepa-latest.pth.tar"
    save_official(path, model, opt, epoch=1, loss=0.5, batch_size=2)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss", "batch_size",
                        "world_size", "lr"}
    assert all(k.startswith("module.") for k in raw["encoder"])

    loaded = load_official(path, CONFIG)
    assert loaded.epoch == 1 and loaded.extra["loss"] == 0.5
    opt2 = build_optimizer(loaded.model.encoder, loaded.model.predictor)
    opt2.load_state_dict(loaded.optimizer_state)

    batch = _batch(cfg, 1)
    with torch.no_grad():
        assert model(*batch).item() == loaded.model(*batch).item()
    # One more step on both: identical parameters, so the optimizer state (moments, step counts) came through.
    _step(model, opt, sched, 1, batch)
    _step(loaded.model, opt2, sched, 1, batch)
    for (n, a), b in zip(model.named_parameters(), loaded.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_a_teacher_free_model_loads_the_official_online_encoder_and_writes_it_as_the_target(tmp_path):
    cfg = config.load(CONFIG)
    torch.manual_seed(0)
    model = build_ijepa(ModelSpec.from_config(cfg))
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(1.0)  # the official file's target differs from its encoder
    save_official(tmp_path / "official.pth.tar", model, None, epoch=2)
    online = load_official(tmp_path / "official.pth.tar", config.load(CONFIG, ["fastjepa.target_encoder=online"]))
    for (name, a), b in zip(model.encoder.state_dict().items(), online.model.encoder.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    save_official(tmp_path / "again.pth.tar", online.model, None, epoch=3)
    raw = torch.load(tmp_path / "again.pth.tar", weights_only=True)
    assert raw["target_encoder"].keys() == raw["encoder"].keys()  # the official format: both, the same weights
    assert all(torch.equal(raw["target_encoder"][k], v) for k, v in raw["encoder"].items())


def test_checkpoint_that_does_not_fit_the_config_names_the_fix(tmp_path):
    cfg = config.load(CONFIG)
    model = build_ijepa(ModelSpec.from_config(cfg))
    path = tmp_path / "ckpt.pth.tar"
    save_official(path, model, None, epoch=0)
    with pytest.raises(ValueError, match="meta.model_name"):
        load_official(path, config.load(CONFIG, ["meta.pred_depth=1"]))
    torch.save({"encoder": {}}, tmp_path / "bad.pth.tar")
    with pytest.raises(ValueError, match="lacks"):
        load_official(tmp_path / "bad.pth.tar", CONFIG)
    with pytest.raises(FileNotFoundError, match="missing.pth.tar"):
        load_official(tmp_path / "missing.pth.tar", CONFIG)


def test_strip_prefixes():
    assert strip_prefixes({"module._orig_mod.blocks.0.norm1.weight": 1}) == {"blocks.0.norm1.weight": 1}


def _timm_vit_keys(depth: int) -> set[str]:
    """timm's VisionTransformer names with class_token=False, fc_norm=False, num_classes=0."""
    keys = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"}
    return keys


def test_export_timm_names_and_reload(tmp_path):
    from safetensors.torch import load_file

    cfg = config.load(CONFIG)
    model = build_ijepa(ModelSpec.from_config(cfg))
    was = os.umask(0o022)
    try:
        out = export_timm(model.target_encoder, tmp_path / "encoder")
    finally:
        os.umask(was)
    assert out.suffix == ".safetensors"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # the folder's normal permissions, not a temp file's 0600
    state = load_file(str(out))
    assert set(state) == _timm_vit_keys(len(model.target_encoder.blocks))
    fresh = build_ijepa(ModelSpec.from_config(cfg)).target_encoder
    fresh.load_state_dict(state, strict=True)
    for a, b in zip(fresh.parameters(), model.target_encoder.parameters(), strict=True):
        assert torch.equal(a, b)


def test_export_metadata_says_how_to_rebuild_the_encoder(tmp_path):
    from safetensors import safe_open

    from fastjepa.models import VisionTransformer

    cfg = config.load(CONFIG, ["fastjepa.in_chans=1"])
    encoder = build_ijepa(ModelSpec.from_config(cfg)).target_encoder
    with safe_open(str(export_timm(encoder, tmp_path / "encoder")), "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("patch_size", "img_size", "in_chans", "mlp_ratio", "embed_dim", "depth",
                                 "num_heads")} == {"patch_size": "4", "img_size": "32x32", "in_chans": "1",
                                                   "mlp_ratio": "4", "embed_dim": "192", "depth": "12",
                                                   "num_heads": "3"}
    rebuilt = VisionTransformer(int(meta["img_size"].split("x")[0]), int(meta["patch_size"]), int(meta["in_chans"]),
                                int(meta["embed_dim"]), int(meta["depth"]), int(meta["num_heads"]),
                                float(meta["mlp_ratio"]))
    rebuilt.load_state_dict(encoder.state_dict(), strict=True)
