"""Weighted k-NN classification on frozen features, as DINO evaluates (Caron et al., 2021): cosine similarity, the
k nearest training features vote for their class with weight exp(similarity / temperature)."""

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, temperature: float = 0.07, device="cpu", chunk: int = 1024) -> float:
    """Top-1 accuracy of the temperature-weighted k-NN vote of ``test_x`` against ``train_x``."""
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have dim {train_x.shape[1]}, test features {test_x.shape[1]}")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    train = F.normalize(train_x.float().to(device), dim=1)
    train_y = train_y.to(device)
    correct = 0
    for i in range(0, len(test_x), chunk):
        test = F.normalize(test_x[i:i + chunk].float().to(device), dim=1)
        similarity, neighbour = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(test), num_classes, device=device)
        votes.scatter_add_(1, train_y[neighbour], (similarity / temperature).exp())
        correct += int((votes.argmax(1).cpu() == test_y[i:i + chunk]).sum())
    return correct / len(test_x)
