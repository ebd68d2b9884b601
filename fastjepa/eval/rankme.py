"""RankMe (Garrido et al., ICML 2023): the effective rank of a batch of embeddings, a label-free collapse monitor.

``exp(entropy(p))`` with ``p_k = sigma_k / sum(sigma) + eps`` over the singular values of the ``[n, d]`` embedding
matrix; between 1 (fully collapsed) and ``min(n, d)``. Use ``n >= d`` samples, or the value is capped at ``n``.
"""

import torch

EPS = 1e-7  # the paper's epsilon


@torch.no_grad()
def rankme(embeddings: torch.Tensor, eps: float = EPS) -> float:
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"rankme needs a [n>=2, d] matrix of embeddings, got shape {tuple(embeddings.shape)}")
    sigma = torch.linalg.svdvals(embeddings.double())
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))
