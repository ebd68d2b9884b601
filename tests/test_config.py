import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from fastjepa import config
from fastjepa.config import CONFIG_DIR, Config, ConfigError, load
from fastjepa.mask_geometry import block_sizes

OFFICIAL_RECIPES = [
    "in1k_vith14_ep300.yaml", "in1k_vith16-448_ep300.yaml", "in22k_vith14_ep66.yaml", "in22k_vitg16_ep44.yaml",
]
SHIPPED = OFFICIAL_RECIPES + ["test_tiny.yaml", "demo_mnist.yaml"]

# configs/in1k_vith14_ep300.yaml of facebookresearch/ijepa, as yaml.safe_load reads it.
OFFICIAL_VITH14 = {
    "data": {
        "batch_size": 128, "color_jitter_strength": 0.0, "crop_scale": [0.3, 1.0], "crop_size": 224,
        "image_folder": "imagenet_full_size/061417/", "num_workers": 10, "pin_mem": True,
        "root_path": "$replace_this_with_absolute_path_to_your_datasets_directory",
        "use_color_distortion": False, "use_gaussian_blur": False, "use_horizontal_flip": False,
    },
    "logging": {
        "folder": "$replace_this_with_path_for_experiment_logs/vith14.224-bs.2048-ep.300/", "write_tag": "jepa",
    },
    "mask": {
        "allow_overlap": False, "aspect_ratio": [0.75, 1.5], "enc_mask_scale": [0.85, 1.0], "min_keep": 10,
        "num_enc_masks": 1, "num_pred_masks": 4, "patch_size": 14, "pred_mask_scale": [0.15, 0.2],
    },
    "meta": {
        "copy_data": False, "load_checkpoint": False, "model_name": "vit_huge", "pred_depth": 12, "pred_emb_dim": 384,
        "read_checkpoint": None, "use_bfloat16": True,
    },
    "optimization": {
        "ema": [0.996, 1.0], "epochs": 300, "final_lr": 1e-06, "final_weight_decay": 0.4, "ipe_scale": 1.0,
        "lr": 0.001, "start_lr": 0.0002, "warmup": 40, "weight_decay": 0.04,
    },
}


def error_of(*overrides, path="test_tiny"):
    with pytest.raises(ConfigError) as info:
        load(path, list(overrides))
    return str(info.value)


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- the official recipes ----------------------------------------------------------------------------------------


def test_shipped_recipe_is_the_official_file():
    assert yaml.safe_load((CONFIG_DIR / "in1k_vith14_ep300.yaml").read_text()) == OFFICIAL_VITH14


@pytest.mark.parametrize("name", OFFICIAL_RECIPES)
def test_official_recipe_loads_every_key_unchanged(name):
    raw = yaml.safe_load((CONFIG_DIR / name).read_text())
    resolved = load(CONFIG_DIR / name).to_dict()
    assert list(resolved)[:len(raw)] == list(raw)  # official sections first, in the files' order
    for section, values in raw.items():
        assert list(resolved[section])[:len(values)] == list(values)  # official keys first, in order
        for key, value in values.items():
            assert resolved[section][key] == value and type(resolved[section][key]) is type(value), f"{section}.{key}"


def test_vith14_recipe_values():
    cfg = load(CONFIG_DIR / "in1k_vith14_ep300.yaml")
    o, m = cfg.optimization, cfg.mask
    assert (o.lr, o.start_lr, o.final_lr, o.warmup, o.ema) == (0.001, 0.0002, 1e-6, 40, (0.996, 1.0))
    assert (m.patch_size, m.pred_mask_scale, m.enc_mask_scale, m.min_keep) == (14, (0.15, 0.2), (0.85, 1.0), 10)
    assert (cfg.data.batch_size, cfg.meta.model_name, cfg.meta.pred_depth) == (128, "vit_huge", 12)
    assert isinstance(o.final_lr, float) and isinstance(o.epochs, int)


