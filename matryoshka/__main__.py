"""Command line: ``python -m matryoshka <command>``."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from . import Prefixes, SparseActs, matryoshka_loss
from .checkpoint import check_writable
from .distributed import init_from_env
from .orthogonality import DEFAULT_CHUNK
from .experiments import (absorption_margins, child_magnitude, compare, hedging, orthogonality, real_absorption,
                          real_compare, turn_dynamics, unturn)
from .experiments.common import RunSpec, check_study_mode, default_jobs
from .sae import ACTIVATIONS, SAEConfig, SparseAutoencoder
from .realdata import DEFAULT_CORPUS
from .toy import ToyModel, nabeshima_spec
from .stop_signals import Interrupted
from .train import EVERY_WEIGHTS, PREFIX_MODES, train


# A checkpoint holds the parameters and Adam's two moments (three times the SAE): a long run that
# kept them all would fill the disk.
KEEP_CHECKPOINTS = 3
KEEP_HELP = "how many of the newest checkpoints to keep (0: all; default: %(default)s)"


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
    if args.margins:  # closed form, no training
        print(f"absorbed pair against the true pair (true minus absorbed; positive: absorption is better), "
              f"parent p {args.parent_p} magnitude {args.parent_magnitude}, {2 + args.distractors} latents:")
        print(absorption_margins.margins_table(tuple(args.phase_ratios), tuple(args.phase_probs), args.parent_p,
                                               args.parent_magnitude, 2 + args.distractors))
        print("\nrotated pair (u and the direction v orthogonal to it in the pair's plane) against the true pair "
              "(true minus rotated; positive: the rotation is better; the orthogonality penalty is 0 for both):")
        print(absorption_margins.rotated_table(parent_p=args.parent_p, parent_magnitude=args.parent_magnitude))
        return
    check_writable(args.out, "--out")
    steps, seeds = _steps_and_seeds(args, child_magnitude)
    toy_params = {
        "parent_p": args.parent_p, "parent_magnitude": args.parent_magnitude, "child_p": args.child_p,
        "child_magnitude": args.child_magnitude, "distractors": args.distractors,
        "distractor_p": args.distractor_p,
    }
    if args.phase:
        child_magnitude.phase(Path(args.out), steps=steps, seeds=seeds, jobs=args.jobs, toy_params=toy_params,
                              ratios=tuple(args.phase_ratios), probs=tuple(args.phase_probs),
                              modes=tuple(args.phase_modes), docs=Path(args.docs) if args.docs else None)
        return
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
        overrides = dict(batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
                         keep_checkpoints=args.keep_checkpoints, progress=leader,
                         detach=args.detach, balance_beta=args.balance_beta, balance_normalise=args.balance_normalise,
                         orthogonality_coeff=args.orthogonality_coeff, orthogonality_chunk=args.orthogonality_chunk,
                         resample_every=args.resample_every, prefix_mode=args.mode)  # a trainer prefix mode, not a study mode
        config = RunSpec(toy.spec, "vanilla", args.seed, args.steps, train_overrides=overrides).train_config(toy)
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


def train_cmd(args: argparse.Namespace) -> None:
    """Train one SAE on the user's activation files (see :mod:`matryoshka.train_files`)."""
    from .train_files import train_on_activations

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    summary = train_on_activations(
        args.path, args.out, args.steps, kind=args.kind, n=args.n, k=args.k, mode=args.mode, batch=args.batch,
        lr=args.lr, seed=args.seed, device=args.device, resume=args.resume, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, held_out=args.held_out,
        every_weights=args.every_weights, orthogonality_coeff=args.orthogonality_coeff,
        orthogonality_chunk=args.orthogonality_chunk, balance_beta=args.balance_beta,
        resample_every=args.resample_every, aux_k=args.aux_k)
    last, settings = summary["last"], summary["settings"]
    ev = last.get("heldout_explained_variance")
    print(f"{settings['kind']} SAE d={settings['d']} n={settings['n']} k={settings['k']}, prefixes {settings['mode']}"
          f"{' (' + settings['every_weights'] + ' weights)' if settings['mode'] in ('sampled', 'every') else ''}; "
          f"inputs scaled by {settings['normalisation']['scale']:.5g} (mean squared norm d)")
    print(f"step {last['step']}: loss {last['loss']:.5f}, L0 {last['l0']:.2f}, dead {last['dead']}"
          + (f", held-out explained variance (all {settings['n']} latents) {ev[-1]:.4f}" if ev else "")
          + f"; {summary['seconds'] / max(1, last['step']):.3f} s/step; SAE saved to {Path(args.out) / 'sae'}")


