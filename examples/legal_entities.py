"""Legal entity extraction: token classification with a LoRA merged into the model, inside a processing pipeline.

A LoRA adapter is trained on a token-classification model to tag parties, dates and statutes; it is then merged
into the weights (the fused merge kernel), leaving a plain ``transformers`` model that runs inside a
``transformers.pipeline("token-classification")`` step of a document-processing pipeline (clean -> split into
sentences -> tag -> collect entities). The training sentences are generated from templates (no legal NER corpus
ships offline); the mechanics are what a real deployment uses.

    python examples/legal_entities.py --size tiny|small
"""

from __future__ import annotations

import random
import re

import torch
from common import fit, parse, run, text_model, tokenizer, window
from transformers import pipeline

import adapter_engine as ae

LABELS = ("O", "B-PARTY", "I-PARTY", "B-DATE", "I-DATE", "B-STATUTE", "I-STATUTE")
PARTIES = ["Acme Holdings Ltd", "Jane Miller", "Northwind Bank plc", "Globex Corporation", "Peter Okafor"]
DATES = ["1 March 2021", "12 July 2019", "30 November 2022", "5 January 2020"]
STATUTES = ["Companies Act 2006", "Data Protection Act 2018", "Consumer Rights Act 2015"]
TEMPLATES = ["On {d} {p} brought a claim against {q} under the {s} .", "{p} and {q} signed the agreement on {d} .",
             "The court found that {p} breached the {s} on {d} ."]  # fmt: skip


def example(rng: random.Random) -> tuple[list[str], list[str]]:
    p, q = rng.sample(PARTIES, 2)
    fill = {
        "p": (p, "PARTY"),
        "q": (q, "PARTY"),
        "d": (rng.choice(DATES), "DATE"),
        "s": (rng.choice(STATUTES), "STATUTE"),
    }
    words, tags = [], []
    for piece in rng.choice(TEMPLATES).split():
        if piece.startswith("{"):
            text, kind = fill[piece[1]]
            for j, w in enumerate(text.split()):
                words.append(w)
                tags.append(("B-" if j == 0 else "I-") + kind)
        else:
            words.append(piece)
            tags.append("O")
    return words, tags


def encode(tok, batch):
    enc = tok([w for w, _ in batch], is_split_into_words=True, truncation=True, max_length=40, padding="max_length",
              return_tensors="pt")  # fmt: skip
    labels = torch.full(enc["input_ids"].shape, -100)
    for i, (_, tags) in enumerate(batch):
        previous = None
        for t, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous:
                labels[i, t] = LABELS.index(tags[word])
            previous = word
    return dict(enc), labels


def process(documents: list[str], ner) -> list[dict]:
    """The processing pipeline: normalise whitespace, split sentences, tag, collect entities per document."""
    out = []
    for doc in documents:
        sentences = [s for s in re.split(r"(?<=\.)\s+", " ".join(doc.split())) if s]
        entities = [e for s in sentences for e in ner(s)]
        out.append({"document": doc, "entities": [(e["entity_group"], e["word"]) for e in entities]})
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse("LoRA token classification, merged, in a pipeline", argv)
    steps = args.steps if args.steps is not None else (12 if args.size == "tiny" else 60)
    tok, rng = tokenizer(), random.Random(args.seed)
    model = text_model(args.size, "BertForTokenClassification", num_labels=len(LABELS),
                       id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})  # fmt: skip
    ae.add_adapter(model, "legal", ae.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"]))
    ae.set_active_adapters(model, "legal")
    ae.train_adapter(model, "legal", train_head=True)
    enc, labels = encode(tok, [example(rng) for _ in range(128)])
    losses = fit(model, lambda s: {**{k: v[window(s, 128)] for k, v in enc.items()}, "labels": labels[window(s, 128)]},
                 steps, lr=5e-3)  # fmt: skip
    params = model.num_parameters()
    ae.merge_adapter(model, "legal")  # folds the LoRA into the weights: a plain transformers model again
    if ae.is_patched(model):
        raise RuntimeError("the merged model should be a plain transformers model")
    ner = pipeline("token-classification", model=model, tokenizer=tok, aggregation_strategy="simple", device=-1)
    docs = ["On 12 July 2019 Jane Miller brought a claim against Globex Corporation under the Companies Act 2006 .",
            "Acme Holdings Ltd and Peter Okafor signed the agreement on 5 January 2020 ."]  # fmt: skip
    results = process(docs, ner)
    for r in results:
        print(r["document"], "->", r["entities"])
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {params:,} parameters with the adapter, "
          f"{model.num_parameters():,} after merging")  # fmt: skip
    return {"losses": losses, "results": results, "parameters": model.num_parameters()}


if __name__ == "__main__":
    run(main)
