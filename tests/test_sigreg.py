"""SIGReg (fastjepa.modules.sigreg) against a direct computation of LeJEPA's sliced Epps–Pulley statistic, its
behaviour on Gaussian and collapsed embeddings, and the same loss and gradients from 2 processes with half the
batch each as from 1 process with the whole batch; SIGReg and the online target inside I-JEPA."""

import sys
from pathlib import Path

import pytest
import torch
from dist_utils import torchrun

from fastjepa.ijepa import IJEPA
from fastjepa.mask_batch import Masks
from fastjepa.masks import MultiBlockMaskCollator
from fastjepa.models import VisionTransformer, VisionTransformerPredictor
from fastjepa.modules.sigreg import SIGReg

ROOT = Path(__file__).resolve().parents[1]


def direct_statistic(x: torch.Tensor, directions: torch.Tensor, t_max: float, points: int) -> torch.Tensor:
    """The definition, computed plainly: the complex empirical characteristic function of each projection on the
    symmetric grid [-t_max, t_max] with the same spacing, |ECF - exp(-t²/2)|² exp(-t²/2) integrated by the
    trapezoid rule, times N, averaged over the slices."""
    t = torch.linspace(-t_max, t_max, 2 * points - 1, dtype=x.dtype)
    proj = x @ directions.to(x.dtype)  # [N, S]
    ecf = torch.exp(1j * proj.unsqueeze(-1) * t).mean(0)  # [S, 2P-1]
    integrand = (ecf - torch.exp(-t**2 / 2)).abs() ** 2 * torch.exp(-t**2 / 2)
    return (torch.trapezoid(integrand, t, dim=-1) * x.shape[0]).mean()


@pytest.mark.parametrize("n,dim,slices,points", [(50, 8, 16, 17), (7, 24, 5, 9), (129, 80, 64, 2)])
def test_the_statistic_and_its_gradient_equal_the_direct_computation(n, dim, slices, points):
    """Against an fp64 evaluation of the definition, the module (fp32) errs at most twice as much as the plain
    fp32 evaluation of that definition, in value and gradient."""
    sigreg = SIGReg(slices, points, t_max=3.0)
    x64 = (torch.randn(n, dim, dtype=torch.float64).exp() - 1).requires_grad_()  # skewed: far from Gaussian
    directions = sigreg.directions(dim, seed=11, device=torch.device("cpu"))
    want = direct_statistic(x64, directions.double(), 3.0, points)
    (want_grad,) = torch.autograd.grad(want, x64)
    x32 = x64.detach().float().requires_grad_()
    plain = direct_statistic(x32, directions, 3.0, points)
    (plain_grad,) = torch.autograd.grad(plain, x32)
    got = sigreg(x32, seed=11)
    (got_grad,) = torch.autograd.grad(got, x32)

    def err(a, b):
        return float((a.detach().double() - b.detach()).norm() / b.detach().norm())

    assert got.dtype == torch.float32 and want > 0
    assert err(got, want) <= 2 * err(plain, want) + 1e-7, (float(got), float(want))
    assert err(got_grad, want_grad) <= 2 * err(plain_grad, want_grad) + 1e-7


def test_directions_are_unit_vectors_shared_by_a_seed_and_new_with_the_next():
    sigreg = SIGReg(slices=32)
    a = sigreg.directions(48, seed=5, device=torch.device("cpu"))
    assert a.shape == (48, 32)
    torch.testing.assert_close(a.norm(dim=0), torch.ones(32))
    torch.testing.assert_close(sigreg.directions(48, 5, torch.device("cpu")), a, rtol=0, atol=0)
    assert (sigreg.directions(48, 6, torch.device("cpu")) - a).abs().max() > 0.1
    assert not sigreg.state_dict()  # derived from the settings: nothing in checkpoints


def test_it_sits_at_its_null_value_for_gaussian_samples_and_is_large_for_collapsed_ones():
    """For N(0, I) samples the expected statistic is sum_k w_k (1 - exp(-t_k²)) (the ECF's variance times N),
    whatever N; a collapsed (constant) or rank-2 embedding is hundreds of times that."""
    sigreg = SIGReg()
    null = float((sigreg.weights * (1 - sigreg.gauss**2)).sum())
    gen = torch.Generator().manual_seed(0)
    gaussian = float(sigreg(torch.randn(4096, 64, generator=gen), seed=1))
    assert 0.5 * null < gaussian < 1.5 * null, (gaussian, null)
    collapsed = float(sigreg(torch.full((4096, 64), 0.3), seed=1))
    low_rank = float(sigreg(torch.randn(4096, 2, generator=gen) @ torch.randn(2, 64, generator=gen) / 8, seed=1))
    shrunk = float(sigreg(0.1 * torch.randn(4096, 64, generator=gen), seed=1))
    assert min(collapsed, low_rank, shrunk) > 100 * null, (collapsed, low_rank, shrunk)


