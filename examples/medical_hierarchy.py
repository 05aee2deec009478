"""The medical hierarchy: a stack of adapters, general medicine -> cardiology -> paediatric cardiology, used at
whichever depth a request needs.

Level 1 learns triage (routine / urgent / emergency) on general-medicine notes, level 2 specialises it on
cardiology notes, level 3 on paediatric cardiology; each level trains with everything below it frozen. A request
from a general ward runs depth 1, a cardiology ward depth 2, a paediatric cardiology ward depth 3, all in one
batch. No clinical corpus ships offline: the notes are generated from templates (clearly synthetic); the
mechanics are what a real deployment uses.

    python examples/medical_hierarchy.py --size tiny|small
"""

from __future__ import annotations

import random

import torch
from common import fit, parse, run, text_model, tokenizer, window

import adapter_engine as ae

TRIAGE = ("routine", "urgent", "emergency")
FINDINGS = {
    "medicine": [("mild cough", 0), ("a rash", 0), ("high fever and confusion", 1), ("severe abdominal pain", 1),
                 ("unresponsive with low oxygen", 2), ("heavy bleeding", 2)],
    "cardiology": [("stable angina on exertion", 0), ("palpitations at rest", 1), ("new atrial fibrillation", 1),
                   ("crushing chest pain and st elevation", 2), ("cardiac arrest", 2), ("mild ankle swelling", 0)],
    "paediatric_cardiology": [("an innocent murmur", 0), ("poor feeding and a murmur", 1),
                              ("cyanosis when crying", 1), ("a blue baby with collapse", 2),
                              ("a follow up after repair", 0), ("duct dependent shock", 2)],
}  # fmt: skip
WARDS = tuple(FINDINGS)


def notes(ward: str, n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    who = {"medicine": "adult", "cardiology": "adult", "paediatric_cardiology": "infant"}[ward]
    texts, labels = [], []
    for _ in range(n):
        finding, label = rng.choice(FINDINGS[ward])
        texts.append(f"{who} patient seen on the {ward.replace('_', ' ')} ward presenting with {finding}")
        labels.append(label)
    return texts, labels


def main(argv: list[str] | None = None) -> dict:
    args = parse("a stack of adapters used at each depth", argv)
    steps = args.steps if args.steps is not None else (12 if args.size == "tiny" else 40)
    tok = tokenizer()
    encode = lambda texts: tok(texts, truncation=True, max_length=24, padding="max_length", return_tensors="pt")
    sam = ae.StackedAdapterModel(text_model(args.size, "BertForSequenceClassification", num_labels=3))
    for level, ward in enumerate(WARDS):
        texts, labels = notes(ward, 64, seed=level)
        enc, y = encode(texts), torch.tensor(labels)
        sam.add_adapter(ward, ae.BottleneckConfig.seq_bn(reduction_factor=8))
        sam.train_adapter(ward, train_head=level == 0)  # the head learns with level 1, then stays frozen
        fit(sam, lambda s, enc=enc, y=y: {**{k: v[window(s, 64)] for k, v in enc.items()}, "labels": y[window(s, 64)]},
            steps, lr=3e-3)  # fmt: skip
    # Accuracy of every depth on every ward's held-out notes.
    table = {}
    for ward in WARDS:
        texts, labels = notes(ward, 48, seed=100 + WARDS.index(ward))
        enc, y = encode(texts), torch.tensor(labels)
        for depth in range(len(WARDS) + 1):
            with torch.no_grad():
                logits = sam(**enc, adapter=sam.levels[depth - 1] if depth else None).logits
            table[(ward, depth)] = (logits.argmax(-1) == y).float().mean().item()
    print(f"{'ward':24s}" + "".join(f"  depth {d}" for d in range(len(WARDS) + 1)))
    for ward in WARDS:
        print(f"{ward:24s}" + "".join(f"  {table[(ward, d)]:7.2f}" for d in range(len(WARDS) + 1)))
    # One batch, each request at its ward's depth.
    batch_texts = [notes(w, 1, seed=7 + i)[0][0] for i, w in enumerate(WARDS)]
    enc = encode(batch_texts)
    with torch.no_grad():
        mixed = sam(**enc, adapter=list(WARDS)).logits  # a level name = the stack up to that level
    print("one batch, one depth per request:", [TRIAGE[i] for i in mixed.argmax(-1).tolist()])
    return {"levels": sam.levels, "accuracy": table, "mixed_logits": mixed}


if __name__ == "__main__":
    run(main)
