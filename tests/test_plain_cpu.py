"""The public API on a CPU without the Triton interpreter: every op takes its torch twin there.

The rest of the CPU tier runs the kernels in the interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` before
any kernel module is imported), so these run in a subprocess without it: what a user's own script on a laptop
gets. Each scenario checks its numbers against another way of computing them, not only that nothing raised."""

import os
import subprocess
import sys
import textwrap

_PRELUDE = textwrap.dedent(
    """
    import torch
    from transformers import LlamaConfig, LlamaModel

    import adapter_engine as ae
    from adapter_engine.kernels import _backend

    assert not _backend.INTERPRET and not torch.cuda.is_available()
    torch.manual_seed(0)
    TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def llama():
        config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=128)
        return LlamaModel(config).eval()
    """
)


def run_plain(script: str) -> str:
    """Runs ``_PRELUDE`` + ``script`` in a fresh interpreter without ``TRITON_INTERPRET``; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = _PRELUDE + textwrap.dedent(script)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_serving_a_mixed_batch_of_lora_adapters():
    """Rows routed to different LoRA adapters (and to none) in one forward equal each row run alone. (It raised
    "0 active drivers": the mixed-batch dispatch timed its Triton candidates on a CPU tensor.)"""
    run_plain(
        """
        model = llama()
        for i in range(3):
            ae.add_adapter(model, f"a{i}", ae.LoraConfig(r=4 + 4 * i, lora_alpha=16, target_modules=TARGETS,
                                                         init_lora_weights=False))
        ids = torch.randint(0, 128, (8, 5))
        routes = [None if i % 4 == 3 else f"a{i % 4}" for i in range(8)]
        with torch.no_grad():
            with ae.use_adapters(routes):
                mixed = model(input_ids=ids).last_hidden_state
            for i, r in enumerate(routes):
                with ae.use_adapters(r):
                    alone = model(input_ids=ids[i : i + 1]).last_hidden_state
                torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
