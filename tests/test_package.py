"""Packaging and the main command: kernels import as adapter_engine.kernels only; the demo runs offline."""

import os
import subprocess
import sys

import pytest

import adapter_engine


def test_kernels_are_not_a_top_level_module():
    # Hugging Face publishes a package named `kernels` that transformers probes: ours must not shadow it.
    code = "import importlib.util, adapter_engine.kernels as k; print(importlib.util.find_spec('kernels'), k.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.expanduser("~"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "adapter_engine.kernels"]


@pytest.mark.slow
def test_demo_merges_minilm_and_checks_itself(capsys, tmp_path):
    from adapter_engine.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Merged a rank-8 LoRA into 24 attention projections" in printed
    assert "Triton interpreter" in printed and "demo: OK" in printed


def test_version():
    assert adapter_engine.__version__
