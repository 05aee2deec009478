"""The ``adapter-engine`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _ensure_kernel_backend() -> None:
    """Without a GPU, re-run this process with the Triton interpreter on, so the demo runs the real kernels.

    ``@triton.jit`` reads TRITON_INTERPRET when the kernel modules are imported, which has already happened by the
    time this function runs; an exec with the variable set is the only reliable switch.
    """
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if os.environ.get("ADAPTER_ENGINE_NO_INTERPRET") == "1":
        return  # the user asked for the torch reference path
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "adapter_engine.cli", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapter-engine", description="Kernel-accelerated adapters for HF models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: the engine on the real all-MiniLM-L6-v2, offline")
    demo.add_argument("--out", default="demo_out", help="folder for the report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "demo":
        if argv is None:
            _ensure_kernel_backend()
        from .demo import run_merge_demo

        return run_merge_demo(out_dir=args.out)
    return 2


if __name__ == "__main__":
    sys.exit(main())
