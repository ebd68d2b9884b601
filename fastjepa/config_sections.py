"""The sections of a run configuration: one dataclass per YAML section, each coercing its values to their types
and checking their ranges and choices (errors name the dotted key, the value and the fix). ``fastjepa.config``
assembles them into a ``Config`` and adds the checks across sections."""

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import ClassVar

from fastjepa.choices import (
    ATTENTION_BACKENDS,
    BLOCK_IMPLS,
    DATA_SOURCES,
    FP8_SCOPES,
    KERNEL_BACKENDS,
    MASK_MODES,
    PARALLEL_STRATEGIES,
    PREDICTOR_LAYOUTS,
    PROGRESS_STYLES,
    SIGREG_SAMPLES,
    TARGET_ENCODERS,
    TARGET_PRECISIONS,
    UPDATE_IMPLS,
    VIT_SIZES,
)
from fastjepa.mask_geometry import Problem, range_problems, sampling_problem

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"

# Strings PyYAML (YAML 1.1) leaves unparsed but that are plain numbers, e.g. "1e-6"; the official train.py calls
# float() on such values, so float fields accept them.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A user error in a config: the message names the key, the value and the fix. ``key`` is the dotted key."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def show(value) -> str:
    """A value as the user wrote it in YAML (lists, true/false, null); strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


def fail(key: str, value, problem: str, fix: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={show(value)}: {problem}. Fix: {fix}", key=key)


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    if origin is tuple:
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}[tp]


def _coerce(key: str, value, tp, example):
    """``value`` as type ``tp``: lists become tuples, ints and numeric strings become floats; anything else that
    does not match (a bool for an int, text for a number, a number for a string) is an error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _coerce(key, value, inner, example)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            eg = f", e.g. {show(example)}" if example is not None else ""
            fail(key, value, f"expected {_describe(tp)}", f"write {_describe(tp)}{eg}")
        item_types = args if origin is tuple else args * len(value)
        items = zip(value, item_types, strict=True)
        return origin(_coerce(f"{key}[{i}]", v, t, None) for i, (v, t) in enumerate(items))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: (isinstance(value, (int, float)) and not isinstance(value, bool))
        or (isinstance(value, str) and _NUMBER.fullmatch(value.strip()) is not None),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        eg = f", e.g. {show(example)}" if example is not None else ""
        hint = " (quote it in YAML)" if tp is str else ""
        fail(key, value, f"expected {_describe(tp)}, got {type(value).__name__}", f"write {_describe(tp)}{eg}{hint}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            fail(key, value, "must be a finite number", f"write a finite number, e.g. {show(example)}")
    return value


def _at_least(key: str, value, low, fix: str = "") -> None:
    if value < low:
        fail(key, value, f"must be >= {low}", fix or f"set {key} to {low} or more")


def _choice(key: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        fail(key, value, f"unknown value; {hint}valid: {', '.join(choices)}",
             f"set {key} to one of {', '.join(choices)}")


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


class Section:
    """Base of the section dataclasses: coerces field types on construction, then checks the section's values."""

    name: ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):
            key, value, tp = f"{self.name}.{f.name}", getattr(self, f.name), _hints(type(self))[f.name]
            if is_section(tp):
                value = _subsection(key, value, tp)
            else:
                value = _coerce(key, value, tp, f.default if f.default is not dataclasses.MISSING else None)
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Ranges and choices of this section's own values."""

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists, sub-sections as mappings), YAML-able."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Section) else list(value) if isinstance(
                value, tuple) else value
        return out


