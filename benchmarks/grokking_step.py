"""Time one full-batch grokking training step: the bridge (TL-native model) against plain PyTorch.

    python benchmarks/grokking_step.py [--device cpu|cuda] [--repeats 5]

Both models have the grokking architecture (1 layer, d_model 128, 4 heads of 32, d_mlp 512, ReLU, no LayerNorm)
and the same parameter count; both are trained with AdamW on the same full batch. Prints steps per second for the
default configuration (p=31, half the pairs) and the paper's (p=113, 30% of the pairs), and the ratio.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

from helpers.models.load import build_native_model, resolve_device
from helpers.tasks.modular import last_position_loss, make_data
from helpers.models.zoo import grokking_transformer_config

CONFIGS = {"default (p=31, frac 0.5)": (31, 0.5), "full scale (p=113, frac 0.3)": (113, 0.3)}


class PlainGrokkingTransformer(nn.Module):
    """The same 1-layer attention + ReLU MLP transformer in plain PyTorch: no hooks, fused QKV projection and
    PyTorch's fused causal attention kernel (the fastest plain implementation, not a strawman)."""

    def __init__(self, d_vocab: int, d_vocab_out: int, n_ctx: int = 3, d_model: int = 128, n_heads: int = 4,
                 d_mlp: int = 512):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.embed = nn.Embedding(d_vocab, d_model)
        self.pos = nn.Parameter(torch.randn(n_ctx, d_model) / d_model**0.5)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.mlp_in, self.mlp_out = nn.Linear(d_model, d_mlp), nn.Linear(d_mlp, d_model)
        self.unembed = nn.Linear(d_model, d_vocab_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, d_model)
        x = x + self.out(z)
        x = x + self.mlp_out(torch.relu(self.mlp_in(x)))
        return self.unembed(x)


def steps_per_second(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, n_steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))

    def step() -> None:
        loss = last_position_loss(model(tokens), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return n_steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the best of each is kept")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (p, frac) in CONFIGS.items():
        data = make_data(p, "modular", frac_train=frac)
        tokens, labels = data.tokens[data.train_indices].to(device), data.labels[data.train_indices].to(device)
        bridge = build_native_model(grokking_transformer_config(p + 1, p), seed=0, device=device)
        plain = PlainGrokkingTransformer(p + 1, p).to(device)
        n_bridge = sum(param.numel() for param in bridge.parameters())
        n_plain = sum(param.numel() for param in plain.parameters())
        assert n_bridge == n_plain, (n_bridge, n_plain)
        n_steps = 30 if p < 100 or device.type != "cpu" else 5
        best = {"bridge": 0.0, "plain": 0.0}
        for _ in range(args.repeats):  # interleaved so background load hits both alike
            best["bridge"] = max(best["bridge"], steps_per_second(bridge, tokens, labels, n_steps))
            best["plain"] = max(best["plain"], steps_per_second(plain, tokens, labels, n_steps))
        print(f"{name}: {len(tokens)} examples, {n_bridge:,} parameters | bridge {best['bridge']:.1f} steps/s, "
              f"plain PyTorch {best['plain']:.1f} steps/s, bridge costs {best['plain'] / best['bridge']:.2f}x")


if __name__ == "__main__":
    main()
