"""Multilingual support: one adapter per language on a shared base, chosen per query, many languages per batch.

A support desk classifies incoming messages (BBC News categories stand in for ticket queues). Each language gets
its own LoRA adapter, a *sibling* in a :class:`~adapter_engine.StackedAdapterModel`; a query's language is
detected and the batch is routed per row, so one forward serves every language at once.

No multilingual corpus ships offline, so the second and third "languages" are deterministic transforms of the
English documents (words reversed; vowels shifted): they tokenize into different word pieces, which is what
makes per-language adapters useful. Swap in real translated data to use this for real.

    python examples/multilingual_support.py --size tiny|small
"""

from __future__ import annotations

import torch
from common import fit, parse, run, text_model, tokenizer

import adapter_engine as ae
from adapter_engine.data import load_bbc_news

LANGUAGES = {
    "en": lambda t: t,
    "rev": lambda t: " ".join(w[::-1] for w in t.split()),  # stand-in language 2
    "vow": lambda t: t.translate(str.maketrans("aeiou", "eioua")),  # stand-in language 3
}


def detect_language(text: str) -> str:
    """The router: a word-list detector (real systems use a language-ID model)."""
    words = text.lower().split()
    markers = {"en": {"the", "and", "of", "to", "in", "is", "for"}}
    markers["rev"] = {w[::-1] for w in markers["en"]}
    markers["vow"] = {LANGUAGES["vow"](w) for w in markers["en"]}
    return max(markers, key=lambda lang: sum(w in markers[lang] for w in words))


def main(argv: list[str] | None = None) -> dict:
    args = parse("one adapter per language, routed per query", argv)
    steps = args.steps if args.steps is not None else (6 if args.size == "tiny" else 40)
    tok = tokenizer()
    train, test = load_bbc_news("train", limit=96), load_bbc_news("test", limit=24)
    encode = lambda texts: tok(texts, truncation=True, max_length=48, padding="max_length", return_tensors="pt")
    sam = ae.StackedAdapterModel(text_model(args.size, "BertForSequenceClassification", num_labels=5))
    labels = torch.tensor(train.labels)
    for i, (lang, transform) in enumerate(LANGUAGES.items()):
        sam.add_adapter(lang, ae.LoraConfig(r=8, lora_alpha=16), level=False)
        sam.train_adapter(lang, train_head=i == 0)  # the first language trains the shared head too
        enc = encode([transform(t) for t in train.texts])
        batches = lambda s, enc=enc: {k: v[(s * 16) % 96 : (s * 16) % 96 + 16] for k, v in
                                      {**enc, "labels": labels}.items()}  # fmt: skip
        fit(sam, batches, steps, lr=2e-3)
    # Incoming queries: every language mixed in one batch.
    queries, truth = [], []
    for j, text in enumerate(test.texts):
        lang = list(LANGUAGES)[j % len(LANGUAGES)]
        queries.append(LANGUAGES[lang](text))
        truth.append(test.labels[j])
    routes = [detect_language(q) for q in queries]
    enc = encode(queries)
    with torch.no_grad():
        routed = sam(**enc, adapter=routes).logits
        one_by_one = torch.cat([sam(**{k: v[i : i + 1] for k, v in enc.items()}, adapter=r).logits
                                for i, r in enumerate(routes)])  # fmt: skip
        wrong = sam(**enc, adapter=["en"] * len(queries)).logits
    truth = torch.tensor(truth)
    result = {
        "routes": routes,
        "detected_correctly": sum(r == list(LANGUAGES)[j % 3] for j, r in enumerate(routes)) / len(routes),
        "accuracy_routed": (routed.argmax(-1) == truth).float().mean().item(),
        "accuracy_english_adapter_for_all": (wrong.argmax(-1) == truth).float().mean().item(),
        "max_diff_batch_vs_one_by_one": (routed - one_by_one).abs().max().item(),
        "resident": ae.list_adapters(sam.model),
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    return result


if __name__ == "__main__":
    run(main)
