"""The dense PyTorch scan's block plan, timed: ``python -m benchmarks.dense_blocks``.

``dense_prefix_norms_torch`` (what ``"auto"`` runs for dense activations) groups close prefix
lengths into latent blocks (``torch_scan._dense_blocks``): a block starts at a length and takes the
next lengths while each is less than ``gap`` latents past the one before and less than ``width``
past the start.  A block pays Gram-form products over its whole width (``P = R W_blk^T``, the
``w x w`` Gram and their backward); a length in a block of its own pays one norm and a few small
ops, but splits the decode GEMM there.  So the plan trades products against op count, and where
the trade turns depends on the machine.

For every ``(B, d)`` and every spacing ``s`` (prefix lengths ``0, s, 2s, ..., n``; ``s = 1`` is every
latent), this times the scan's forward + backward (``(norms * weights).sum().backward()``, grads on
``x``'s target, ``W_dec``, ``acts``) under each ``(width, gap)`` plan in ``--widths`` x ``--gaps``, and
one dense decode forward + backward beside them (``baselines.dense_decode_loss``), after checking
each plan's norms and gradients against the package's plan (the largest relative difference is
recorded per cell).  Median of
``--rounds`` calls after a warm-up, two input sets in turn; on CUDA, events.  The plan is set by
patching the module's ``_DENSE_BLOCK``/``_DENSE_GAP`` for the timed calls.  Writes
``dense_blocks_<device>[_tag].{json,md}`` into ``--results``; the package's plan is marked.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from pathlib import Path

import torch

from matryoshka import torch_scan

from .baselines import dense_decode_loss
from .harness import DTYPES, REPO, device_slug, environment, median_time, write_results

NEVER = 0  # a --gaps value: lengths are never put in a block of their own for being far apart


@contextlib.contextmanager
def block_plan(width: int, gap: int):
    """The dense scan's blocks at most ``width`` latents wide, a length ``gap`` or more past the one
    before in a block of its own (``gap`` = ``NEVER``: width alone decides)."""
    saved = torch_scan._DENSE_BLOCK, torch_scan._DENSE_GAP
    torch_scan._DENSE_BLOCK, torch_scan._DENSE_GAP = width, (gap or sys.maxsize)
    try:
        yield
    finally:
        torch_scan._DENSE_BLOCK, torch_scan._DENSE_GAP = saved


def dense_inputs(B: int, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int):
    """ReLU-like ``(B, n)`` activations (half of them zero), unit-norm decoder rows, a bias."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, d, device=device, generator=g, dtype=dtype)
    W = torch.randn(n, d, device=device, generator=g, dtype=dtype)
    W = (W / W.norm(dim=1, keepdim=True)).requires_grad_()
    b = (0.1 * torch.randn(d, device=device, generator=g, dtype=dtype)).requires_grad_()
    acts = torch.randn(B, n, device=device, generator=g, dtype=dtype).relu_().requires_grad_()
    return x, W, b, acts


def scan_step(inputs, lengths: list[int], weights: torch.Tensor):
    x, W, b, acts = inputs
    for t in (W, b, acts):
        t.grad = None
    (torch_scan.dense_prefix_norms_torch(x, b, W, acts, lengths) * weights).sum().backward()