def activations_cmd(args: argparse.Namespace) -> None:
    """Cache a real model's residual-stream activations (see :mod:`matryoshka.realdata`)."""
    from .realdata import cache_activations

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model loads from its package folder: never the hub
    meta = cache_activations(args.out, layer=args.layer, tokens=args.tokens, seq_len=args.seq_len,
                             corpus=args.corpus, batch=args.batch, dtype=args.dtype)
    print(f"cached {meta['tokens']} tokens x d={meta['d']} of {meta['model']}, {meta['site']}, over "
          f"{meta['corpus_paragraphs']} paragraphs of {meta['corpus']} into {args.out} ({meta['seconds']:.0f} s)")


def _real_study_cmd(args: argparse.Namespace, study, run, **settings) -> None:
    """A real-data study from the shared flags: ``study`` its module, ``run`` its entry point,
    ``settings`` the study's own flags."""
    check_writable(args.out, "--out")
    if _replotted(args, study):
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps, seeds = _steps_and_seeds(args, study)
    run(Path(args.out), acts=Path(args.acts), steps=steps, seeds=seeds, jobs=args.jobs, modes=tuple(args.modes),
        tokens=args.tokens, quick=args.quick, docs=Path(args.docs) if args.docs and not args.quick else None, **settings)


def real_compare_cmd(args: argparse.Namespace) -> None:
    _real_study_cmd(args, real_compare, real_compare.real_compare, every_weights=args.every_weights)


def real_absorption_cmd(args: argparse.Namespace) -> None:
    _real_study_cmd(args, real_absorption, real_absorption.real_absorption, measure_only=args.measure)


def _replotted(args: argparse.Namespace, study) -> bool:
    """``--replot``: redo ``study``'s tables and figures from its results file in ``--out``, no training."""
    if args.replot:
        study.replot(Path(args.out), docs=Path(args.docs) if args.docs else None)
    return args.replot


def hedging_cmd(args: argparse.Namespace) -> None:
    check_writable(args.out, "--out")
    if _replotted(args, hedging):
        return
    steps, seeds = _steps_and_seeds(args, hedging)
    hedging.hedging(Path(args.out), steps=steps, seeds=seeds, jobs=args.jobs, toys=tuple(args.toys),
                    betas=tuple(args.betas), norm_betas=tuple(args.norm_betas), quick=args.quick,
                    modes=None if args.modes == list(hedging.MODES) else tuple(args.modes),
                    unequal_betas=tuple(args.unequal_betas),
                    docs=None if args.quick or not args.docs else Path(args.docs))


def orthogonality_cmd(args: argparse.Namespace) -> None:
    check_writable(args.out, "--out")
    if _replotted(args, orthogonality):
        return
    steps, seeds = _steps_and_seeds(args, orthogonality)
    bases, gammas = (["every"], [0.0, 1.0]) if args.quick else (args.bases, args.gammas)
    orthogonality.orthogonality(Path(args.out), steps=steps, seeds=seeds, jobs=args.jobs, bases=tuple(bases),
                                gammas=tuple(gammas), ratios=tuple(args.ratios),
                                child_bases=tuple(["every"] if args.quick else args.child_bases),
                                family_toys=tuple(args.toys), docs=None if args.quick or not args.docs else Path(args.docs))


def turn_dynamics_cmd(args: argparse.Namespace) -> None:
    check_writable(args.out, "--out")
    if _replotted(args, turn_dynamics):
        return
    steps, seeds = _steps_and_seeds(args, turn_dynamics)
    turn_dynamics.turn_dynamics(Path(args.out), qs=tuple([0.5] if args.quick else args.qs), mode=args.mode,
                                steps=steps, seeds=seeds, jobs=args.jobs, read_every=args.read_every,
                                read_until=min(args.read_until, steps),
                                docs=None if args.quick or not args.docs else Path(args.docs))


