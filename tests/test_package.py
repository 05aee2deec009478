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


def test_repository_root_on_sys_path_does_not_load_a_second_copy_of_the_kernels():
    """From the repository root (``python -m``, ``PYTHONPATH=.``) the folder ``kernels/`` is importable as
    ``kernels``, the name transformers probes for Hugging Face's package when it loads a model: that import must
    register nothing (a second registration of the custom ops crashed torch) and must not pass for HF's package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import kernels, adapter_engine.kernels as k\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "from transformers import BertConfig, BertModel\n"
        "BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37))\n"
        "print(kernels.__all__, len(k.__all__) > 0, is_kernels_available())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": root})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "True", "False"]


# The main job itself (`adapter-engine demo`) is tested in tests/test_demo.py.


def test_version():
    assert adapter_engine.__version__


def test_every_public_name_has_a_docstring():
    """``help(adapter_engine)`` and ``help(ae.<name>)`` are a new user's reference: ``is_patched`` had none."""
    import inspect

    public = [n for n in adapter_engine.__all__ if n != "__version__"]
    assert [n for n in public if not inspect.getdoc(getattr(adapter_engine, n))] == []
