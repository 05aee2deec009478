"""Packaging and the main command: kernels import as adapter_engine.kernels only; the demo runs offline."""

import os
import subprocess
import sys

import adapter_engine


def test_kernels_are_not_a_top_level_module():
    # Hugging Face publishes a package named `kernels` that transformers probes: ours must not shadow it.
    code = "import importlib.util, adapter_engine.kernels as k; print(importlib.util.find_spec('kernels'), k.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.expanduser("~"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "adapter_engine.kernels"]


# The main job itself (`adapter-engine demo`) is tested in tests/test_demo.py.


def test_version():
    assert adapter_engine.__version__
