"""Command line: ``python -m matryoshka <command>``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from . import Prefixes, SparseActs, matryoshka_loss
from .checkpoint import check_writable
from .distributed import init_from_env
from .experiments import child_magnitude, compare
from .experiments.common import RunSpec, default_jobs
from .sae import ACTIVATIONS, SAEConfig, SparseAutoencoder
from .toy import ToyModel, nabeshima_spec
from .train import PREFIX_MODES, train


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


def _steps_and_seeds(args: argparse.Namespace, study) -> tuple[int, int]:
    """Explicit flags win; otherwise the study's quick or default settings."""
    steps = args.steps or (study.QUICK_STEPS if args.quick else study.DEFAULT_STEPS)
    seeds = args.seeds or (1 if args.quick else study.DEFAULT_SEEDS)
    return steps, seeds


def compare_cmd(args: argparse.Namespace) -> None:
    check_writable(args.out, "--out")  # the study writes only at its end: fail now, not then
    steps, seeds = _steps_and_seeds(args, compare)
    compare.compare(Path(args.out), steps=steps, seeds=seeds, jobs=args.jobs, modes=tuple(args.modes))


def child_magnitude_cmd(args: argparse.Namespace) -> None:
    check_writable(args.out, "--out")
    steps, seeds = _steps_and_seeds(args, child_magnitude)
    toy_params = {
        "parent_p": args.parent_p, "parent_magnitude": args.parent_magnitude, "child_p": args.child_p,
        "child_magnitude": args.child_magnitude, "distractors": args.distractors,
        "distractor_p": args.distractor_p,
    }
    child_magnitude.child_magnitude(
        Path(args.out), steps=steps, seeds=seeds, jobs=args.jobs, modes=tuple(args.modes),
        toy_params=toy_params, sweep_ratios=tuple(args.ratios) if args.sweep else None,
    )


def train_toy_cmd(args: argparse.Namespace) -> None:
    """Train one SAE on the nabeshima toy with the studies' recipe; checkpoints in ``OUT/checkpoints``,
    the final SAE in ``OUT/sae``.  Under ``torchrun`` the ranks train data-parallel."""
    parallel = init_from_env()
    try:
        leader = not parallel or dist.get_rank() == 0
        out = check_writable(args.out, "--out")
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
        toy = ToyModel(nabeshima_spec())
        overrides = dict(batch_size=args.batch_size, checkpoint_every=args.checkpoint_every, progress=leader)
        config = RunSpec(toy.spec, args.mode, args.seed, args.steps, train_overrides=overrides).train_config(toy)
        sae_config = SAEConfig(d=toy.d, n=toy.num_features, activation=args.activation, k=args.k)
        sae = SparseAutoencoder(sae_config, generator=torch.Generator().manual_seed(10_000 + args.seed)).to(device)
        result = train(sae, lambda rows, g: toy.sample(rows, g)[0], config,
                       checkpoint_dir=out / "checkpoints", resume=args.resume)
        if leader:
            sae.save(out / "sae")
            last = result.history[-1]
            print(f"step {last['step']}: loss {last['loss']:.5f}, reconstruction {last['recon']:.5f}, "
                  f"L0 {last['l0']:.3f}; SAE saved to {out / 'sae'}")
    finally:
        if parallel:
            dist.destroy_process_group()


def _study_args(parser: argparse.ArgumentParser, out: str, study) -> None:
    parser.add_argument("--out", default=out, help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per run (default {study.DEFAULT_STEPS}, --quick "
                             f"{study.QUICK_STEPS}; the original recipe uses 40000)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per mode (default {study.DEFAULT_SEEDS}, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, one seed")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="parallel training processes (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", default=list(study.MODES),
                        choices=["vanilla", "groups", "sampled", "every"])


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

    cmp = sub.add_parser("compare", help="vanilla / groups / sampled / every-prefix SAEs on the nabeshima toy",
                         description=compare.__doc__)
    _study_args(cmp, "runs/compare", compare)
    cmp.set_defaults(func=compare_cmd)

    child = sub.add_parser("child-magnitude", help="a child much larger than its parent: order, absorption",
                           description=child_magnitude.__doc__)
    _study_args(child, "runs/child_magnitude", child_magnitude)
    child.add_argument("--parent-p", type=float, default=0.3)
    child.add_argument("--parent-magnitude", type=float, default=2.0)
    child.add_argument("--child-p", type=float, default=0.5, help="probability given the parent")
    child.add_argument("--child-magnitude", type=float, default=10.0)
    child.add_argument("--distractors", type=int, default=6)
    child.add_argument("--distractor-p", type=float, default=0.05)
    child.add_argument("--sweep", action="store_true", help="also sweep the child/parent magnitude ratio")
    child.add_argument("--ratios", type=float, nargs="+", default=list(child_magnitude.DEFAULT_RATIOS),
                       help="child/parent magnitude ratios for --sweep (default: %(default)s)")
    child.set_defaults(func=child_magnitude_cmd)

    toy_train = sub.add_parser("train-toy", description=train_toy_cmd.__doc__,
                               help="train one SAE on the nabeshima toy (resumable; torchrun for data-parallel)")
    toy_train.add_argument("--out", default="runs/train_toy", help="output folder (default: %(default)s)")
    toy_train.add_argument("--activation", default="relu", choices=ACTIVATIONS)
    toy_train.add_argument("--k", type=int, default=None, help="active latents per row (topk, batchtopk)")
    toy_train.add_argument("--mode", default="sampled", choices=PREFIX_MODES, help="prefix mode (default: %(default)s)")
    toy_train.add_argument("--steps", type=int, default=2000)
    toy_train.add_argument("--batch-size", type=int, default=200, help="global batch, split over the ranks")
    toy_train.add_argument("--seed", type=int, default=0)
    toy_train.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0: none)")
    toy_train.add_argument("--resume", action="store_true",
                           help="continue from the latest checkpoint in OUT/checkpoints")
    toy_train.set_defaults(func=train_toy_cmd)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, FloatingPointError) as exc:  # bad settings, files or data: no traceback
        parser.exit(1, f"{parser.prog} {args.command}: error: {exc}\n")


if __name__ == "__main__":
    main()
