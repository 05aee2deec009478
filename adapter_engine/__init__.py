"""adapter-engine: kernel-accelerated LoRA and bottleneck adapters for Hugging Face transformers models."""

from . import kernels

__version__ = "0.1.0"

__all__ = ["kernels", "__version__"]
