"""fastjepa: fast I-JEPA pretraining for Vision Transformers."""

__version__ = "0.1.0"
