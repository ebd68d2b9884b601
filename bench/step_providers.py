"""The providers of the step benchmark (``bench/bench_step.py``): one training step each, from the same initial
weights, marking its phases on a ``PhaseTimer``.

- ``official``: what facebookresearch/ijepa does (``bench/official_style.py``): naive attention with the
  softmax in fp32, ``apply_masks`` with a repeated int64 index, ``repeat_interleave_batch`` copies, bf16 autocast
  with a GradScaler, default AdamW, a per-parameter EMA loop, the per-step ``grad_logger`` norms and
  ``float(loss)`` host syncs (their own phase, ``logging``), no compile.
- ``pytorch``: strong plain PyTorch (``bench/plain_ijepa.py``): its own modules, SDPA, ``torch.gather`` masks,
  the official predictor layout, bf16 autocast without a scaler, ``torch.compile`` per block, fused AdamW, a
  ``_foreach_lerp_`` EMA. No fastjepa code runs in its step.
- ``fastjepa``: exactly the trainer's default step (``fastjepa.step.Stepper`` built by the trainer's
  ``prepare_model``): compiled blocks, bf16 activations, the bf16 target replica written by the fused EMA, auto
  attention, the fused gathers and loss, the target-only last predictor block, fused AdamW. Its forward and
  backward are one phase (``fwd_bwd``): the step is not split by marks inside the model.
- ``fastjepa_shared`` (opt-in, changes the method): as fastjepa with the shared-context predictor layout.
- ``fastjepa_fp8``: as fastjepa with FP8 (e4m3) matmuls in the target forward; the fastjepa providers also report
  the target forward's own time.
- ``fastjepa_sigreg``: as fastjepa with SIGReg (weight 0.05, 1024 slices, pooled per image): what the
  regulariser costs (plain PyTorch; a fused kernel only if this costs over ~1% of the step).
"""

import dataclasses
import time

import torch
import torch.nn.functional as F

from fastjepa import schedules
from fastjepa.config import Config
from fastjepa.ijepa import IJEPA, objective_options
from fastjepa.mask_batch import Masks
from fastjepa.models import build_models
from fastjepa.modules.fp8 import Float8Linear, to_float8_training
from fastjepa.parallel import DistEnv
from fastjepa.spec import ModelSpec, StepOptions
from fastjepa.step import Stepper

from . import official_style as official
from . import plain_ijepa as plain

PHASES = ("target_fwd", "context_fwd", "predictor_fwd", "backward", "fwd_bwd", "optimizer", "ema", "logging")


class PhaseTimer:
    """Marks phase boundaries inside a step: CUDA events on a GPU (no host sync until read), clocks on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self):
        self.marks = [("start", self._now())]

    def mark(self, phase: str):
        self.marks.append((phase, self._now()))

    def phases_ms(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = {}
        for (_, t0), (name, t1) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = out.get(name, 0.0) + (t0.elapsed_time(t1) if self.cuda else (t1 - t0) * 1e3)
        return out


def initial_model(s: ModelSpec, device, layout: str, backend: str = "sdpa", seed: int = 0, **options) -> IJEPA:
    """fastjepa's model at the official initialisation from ``seed``: every provider starts from its weights.
    ``options``: IJEPA's keyword options (SIGReg)."""
    torch.manual_seed(seed)
    enc, pred = build_models(dataclasses.replace(s, layout=layout, attn_backend=backend))
    return IJEPA(enc, pred, **options).to(device)


def setup_config(s: ModelSpec, batch: int, layout: str, bf16: bool, compile_blocks: bool, act_ckpt: bool,
                 fp8: str = "none", sigreg_weight: float = 0.0) -> Config:
    """The trainer's config for a benchmark model, with a constant lr and momentum like the other providers'
    steps."""
    return Config.from_dict({
        "data": {"batch_size": batch, "crop_size": s.img_size},
        "mask": {"patch_size": s.patch_size, "enc_mask_scale": list(s.enc_mask_scale), "min_keep": s.min_keep,
                 "pred_mask_scale": list(s.pred_mask_scale), "aspect_ratio": list(s.aspect_ratio),
                 "num_enc_masks": s.num_enc_masks, "num_pred_masks": s.num_pred_masks},
        "meta": {"model_name": s.model_name, "pred_emb_dim": s.pred_dim, "pred_depth": s.pred_depth,
                 "use_bfloat16": bf16},
        "optimization": {"lr": 1e-3, "start_lr": 1e-3, "final_lr": 1e-3, "warmup": 0, "weight_decay": 0.01,
                         "final_weight_decay": 0.01, "ema": [0.996, 0.996]},
        "fastjepa": {"predictor_layout": layout, "in_chans": s.in_chans,
                     "fp8": fp8, "sigreg": {"weight": sigreg_weight}},
        "train": {"compile": compile_blocks, "activation_checkpointing": act_ckpt},
    })


