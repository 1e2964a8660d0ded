"""What an input that needs no gradient saves: ``python -m benchmarks.frozen_inputs``.

Forward + backward of ``matryoshka_loss`` (backend ``--backend``, default ``"auto"``: the PyTorch
scans on the CPU, the Triton kernels for sparse activations on CUDA) in three cases:

* ``training``: the activations, ``W_dec`` and ``b_dec`` need gradients (an SAE training step);
* ``frozen decoder``: only the activations do (``W_dec`` and ``b_dec`` frozen: encoder-only
  training, or codes fitted to a fixed dictionary);
* ``fixed codes``: only ``W_dec`` and ``b_dec`` do (a decoder fitted to given codes).

for TopK-style sparse activations and dense ReLU ones, at every prefix and at 5 groups.  The backward
skips the gradients nobody asked for (``kernels/scan_autograd.py``); the ratio to ``training`` is
what that saves.  Each cell: median of ``--rounds`` calls after a warm-up, two input sets in turn
(CUDA events on a GPU), loss and gradients checked against the training case's first.  Writes
``frozen_inputs_<device>[_tag].{json,md}`` into ``--results``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from matryoshka import Prefixes, matryoshka_loss

from .dense_blocks import dense_inputs
from .harness import DTYPES, REPO, commit_label, device_slug, environment, make_input_set, median_time, write_results

CASES = {"training": ("acts", "W_dec", "b_dec"), "frozen decoder": ("acts",), "fixed codes": ("W_dec", "b_dec")}


def _input_sets(activation: str, B: int, n: int, d: int, k: int, dtype, device) -> list[dict]:
    """Two input sets, as dicts of ``x``, ``acts`` (``SparseActs`` or dense), ``W_dec``, ``b_dec``."""
    out = []
    for seed in (0, 1):
        if activation == "sparse":
            s = make_input_set(B, n, d, k, dtype, device, seed)
            out.append(dict(x=s.x, acts=s.acts, W_dec=s.W_dec.detach(), b_dec=s.b_dec.detach()))
        else:
            x, W, b, acts = dense_inputs(B, n, d, dtype, device, seed)
            out.append(dict(x=x, acts=acts.detach(), W_dec=W.detach(), b_dec=b.detach()))
    return out


def _leaves(inputs: dict, needs: tuple[str, ...]) -> dict:
    """Fresh leaves of ``inputs``, those named in ``needs`` asking for a gradient."""
    out = dict(inputs)
    for name in ("W_dec", "b_dec"):
        out[name] = inputs[name].detach().requires_grad_(name in needs)
    acts = inputs["acts"]
    if isinstance(acts, torch.Tensor):
        out["acts"] = acts.detach().requires_grad_("acts" in needs)
    else:
        out["acts"] = type(acts)(acts.values.detach().requires_grad_("acts" in needs), acts.indices)
    return out


def _params(leaves: dict) -> list[torch.Tensor]:
    acts = leaves["acts"]
    return [acts if isinstance(acts, torch.Tensor) else acts.values, leaves["W_dec"], leaves["b_dec"]]


def measure(activation: str, prefixes_name: str, prefixes: Prefixes, sets: list[dict], args, device) -> list[dict]:
    """The three cases' times for one activation kind and prefix set, each against ``training``."""
    records, reference = [], None
    for case, needs in CASES.items():
        leaves = [_leaves(s, needs) for s in sets]

        def step(r: int, leaves=leaves):
            s = leaves[r % len(leaves)]
            for t in _params(s):
                t.grad = None
            loss = matryoshka_loss(s["x"], s["acts"], s["W_dec"], s["b_dec"], prefixes, backend=args.backend).loss
            loss.backward()
            return loss

        check = leaves[0]
        loss = step(0).detach()
        grads = [None if t.grad is None else t.grad.clone() for t in _params(check)]
        if reference is None:
            reference = (loss, grads)
        else:  # the gradients still asked for are the training case's
            assert torch.allclose(loss, reference[0]), (case, loss, reference[0])
            for got, want in zip(grads, reference[1]):
                if got is not None:
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
        seconds = median_time(step, device, args.rounds)
        records.append(dict(activation=activation, prefixes=prefixes_name, G=len(prefixes), case=case,
                            needs=list(needs), median_s=seconds))
    base = records[0]["median_s"]
    for r in records:
        r["over_training"] = r["median_s"] / base
    return records


def markdown(doc: dict) -> str:
    env, s = doc["environment"], doc["settings"]
    lines = [
        f"# Frozen inputs: forward + backward, {env['device_name']} ({env['device_type']})",
        "",
        f"torch {env['torch']}, commit {commit_label(env, 10)}; "
        f"B={s['B']}, d={s['d']}, n={s['n']}, k={s['k']} (sparse), {s['dtype']}, backend {s['backend']}, "
        f"median of {s['rounds']} calls, {s['threads']} CPU thread(s)",
        "",
        "| activations | prefixes | case | needs gradients | ms | / training |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in doc["records"]:
        lines.append(f"| {r['activation']} | {r['prefixes']} (G={r['G']}) | {r['case']} | {', '.join(r['needs'])} | "
                     f"{1e3 * r['median_s']:.2f} | {r['over_training']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frozen_inputs", description=__doc__.split("\n")[0])
    parser.add_argument("--B", type=int, default=1024)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dense-B", type=int, default=256, help="batch of the dense cases (a (B, n) activation matrix)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    prefix_sets = {"every": Prefixes.every(args.n), "5 groups": Prefixes.groups([args.n >> s for s in range(4, -1, -1)])}
    records = []
    for activation in ("sparse", "dense"):
        B = args.B if activation == "sparse" else args.dense_B
        sets = _input_sets(activation, B, args.n, args.d, args.k, dtype, device)
        for name, prefixes in prefix_sets.items():
            records += measure(activation, name, prefixes, sets, args, device)
            print(f"{activation} {name}: " + ", ".join(f"{r['case']} {r['over_training']:.2f}" for r in records[-3:]),
                  file=sys.stderr)
    doc = dict(environment=environment(device), records=records,
               settings=dict(B=args.B, dense_B=args.dense_B, d=args.d, n=args.n, k=args.k, dtype=args.dtype,
                             backend=args.backend, rounds=args.rounds, threads=args.threads))
    args.results.mkdir(parents=True, exist_ok=True)
    write_results(args.results / f"frozen_inputs_{device_slug(device)}{args.tag}", doc, markdown(doc))
    return doc


if __name__ == "__main__":
    main()
