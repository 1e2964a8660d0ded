"""SAELens's Matryoshka BatchTopK training SAE, stock vs fused (``matryoshka.integrations.sae_lens``).

    python -m benchmarks.sae_lens_bench                      # CPU, 1 thread, the issue's sizes
    python -m benchmarks.sae_lens_bench --device cuda        # on a GPU

For each prefix set (5 doubling groups n/16..n, 64 equal groups, every prefix 1..n) it times, on
the same SAE weights and batch:

* ``forward``: ``training_forward_pass`` (encode, BatchTopK, every level's loss, threshold);
* ``step``: what SAELens's ``SAETrainer`` does per step: that forward, ``loss.backward()``, gradient
  clipping, an Adam step and ``zero_grad``.

The rows are timed round-robin (one call of each per round), so that a load change on a shared
machine hits them alike.

SAELens's plain ``BatchTopKTrainingSAE`` (one level) is timed too: the step a Matryoshka loss adds
to.  No latent is dead (no auxiliary loss), the steady state of training.  The stock class scores
every prefix by ``matryoshka_widths = [1, 2, ..., n]``; the fused one by ``matryoshka_prefixes =
"every"`` (its widths, the 5 groups, then only choose the logged losses).  Each pair's loss values
are compared, so a table never reports a speedup of something that computes a different loss.

Results (median of the repeats, quartiles, the environment) go to
``benchmarks/results/sae_lens_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from .harness import REPO, add_sae_step_arguments, commit_label, device_slug, environment, summarize, time_call, write_results

RESULTS = REPO / "benchmarks" / "results"
TARGET = 1.1  # the target: every-prefix fused step <= 1.1x the stock 5-group step


def prefix_widths(kind: str, n: int) -> list[int]:
    """``"5"``: n/16, n/8, n/4, n/2, n; ``"64"``: 64 equal groups; ``"every"``: 1..n."""
    if kind == "5":
        return [n // 16, n // 8, n // 4, n // 2, n]
    if kind == "64":
        return sorted({max(1, round(g * n / 64)) for g in range(1, 65)})
    return list(range(1, n + 1))


def build_sae(variant: str, kind: str, args: argparse.Namespace, state: dict | None):
    """The SAELens training SAE of ``variant`` (``stock``, ``fused``, ``batchtopk``), loaded with
    ``state`` (the weights every variant shares) when given."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

    from matryoshka.integrations.sae_lens import (
        FusedMatryoshkaBatchTopKTrainingSAE,
        FusedMatryoshkaBatchTopKTrainingSAEConfig,
    )

    common = {"d_in": args.d, "d_sae": args.n, "k": args.k, "device": args.device, "dtype": "float32"}
    if variant == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    elif variant == "stock":
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(**common, matryoshka_widths=prefix_widths(kind, args.n))
        sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    else:
        every = kind == "every"
        cfg = FusedMatryoshkaBatchTopKTrainingSAEConfig(
            **common,
            matryoshka_widths=prefix_widths("5" if every else kind, args.n),
            matryoshka_prefixes="every" if every else "groups",
        )
        sae = FusedMatryoshkaBatchTopKTrainingSAE(cfg)
    if state is not None:
        sae.load_state_dict(state)
    return sae


def make_calls(variant: str, kind: str, args, state: dict, x: torch.Tensor) -> dict:
    """The row of ``variant`` with its two timed calls, ``forward`` and ``step``, and its loss."""
    from sae_lens.saes.sae import TrainStepInput

    sae = build_sae(variant, kind, args, state)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-12)  # a real Adam step that barely moves
    step_input = TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
    )

    def forward():
        return sae.training_forward_pass(step_input)

    def step():
        forward().loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    levels = 1 if variant == "batchtopk" else (args.n if kind == "every" else len(prefix_widths(kind, args.n)))
    return {"variant": variant, "prefixes": kind, "levels": levels, "loss": float(forward().loss),
            "calls": {"forward": forward, "step": step}}