def unturn_cmd(args: argparse.Namespace) -> None:
    check_writable(args.out, "--out")
    if _replotted(args, unturn):
        return
    steps, seeds = _steps_and_seeds(args, unturn)
    unturn.unturn_study(Path(args.out), qs=tuple([0.5] if args.quick else args.qs), mode=args.mode, steps=steps,
                        retrain_steps=unturn.QUICK_STEPS if args.quick else args.retrain_steps, seeds=seeds,
                        jobs=args.jobs, retrain=args.retrain, order=args.order, retrain_warmup=args.retrain_warmup,
                        retrain_resort_every=args.retrain_resort_every, parent_std=args.parent_std,
                        parent_scale=args.parent_scale, retrain_beta=args.retrain_beta,
                        retrain_budget=args.retrain_budget,
                        parent_rule=args.parent_rule, min_correlation=args.min_correlation, docs=None if args.quick or not args.docs else Path(args.docs))


def _family_toy(name: str) -> str:
    """argparse type of ``orthogonality --toys``: a family toy's name, refused with the reason."""
    try:
        hedging.family_toy_spec(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def _orthogonality_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--orthogonality-coeff", type=float, default=0.0,
                        help="weight of the decoder orthogonality penalty: each latent's largest squared cosine "
                             "with another's decoder row, averaged (after OrtSAE; default %(default)s: off)")
    parser.add_argument("--orthogonality-chunk", type=int, default=DEFAULT_CHUNK,
                        help="latents compared with each other per step, in random chunks redrawn every step "
                             "(default %(default)s; n or more: every pair)")


def _resample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resample-every", type=int, default=0,
                        help="every that many steps, restart latents that have not fired for the trainer's dead_after "
                             "steps on the batch's worst-reconstructed inputs, until the learning-rate cool-down "
                             "(default %(default)s: never)")


def _study_args(parser: argparse.ArgumentParser, out: str, study, modes: bool = True) -> None:
    parser.add_argument("--out", default=out, help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per run (default {study.DEFAULT_STEPS}, --quick "
                             f"{study.QUICK_STEPS}; the original recipe uses 40000)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per mode (default {study.DEFAULT_SEEDS}, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, one seed")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="parallel training processes (default: %(default)s)")
    if not modes:  # a study with its own grid options
        return
    parser.add_argument("--modes", nargs="+", default=list(study.MODES), type=check_study_mode,
                        help="study modes (matryoshka.experiments.common.study_mode): vanilla, groups, sampled, "
                             "every, every-uniform, detached, detached-uniform, groups-detached, every-b<beta>, "
                             "every-uniform-b<beta>, balanced-b<beta>, each -b form optionally with -norm; suffixes "
                             "-pp, -freq, -orth<gamma>, -resample, -dead<N>, -auxk<N>, -cool<f>, -jumprelu, -batchtopk "
                             "(default: %(default)s)")


