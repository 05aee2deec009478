"""Shared helpers of the examples: sizes, the offline tokenizer and models, a plain training loop.

``--size tiny`` builds small random models from configs (seconds on a CPU, what the tests run);
``--size small`` loads the real all-MiniLM-L6-v2 weights for the text examples (a few minutes on a CPU).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from adapter_engine.cli import positive_int  # noqa: E402  (the CLI's --steps check: exit 2 naming the flag)

TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def parse(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny", help="tiny: random small model; "
                        "small: the real all-MiniLM-L6-v2")  # fmt: skip
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="training steps per adapter (default per size)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    return args


def tokenizer():
    from transformers import AutoTokenizer

    from adapter_engine.demo import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def text_model(size: str, cls_name: str, **kwargs):
    """``transformers.<cls_name>``: random tiny BERT with MiniLM's vocabulary, or the real MiniLM weights."""
    import transformers

    from adapter_engine.demo import minilm_path

    transformers.logging.set_verbosity_error()
    cls = getattr(transformers, cls_name)
    if size == "small":
        return cls.from_pretrained(minilm_path(), **kwargs)
    config = transformers.BertConfig(vocab_size=30522, max_position_embeddings=128, **TINY_BERT, **kwargs)
    return cls(config)


def fit(model, batches, steps: int, lr: float, forward=None) -> list[float]:
    """AdamW over the parameters that require gradients; ``batches(step)`` gives the keyword inputs with labels."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        out = (forward or model)(**batches(step))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    return losses


def run(main) -> None:
    """Script entry point: run ``main`` on the command line's arguments."""
    main(sys.argv[1:])


def window(step: int, n: int, batch: int = 16) -> slice:
    """The rows of training step ``step`` when cycling through ``n`` examples in batches of ``batch``."""
    start = (step * batch) % n
    return slice(start, start + batch)