@pytest.mark.parametrize("name, expected", [
    ("in1k_vith16-448_ep300.yaml", {"data.crop_size": 448, "mask.patch_size": 16, "data.batch_size": 16}),
    ("in22k_vith14_ep66.yaml", {"optimization.epochs": 66, "optimization.warmup": 3, "data.batch_size": 32}),
    ("in22k_vitg16_ep44.yaml", {"meta.model_name": "vit_giant", "meta.pred_depth": 16, "optimization.epochs": 44}),
])
def test_other_recipe_values(name, expected):
    cfg = load(CONFIG_DIR / name)
    assert {key: cfg.get(key) for key in expected} == expected


def test_small_configs_are_small():
    tiny, mnist = load("test_tiny"), load("demo_mnist")
    assert (tiny.meta.model_name, tiny.data.crop_size, tiny.mask.patch_size, tiny.data.batch_size) == (
        "vit_tiny", 32, 4, 8)
    assert tiny.optimization.epochs == 1
    # the demo is tuned (configs/demo_mnist.yaml says how); what must hold is a one-channel MNIST run on a small grid
    assert (mnist.data.source, mnist.fastjepa.in_chans) == ("mnist", 1)
    assert (mnist.data.crop_size // mnist.mask.patch_size) ** 2 <= 256


def test_bare_name_finds_a_shipped_config():
    assert load("in1k_vith14_ep300") == load(CONFIG_DIR / "in1k_vith14_ep300.yaml")


# ---- defaults ------------------------------------------------------------------------------------------------------


def test_missing_sections_and_keys_take_documented_defaults(tmp_path):
    cfg = load(write(tmp_path, "meta:\n  model_name: vit_small\ntrain:\n"))
    assert cfg.meta.model_name == "vit_small"
    assert (cfg.meta.pred_depth, cfg.meta.pred_emb_dim, cfg.mask.patch_size, cfg.data.crop_size) == (6, 384, 16, 224)
    official = load(CONFIG_DIR / "in1k_vith14_ep300.yaml")
    assert dataclasses.replace(cfg.mask, patch_size=14) == official.mask
    assert cfg.optimization == official.optimization
    assert (cfg.fastjepa.mode, cfg.fastjepa.seed, cfg.fastjepa.attn_backend) == ("parity", 0, "auto")
    assert (cfg.fastjepa.in_chans, cfg.fastjepa.kernel_backend, cfg.train.device) == (3, "auto", "auto")
    assert cfg.data.root_path == "" and cfg.logging.folder == ""


# ---- overrides -----------------------------------------------------------------------------------------------------


def test_overrides_dotted_lists_and_coercion():
    cfg = load("test_tiny", [
        "optimization.lr=5e-4", "optimization.final_lr=1", "mask.aspect_ratio=[0.5,2]",
        "meta.read_checkpoint=jepa-ep10.pth.tar", "logging.write_tag=2024", "data.pin_mem=true",
    ])
    assert cfg.optimization.lr == 5e-4 and isinstance(cfg.optimization.lr, float)  # PyYAML reads "5e-4" as text
    assert cfg.optimization.final_lr == 1.0 and isinstance(cfg.optimization.final_lr, float)
    assert cfg.mask.aspect_ratio == (0.5, 2.0) and all(isinstance(a, float) for a in cfg.mask.aspect_ratio)
    assert cfg.meta.read_checkpoint == "jepa-ep10.pth.tar"
    assert cfg.logging.write_tag == "2024"  # string fields take the text as written
    assert cfg.data.pin_mem is True
    assert load("test_tiny", ["meta.read_checkpoint=x", "meta.read_checkpoint=null"]).meta.read_checkpoint is None


def test_override_creates_a_missing_section(tmp_path):
    cfg = load(write(tmp_path, "meta:\n  model_name: vit_tiny\n"), ["optimization.epochs=3", "train.log_every=5"])
    assert (cfg.optimization.epochs, cfg.train.log_every) == (3, 5)


def test_a_sub_section_loads_from_yaml_and_overrides_and_dumps_back(tmp_path):
    """fastjepa.sigreg is a mapping inside fastjepa: nested in YAML, dotted in overrides, and in cfg.get."""
    path = write(tmp_path, "fastjepa:\n  sigreg:\n    weight: 0.05\n    samples: tokens\n")
    cfg = load(path, ["fastjepa.sigreg.slices=256"])
    assert (cfg.fastjepa.sigreg.weight, cfg.fastjepa.sigreg.samples, cfg.get("fastjepa.sigreg.slices")) == (
        0.05, "tokens", 256)
    assert cfg.fastjepa.sigreg.points == 17 and load(path).fastjepa.sigreg.slices == 1024  # defaults
    assert cfg.to_dict()["fastjepa"]["sigreg"] == {"weight": 0.05, "slices": 256, "points": 17, "t_max": 3.0,
                                                   "samples": "tokens"}
    assert load(cfg.dump(tmp_path / "again.yaml")) == cfg


# ---- errors --------------------------------------------------------------------------------------------------------


def test_unknown_key_in_file_names_file_key_value_and_suggestion(tmp_path):
    path = write(tmp_path, "optimization:\n  lrr: 0.001\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and "optimization.lrr=0.001" in message
    assert "did you mean optimization.lr?" in message and "Fix: rename it to optimization.lr" in message
    assert info.value.key == "optimization.lrr"


@pytest.mark.parametrize("override, fragments", [
    ("optimization.lrr=1e-3", ["override 'optimization.lrr=1e-3'", "did you mean optimization.lr?"]),
    ("optimisation.lr=1e-3", ["optimisation.lr", "did you mean optimization.lr?"]),
    ("meta.patch_size=8", ["meta.patch_size", "did you mean mask.patch_size?"]),
    ("mask.npred=4", ["mask.npred", "did you mean mask.num_pred_masks?"]),
    ("mask.xyz=4", ["mask.xyz", "mask accepts: allow_overlap, aspect_ratio", "Fix: remove it"]),
    ("lr=5e-4", ["override 'lr=5e-4'", "expected section.key=value"]),
    ("mask.aspect_ratio=[1,", ["override 'mask.aspect_ratio=[1,'", "not valid YAML"]),
    ("fastjepa.sigreg.wieght=0.1", ["fastjepa.sigreg.wieght", "did you mean fastjepa.sigreg.weight?",
                                    "sigreg.weight, sigreg.slices"]),
    ("fastjepa.sigreg=0.1", ["fastjepa.sigreg=0.1: must be a mapping of keys", "accepts: weight, slices"]),
])
def test_unknown_or_malformed_override(override, fragments):
    message = error_of(override)
    for fragment in fragments:
        assert fragment in message


def test_unknown_section_in_file(tmp_path):
    with pytest.raises(ConfigError, match=r"optimisation: unknown section; did you mean optimization\?"):
        load(write(tmp_path, "optimisation:\n  lr: 0.001\n"))


@pytest.mark.parametrize("override, fragment", [
    ("data.batch_size=true", "data.batch_size=true: expected an integer, got bool"),
    ("data.batch_size=8.5", "data.batch_size=8.5: expected an integer, got float"),
    ("optimization.lr=fast", "optimization.lr='fast': expected a number, got str"),
    ("optimization.lr=true", "optimization.lr=true: expected a number, got bool"),
    ("meta.use_bfloat16=1", "meta.use_bfloat16=1: expected a boolean (true/false), got int"),
    ("mask.aspect_ratio=[1.0]", "mask.aspect_ratio=[1.0]: expected a list of 2 numbers"),
    ("mask.aspect_ratio=0.75", "mask.aspect_ratio=0.75: expected a list of 2 numbers"),
    ("optimization.ema=[0.99,yes]", "optimization.ema[1]=true: expected a number"),
    ("optimization.lr=.nan", "optimization.lr=nan: must be a finite number"),
])
def test_wrong_type(override, fragment):
    message = error_of(override)
    assert fragment in message and "Fix: write" in message and f"override '{override}'" in message


def test_wrong_type_in_file_says_to_quote_strings(tmp_path):
    with pytest.raises(ConfigError, match=r"logging.write_tag=2024: expected a string, got int.*quote it"):
        load(write(tmp_path, "logging:\n  write_tag: 2024\n"))


@pytest.mark.parametrize("overrides, fragments", [
    (["data.crop_size=30"], ["data.crop_size=30: not divisible by mask.patch_size=4", "28 or 32"]),
    (["mask.pred_mask_scale=[0.3,0.2]"], ["mask.pred_mask_scale=[0.3, 0.2]", "0 < min <= max <= 1"]),
    (["mask.enc_mask_scale=[0,1]"], ["mask.enc_mask_scale=[0.0, 1.0]", "0 < min <= max <= 1"]),
    (["data.crop_scale=[0.3,1.2]"], ["data.crop_scale=[0.3, 1.2]", "0 < min <= max <= 1"]),
    (["mask.aspect_ratio=[2,1]"], ["mask.aspect_ratio=[2.0, 1.0]", "0 < min <= max"]),
    (["optimization.ema=[0.996,1.01]"], ["optimization.ema[1]=1.01", "[0, 1]"]),
    (["optimization.ipe_scale=0.5"], ["optimization.ipe_scale=0.5: must be >= 1.0"]),
    (["mask.num_enc_masks=0"], ["mask.num_enc_masks=0: must be >= 1"]),
    (["mask.num_pred_masks=0"], ["mask.num_pred_masks=0: must be >= 1"]),
    (["data.batch_size=0"], ["data.batch_size=0: must be >= 1"]),
    (["meta.model_name=vit_hug"], ["meta.model_name='vit_hug'", "did you mean 'vit_huge'?", "vit_tiny, vit_small"]),
    (["fastjepa.mode=fix"], ["fastjepa.mode='fix'", "did you mean 'fixed'?", "valid: parity, fixed"]),
    (["fastjepa.attn_backend=flash"], ["fastjepa.attn_backend='flash'", "sdpa", "math"]),
    (["fastjepa.in_chans=0"], ["fastjepa.in_chans=0: must be >= 1"]),
    (["train.device=gpu"], ["train.device='gpu'", "auto, cpu, cuda or cuda:N"]),
    (["fastjepa.sigreg.weight=1"], ["fastjepa.sigreg.weight=1.0: must be in [0, 1)"]),
    (["fastjepa.sigreg.slices=0"], ["fastjepa.sigreg.slices=0: must be >= 1"]),
    (["fastjepa.sigreg.t_max=0"], ["fastjepa.sigreg.t_max=0.0: must be > 0"]),
    (["fastjepa.sigreg.samples=patches"], ["fastjepa.sigreg.samples='patches'", "valid: pooled, tokens"]),
    (["fastjepa.target_encoder=teacher"], ["fastjepa.target_encoder='teacher'", "valid: ema, online"]),
    (["fastjepa.target_encoder=online", "fastjepa.target_precision=fp8"],
     ["fastjepa.fp8='target'", "fastjepa.target_encoder=online does not keep", "set fastjepa.fp8=none"]),
    (["fastjepa.fp8=half"], ["fastjepa.fp8='half'", "valid: none, target, all"]),
    (["fastjepa.fp8=all", "fastjepa.update_impl=fused"], ["fastjepa.update_impl='fused'", "fastjepa.fp8=all"]),
    (["fastjepa.fp8=all", "fastjepa.block_impl=fused"], ["fastjepa.block_impl='fused'", "torchao"]),
])
def test_impossible_setting(overrides, fragments):
    message = error_of(*overrides)
    for fragment in fragments:
        assert fragment in message
    assert "Fix:" in message


# ---- mask geometry -------------------------------------------------------------------------------------------------


def drawn_block_size(grid, scale, aspect_ratio, u_scale, u_ratio, largest):
    """The block-size rule of src/masks/multiblock.py, restated, for scale and ratio draws u_scale, u_ratio."""
    keep = int(grid * grid * (scale[0] + u_scale * (scale[1] - scale[0])))
    ar = aspect_ratio[0] + u_ratio * (aspect_ratio[1] - aspect_ratio[0])
    return min(round(math.sqrt(keep * ar)), largest), min(round(math.sqrt(keep / ar)), largest)


GEOMETRIES = [
    (16, (0.15, 0.2), (0.75, 1.5)),
    (7, (0.15, 0.2), (0.75, 1.5)),
    (14, (0.05, 0.6), (0.3, 3.0)),
    (32, (0.85, 1.0), (1.0, 1.0)),
    (10, (0.2, 0.2), (0.5, 2.0)),
    (5, (0.01, 1.0), (0.2, 5.0)),
]


@pytest.mark.parametrize("grid, scale, aspect_ratio", GEOMETRIES)
def test_block_sizes_match_the_official_draw(grid, scale, aspect_ratio):
    # parity: one draw r for both scale and ratio, clamped to grid - 1
    drawn = {drawn_block_size(grid, scale, aspect_ratio, i / 20000, i / 20000, grid - 1) for i in range(20000)}
    assert block_sizes(grid, scale, aspect_ratio, "parity") == drawn


@pytest.mark.parametrize("grid, scale, aspect_ratio", GEOMETRIES)
def test_block_sizes_match_independent_draws_in_fixed_mode(grid, scale, aspect_ratio):
    u = [i / 200 for i in range(200)]
    drawn = {drawn_block_size(grid, scale, aspect_ratio, a, b, grid) for a in u for b in u}
    assert block_sizes(grid, scale, aspect_ratio, "fixed") == drawn


@pytest.mark.parametrize("mode", ["parity", "fixed"])
def test_block_sizes_cover_what_the_collator_draws(mode):
    import numpy as np

    from fastjepa.masks import MultiBlockMaskCollator
    from fastjepa.spec import ModelSpec

    cfg = load("test_tiny", [f"fastjepa.mode={mode}"])
    collator = MultiBlockMaskCollator.from_spec(ModelSpec.from_config(cfg))
    grid = cfg.data.crop_size // cfg.mask.patch_size
    targets = block_sizes(grid, cfg.mask.pred_mask_scale, cfg.mask.aspect_ratio, mode)
    contexts = block_sizes(grid, cfg.mask.enc_mask_scale, (1.0, 1.0), mode)
    rng = np.random.default_rng(0)
    drawn = [collator.block_sizes(step, rng) for step in range(300)]
    assert {t for t, _ in drawn} <= targets and {c for _, c in drawn} <= contexts


def test_min_keep_boundary_is_exact():
    # On the 8x8 grid of test_tiny the smallest target block is 3x3 = 9 patches: min_keep 8 is fine, 9 would hang.
    assert min(h * w for h, w in block_sizes(8, (0.15, 0.2), (0.75, 1.5))) == 9
    assert load("test_tiny", ["mask.min_keep=8"]).mask.min_keep == 8
    message = error_of("mask.min_keep=9")
    assert "3x3 = 9-patch target blocks" in message and "loop forever" in message
    assert "lower mask.min_keep to 8 or less" in message and "override 'mask.min_keep=9'" in message


def test_min_keep_boundary_in_fixed_mode():
    # Independent draws reach 4x2 = 8 patches on the same grid.
    assert load("test_tiny", ["fastjepa.mode=fixed", "mask.min_keep=7"]).mask.min_keep == 7
    message = error_of("fastjepa.mode=fixed", "mask.min_keep=8")
    assert "4x2 = 8-patch target blocks" in message and "fastjepa.mode=fixed" in message


def test_context_block_too_small_would_hang():
    message = error_of("mask.enc_mask_scale=[0.1,0.1]")  # int(64 * 0.1) = 6 patches -> a 2x2 context block
    assert "mask.enc_mask_scale=[0.1, 0.1]" in message and "2x2 = 4-patch context blocks" in message


def test_context_with_no_room_besides_targets():
    overrides = ["mask.enc_mask_scale=[0.5,0.6]", "mask.pred_mask_scale=[0.5,0.6]"]
    # 6x6 context and 6x6 targets inside the first 7 rows/columns overlap by at least 5x5: 11 patches remain.
    assert load("test_tiny", overrides + ["mask.min_keep=10"]).mask.min_keep == 10
    message = error_of(*overrides, "mask.min_keep=11")
    assert "mask.min_keep=11" in message and "keeps at most 11 patches" in message
    assert "mask.allow_overlap=true" in message
    assert load("test_tiny", overrides + ["mask.min_keep=11", "mask.allow_overlap=true"]).mask.allow_overlap


# ---- construction, round trip, paths -----------------------------------------------------------------------------


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="data.crop_size=224: not divisible by mask.patch_size=5"):
        Config(mask=config.Mask(patch_size=5))
    with pytest.raises(ConfigError, match="meta.pred_depth=0"):
        config.Meta(pred_depth=0)
    cfg = Config()
    cfg.data.crop_size = 100
    with pytest.raises(ConfigError, match="data.crop_size=100"):
        cfg.validate()


@pytest.mark.parametrize("name", SHIPPED)
def test_dump_load_round_trip(tmp_path, name):
    cfg = load(name, ["optimization.lr=3e-4", "meta.read_checkpoint=a.pth.tar", "fastjepa.seed=7"])
    again = load(cfg.dump(tmp_path / "sub" / "resolved.yaml"))
    assert again == cfg
    assert yaml.safe_load((tmp_path / "sub" / "resolved.yaml").read_text()) == cfg.to_dict()


def test_placeholder_paths(monkeypatch):
    cfg = load(CONFIG_DIR / "in1k_vith14_ep300.yaml")
    assert set(cfg.placeholder_paths()) == {"data.root_path", "logging.folder"}
    with pytest.raises(ConfigError, match=r"data.root_path=.*placeholder.*Fix: pass the override data.root_path="):
        cfg.require_paths()
    monkeypatch.setenv("FASTJEPA_TEST_DATA", "/datasets")
    cfg = load(CONFIG_DIR / "in1k_vith14_ep300.yaml", ["data.root_path=$FASTJEPA_TEST_DATA", "logging.folder=/logs"])
    assert cfg.placeholder_paths() == {}
    cfg.require_paths()
    assert load("test_tiny").placeholder_paths(["data.root_path"]) == {"data.root_path": ""}


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"'test_tny' not found \(did you mean .*test_tiny.yaml\?\)"):
        load("test_tny")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(write(tmp_path, "mask: [1, 2\n"))
    with pytest.raises(ConfigError, match="mask=.*a section must be a mapping"):
        load(write(tmp_path, "mask: 4\n"))