def test_bad_settings_and_shapes_are_refused():
    with pytest.raises(ValueError, match="slices >= 1"):
        SIGReg(slices=0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        SIGReg()(torch.randn(2, 3, 4), seed=0)


@pytest.mark.dist
def test_two_processes_with_half_the_batch_give_one_processs_loss_and_gradients(tmp_path):
    """FSDP2 over 2 gloo processes, each with half of the images: the loss on every rank and the (averaged,
    gathered) gradients equal one unsharded process's on the whole batch."""
    out = tmp_path / "dist.pt"
    torchrun("dist_sigreg.py", str(out))
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_sigreg import sigreg_loss_and_grads

    want_loss, want_grads = sigreg_loss_and_grads(torch.load(out.with_suffix(".images.pt")))
    got = torch.load(out)
    assert got["losses"][0] == got["losses"][1]  # every rank computes the global statistic
    torch.testing.assert_close(torch.tensor(got["losses"][0]), want_loss.detach(), rtol=1e-5, atol=0)
    assert got["grads"].keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def tiny_ijepa(**kwargs) -> tuple[IJEPA, torch.Tensor, Masks]:
    torch.manual_seed(0)
    enc = VisionTransformer(32, 4, 3, 64, 2, 4)
    model = IJEPA(enc, VisionTransformerPredictor(enc.grid, 64, 32, 1, 4), **kwargs)
    collator = MultiBlockMaskCollator(input_size=(32, 32), patch_size=4, enc_mask_scale=(0.6, 0.8), min_keep=2, seed=0)
    _, enc_masks, pred_masks = collator([(torch.zeros(3, 32, 32), 0) for _ in range(6)])
    return model, torch.randn(6, 3, 32, 32), Masks.from_lists(enc_masks, pred_masks)


def test_ijepa_mixes_sigreg_of_the_pooled_context_into_its_loss():
    weight = 0.2
    model, images, masks = tiny_ijepa(sigreg=SIGReg(slices=64), sigreg_weight=weight, sigreg_seed=3)
    loss = model(images, masks, step=7)
    plain, reg = model.loss_terms
    model.sigreg = None
    torch.testing.assert_close(plain, model(images, masks).detach())
    pooled = model.encode_context(images, masks).mean(1)
    assert pooled.shape == (6 * masks.num_context_blocks, 64)
    torch.testing.assert_close(reg, SIGReg(slices=64)(pooled, seed=model.sigreg_step_seed(7)).detach())
    torch.testing.assert_close(loss.detach(), (1 - weight) * plain + weight * reg)
    assert model.sigreg_step_seed(7) != model.sigreg_step_seed(8)


def test_sigreg_per_token_takes_every_context_token():
    model, images, masks = tiny_ijepa(sigreg=SIGReg(slices=8), sigreg_weight=0.1, sigreg_tokens=True)
    context = model.encode_context(images, masks)
    torch.testing.assert_close(model.sigreg_samples(context, masks), context.flatten(0, 1), rtol=0, atol=0)
    model(images, masks, step=3)
    want = SIGReg(slices=8)(context.flatten(0, 1), seed=model.sigreg_step_seed(3))
    torch.testing.assert_close(model.loss_terms[1], want.detach(), rtol=0, atol=0)


def test_packed_context_pools_each_sequence():
    enc = torch.tensor([[[0, 1, 2, -1], [3, -1, -1, -1], [4, 5, 6, 7]]])  # nenc=1, B=3, lengths 3, 1, 4
    packed = Masks.from_lists(list(enc), [torch.tensor([[0], [1], [2]])], packed_num_patches=8).packed
    x = torch.randn(8, 5)
    want = torch.stack([x[0:3].mean(0), x[3:4].mean(0), x[4:8].mean(0)])
    torch.testing.assert_close(packed.segment_mean(x), want)


def test_an_online_target_is_the_encoder_with_no_copy_and_no_ema():
    model, images, masks = tiny_ijepa(online_target=True)
    assert model.online_target and model.target_encoder is model.encoder
    assert not any(k.startswith("target_encoder.") for k in model.state_dict())
    # still trained: nothing frozen beyond what a fresh encoder freezes (its sin-cos embedding)
    assert [p.requires_grad for p in model.encoder.parameters()] == [
        p.requires_grad for p in VisionTransformer(32, 4, 3, 64, 2, 4).parameters()]
    before = [p.detach().clone() for p in model.encoder.parameters()]
    model.update_target(0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.encoder.parameters(), strict=True))
    ema = IJEPA(model.encoder, model.predictor)  # its target: a copy of the same weights
    torch.testing.assert_close(model.targets(images, masks), ema.targets(images, masks), rtol=0, atol=0)
    loss = model(images, masks)
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="online target"):
        model.enable_target_replica()


def test_a_teacher_free_run_with_sigreg_logs_checkpoints_exports_and_resumes_exactly(tmp_path):
    from test_train import tiny_cfg
    from torch.distributed.checkpoint import FileSystemReader

    from fastjepa import train as fj_train
    from fastjepa.metrics import read_jsonl

    options = ["fastjepa.sigreg.weight=0.1", "fastjepa.sigreg.slices=64", "fastjepa.target_encoder=online",
               "train.checkpoint_steps=2", "train.log_every=1"]
    whole = fj_train.run(tiny_cfg(tmp_path / "whole", *options, "train.max_steps=4", "train.export=true"))
    records = [r for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if r.get("kind", "train") == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["sigreg"] > 0 and r["loss"] == pytest.approx(0.9 * r["loss_ijepa"] + 0.1 * r["sigreg"])
               for r in records)
    keys = FileSystemReader(tmp_path / "whole" / "step_00000004").read_metadata().state_dict_metadata
    assert any(".encoder." in k for k in keys) and not any("target_encoder" in k for k in keys)
    exported = torch.load(tmp_path / "whole" / "target_encoder.pt", weights_only=True)
    for name, value in whole.model.encoder.state_dict().items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)

    fj_train.run(tiny_cfg(tmp_path / "cut", *options, "train.max_steps=2"))
    resumed = fj_train.run(tiny_cfg(tmp_path / "cut", *options, "train.max_steps=4"))
    assert [resumed.losses[s] for s in (3, 4)] == [whole.losses[s] for s in (3, 4)]
    with pytest.raises(fj_train.SetupError, match="fastjepa.target_encoder=online, this run has "
                                                 "fastjepa.target_encoder=ema"):
        fj_train.run(tiny_cfg(tmp_path / "cut", "train.max_steps=6"))