class OfficialStep:
    layout = "official"
    takes_masks_value = False

    def __init__(self, s: ModelSpec, device, amp_dtype, compile_backend, act_ckpt: bool = False, batch: int = 0):
        if act_ckpt:
            raise ValueError("the official-style provider has no activation checkpointing (the official code has none)")
        model = initial_model(s, device, self.layout, "math")
        self.heads = s.num_heads
        self.enc, self.pred, self.tgt = (dict(m.named_parameters())
                                         for m in (model.encoder, model.predictor, model.target_encoder))
        self.online, self.target = list(model.encoder.parameters()), list(model.target_encoder.parameters())
        self.encoder = model.encoder
        self.opt = torch.optim.AdamW([p for p in [*model.encoder.parameters(), *model.predictor.parameters()]
                                      if p.requires_grad])
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is not None)

    def step(self, images, masks_enc, masks_pred, timer: PhaseTimer, momentum: float, index: int):
        with torch.autocast(images.device.type, self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            with torch.no_grad():
                h = official.encoder_forward(self.tgt, images, self.heads)
                h = F.layer_norm(h, (h.size(-1),))
                h = official.repeat_interleave_batch(official.apply_masks(h, masks_pred), len(h), repeat=len(masks_enc))
            timer.mark("target_fwd")
            z = official.encoder_forward(self.enc, images, self.heads, masks_enc)
            timer.mark("context_fwd")
            z = official.predictor_forward(self.pred, z, masks_enc, masks_pred, self.heads)
            loss = F.smooth_l1_loss(z, h)
        timer.mark("predictor_fwd")
        self.scaler.scale(loss).backward()
        timer.mark("backward")
        self.scaler.step(self.opt)
        self.scaler.update()
        timer.mark("optimizer")
        # the official grad_logger: one host sync per weight matrix, every step
        for n, p in self.encoder.named_parameters():
            if p.grad is not None and not (n.endswith(".bias") or p.ndim == 1):
                float(torch.norm(p.grad))
        self.opt.zero_grad()
        timer.mark("logging")
        official.ema_update(self.target, self.online, momentum)
        timer.mark("ema")
        return loss.item()


class PyTorchStep:
    """Strong plain PyTorch (``bench/plain_ijepa.py``), from the same initial weights."""

    layout = "official"
    takes_masks_value = False

    def __init__(self, s: ModelSpec, device, amp_dtype, compile_backend, act_ckpt: bool = False, batch: int = 0):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        model = initial_model(s, "cpu", self.layout)  # only its weights: copied to the device below
        self.encoder, self.target, self.predictor = (
            m.to(device) for m in plain.build(s.embed_dim, s.depth, s.num_heads, s.mlp_ratio, s.patch_size,
                                              s.num_patches, s.pred_dim, s.pred_depth, s.in_chans))
        for mine, theirs in ((self.encoder, model.encoder), (self.target, model.target_encoder),
                             (self.predictor, model.predictor)):
            mine.load_state_dict(theirs.state_dict())
        blocks = [*self.encoder.blocks, *self.target.blocks, *self.predictor.predictor_blocks]
        if act_ckpt:
            for blocks_of in (self.encoder.blocks, self.predictor.predictor_blocks):
                for i, blk in enumerate(blocks_of):
                    blocks_of[i] = checkpoint_wrapper(blk)
        if compile_backend is not None:
            for blk in blocks:
                blk.compile(backend=compile_backend)
        self.online, self.ema_target = list(self.encoder.parameters()), list(self.target.parameters())
        params = [p for m in (self.encoder, self.predictor) for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, fused=True)
        self.amp_dtype = amp_dtype

    def step(self, images, masks_enc, masks_pred, timer: PhaseTimer, momentum: float, index: int):
        with torch.autocast(images.device.type, self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            with torch.no_grad():
                h = self.target(images)
                h = plain.repeat_per_context(plain.apply_masks(F.layer_norm(h, (h.shape[-1],)), masks_pred),
                                             len(masks_pred), len(masks_enc))
            timer.mark("target_fwd")
            z = self.encoder(images, masks_enc)
            timer.mark("context_fwd")
            loss = F.smooth_l1_loss(self.predictor(z, masks_enc, masks_pred), h)
        timer.mark("predictor_fwd")
        loss.backward()
        timer.mark("backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        timer.mark("optimizer")
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_target, self.online, 1.0 - momentum)
        timer.mark("ema")
        return loss.detach()


class FastJepaStep:
    """The trainer's default step (``Stepper.build``), on masks handed off as one ``Masks`` value."""

    layout = "repeat"
    fp8 = "none"
    sigreg_weight = 0.0
    takes_masks_value = True

    def __init__(self, s: ModelSpec, device, amp_dtype, compile_backend, act_ckpt: bool = False, batch: int = 0):
        cfg = setup_config(s, batch, self.layout, amp_dtype is not None, compile_backend is not None, act_ckpt,
                           self.fp8, self.sigreg_weight)
        spec = ModelSpec.from_config(cfg)
        model = initial_model(s, device, self.layout, "auto", **objective_options(spec.objective))
        env = DistEnv(0, 1, 0, torch.device(device))
        self.stepper = Stepper.build(spec, StepOptions.from_config(cfg), env, "none", model,
                                     schedules.build(cfg.optimization, 1000), compile_backend or "inductor")

    def step(self, images, masks: Masks, _, timer: PhaseTimer, momentum: float, index: int):
        return self.stepper(images, masks, index, mark=timer.mark).loss

    @torch.no_grad()
    def target_forward_ms(self, images: torch.Tensor, repeats: int = 3) -> float:
        """Median ms of the target forward alone (after the warm-up steps compiled it)."""
        timer, times = PhaseTimer(images.device), []
        for _ in range(repeats):
            timer.start()
            with torch.autocast(**self.stepper.autocast):
                self.stepper.model.target_forward_encoder(images)
            timer.mark("target")
            times.append(timer.phases_ms()["target"])
        return sorted(times)[len(times) // 2]


class FastJepaSharedStep(FastJepaStep):
    layout = "shared"


class FastJepaFp8Step(FastJepaStep):
    """The default step with FP8 targets (``fastjepa.fp8: target``)."""

    fp8 = "target"


class FastJepaFp8AllStep(FastJepaStep):
    """The default step with every GEMM in FP8 (``fastjepa.fp8: all``: torchao's float8 training for the context
    encoder and the predictor, fastjepa's FP8 targets)."""

    fp8 = "all"


class FastJepaTorchaoFp8Step(FastJepaStep):
    """The FP8-target step with its target forward through torchao's float8 layers (row-wise scales, as fastjepa's)
    instead of fastjepa's: the library a user would reach for, measured against the hand-written path."""

    fp8 = "target"  # builds the low-precision replica, whose FP8 layers then become torchao's

    def __init__(self, s: ModelSpec, device, amp_dtype, compile_backend, act_ckpt: bool = False, batch: int = 0):
        super().__init__(s, device, amp_dtype, compile_backend, act_ckpt, batch)
        replica = self.stepper.model.target_replica  # nothing has run it yet: the blocks compile on first use
        if not to_float8_training(replica, source=Float8Linear):  # the EMA then writes the weights torchao reads
            raise RuntimeError("fastjepa_torchao_fp8: the target replica has no FP8 layer to hand to torchao")
        for block in replica.blocks:
            block.impl = "compile"  # the fused MLP runs fc1 through fastjepa's kernels, outside torchao's layers


class FastJepaSigRegStep(FastJepaStep):
    """The default step with SIGReg mixed into the loss (``fastjepa.sigreg.weight: 0.05``)."""

    sigreg_weight = 0.05


STEPS = {"official": OfficialStep, "pytorch": PyTorchStep, "fastjepa": FastJepaStep,
         "fastjepa_shared": FastJepaSharedStep, "fastjepa_fp8": FastJepaFp8Step, "fastjepa_fp8_all": FastJepaFp8AllStep,
         "fastjepa_torchao_fp8": FastJepaTorchaoFp8Step, "fastjepa_sigreg": FastJepaSigRegStep}