# ---- command line --------------------------------------------------------------------------------------------------


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "fastjepa.config", *args], capture_output=True, text=True, env=env)


def test_cli_prints_resolved_yaml():
    result = run_cli("test_tiny", "optimization.lr=5e-4")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == load("test_tiny", ["optimization.lr=5e-4"]).to_dict()


def test_cli_user_error_exits_2_without_traceback():
    result = run_cli("test_tiny", "optimization.lrr=5e-4")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "did you mean optimization.lr?" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_exit_on_config_error(capsys):
    with pytest.raises(SystemExit) as info:
        config.load_or_exit("test_tiny", ["mask.patch_size=5"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: override 'mask.patch_size=5': data.crop_size=32")


# ---- names shared with other modules -------------------------------------------------------------------------------


def test_every_choice_the_config_accepts_is_accepted_where_it_is_used():
    """The choice tuples live once in fastjepa.choices; the modules take every name the config lets through."""
    from fastjepa import choices
    from fastjepa.kernels import set_backend
    from fastjepa.models import VisionTransformerPredictor, build_models
    from fastjepa.modules import Attention
    from fastjepa.spec import ModelSpec

    for name in choices.VIT_SIZES:
        with torch.device("meta"):
            build_models(ModelSpec.from_config(load("test_tiny", [f"meta.model_name={name}"])))
    for backend in choices.ATTENTION_BACKENDS:
        Attention(8, 2, backend=load("test_tiny", [f"fastjepa.attn_backend={backend}"]).fastjepa.attn_backend)
    for layout in choices.PREDICTOR_LAYOUTS:
        cfg = load("test_tiny", [f"fastjepa.predictor_layout={layout}"])
        assert VisionTransformerPredictor((4, 4), 8, 8, 1, 2, layout=cfg.fastjepa.predictor_layout).layout == layout
    for backend in choices.KERNEL_BACKENDS:
        set_backend(load("test_tiny", [f"fastjepa.kernel_backend={backend}"]).fastjepa.kernel_backend)
    set_backend("auto")


def test_renamed_and_unsupported_official_keys_say_what_to_use():
    with pytest.raises(ConfigError, match="renamed. Fix: use fastjepa.kernel_backend"):
        load("test_tiny", ["fastjepa.fused=false"])
    with pytest.raises(ConfigError, match="meta.copy_data=true: .*data.source=webdataset"):
        load("test_tiny", ["meta.copy_data=true"])
