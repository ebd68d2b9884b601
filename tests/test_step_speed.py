"""What a CPU can prove about the speed of the default step: every block compiled without a graph break and with
a bounded number of graphs while token counts change, bf16 activations under bf16 autocast, no per-step cast of
the target weights (the EMA writes their bf16 replica), and no host synchronisation outside logging steps."""

import json

import pytest
import torch
from test_train import ROOT, tiny_cfg
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from fastjepa import step as fj_step
from fastjepa import train as fj_train
from fastjepa import trainer
from fastjepa.ijepa import IJEPA
from fastjepa.masks import MultiBlockMaskCollator
from fastjepa.models import VisionTransformer, VisionTransformerPredictor
from fastjepa.modules.block import Block
from fastjepa.spec import ModelSpec

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
FAST = ["meta.pred_depth=2", "fastjepa.kernel_backend=reference", "fastjepa.attn_backend=auto"]


def masks_per_step(cfg, steps):
    collator = MultiBlockMaskCollator.from_spec(ModelSpec.from_config(cfg), seed=cfg.fastjepa.seed)
    return [collator.sample(cfg.data.batch_size, step) for step in range(steps)]


@pytest.mark.slow
@pytest.mark.parametrize("varlen", [False, True], ids=["default", "varlen"])
def test_every_block_compiles_once_per_variant_without_graph_breaks(tmp_path, monkeypatch, varlen):
    """Six steps whose context and target sizes all differ, inductor on every block: no graph break; at most one
    graph per (grad mode, block variant), all made by step 2 (automatic dynamic shapes), none after."""
    extra = ["fastjepa.mode=fixed", "fastjepa.varlen_context=true"] if varlen else []
    cfg = tiny_cfg(tmp_path, "train.max_steps=6", "train.compile=true", *FAST, *extra)
    sizes = {(m.enc[0].shape[1], m.pred[0].shape[1]) for m in masks_per_step(cfg, 6)}
    assert len(sizes) >= 4  # the token counts really change from step to step
    graphs = []
    real_step = fj_step.Stepper.__call__
    monkeypatch.setattr(fj_step.Stepper, "__call__",
                        lambda self, *a: (real_step(self, *a), graphs.append(counters["stats"]["unique_graphs"]))[0])
    torch._dynamo.reset()
    counters.clear()
    result = fj_train.run(cfg)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # target encoder (no grad); encoder and predictor blocks (grad); the predictor's target-only last block
    assert graphs[-1] <= 4 and graphs[1] == graphs[-1], graphs
    assert all(isinstance(blk.attn.backend, str) and blk.attn.backend != "auto"
               for blk in result.model.modules() if isinstance(blk, Block))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    enc = VisionTransformer(32, 4, 3, 32, 2, 2, attn_backend="sdpa")
    return IJEPA(enc, VisionTransformerPredictor(enc.grid, 32, 16, 2, 2, attn_backend="sdpa"))


def tiny_batch(seed=1):
    collator = MultiBlockMaskCollator(32, 4, (0.85, 1.0), (0.15, 0.2), (0.75, 1.5), 1, 2, 4)
    masks = collator.sample(4, seed)
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)), masks


def test_block_activations_are_bf16_under_bf16_autocast(reference_ops):
    model = tiny_model()
    model.enable_target_replica(torch.bfloat16)
    seen = []
    nets = {"encoder": model.encoder, "target": model.target_forward_encoder, "predictor": model.predictor}
    for name, net in nets.items():
        for blk in net.modules():
            if isinstance(blk, Block):
                blk.register_forward_hook(lambda m, args, out, name=name: seen.append((name, args[0].dtype,
                                                                                        out.dtype)))
    images, masks = tiny_batch()
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(images, masks)
    loss.backward()
    assert {name for name, *_ in seen} == set(nets) and len(seen) == 6
    assert all(i == o == torch.bfloat16 for _, i, o in seen), seen


class WeightCasts(TorchDispatchMode):
    """Counts casts of 2-D tensors (matmul weights): what autocast does to fp32 weights at every use."""

    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and args[0].dim() == 2:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_the_target_forward_reads_the_replica_and_casts_no_weight(reference_ops):
    model = tiny_model()
    images = tiny_batch()[0]
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), WeightCasts() as without:
        model.target_forward_encoder(images)
    model.enable_target_replica(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), WeightCasts() as with_replica:
        model.target_forward_encoder(images)
    assert without.casts >= 8 and with_replica.casts == 0  # qkv, proj, fc1, fc2 of each block, once a step


# The Triton interpreter truncates bf16 casts (a GPU rounds to nearest): on CPU the fused pass is checked with an
# fp16 replica, bf16 on a GPU.
EMA_CASES = {"fused-fp16": ("auto", torch.float16, "cpu"), "reference-bf16": ("reference", torch.bfloat16, "cpu"),
             "fused-bf16-gpu": ("auto", torch.bfloat16, "cuda")}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.gpu) if "gpu" in c else c for c in EMA_CASES])
def test_the_ema_pass_writes_the_low_precision_replica(case):
    from fastjepa.kernels import set_backend

    backend, dtype, device = EMA_CASES[case]
    set_backend(backend)
    try:
        model = tiny_model().to(device)
        model.enable_target_replica(dtype)
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.add_(torch.randn_like(p))
            for r in model.target_replica.parameters():
                r.fill_(float("nan"))  # only the EMA pass can make it right again
        old = [t.detach().clone() for t in model.target_encoder.parameters()]
        model.update_target(0.9)
        for t, o, e, r in zip(model.target_encoder.parameters(), old, model.encoder.parameters(),
                              model.target_replica.parameters(), strict=True):
            torch.testing.assert_close(t, 0.9 * o + 0.1 * e)  # the EMA itself (fp32 rounding of the lerp)
            assert r.dtype == dtype
            torch.testing.assert_close(r, t.to(dtype), rtol=0, atol=0)
    finally:
        set_backend("auto")


