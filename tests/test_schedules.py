import math
from types import SimpleNamespace

import pytest
import torch

from fastjepa import schedules


def _opt(**kw):
    base = dict(ema=[0.996, 1.0], epochs=10, final_lr=1.0e-6, final_weight_decay=0.4, ipe_scale=1.0, lr=0.001,
                start_lr=0.0002, warmup=2, weight_decay=0.04)
    base.update(kw)
    return SimpleNamespace(**base)


class _OfficialLR:
    """The official stateful WarmupCosineSchedule, restated: step() before each forward."""

    def __init__(self, warmup_steps, start_lr, ref_lr, T_max, final_lr):
        self.warmup_steps, self.start_lr, self.ref_lr, self.final_lr = warmup_steps, start_lr, ref_lr, final_lr
        self.T_max, self._step = T_max - warmup_steps, 0.0

    def step(self):
        self._step += 1
        if self._step < self.warmup_steps:
            return self.start_lr + self._step / max(1, self.warmup_steps) * (self.ref_lr - self.start_lr)
        progress = (self._step - self.warmup_steps) / max(1, self.T_max)
        cosine = self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return max(self.final_lr, cosine)


class _OfficialWD:
    def __init__(self, ref_wd, T_max, final_wd):
        self.ref_wd, self.T_max, self.final_wd, self._step = ref_wd, T_max, final_wd, 0.0

    def step(self):
        self._step += 1
        progress = self._step / self.T_max
        wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1 + math.cos(math.pi * progress))
        return max(self.final_wd, wd) if self.final_wd <= self.ref_wd else min(self.final_wd, wd)


@pytest.mark.parametrize("ipe,ipe_scale", [(100, 1.0), (37, 1.25)])
def test_every_step_matches_the_official_stateful_schedulers(ipe, ipe_scale):
    o = _opt(ipe_scale=ipe_scale)
    s = schedules.build(o, ipe)
    T = int(ipe_scale * o.epochs * ipe)
    lr = _OfficialLR(int(o.warmup * ipe), o.start_lr, o.lr, T, o.final_lr)
    wd = _OfficialWD(o.weight_decay, T, o.final_weight_decay)
    momentum = (o.ema[0] + i * (o.ema[1] - o.ema[0]) / (ipe * o.epochs * ipe_scale)
                for i in range(int(ipe * o.epochs * ipe_scale) + 1))
    for i in range(o.epochs * ipe):
        assert s.lr(i) == lr.step()
        assert s.weight_decay(i) == wd.step()
        assert s.momentum(i) == next(momentum)


def test_known_values():
    s = schedules.build(_opt(), 100)  # warmup 200 steps, 1000 steps in all
    assert s.total_steps == 1000 and s.warmup_steps == 200
    assert s.lr(0) == pytest.approx(0.0002 + (0.001 - 0.0002) / 200)
    assert s.lr(199) == pytest.approx(0.001)  # step 200: the cosine starts at the peak
    assert s.lr(599) == pytest.approx(1e-6 + (0.001 - 1e-6) * 0.5)  # half-way through the cosine
    assert s.lr(999) == pytest.approx(1e-6)
    assert s.weight_decay(499) == pytest.approx(0.22)  # weight decay rises 0.04 -> 0.4, cosine midpoint
    assert s.weight_decay(999) == pytest.approx(0.4)
    assert s.momentum(0) == 0.996 and s.momentum(500) == pytest.approx(0.998)


def test_apply_sets_groups_and_respects_wd_exclude():
    p1, p2 = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p1]}, {"params": [p2], "WD_exclude": True, "weight_decay": 0.0}])
    s = schedules.build(_opt(), 100)
    lr, wd = s.apply(opt, 10)
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == lr == s.lr(10)
    assert opt.param_groups[0]["weight_decay"] == wd and opt.param_groups[1]["weight_decay"] == 0.0


def test_empty_loader_is_refused():
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        schedules.build(_opt(), 0)
