"""fastjepa: fast I-JEPA pretraining for Vision Transformers."""

from pathlib import Path

__version__ = "0.1.0"

# In a source checkout used without an install (PYTHONPATH=<checkout>, e.g. scripts/gpu_check.sh on a GPU machine),
# the fused ops live in the top-level kernels/ folder that setup.py installs as fastjepa.kernels: find them there.
_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "kernels").is_dir() and (_CHECKOUT / "kernels" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (the package's own __path__)
