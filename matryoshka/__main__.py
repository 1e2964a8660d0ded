"""Command line: ``python -m matryoshka <command>``."""

from __future__ import annotations

import argparse

import torch

from . import Prefixes, SparseActs, matryoshka_loss


def loss_demo(args: argparse.Namespace) -> None:
    """Print every prefix's loss for a random TopK batch, by the fused scan and by the plain loop."""
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.d, generator=g)
    W_dec = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=g), dim=1)
    scores = torch.randn(args.batch, args.n, generator=g)
    values, indices = scores.relu().topk(args.k, dim=1)
    acts = SparseActs(values, indices)
    prefixes = Prefixes.every(args.n, include_empty=True)
    fused = matryoshka_loss(x, acts, W_dec, None, prefixes, backend=args.backend)
    loop = matryoshka_loss(x, acts, W_dec, None, prefixes, backend="reference")
    print(f"B={args.batch} d={args.d} n={args.n} k={args.k}, every prefix 0..n (G={len(prefixes)})")
    print(f"{'length':>6} {'fused':>12} {'reference':>12}")
    for m, a, b in zip(prefixes.lengths.tolist(), fused.per_prefix.tolist(), loop.per_prefix.tolist()):
        print(f"{m:>6} {a:>12.6f} {b:>12.6f}")
    print(f"weighted loss: fused {fused.loss.item():.6f}  reference {loop.loss.item():.6f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m matryoshka", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("loss-demo", help="per-prefix losses of a random TopK batch")
    demo.add_argument("--batch", type=int, default=64)
    demo.add_argument("--d", type=int, default=24)
    demo.add_argument("--n", type=int, default=32)
    demo.add_argument("--k", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "reference"])
    demo.set_defaults(func=loss_demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