def _unequal_q_study_args(parser: argparse.ArgumentParser, out: str, study, results: str) -> None:
    """The options of a study of one mode over the unequal toys' q (``turn-dynamics``, ``unturn``)."""
    _study_args(parser, out, study, modes=False)
    parser.add_argument("--qs", type=float, nargs="+", default=list(study.DEFAULT_QS),
                        help="P(most frequent child | parent) of the unequal toys, each in (0, 0.83] (default: %(default)s)")
    parser.add_argument("--mode", default=study.DEFAULT_MODE, type=check_study_mode,
                        help="study mode (default: %(default)s)")
    parser.add_argument("--docs", default=None, help="also copy the figures and results table here")
    parser.add_argument("--replot", action="store_true",
                        help=f"redo the tables and figures from OUT/{results}, without training")


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
    child.add_argument("--phase", action="store_true",
                       help="the phase diagram: magnitude ratio x P(child | parent) x --phase-modes (heatmaps)")
    child.add_argument("--phase-ratios", type=float, nargs="+", default=list(child_magnitude.PHASE_RATIOS))
    child.add_argument("--phase-probs", type=float, nargs="+", default=list(child_magnitude.PHASE_PROBS))
    child.add_argument("--phase-modes", nargs="+", default=list(child_magnitude.PHASE_MODES), type=check_study_mode)
    child.add_argument("--docs", default=None, help="also copy the phase figures and results table here")
    child.add_argument("--margins", action="store_true",
                       help="no training: the absorbed pair's closed-form margins against the true pair over "
                            "--phase-ratios x --phase-probs (why no prefix weighting prevents the absorption), "
                            "then the rotated pair's (why a child on half its parent's samples turns the pair)")
    child.set_defaults(func=child_magnitude_cmd)

    hedge = sub.add_parser("hedging", help="why mixing remains with every prefix: inner prefixes scaled by beta, "
                                           "uniform and detached levels, two toys", description=hedging.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _study_args(hedge, "runs/hedging", hedging)
    hedge.add_argument("--toys", nargs="+", default=list(hedging.TOYS), choices=list(hedging.TOYS))
    hedge.add_argument("--betas", type=float, nargs="+", default=list(hedging.BETAS),
                       help="beta grid of every-b<beta> (default: %(default)s)")
    hedge.add_argument("--norm-betas", type=float, nargs="+", default=list(hedging.NORM_BETAS),
                       help="betas of the normalised form every-b<beta>-norm, nabeshima toy (default: %(default)s)")
    hedge.add_argument("--docs", default="docs", help="copy figures and results.md here (not with --quick; '' = no)")
    hedge.add_argument("--unequal-betas", type=float, nargs="+", default=list(hedging.UNEQUAL_BETAS),
                       help="beta grid on the unequal toy (default: %(default)s)")
    hedge.add_argument("--replot", action="store_true", help="redo tables and figures from OUT/results.json")
    hedge.set_defaults(func=hedging_cmd)

    ortho = sub.add_parser("orthogonality", help="does a decoder orthogonality penalty remove mixing and the "
                                                 "large-child absorption?", description=orthogonality.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _study_args(ortho, "runs/orthogonality", orthogonality, modes=False)
    ortho.add_argument("--bases", nargs="+", default=list(orthogonality.BASES), type=check_study_mode,
                       help="base study modes on the nabeshima and unequal toys (default: %(default)s)")
    ortho.add_argument("--toys", nargs="*", default=list(orthogonality.FAMILY_TOYS), type=_family_toy,
                       help="the toys with parent/child families that --bases run on: nabeshima, unequal, or "
                            "unequal-q<x> (the unequal toy's most frequent child at P(c | parent) = x instead of "
                            "0.5; e.g. unequal-q0.3) (default: %(default)s)")
    ortho.add_argument("--child-bases", nargs="*", default=list(orthogonality.CHILD_BASES), type=check_study_mode,
                       help="base study modes on the child-magnitude toy; none: no child-magnitude runs "
                            "(default: %(default)s)")
    ortho.add_argument("--gammas", type=float, nargs="+", default=list(orthogonality.GAMMAS),
                       help="penalty weights; 0 is the base mode (default: %(default)s)")
    ortho.add_argument("--ratios", type=float, nargs="+", default=list(orthogonality.RATIOS),
                       help="child/parent magnitude ratios of the child-magnitude toy (default: %(default)s)")
    ortho.add_argument("--docs", default=None, help="also copy the figure and results table here")
    ortho.add_argument("--replot", action="store_true",
                       help="redo the tables and figure from OUT/orthogonality_results.json, without training")
    ortho.set_defaults(func=orthogonality_cmd)

    turn = sub.add_parser("turn-dynamics", help="where training commits a frequent child's pair to the turn: each "
                                                "family's first latent against the leading direction",
                          description=turn_dynamics.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _unequal_q_study_args(turn, "runs/turn_dynamics", turn_dynamics, "turn_results.json")
    turn.add_argument("--read-every", type=int, default=10, help="steps between read-outs (default: %(default)s)")
    turn.add_argument("--read-until", type=int, default=1000,
                      help="last step read (default: %(default)s; the first latents form in the first few hundred)")
    turn.set_defaults(func=turn_dynamics_cmd)

    rebase = sub.add_parser("unturn", help="re-base trained SAEs' nested latents so that a parent's code does not vary with its children, "
                                           "and see whether training keeps the truth it gives",
                            description=unturn.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _unequal_q_study_args(rebase, "runs/unturn", unturn, "unturn_results.json")
    rebase.add_argument("--retrain-steps", type=int, default=unturn.DEFAULT_RETRAIN_STEPS,
                        help="steps trained after the re-basing, and by the control (default: %(default)s)")
    rebase.add_argument("--retrain", choices=unturn.RETRAINS, default=unturn.RETRAINS[0],
                        help="the sparsity coefficient while training on: the recipe's, adapted to the toy's L0 from "
                             "its start, or held fixed at that start, 1e-3 (default: %(default)s)")
    rebase.add_argument("--order", choices=unturn.ORDERS, default=unturn.ORDERS[0],
                        help="the latents' order once re-based: re-sorted by energy; kept (each re-based child in the "
                             "place of the turned latent it replaced); or children-last (re-sorted, then only the "
                             "re-based children moved to the end) (default: %(default)s)")
    rebase.add_argument("--retrain-warmup", type=float, default=None,
                        help="the learning-rate warm-up's share of the steps trained on, in [0, 1] (default: the "
                             "recipe's, 0.05)")
    rebase.add_argument("--retrain-resort-every", type=int, default=None,
                        help="steps between the trainer's re-sorts of the latents while training on (0: never; "
                             "default: the recipe's, 100)")
    rebase.add_argument("--retrain-beta", type=float, default=None,
                        help="the inner prefixes' scale β while training on, for an 'every' mode (0: the full "
                             "prefix alone; default: the mode's, 0.2 in the recipe)")
    rebase.add_argument("--retrain-budget", type=float, default=1.0,
                        help="multiply BatchTopK's k (the share of the batch it keeps) while training on, for a "
                             "BatchTopK mode (default: %(default)s)")
    rebase.add_argument("--parent-std", type=float, default=0.0,
                        help="standard deviation of each family parent's magnitude, of mean 1 (default: %(default)s, "
                             "fixed magnitudes)")
    rebase.add_argument("--parent-scale", type=float, default=1.0,
                        help="each family parent's magnitude is multiplied by this where its most frequent child "
                             "fires: a parent whose magnitude depends on which child fires (default: %(default)s)")
    rebase.add_argument("--parent-rule", choices=unturn.PARENT_RULES, default=unturn.PARENT_RULES[0],
                        help="how the re-basing picks a parent's direction: least-varying (u ∝ C⁻¹μ) or uncorrelated "
                             "(the least-varying eigenvector of the rows' covariance, for a parent whose magnitude "
                             "varies) (default: %(default)s)")
    rebase.add_argument("--min-correlation", type=float, default=0.5,
                        help="the re-basing's detection threshold: a container is re-based when a nested latent's "
                             "code correlates with its own at least this much (|corr|, default: %(default)s)")
    rebase.set_defaults(func=unturn_cmd)

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
    toy_train.add_argument("--keep-checkpoints", type=int, default=KEEP_CHECKPOINTS, help=KEEP_HELP)
    toy_train.add_argument("--resume", action="store_true",
                           help="continue from the latest checkpoint in OUT/checkpoints")
    toy_train.add_argument("--detach", action="store_true",
                           help="detached levels: each latent learns only from the prefix that adds it")
    toy_train.add_argument("--balance-beta", type=float, default=None,
                           help="inner levels' scale beta: every = L_n + beta * sum_{l<n} w_l L_l; "
                                "balanced (needs it) = group weights beta^(G-g)")
    toy_train.add_argument("--balance-normalise", action="store_true",
                           help="divide the beta-scaled weights by their sum")
    _orthogonality_args(toy_train)
    _resample_args(toy_train)
    toy_train.set_defaults(func=train_toy_cmd)

    # Prefix modes come from the trainer (PREFIX_MODES), so modes it gains (balanced, detached) appear here.
    fit = sub.add_parser("train", help="train a Matryoshka SAE on your own activation files",
                         description=train_cmd.__doc__ + " " + "PATH: a .npy/.safetensors file or a folder of them, "
                         "(tokens, d) float arrays, memory-mapped; inputs are scaled to mean squared norm d (SAELens).")
    fit.add_argument("path", metavar="PATH", help="activation file or folder (.npy, .safetensors)")
    fit.add_argument("--out", required=True, help="output folder: checkpoints/, sae/, normalization.json, history.json")
    fit.add_argument("--steps", type=int, required=True, help="training steps")
    fit.add_argument("--kind", default="topk", choices=ACTIVATIONS, help="SAE activation (default: %(default)s)")
    fit.add_argument("--n", type=int, default=None, help="latents (default: 8 x d)")
    fit.add_argument("--k", type=int, default=32,
                     help="active latents per token (topk, batchtopk) or target L0 (relu, jumprelu); default %(default)s")
    fit.add_argument("--mode", default="every", choices=PREFIX_MODES, help="prefix mode (default: %(default)s)")
    fit.add_argument("--every-weights", default="exact", choices=EVERY_WEIGHTS,
                     help="weights of the every objective: exact inclusion probabilities / num_sampled (the "
                          "expected sampled loss), or uniform 1/n (default: %(default)s)")
    fit.add_argument("--balance-beta", type=float, default=None,
                     help="with --mode every: scale the inner prefixes by beta, L_n + beta * sum_{l<n} w_l L_l "
                          "(default: every's own weights)")
    fit.add_argument("--batch", type=int, default=512, help="tokens per step (default: %(default)s)")
    fit.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: %(default)s)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--held-out", type=int, default=8192,
                     help="tokens at the end of the data kept out of training for the explained-variance log "
                          "(default: %(default)s)")
    fit.add_argument("--log-every", type=int, default=100, help="steps between read-outs (default: %(default)s)")
    fit.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0: none)")
    fit.add_argument("--keep-checkpoints", type=int, default=KEEP_CHECKPOINTS, help=KEEP_HELP)
    fit.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    fit.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cpu or cuda[:i] (default: %(default)s)")
    fit.add_argument("--aux-k", type=int, default=16,
                     help="topk/batchtopk: dead latents (silent for 200 steps) the dead-latent loss (AuxK, Gao et al. "
                          "2024) decodes per token; they suggest about d/2 (default: %(default)s; 0: off)")
    _orthogonality_args(fit)
    _resample_args(fit)
    fit.set_defaults(func=train_cmd)

    cache = sub.add_parser("activations", help="cache a real transformer's residual-stream activations over English text",
                           description=activations_cmd.__doc__)
    cache.add_argument("--out", default="runs/real/acts", help="output folder (default: %(default)s)")
    cache.add_argument("--layer", type=int, default=3, help="residual stream after this encoder block, 0..6 "
                                                            "(default: %(default)s)")
    cache.add_argument("--tokens", type=int, default=1_000_000, help="tokens to cache (default: %(default)s)")
    cache.add_argument("--seq-len", type=int, default=128, help="positions per window incl. [CLS]/[SEP]")
    cache.add_argument("--batch", type=int, default=32, help="windows per forward pass")
    cache.add_argument("--corpus", default=str(DEFAULT_CORPUS),
                       help="folder or file of .txt/.rst English text (default: Debian python3.11-doc, %(default)s)")
    cache.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    cache.set_defaults(func=activations_cmd)

    real = sub.add_parser("real-compare", help="the prefix modes on a real model's activations: FVU per prefix, "
                                               "ordering and nesting probes", description=real_compare.__doc__)
    _study_args(real, "runs/real_compare", real_compare)
    real.add_argument("--acts", default="runs/real/acts",
                      help="cached activations; cached there first if absent (default: %(default)s)")
    real.add_argument("--tokens", type=int, default=real_compare.DEFAULT_TOKENS,
                      help="tokens to cache when --acts is absent (default: %(default)s)")
    real.add_argument("--every-weights", default="exact", choices=EVERY_WEIGHTS,
                      help="weights of the every mode (default: %(default)s)")
    real.add_argument("--docs", default="docs", help="folder for the figures and the results table (not with --quick)")
    real.add_argument("--replot", action="store_true",
                      help="redo the summary, tables and figures from OUT/results.json, no training")
    real.set_defaults(func=real_compare_cmd)

    absorb = sub.add_parser("real-absorption", help="absorption of general features (word pieces, numbers, ...) on "
                                                    "a real model's activations, read through linear probes",
                            description=real_absorption.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _study_args(absorb, "runs/real_absorption", real_absorption)
    absorb.add_argument("--acts", default="runs/real/acts",
                        help="cached activations; cached there first if absent (default: %(default)s)")
    absorb.add_argument("--tokens", type=int, default=real_compare.DEFAULT_TOKENS,
                        help="tokens to cache when --acts is absent (default: %(default)s)")
    absorb.add_argument("--docs", default="docs/real_absorption",
                        help="folder for the figure and the results table (default: %(default)s; not with --quick)")
    absorb.add_argument("--measure", action="store_true",
                        help="no training: measure the SAEs of --modes already saved in OUT/saes")
    absorb.add_argument("--replot", action="store_true",
                        help="redo the summary, tables and figure from OUT/results.json, no measuring")
    absorb.set_defaults(func=real_absorption_cmd)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, FloatingPointError, ImportError) as exc:  # bad settings, files, data, installs
        parser.exit(1, f"{parser.prog} {args.command}: error: {exc}\n")
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: say what was kept, exit as the signal would
        code = stop.exit_code if isinstance(stop, Interrupted) else 128 + signal.SIGINT
        parser.exit(code, f"{parser.prog} {args.command}: {stop or 'interrupted'}\n")


if __name__ == "__main__":
    main()
