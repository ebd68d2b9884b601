"""The shipped configs, installed as ``fastjepa.configs`` (package data): the four official I-JEPA recipes, the
MNIST demo's and the tests' tiny one. ``fastjepa.config.load("in1k_vith14_ep300")`` finds them by name."""
