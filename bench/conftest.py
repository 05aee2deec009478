"""Benchmarks run through pytest-benchmark. On a GPU they use full sizes; on CPU they run at tiny sizes with the
Triton interpreter as smoke tests (so `make test` keeps them from rotting)."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of a kernel module (see tests/conftest.py)
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    from harness import environment_info

    machine_info.update(environment_info())