def test_the_replica_is_not_checkpointed_and_is_refreshed_after_a_load(tmp_path):
    from fastjepa.checkpoint import CheckpointManager

    model = tiny_model()
    model.enable_target_replica(torch.bfloat16)
    assert not any("replica" in k for k in model.state_dict())
    CheckpointManager(tmp_path).save(1, model, None, {"step": 1})
    other = tiny_model(seed=3)
    other.enable_target_replica(torch.bfloat16)
    CheckpointManager(tmp_path).load(tmp_path / "step_00000001", other, None)
    other.sync_target_replica()
    for t, r in zip(model.target_encoder.parameters(), other.target_replica.parameters(), strict=True):
        torch.testing.assert_close(r, t.to(torch.bfloat16), rtol=0, atol=0)


class NoHostSync:
    """Fails on every way Python code reads a tensor on the host or builds one from Python values."""

    PATCHED = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.monkeypatch, self.active = monkeypatch, False
        for name in self.PATCHED:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._guard(name, real))
        real_tensor = torch.tensor
        monkeypatch.setattr(torch, "tensor", self._guard("torch.tensor", real_tensor))

    def _guard(self, name, real):
        def guarded(*args, **kwargs):
            if self.active:
                raise AssertionError(f"host synchronisation in a non-logging step: {name}")
            return real(*args, **kwargs)

        return guarded


SIGREG = ["fastjepa.sigreg.weight=0.1", "fastjepa.sigreg.slices=32", "fastjepa.target_encoder=online"]


@pytest.mark.parametrize("varlen,options", [(False, []), (True, []), (True, SIGREG)],
                         ids=["default", "varlen", "varlen_sigreg_online"])
def test_no_host_synchronisation_outside_logging_steps(tmp_path, monkeypatch, varlen, options):
    extra = ["fastjepa.mode=fixed", "fastjepa.varlen_context=true", *options] if varlen else []
    cfg = tiny_cfg(tmp_path, "train.max_steps=6", "train.log_every=3", *FAST, *extra)
    guard = NoHostSync(monkeypatch)
    guarded_steps = []
    real_one = fj_train.stopped_after_step

    def one_step(tr, result, *batch):
        log_step = (tr.state.step + 1) % tr.cfg.train.log_every == 0 or tr.state.step + 1 == tr.total_steps
        if log_step:
            return real_one(tr, result, *batch)
        guard.active = True
        try:
            return real_one(tr, result, *batch)  # to the device, the step, its bookkeeping
        finally:
            guard.active = False
            guarded_steps.append(tr.state.step)

    monkeypatch.setattr(fj_train, "stopped_after_step", one_step)
    result = fj_train.run(cfg)
    assert guarded_steps == [1, 2, 4, 5] and sorted(result.losses) == [1, 2, 3, 4, 5, 6]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)] == [3, 6]


def record_parallelize(monkeypatch) -> list[dict]:
    """Replace ``parallelize`` in the step's preparation by a recorder of what it is handed, then the real one."""

    calls, real = [], fj_step.parallelize

    def recording(model, *args, **kwargs):
        backends = {blk.attn.backend for blk in model.modules() if isinstance(blk, Block)}
        calls.append({"compile": kwargs["compile"], "backends": backends})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(fj_step, "parallelize", recording)
    return calls


def test_auto_attention_is_resolved_before_anything_is_compiled(tmp_path, monkeypatch):
    calls = record_parallelize(monkeypatch)
    tr = trainer.Trainer.setup(tiny_cfg(tmp_path, *FAST, "train.compile=true"))
    tr.close()
    # when blocks are handed to compile, every attention already names a concrete backend
    assert calls == [{"compile": "inductor", "backends": {"sdpa"}}]  # sdpa: the deterministic CPU choice


@pytest.mark.parametrize("setting,device,want", [(None, "cpu", None), (True, "cpu", "inductor"),
                                                 (None, "cuda", "inductor"), (False, "cuda", None)])
def test_blocks_are_compiled_by_default_only_with_cuda(tmp_path, monkeypatch, setting, device, want):
    from fastjepa import config
    from fastjepa.parallel import DistEnv
    from fastjepa.spec import StepOptions

    assert config.load(ROOT / "configs/test_tiny.yaml").train.compile is None  # shipped: null, the device decides
    calls = []
    monkeypatch.setattr(fj_step, "parallelize", lambda model, *a, **kw: calls.append(kw["compile"]) or model)
    monkeypatch.setattr(fj_step, "resolve_attention", lambda *a: {})
    model = IJEPA(VisionTransformer(32, 8, 3, 32, 1, 2), VisionTransformerPredictor((4, 4), 32, 16, 1, 2))
    model.to = lambda device: model  # no CUDA here: only the decision is under test
    cfg = tiny_cfg(tmp_path, f"train.compile={'null' if setting is None else str(setting).lower()}")
    env = DistEnv(0, 1, 0, torch.device(device))
    fj_step.prepare_model(ModelSpec.from_config(cfg), StepOptions.from_config(cfg), env, "none", model)
    assert calls == [want]
