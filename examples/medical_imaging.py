"""Medical imaging: a ViT backbone with bottleneck adapters and a small convolutional input adapter in front.

Scans are single-channel; the ViT expects 3 channels at its own resolution. A small trainable convolutional
adapter maps the scan into the backbone's input space; bottleneck adapters (seq_bn, AdapterHub placement) adapt
the frozen transformer blocks; the classification head trains too. Only the input adapter, the bottleneck
adapters and the head train. No imaging data set ships offline: the scans are generated (noise with or without
a bright lesion-like blob), and the ViT is a small random one (no pretrained ViT weights are available offline):
the mechanics are what a real deployment uses with a pretrained ViT.

    python examples/medical_imaging.py --size tiny|small
"""

from __future__ import annotations

import torch
from common import fit, parse, run
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

import adapter_engine as ae


class ConvInputAdapter(nn.Module):
    """(B, 1, H, W) scans -> (B, 3, H, W) backbone inputs: 3x3 conv, GELU, 1x1 conv; starts as a grey-to-RGB copy."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.features = nn.Conv2d(1, channels, 3, padding=1)
        self.act = nn.GELU()
        self.to_rgb = nn.Conv2d(channels, 3, 1)
        nn.init.zeros_(self.to_rgb.weight)
        nn.init.zeros_(self.to_rgb.bias)

    def forward(self, scan: torch.Tensor) -> torch.Tensor:
        return scan.expand(-1, 3, -1, -1) + self.to_rgb(self.act(self.features(scan)))


class ScanClassifier(nn.Module):
    def __init__(self, backbone: ViTForImageClassification):
        super().__init__()
        self.input_adapter, self.backbone = ConvInputAdapter(), backbone

    def forward(self, scans: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        return self.backbone(pixel_values=self.input_adapter(scans), labels=labels, **kwargs)


def scans(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images; label 1 ones carry a Gaussian blob at a random place."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, size, size, generator=g) * 0.5
    labels = torch.randint(0, 2, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in torch.nonzero(labels).flatten().tolist():
        cy, cx = torch.randint(4, size - 4, (2,), generator=g).tolist()
        images[i, 0] += 2.5 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)
    return images, labels


def main(argv: list[str] | None = None) -> dict:
    args = parse("ViT with a convolutional input adapter and bottleneck adapters", argv)
    steps = args.steps if args.steps is not None else (10 if args.size == "tiny" else 240)
    hidden, layers, size = (64, 2, 32) if args.size == "tiny" else (192, 6, 64)
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                       intermediate_size=2 * hidden, image_size=size, patch_size=8, num_labels=2)  # fmt: skip
    model = ScanClassifier(ViTForImageClassification(config))
    ae.add_adapter(model.backbone, "radiology", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    ae.set_active_adapters(model.backbone, "radiology")
    ae.train_adapter(model.backbone, "radiology", train_head=True)
    for p in model.input_adapter.parameters():
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    # Synthetic scans cost nothing: a fresh batch every step (a fixed set of 128 was memorised, 0.55 held out).
    batch = lambda s: dict(zip(("scans", "labels"), scans(16, size, seed=1000 * (args.seed + 1) + s)))  # noqa: E731
    losses = fit(model, batch, steps, lr=3e-3)
    xt, yt = scans(64, size, seed=args.seed + 1)
    with torch.no_grad():
        acc = (model(xt).logits.argmax(-1) == yt).float().mean().item()
    print(f"trainable {trainable:,} of {total:,} parameters (input adapter, bottleneck adapters, head)")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; held-out accuracy {acc:.2f} on {len(yt)} scans")
    return {"trainable": trainable, "total": total, "losses": losses, "accuracy": acc}


if __name__ == "__main__":
    run(main)