def is_section(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def section_keys(cls) -> list[str]:
    """Every key of a section, a sub-section's as ``sub.key`` (e.g. ``sigreg.weight`` in ``fastjepa``)."""
    keys = []
    for f in fields(cls):
        tp = _hints(cls)[f.name]
        keys += [f"{f.name}.{k}" for k in section_keys(tp)] if is_section(tp) else [f.name]
    return keys


def key_type(cls, key: str):
    """The type of a (possibly ``sub.key``) key of section ``cls``."""
    head, _, rest = key.partition(".")
    tp = _hints(cls)[head]
    return key_type(tp, rest) if rest else tp


def _subsection(key: str, value, cls):
    """A nested section (e.g. ``fastjepa.sigreg``) from its YAML mapping; missing keys take their defaults."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if not isinstance(value, dict):
        fail(key, value, "must be a mapping of keys", f"write '{key.rsplit('.', 1)[-1]}:' then indented "
             f"'key: value' lines; it accepts: {', '.join(section_keys(cls))}")
    return cls(**value)


# Field order within a section is the official files' (alphabetical), so dumps read like the recipes.
@dataclass
class Data(Section):
    name: ClassVar[str] = "data"
    batch_size: int = 128  # per process
    color_jitter_strength: float = 0.0
    crop_scale: tuple[float, float] = (0.3, 1.0)  # random-resized-crop area range
    crop_size: int = 224
    image_folder: str = "imagenet_full_size/061417/"  # relative to root_path
    num_workers: int = 10
    pin_mem: bool = True
    root_path: str = ""
    use_color_distortion: bool = False
    use_gaussian_blur: bool = False
    use_horizontal_flip: bool = False
    # fastjepa's own (fastjepa.data): where samples come from and how the streaming loader treats them
    source: str = "imagefolder"  # "imagefolder" (official: root_path/image_folder/train/), "webdataset", ...
    shards: str = ""  # webdataset: brace pattern / '::'-list of tar urls (local, pipe:cmd, http)
    shard_index: str = ""  # webdataset: index.json of per-shard counts; default: next to the first local shard
    shuffle_buffer: int = 1000  # webdataset: samples held per worker for shuffling within shards
    max_bad_fraction: float = 0.01  # share of unreadable samples that aborts the run (0: abort on the first)
    synthetic_samples: int = 10000  # synthetic: samples per epoch
    synthetic_image_size: tuple[int, int] = (500, 375)  # synthetic: JPEG width, height
    fast_decode: bool = True  # DCT-scaled JPEG decode, torch uint8 resize (resampling noise); false: PIL as torchvision

    def check(self) -> None:
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.color_jitter_strength", self.color_jitter_strength, 0)
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            fail("data.crop_scale", self.crop_scale, "must be [min, max] with 0 < min <= max <= 1 (fractions of the "
                 "image area)", "set it within those bounds, e.g. [0.3, 1.0]")
        _at_least("data.crop_size", self.crop_size, 1)
        _at_least("data.num_workers", self.num_workers, 0)
        _choice("data.source", self.source, DATA_SOURCES)
        if self.source == "webdataset" and not self.shards:
            fail("data.shards", self.shards, "data.source=webdataset needs the shard urls",
                 "set data.shards, e.g. '/data/in1k/train-{000000..001281}.tar' (written by "
                 "python -m fastjepa.data.make_shards)")
        if self.source == "mnist" and self.use_horizontal_flip:
            fail("data.use_horizontal_flip", True, "a mirrored digit is not a digit (data.source=mnist)",
                 "set data.use_horizontal_flip=false")
        _at_least("data.shuffle_buffer", self.shuffle_buffer, 0)
        if not 0 <= self.max_bad_fraction <= 1:
            fail("data.max_bad_fraction", self.max_bad_fraction, "must be a fraction in [0, 1]",
                 "set it to e.g. 0.01 (abort when more than 1% of the samples read are unusable)")
        _at_least("data.synthetic_samples", self.synthetic_samples, 1)
        _at_least("data.synthetic_image_size[0]", min(self.synthetic_image_size), 1)


@dataclass
class Logging(Section):
    name: ClassVar[str] = "logging"
    folder: str = ""  # logs and checkpoints
    # the official checkpoint file's prefix: meta.load_checkpoint reads <folder>/<tag>-latest.pth.tar
    write_tag: str = "jepa"


@dataclass
class Mask(Section):
    name: ClassVar[str] = "mask"
    allow_overlap: bool = False  # may the context block overlap the target blocks
    aspect_ratio: tuple[float, float] = (0.75, 1.5)  # of the target blocks (height / width)
    enc_mask_scale: tuple[float, float] = (0.85, 1.0)  # context block area, fraction of the patch grid
    min_keep: int = 10  # a block is redrawn until it has more than min_keep patches
    num_enc_masks: int = 1  # context blocks per image
    num_pred_masks: int = 4  # target blocks per image
    patch_size: int = 16
    pred_mask_scale: tuple[float, float] = (0.15, 0.2)  # target block area, fraction of the patch grid

    def check(self) -> None:
        for problem in range_problems(self.enc_mask_scale, self.pred_mask_scale, self.aspect_ratio, self.min_keep,
                                      self.num_enc_masks, self.num_pred_masks, self.patch_size):
            _refuse(problem)


def mask_key(setting: str) -> str:
    """The config key of a mask-recipe setting named as in fastjepa.mask_geometry (``ModelSpec``'s field names)."""
    return {"img_size": "data.crop_size", "mask_mode": "fastjepa.mode"}.get(setting, f"mask.{setting}")


def _refuse(problem: Problem) -> typing.NoReturn:
    fail(mask_key(problem.setting), problem.value, problem.problem, problem.fix)


@dataclass
class Meta(Section):
    name: ClassVar[str] = "meta"
    copy_data: bool = False  # the official cluster's copy of the dataset to local scratch: not supported
    # as the official trainer: start from the official checkpoint <logging.folder>/<read_checkpoint>, or
    # <logging.folder>/<logging.write_tag>-latest.pth.tar (weights, AdamW state, epoch)
    load_checkpoint: bool = False
    model_name: str = "vit_base"
    pred_depth: int = 6
    pred_emb_dim: int = 384
    read_checkpoint: str | None = None  # file name inside logging.folder
    use_bfloat16: bool = False

    def check(self) -> None:
        if self.copy_data:
            fail("meta.copy_data", True, "copying the dataset to local scratch is specific to the official cluster "
                 "and not supported", "set meta.copy_data=false; to read data fast, write WebDataset shards "
                 "(python -m fastjepa.data.make_shards) and set data.source=webdataset")
        _choice("meta.model_name", self.model_name, tuple(VIT_SIZES))
        _at_least("meta.pred_depth", self.pred_depth, 1)
        _at_least("meta.pred_emb_dim", self.pred_emb_dim, 1)


@dataclass
class Optimization(Section):
    name: ClassVar[str] = "optimization"
    ema: tuple[float, float] = (0.996, 1.0)  # target-encoder momentum, linear from ema[0] to ema[1]
    epochs: int = 300
    final_lr: float = 1e-6
    final_weight_decay: float = 0.4
    ipe_scale: float = 1.0  # schedules span ipe_scale * epochs * iterations_per_epoch
    lr: float = 1e-3  # peak lr, reached after warmup
    start_lr: float = 2e-4
    warmup: int = 40  # epochs
    weight_decay: float = 0.04

    def check(self) -> None:
        for i, m in enumerate(self.ema):
            if not 0 <= m <= 1:
                fail(f"optimization.ema[{i}]", m, "an EMA momentum must lie in [0, 1]", "e.g. ema: [0.996, 1.0]")
        _at_least("optimization.epochs", self.epochs, 1)
        for key in ("final_lr", "final_weight_decay", "lr", "start_lr", "weight_decay"):
            _at_least(f"optimization.{key}", getattr(self, key), 0)
        # The official momentum schedule has ipe*epochs*ipe_scale + 1 values and is drawn once per step: with
        # ipe_scale < 1 it runs out before training ends (and the momentum would pass ema[1]).
        _at_least("optimization.ipe_scale", self.ipe_scale, 1.0,
                  "set optimization.ipe_scale >= 1.0 (the official recipes use 1.0); to train shorter, lower epochs")
        _at_least("optimization.warmup", self.warmup, 0)


@dataclass
class SIGRegSettings(Section):
    """``fastjepa.sigreg``: LeJEPA's regulariser towards an isotropic Gaussian embedding (fastjepa.sigreg)."""

    name: ClassVar[str] = "fastjepa.sigreg"
    # lambda: loss = (1 - lambda) * I-JEPA + lambda * SIGReg; 0 = off (the official method). The statistic grows
    # with the global batch and its gradient dwarfs smooth-L1's, so useful values are ~1e-6..1e-4, not LeJEPA's 0.05
    weight: float = 0.0
    slices: int = 1024  # random unit directions per step
    points: int = 17  # quadrature points of t on [0, t_max]
    t_max: float = 3.0
    samples: str = "pooled"  # "pooled": context-encoder output averaged per image; "tokens": every context token

    def check(self) -> None:
        if not 0 <= self.weight < 1:
            fail("fastjepa.sigreg.weight", self.weight, "must be in [0, 1) (0 turns SIGReg off; 1 would drop the "
                 "I-JEPA loss)", "set it to e.g. 1e-5 (README: SIGReg)")
        _at_least("fastjepa.sigreg.slices", self.slices, 1)
        _at_least("fastjepa.sigreg.points", self.points, 2)
        if not self.t_max > 0:
            fail("fastjepa.sigreg.t_max", self.t_max, "must be > 0", "set it to e.g. 3.0 (LeJEPA's)")
        _choice("fastjepa.sigreg.samples", self.samples, SIGREG_SAMPLES)


@dataclass
class FastJepa(Section):
    name: ClassVar[str] = "fastjepa"
    mode: str = "parity"  # "parity": reproduce the official training, quirks included; "fixed": quirks corrected
    seed: int = 0
    # "auto": each call site's fastest backend at the step's shapes, timed on the GPU before compiling (sdpa on CPU);
    # the H200 measurements of the default step ran it (bench/results/nvidia-h200/)
    attn_backend: str = "auto"
    in_chans: int = 3
    kernel_backend: str = "auto"  # "auto": per op, what measured faster on the GPU; "triton"; "reference"
    # each block's memory-bound half (residual add + LayerNorm, fc1 bias + GELU): "compile" the PyTorch ops (fused
    # by torch.compile), "fused" fastjepa's kernels; "auto" times both per call site at the run's shapes on the GPU
    block_impl: str = "auto"
    # the parameter update: "separate" (fused AdamW, then the EMA), "fused" (AdamW + EMA + bf16 replica in one
    # pass); "auto" times both on clones of the run's parameters on the GPU ("separate" on CPU)
    update_impl: str = "auto"
    # predictor attention layout (fastjepa.models.predictor): "repeat" = the official method with a cheaper last
    # block (same results), "official" = every block on every token, "shared" = opt-in, context computed once
    predictor_layout: str = "repeat"
    # fixed mode, opt-in: keep every image's whole context (no cut to the batch minimum), packed sequences with
    # cumulative lengths through varlen attention (fastjepa.mask_batch.PackedContext); the loss weighting is unchanged
    varlen_context: bool = False
    # FP8 matmuls (e4m3, row-wise dynamic scales: twice the bf16 rate on Hopper): "none"; "target" the target
    # encoder's forward (half the step's FLOPs, no gradient); "all" also the context encoder's and the predictor's
    # forward and backward GEMMs (torchao.float8). fp32 master weights, optimizer and checkpoints are unchanged.
    fp8: str = "none"
    # the former name of fp8=target, kept working: "fp8" here sets fastjepa.fp8=target ("bf16" changes nothing)
    target_precision: str = "bf16"
    # "ema": the official momentum target encoder; "online": targets from the context encoder itself under no_grad
    # (teacher-free, as LeJEPA: no target copy in memory, no EMA step; pair it with SIGReg against collapse)
    target_encoder: str = "ema"
    sigreg: SIGRegSettings = field(default_factory=SIGRegSettings)

    def check(self) -> None:
        _choice("fastjepa.mode", self.mode, MASK_MODES)
        if not 0 <= self.seed < 2**32:
            fail("fastjepa.seed", self.seed, "must be in [0, 2**32) (numpy's seed range)", "e.g. seed: 0")
        _choice("fastjepa.attn_backend", self.attn_backend, ATTENTION_BACKENDS)
        _choice("fastjepa.kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        _choice("fastjepa.block_impl", self.block_impl, BLOCK_IMPLS)
        _choice("fastjepa.update_impl", self.update_impl, UPDATE_IMPLS)
        _choice("fastjepa.predictor_layout", self.predictor_layout, PREDICTOR_LAYOUTS)
        _choice("fastjepa.fp8", self.fp8, FP8_SCOPES)
        _choice("fastjepa.target_precision", self.target_precision, TARGET_PRECISIONS)
        if self.target_precision == "fp8" and self.fp8 == "none":
            self.fp8 = "target"
        _choice("fastjepa.target_encoder", self.target_encoder, TARGET_ENCODERS)
        if self.target_encoder == "online" and self.fp8 != "none":
            fail("fastjepa.fp8", self.fp8, "FP8 targets read the EMA target's low-precision replica, which "
                 "fastjepa.target_encoder=online does not keep", "set fastjepa.fp8=none")
        if self.update_impl == "fused" and self.fp8 != "none":
            fail("fastjepa.update_impl", "fused", "the one-pass AdamW + EMA update does not write the FP8 target's "
                 f"e4m3 weights (the EMA of fastjepa.fp8={self.fp8} does)",
                 "set fastjepa.update_impl=auto or separate")
        if self.block_impl == "fused" and self.fp8 == "all":
            fail("fastjepa.block_impl", "fused", "the fused MLP runs fc1 without its bias through its own kernels, "
                 "outside torchao's FP8 layers (fastjepa.fp8=all)", "set fastjepa.block_impl=auto or compile")
        if self.varlen_context and self.mode != "fixed":
            fail("fastjepa.varlen_context", True, "variable-length context is a fixed-mode correction (the "
                 "official sampler cuts every context to the batch minimum)", "also set fastjepa.mode=fixed")
        if self.varlen_context and self.predictor_layout == "shared":
            fail("fastjepa.varlen_context", True, "the shared-context predictor layout has no variable-length path",
                 "use fastjepa.predictor_layout=repeat with it")
        _at_least("fastjepa.in_chans", self.in_chans, 1)


EVAL_DATA = ("imagefolder", "webdataset", "mnist")


@dataclass
class Eval(Section):
    """``eval``: an online k-NN probe of the target encoder while training (off by default)."""

    name: ClassVar[str] = "eval"
    every_epochs: int = 0  # k-NN top-1 of the target encoder every N epochs (0: off)
    data: str = ""  # "imagefolder" or "webdataset" (eval.train / eval.val), or "mnist" (the bundled digits)
    train: str = ""  # the labelled memory bank: an ImageFolder folder or a shard pattern
    val: str = ""  # the evaluated split, like eval.train
    max_samples: int = 10000  # per split, the first ones: decoded once, held in memory at data.crop_size
    knn_k: int = 20
    knn_temperature: float = 0.07

    def check(self) -> None:
        _at_least("eval.every_epochs", self.every_epochs, 0)
        _at_least("eval.max_samples", self.max_samples, 1)
        _at_least("eval.knn_k", self.knn_k, 1)
        if not self.knn_temperature > 0:
            fail("eval.knn_temperature", self.knn_temperature, "must be positive", "e.g. 0.07 (DINO's)")
        if self.every_epochs:
            _choice("eval.data", self.data, EVAL_DATA)
            if self.data != "mnist" and not (self.train and self.val):
                fail("eval.data", self.data, "needs eval.train and eval.val (a folder or a shard pattern each)",
                     "set both, or eval.every_epochs=0")


@dataclass
class Train(Section):
    name: ClassVar[str] = "train"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    log_every: int = 10  # iterations between log lines (official log_freq)
    checkpoint_every: int = 50  # epochs between permanent checkpoints (official checkpoint_freq); latest every epoch
    keep_last: int = 3  # rolling checkpoints (every epoch / checkpoint_steps / preemption) kept; 0 keeps all
    checkpoint_steps: int = 0  # also checkpoint every N steps (0: only at epoch ends, preemption and the end)
    # periodic and epoch-end saves staged to CPU and written in the background while training goes on
    async_checkpoint: bool = False
    resume: str = "auto"  # "auto": latest checkpoint in logging.folder if any; "none"; or a checkpoint path
    parallel: str = "auto"  # "auto" (fsdp under torchrun, else none), "none", "ddp", "fsdp" (FSDP2), "hsdp"
    shard_size: int = 0  # hsdp: processes per shard group (0: one node's, torchrun's LOCAL_WORLD_SIZE)
    compile: bool | None = None  # torch.compile every transformer block; null (default): on with CUDA
    activation_checkpointing: bool = False  # recompute encoder/predictor block activations in the backward
    max_steps: int = 0  # stop after this many steps (0: optimization.epochs); schedules keep the full horizon
    max_bad_steps: int = 20  # consecutive non-finite loss/gradient steps (each skipped) that stop the run
    clip_grad: float = 0.0  # clip the global gradient norm to this (0: off, as the official)
    rankme_every: int = 0  # steps between RankMe evaluations of the target encoder (0: off)
    rankme_samples: int = 512  # images per rank for RankMe (>= the embedding width for a meaningful value)
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: detected for known GPUs, else MFU not reported
    dist_timeout_s: float = 600.0  # collective timeout: a rank that died makes the others exit after this
    progress: str = "auto"  # "auto" (progress bar on a terminal, log lines otherwise), "bar", "lines"
    export: bool = True  # write the final target encoder (full state dict + timm-named file) to logging.folder
    memory_check: bool = True  # refuse a run whose estimated memory is above the device's before building it

    def check(self) -> None:
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            fail("train.device", self.device, "unknown device", "use auto, cpu, cuda or cuda:N")
        _at_least("train.log_every", self.log_every, 1)
        _at_least("train.checkpoint_every", self.checkpoint_every, 1)
        _at_least("train.keep_last", self.keep_last, 0)
        for key in ("checkpoint_steps", "max_steps", "rankme_every", "clip_grad", "peak_tflops"):
            _at_least(f"train.{key}", getattr(self, key), 0)
        _at_least("train.max_bad_steps", self.max_bad_steps, 1)
        _at_least("train.rankme_samples", self.rankme_samples, 2)
        _at_least("train.dist_timeout_s", self.dist_timeout_s, 1)
        _at_least("train.shard_size", self.shard_size, 0)
        _choice("train.parallel", self.parallel, PARALLEL_STRATEGIES)
        _choice("train.progress", self.progress, PROGRESS_STYLES)


def check_mask_sampling(data: Data, mask: Mask, mode: str) -> None:
    """Refuse a mask recipe the sampler could never draw on the data's patch grid (``sampling_problem``)."""
    problem = sampling_problem(data.crop_size, mask.patch_size, mask.enc_mask_scale, mask.pred_mask_scale,
                               mask.aspect_ratio, mask.min_keep, mask.allow_overlap, mode, name=mask_key)
    if problem:
        _refuse(problem)
