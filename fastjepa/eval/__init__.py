"""Evaluation of pretrained encoders: linear probe on frozen features, RankMe (label-free collapse monitor)."""

from fastjepa.eval.linear_probe import extract_features, fit_logistic_regression, linear_probe, tensor_batches
from fastjepa.eval.rankme import rankme

__all__ = ["extract_features", "fit_logistic_regression", "linear_probe", "rankme", "tensor_batches"]