def measure(rows: list[dict], device: torch.device, repeats: int, budget_s: float) -> None:
    """Time every row's calls round-robin (one warm-up round, then ``repeats`` rounds), so that a
    load change on a shared machine hits every row alike; a row's call stops repeating once its
    times add up to ``budget_s`` (after 2 repeats).  Adds the summaries to the rows."""
    times = {(i, name): [] for i, row in enumerate(rows) for name in row["calls"]}
    for round_ in range(repeats + 1):
        for i, row in enumerate(rows):
            for name, fn in row["calls"].items():
                done = times[i, name]
                if len(done) >= 2 and sum(done) > budget_s:
                    continue
                seconds = time_call(fn, device)
                if round_ > 0:
                    done.append(seconds)
    for i, row in enumerate(rows):
        for name in row.pop("calls"):
            row[name] = summarize(times[i, name])


def to_markdown(result: dict) -> str:
    env, cfg, rows = result["environment"], result["config"], result["rows"]
    base = result["stock_5_group_step_s"]
    lines = [
        f"# SAELens Matryoshka BatchTopK: stock vs fused ({env['device_name']}, {env['torch_threads']} thread(s))",
        "",
        f"d_in = {cfg['d']}, d_sae = {cfg['n']}, k = {cfg['k']}, batch {cfg['batch']}, float32, no dead latents; "
        f"SAELens {result['sae_lens']}, torch {env['torch']}; median (and min) of the repeats, "
        "timed round-robin over the rows.  `step` = forward + backward + grad clip + Adam, as SAELens's trainer; "
        f"load average at start {env['load_average_at_start']}.",
        "",
        "| class | prefixes | forward ms | step ms (min) | step / stock 5-group step | fused speedup (step) "
        "| loss rel. diff vs stock |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    stock = {row["prefixes"]: row for row in rows if row["variant"] == "stock"}
    for row in rows:
        speedup = diff = ""
        if row["variant"] == "fused" and row["prefixes"] in stock:
            reference = stock[row["prefixes"]]
            speedup = f"{reference['step']['median_s'] / row['step']['median_s']:.2f}x"
            diff = f"{abs(row['loss'] - reference['loss']) / abs(reference['loss']):.1e}"
        name = {"batchtopk": "BatchTopK (1 level)", "stock": "stock Matryoshka", "fused": "fused Matryoshka"}
        name = name[row["variant"]]
        levels = "-" if row["variant"] == "batchtopk" else f"{row['prefixes']} ({row['levels']} levels)"
        lines.append(
            f"| {name} | {levels} | {row['forward']['median_s'] * 1e3:.1f} "
            f"| {row['step']['median_s'] * 1e3:.1f} ({row['step']['min_s'] * 1e3:.1f}) "
            f"| {row['step']['median_s'] / base:.2f} | {speedup} | {diff} |"
        )
    verdict = "meets" if result["every_fused_over_stock_5_group"] <= TARGET else "misses"
    lines += [
        "",
        f"Every-prefix fused step / stock 5-group step = {result['every_fused_over_stock_5_group']:.2f} "
        f"(medians; {result['every_fused_over_stock_5_group_min']:.2f} on the minima): "
        f"{verdict} the target <= {TARGET}.",
        "",
        f"Command: `{' '.join(['python -m benchmarks.sae_lens_bench', *result['argv']])}`; "
        f"machine: {env['cpu_model']}, git {commit_label(env, 10)}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sae_step_arguments(parser, repeats=7)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per timing before repeats stop (min 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import sae_lens

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)  # SAELens's one-level warning
    device = torch.device(args.device)
    torch.manual_seed(0)
    state = build_sae("batchtopk", "5", args, None).state_dict()
    x = torch.randn(args.batch, args.d, device=device)
    plan = [("batchtopk", "1")] + [(variant, kind) for kind in ("5", "64", "every") for variant in ("stock", "fused")]
    rows = [make_calls(variant, kind, args, state, x) for variant, kind in plan]
    measure(rows, device, args.repeats, args.budget)
    by_key = {(row["variant"], row["prefixes"]): row for row in rows}
    base = by_key[("stock", "5")]["step"]["median_s"]
    result = {
        "argv": list(sys.argv[1:] if argv is None else argv),
        "config": {"d": args.d, "n": args.n, "k": args.k, "batch": args.batch},
        "sae_lens": sae_lens.__version__,
        "environment": environment(device),
        "rows": rows,
        "stock_5_group_step_s": base,
        "every_fused_over_stock_5_group": by_key[("fused", "every")]["step"]["median_s"] / base,
        "every_fused_over_stock_5_group_min": (
            by_key[("fused", "every")]["step"]["min_s"] / by_key[("stock", "5")]["step"]["min_s"]
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sae_lens_{device_slug(device)}"
    write_results(stem, result, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
