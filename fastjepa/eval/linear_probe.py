"""Linear probe: frozen features extracted once, then a multinomial logistic regression fitted in torch.

Works on any encoder that maps ``[B, C, H, W]`` images to ``[B, N, D]`` tokens (average-pooled) or ``[B, D]``
features, and on raw pixels (``encoder=None``), over any iterable of ``(images, labels)`` batches. The L2 strength
is chosen on a slice of the training features (never on the test set); the classifier is then refitted on all
training features and scored top-1 on the test features.
"""

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

L2_GRID = (1e-4, 1e-3, 1e-2)


def tensor_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256):
    """``(images, labels)`` batches over in-memory tensors, in order."""
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size], labels[i:i + batch_size]


def to_float_images(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) images -> normalised float32, channel-wise ``(x - mean) / std``."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    shape = (1, -1, 1, 1)
    return (x - torch.tensor(mean, device=x.device).view(shape)) / torch.tensor(std, device=x.device).view(shape)


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images bilinearly resized to ``size`` x ``size`` (the encoder's resolution), unchanged if already so."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def extract_features(encoder: nn.Module | None, batches: Iterable, *, device: torch.device | str = "cpu",
                     preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, D]`` (float32, CPU) and labels ``[N]`` for every batch; ``encoder=None`` gives raw pixels."""
    feats, labels = [], []
    device = torch.device(device)
    if encoder is not None:
        encoder.eval()
    for images, y in batches:
        x = images.to(device, non_blocking=True)
        x = preprocess(x) if preprocess is not None else x.float()
        if encoder is None:
            f = x.flatten(1)
        else:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                f = encoder(x)
            f = f.mean(dim=1) if f.ndim == 3 else f
        feats.append(f.float().cpu())
        labels.append(y.cpu())
    if not feats:
        raise ValueError("extract_features: the data source yielded no batch")
    return torch.cat(feats), torch.cat(labels).long()


class LogisticRegression(nn.Module):
    """Standardised features -> logits; the standardisation statistics come from the training features."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                            max_iter: int = 100) -> LogisticRegression:
    """Full-batch L-BFGS on the convex multinomial objective (deterministic; no lr or epochs to tune)."""
    x, y = x.float(), y.long()
    model = LogisticRegression(x.mean(0), x.std(0).clamp_min(1e-6), num_classes)
    opt = torch.optim.LBFGS(model.linear.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                            tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * l2 * model.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


@torch.no_grad()
def accuracy(model: LogisticRegression, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x.float()).argmax(1) == y).float().mean())


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 l2_grid: Iterable[float] = L2_GRID, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Top-1 accuracy of a logistic regression on frozen features; the L2 strength is picked on a random
    ``val_fraction`` of the training features. Returns ``{"top1", "l2", "val_top1"}``."""
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have dim {train_x.shape[1]}, test features {test_x.shape[1]}")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(len(train_x) * val_fraction))
    val, fit = perm[:n_val], perm[n_val:]
    scores = {}
    for l2 in l2_grid:
        clf = fit_logistic_regression(train_x[fit], train_y[fit], num_classes, l2)
        scores[l2] = accuracy(clf, train_x[val], train_y[val])
    best = max(scores, key=lambda k: (scores[k], k))
    clf = fit_logistic_regression(train_x, train_y, num_classes, best)
    return {"top1": accuracy(clf, test_x, test_y), "l2": best, "val_top1": scores[best]}
