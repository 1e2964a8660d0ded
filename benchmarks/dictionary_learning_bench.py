"""dictionary_learning's Matryoshka BatchTopK trainer, stock vs fused (``matryoshka.integrations.dictionary_learning``).

    python -m benchmarks.dictionary_learning_bench              # CPU, 1 thread
    python -m benchmarks.dictionary_learning_bench --device cuda

Times ``trainer.loss(x, step=0)`` + ``backward()`` (encode, BatchTopK, every group's loss, the
dead-latent bookkeeping; no latent is dead, the steady state) of the stock
``MatryoshkaBatchTopKTrainer`` and of ``FusedMatryoshkaBatchTopKTrainer`` on the same weights and
batch, at 5 doubling groups (n/16, n/16, n/8, n/4, n/2), 64 equal groups, and (fused only) every
prefix.  Rows are timed round-robin, one call each per round, so that load changes on a shared
machine hit them alike.  Prints a Markdown table (medians, minima in brackets) and the machine.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .harness import add_sae_step_arguments, device_name, summarize, time_call

GROUPS = {"5": [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2], "64": [1 / 64] * 64}


def build(variant: str, kind: str, args: argparse.Namespace, state: dict | None):
    """The ``variant`` trainer (``stock`` or ``fused``) with ``kind`` prefixes, its SAE loaded with
    ``state`` (the weights every row shares) when given."""
    # The integration first: it imports dictionary_learning also where nnsight (its __init__'s) is missing.
    from matryoshka.integrations.dictionary_learning import FusedMatryoshkaBatchTopKTrainer, MatryoshkaBatchTopKTrainer

    common = {"steps": 10_000, "activation_dim": args.d, "dict_size": args.n, "k": args.k, "layer": 0,
              "lm_name": "bench", "device": args.device, "group_fractions": GROUPS["5" if kind == "every" else kind]}
    if variant == "stock":
        trainer = MatryoshkaBatchTopKTrainer(**common)
    else:
        trainer = FusedMatryoshkaBatchTopKTrainer(**common, matryoshka_prefixes="every" if kind == "every" else "groups")
    if state is not None:
        trainer.ae.load_state_dict({**state, "group_sizes": trainer.ae.group_sizes})  # shared weights, own groups
    return trainer


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sae_step_arguments(parser, repeats=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    state = build("stock", "5", args, None).ae.state_dict()
    x = torch.randn(args.batch, args.d, device=device)
    plan = [("stock", "5"), ("fused", "5"), ("stock", "64"), ("fused", "64"), ("fused", "every")]
    rows = []
    for variant, kind in plan:
        trainer = build(variant, kind, args, state)

        def call(trainer=trainer):
            loss = trainer.loss(x, step=0)
            loss.backward()
            trainer.optimizer.zero_grad()
            return loss

        rows.append({"variant": variant, "kind": kind, "loss": call().item(), "call": call, "times": []})
    for round_ in range(args.repeats + 1):
        for row in rows:
            seconds = time_call(row["call"], device)
            if round_ > 0:
                row["times"].append(seconds)
    stock = {row["kind"]: row for row in rows if row["variant"] == "stock"}
    base = summarize(stock["5"]["times"])["median_s"]
    print(f"# dictionary_learning Matryoshka BatchTopK, loss + backward: {device_name(device)}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"d = {args.d}, dict_size = {args.n}, k = {args.k}, batch {args.batch}, float32, no dead latents; "
          f"{args.repeats} rounds; command: python -m benchmarks.dictionary_learning_bench {' '.join(sys.argv[1:])}")
    print()
    print("| trainer | prefixes | ms, median (min) | / stock 5 groups | fused speedup | loss rel. diff vs stock |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        row |= summarize(row.pop("times"))
        del row["call"]
        speedup = diff = ""
        if row["variant"] == "fused" and row["kind"] in stock:
            speedup = f"{stock[row['kind']]['median_s'] / row['median_s']:.2f}x"
            diff = f"{abs(row['loss'] - stock[row['kind']]['loss']) / abs(stock[row['kind']]['loss']):.1e}"
        prefixes = f"every ({args.n})" if row["kind"] == "every" else f"{row['kind']} groups"
        print(f"| {row['variant']} | {prefixes} | {row['median_s'] * 1e3:.1f} ({row['min_s'] * 1e3:.1f}) "
              f"| {row['median_s'] / base:.2f} | {speedup} | {diff} |")
    return rows


if __name__ == "__main__":
    main()
