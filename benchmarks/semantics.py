"""The op's other Matryoshka semantics against the plain scan: ``python -m benchmarks.semantics``.

Detached levels (``detach=True``) and rank-order prefixes (``order="rank"``) reuse the scan, so each
should cost what the plain (index-order) scan costs.  Variants, each forward+backward of the fused op
on the same TopK inputs (``validate=False``, as in ``baselines.fused_loss``):

* ``plain G=5`` / ``detach G=5``: the doubling groups ``n/16 .. n`` (``harness.prefix_set("5")``);
* ``plain G=n`` / ``detach G=n``: every prefix ``1..n``;
* ``rank G=k`` / ``rank+detach G=k``: every rank-order length ``1..k`` (flex-sae's prefixes),
  against ``plain G=n`` (both scan the same ``k`` slots per row).

Every variant is first checked against ``matryoshka.reference`` on a small float64 problem.  Timing is
round-robin (one call of each variant per round, inputs rotating over several sets), so load changes
on a shared machine hit every variant alike; the ratio of a variant to its plain twin is the median of
the per-round ratios.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from dataclasses import dataclass

import torch

from matryoshka import Prefixes, SparseActs, matryoshka_loss

from .checks import rel_err
from .harness import device_name, make_input_sets, prefix_set, time_call

__all__ = ["Variant", "variants", "check_variants", "main"]


@dataclass(frozen=True)
class Variant:
    name: str
    prefixes: Prefixes
    order: str
    detach: bool
    baseline: str  # the plain variant it is compared with ("" for a plain one)

    def loss(self, x, acts, W_dec, b_dec, backend, validate=False):
        return matryoshka_loss(x, acts, W_dec, b_dec, self.prefixes, backend=backend, validate=validate,
                               order=self.order, detach=self.detach)


def variants(n: int, k: int) -> list[Variant]:
    groups, every, ranks = prefix_set("5", n), prefix_set("n", n), Prefixes.every(k)
    return [
        Variant("plain G=5", groups, "index", False, ""),
        Variant("detach G=5", groups, "index", True, "plain G=5"),
        Variant("plain G=n", every, "index", False, ""),
        Variant("detach G=n", every, "index", True, "plain G=n"),
        Variant("rank G=k", ranks, "rank", False, "plain G=n"),
        Variant("rank+detach G=k", ranks, "rank", True, "plain G=n"),
    ]


def check_variants(backend: str, device, tolerance: float = 1e-9) -> dict[str, float]:
    """Worst relative error of each variant's loss and gradients against the reference (float64)."""
    g = torch.Generator().manual_seed(0)
    B, n, d, k = 6, 64, 16, 8
    x, W, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(B, d), (n, d), (d,)])
    values = torch.rand(B, k, generator=g, dtype=torch.float64) + 0.1
    indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    indices[0, :3] = -1
    errors = {}
    for v in variants(n, k):
        grads = []
        for which in (backend, "reference"):
            leaves = [t.to(device).requires_grad_() for t in (x, values, W, b)]
            out = v.loss(leaves[0], SparseActs(leaves[1], indices.to(device)), leaves[2], leaves[3], which, True)
            out.loss.backward()
            grads.append([out.loss.detach()] + [t.grad for t in leaves])
        errors[v.name] = max(rel_err(a, w) for a, w in zip(*grads))
        if errors[v.name] > tolerance:
            raise AssertionError(f"{v.name}: relative error {errors[v.name]:.3g} > {tolerance}")
    return errors


def time_variants(B, n, d, k, backend, device, rounds: int) -> dict[str, dict]:
    """Round-robin forward+backward times (seconds) of every variant and its ratio to its baseline."""
    sets = make_input_sets(B, n, d, k, torch.float32, device)
    chosen = variants(n, k)
    calls = itertools.count()

    def run(v: Variant) -> float:
        s = sets[next(calls) % len(sets)]
        s.clear_grads()
        return time_call(lambda: v.loss(s.x, s.acts, s.W_dec, s.b_dec, backend).loss.backward(), device)

    for v in chosen:  # warm-up
        run(v)
    times = {v.name: [] for v in chosen}
    for _ in range(rounds):
        for v in chosen:
            times[v.name].append(run(v))
    out = {}
    for v in chosen:
        ratios = [t / b for t, b in zip(times[v.name], times[v.baseline])] if v.baseline else [1.0]
        out[v.name] = dict(median_s=statistics.median(times[v.name]), min_s=min(times[v.name]),
                           ratio=statistics.median(ratios), baseline=v.baseline)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--B", type=int, default=256)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    backend = "triton" if device.type == "cuda" else "torch"
    errors = check_variants(backend, device)
    print(f"{device_name(device)}, backend={backend}, B={args.B} n={args.n} d={args.d} k={args.k}, fp32, "
          f"{args.rounds} rounds; reference check max rel err {max(errors.values()):.1e}")
    print(f"{'variant':<18} {'median ms':>10} {'min ms':>8}  ratio to")
    for name, r in time_variants(args.B, args.n, args.d, args.k, backend, device, args.rounds).items():
        against = f"{r['ratio']:.3f}x {r['baseline']}" if r["baseline"] else "-"
        print(f"{name:<18} {1e3 * r['median_s']:>10.2f} {1e3 * r['min_s']:>8.2f}  {against}")


if __name__ == "__main__":
    main()