def plan_difference(inputs, lengths: list[int], weights: torch.Tensor, plan: tuple[int, int]) -> float:
    """The largest relative difference, over the norms and the ``W_dec``, ``b_dec`` and ``acts``
    gradients, between ``plan`` and the package's plan on ``inputs`` (every plan computes the same
    numbers, up to float rounding)."""
    def outputs():
        x, W, b, acts = inputs
        for t in (W, b, acts):
            t.grad = None
        norms = torch_scan.dense_prefix_norms_torch(x, b, W, acts, lengths)
        (norms * weights).sum().backward()
        return [norms.detach(), W.grad, b.grad, acts.grad]

    want = outputs()
    with block_plan(*plan):
        got = outputs()
    return max(((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for g, w in zip(got, want))


def decode_step(inputs):
    x, W, b, acts = inputs
    for t in (W, b, acts):
        t.grad = None
    dense_decode_loss(x, acts, W, b).backward()


def plan_label(width: int, gap: int) -> str:
    return f"w{width} g{gap or 'never'}"


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    package_plan = (torch_scan._DENSE_BLOCK, torch_scan._DENSE_GAP)
    plans = list(itertools.product(args.widths, args.gaps))
    doc = dict(command="python -m benchmarks.dense_blocks " + " ".join(args.argv), environment=environment(device),
               n=args.n, dtype=args.dtype, rounds=args.rounds, package_plan=dict(width=package_plan[0], gap=package_plan[1]),
               cells=[])
    for B, d in itertools.product(args.B, args.d):
        sets = [dense_inputs(B, args.n, d, dtype, device, seed) for seed in (0, 1)]
        decode_ms = 1e3 * median_time(lambda r: decode_step(sets[r % 2]), device, args.rounds)
        for spacing in args.spacings:
            lengths = list(range(0, args.n + 1, spacing))
            weights = torch.full((len(lengths),), 1.0 / len(lengths), dtype=dtype, device=device)
            cell = dict(B=B, d=d, spacing=spacing, G=len(lengths), decode_ms=decode_ms, plans={})
            for width, gap in plans:
                difference = plan_difference(sets[0], lengths, weights, (width, gap))
                cell["max_rel_difference"] = max(cell.get("max_rel_difference", 0.0), difference)
                with block_plan(width, gap):
                    seconds = median_time(lambda r: scan_step(sets[r % 2], lengths, weights), device, args.rounds)
                cell["plans"][plan_label(width, gap)] = 1e3 * seconds
            doc["cells"].append(cell)
            print(f"B={B} d={d} spacing={spacing}: " + "  ".join(f"{k} {v:.1f}" for k, v in cell["plans"].items())
                  + f"  decode {decode_ms:.1f} ms", flush=True)
    return doc


def markdown(doc: dict) -> str:
    env = doc["environment"]
    width, gap = doc["package_plan"]["width"], doc["package_plan"]["gap"]
    package = plan_label(width, gap)
    labels = list(doc["cells"][0]["plans"]) if doc["cells"] else []
    head = (["B", "d", "spacing", "G"] + [f"{k} (package)" if k == package else k for k in labels]
            + ["one decode", "max rel. diff. to package"])
    lines = [
        f"# Dense PyTorch scan: block plans ({env['device_name']}, torch {env['torch']}, "
        f"{env['torch_threads']} thread(s), commit {(env['git_commit'] or '?')[:7]})",
        "",
        f"`{doc['command']}`",
        "",
        f"Forward + backward median ms over {doc['rounds']} calls, {doc['dtype']}, n = {doc['n']}; prefix lengths "
        "0, s, 2s, ..., n (spacing s; 1 = every latent); plan `wW gG`: blocks at most W latents wide, a length G "
        "or more past the one before in a block of its own (`never`: width alone).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for c in doc["cells"]:
        best = min(c["plans"].values())
        times = [f"**{v:.1f}**" if v == best else f"{v:.1f}" for v in c["plans"].values()]
        lines.append("| " + " | ".join([str(c["B"]), str(c["d"]), str(c["spacing"]), str(c["G"]), *times,
                                        f"{c['decode_ms']:.1f}", f"{c['max_rel_difference']:.1e}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.dense_blocks", description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, nargs="+", default=[256])
    p.add_argument("--d", type=int, nargs="+", default=[256, 768])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--spacings", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--gaps", type=int, nargs="+", default=[NEVER, 16, 32],
                   help=f"latents between lengths that put a length in a block of its own ({NEVER}: never)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="appended to the results' file names")
    args = p.parse_args(argv)
    for name in ("B", "d", "spacings", "widths"):
        if min(getattr(args, name)) < 1:
            p.error(f"--{name} must be positive integers")
    if min(args.gaps) < 0:
        p.error(f"--gaps must be non-negative ({NEVER}: never)")
    if max(args.spacings) > args.n:
        p.error(f"--spacings must be at most --n ({args.n})")
    args.argv = argv
    torch.set_num_threads(args.threads)
    doc = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"dense_blocks_{device_slug(torch.device(args.device))}{args.tag}"
    write_results(stem, doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
