"""Market analysis: one adapter per market, kept in an adapter store and loaded lazily when a request needs it.

Each market (a BBC News category stands in for a market's news feed) has a LoRA adapter that scores whether a
document is relevant to that market (2 classes); the shared relevance head learns with the first market's adapter
and then stays frozen, so every later adapter steers the shared base towards it. The adapters are trained once
and saved into an
:class:`~adapter_engine.AdapterStore`; the serving model starts with none resident, loads each market's adapter on
its first request and, capped at ``max_active`` adapters, evicts the least recently used one (kept in host memory
for a fast reload). The memory manager's counters show what happened.

    python examples/market_analysis.py --size tiny|small
"""

from __future__ import annotations

import tempfile

import torch
from common import fit, parse, run, text_model, tokenizer, window

import adapter_engine as ae
from adapter_engine.data import load_bbc_news
from adapter_engine.stacking import head_parameters

MARKETS = ("business", "tech", "entertainment", "sports")


def main(argv: list[str] | None = None) -> dict:
    args = parse("one adapter per market, lazily loaded from a store", argv)
    steps = args.steps if args.steps is not None else (5 if args.size == "tiny" else 80)
    tok = tokenizer()
    train, test = load_bbc_news("train", limit=128), load_bbc_news("test", limit=32)
    encode = lambda texts: tok(texts, truncation=True, max_length=48, padding="max_length", return_tensors="pt")
    enc = encode(train.texts)
    store = ae.AdapterStore(tempfile.mkdtemp(prefix="markets-"), create=True)

    # Training: one relevance adapter per market, saved into the store (the shared base stays frozen; the shared
    # head learns with the first market only).
    torch.manual_seed(args.seed)
    base = text_model(args.size, "BertForSequenceClassification", num_labels=2)
    trainer = ae.StackedAdapterModel(base)
    for market in MARKETS:
        relevant = torch.tensor([train.classes[y] == market for y in train.labels], dtype=torch.long)
        trainer.add_adapter(market, ae.LoraConfig(r=4, lora_alpha=8), level=False)
        trainer.train_adapter(market, train_head=market == MARKETS[0])
        batches = lambda s, y=relevant: {**{k: v[window(s, 128)] for k, v in enc.items()}, "labels": y[window(s, 128)]}
        fit(trainer, batches, steps, lr=1e-2)
        store.save(trainer.model, market)

    # Serving: a fresh copy of the base with the shared head, adapters loaded lazily from the store, at most 2
    # resident.
    head = {name: p.detach().clone() for name, p in head_parameters(trainer.model).items()}
    serving_base = text_model(args.size, "BertForSequenceClassification", num_labels=2)
    missing, unexpected = serving_base.load_state_dict(head, strict=False)
    assert not unexpected and set(missing) == set(serving_base.state_dict()) - set(head)
    server = ae.StackedAdapterModel(serving_base, store=store, max_active=2)
    requests = [(MARKETS[i % 3 if i < 6 else 3], i) for i in range(8)]  # business, tech, ent, ..., then sports
    scores, resident_after = [], []
    test_enc = encode(test.texts)
    for market, doc in requests:
        with torch.no_grad():
            logits = server(**{k: v[doc : doc + 1] for k, v in test_enc.items()}, adapter=market).logits
        scores.append((market, test.classes[test.labels[doc]], logits.softmax(-1)[0, 1].item()))
        resident_after.append(sorted(ae.list_adapters(server.model)))
    stats = server.memory.stats()
    for (market, topic, p), resident in zip(scores, resident_after):
        print(f"market {market:13s} doc about {topic:13s} relevance {p:.2f}   resident: {resident}")
    print(f"store: {store.names()}; loads {stats.loads} (disk {stats.loads_from_disk}, host {stats.loads_from_cpu}), "
          f"hits {stats.hits}, evictions {stats.evictions}, load time {stats.load_time_s * 1e3:.1f} ms")  # fmt: skip
    # Each market's adapter on every held-out document: is it relevant to that market (accuracy, one batch each)?
    accuracy = {}
    with torch.no_grad():
        for market in MARKETS:
            truth = torch.tensor([test.classes[y] == market for y in test.labels])
            predicted = server(**test_enc, adapter=market).logits.argmax(-1).bool()
            accuracy[market] = (predicted == truth).float().mean().item()
    print(f"relevance accuracy on {len(test.labels)} held-out documents: "
          + ", ".join(f"{m} {a:.2f}" for m, a in accuracy.items()))  # fmt: skip
    return {"store": store.names(), "stats": stats, "max_resident": max(len(r) for r in resident_after),
            "scores": scores, "accuracy": accuracy}  # fmt: skip


if __name__ == "__main__":
    run(main)
