"""Absorption on a real model's activations: does an SAE's latent for a general feature fire on every
token that has the feature, or do token-specific latents take the feature over?

Feature absorption (Chanin et al. 2024, "A is for Absorption") is the real-data face of the toy
studies' parent/child question: a general feature (the parent) gets a latent, but on tokens that
also have a frequent specific feature (a child, here a token's own identity) the child's latent
fires with the parent's direction folded into its decoder row and the parent's latent stays
silent.  The toy studies see it in the decoder geometry; here it is measured the way Chanin et al.
and SAEBench do, through a linear probe for the parent.

Data and SAEs: those of :mod:`.real_compare` (MiniLM block 3 over the Python documentation's prose,
the same recipe, modes and seeds); each SAE is saved to ``OUT/saes/<mode>-seed<seed>`` (weights,
config and ``run.json``: spec and training record), so the measurement can be redone on them
(``--measure``) without training.

Parent features (:data:`CONCEPTS`): properties of a token that a regex on its WordPiece string
decides, e.g. "a word piece" (a ``##`` continuation), "a number", "a whole word ending in -ed".
Every row's token id is made again from the corpus and checked against the cache's digest
(:func:`matryoshka.realdata.cached_token_ids`).  Per concept, a logistic-regression probe (one
direction ``w`` and a bias) is fitted on the model's activations of ``PROBE_ROWS`` training tokens.
A probe can score well by memorising which token types carry the property, which would make a
"feature" of a list of tokens; so each concept is first probed on the token types of a random 80%
of types and scored (F1) on the tokens of the other 20%: only a concept whose probe generalises to
types it never saw (``GENERALISES`` F1 or more) is a feature of the model, and only those enter the
summary (the others are reported, marked).  MiniLM does not spell: a first letter, Chanin et al.'s
parent, is fitted on the types it saw but not on unseen ones ("s- word" in the tables), so the
parents here are word-piece, number and suffix properties.

Per SAE and concept:

* Main latents (k-sparse probing, as SAEBench): on the probe's training tokens, the latent whose
  firing best detects the concept (F1 of "fires => concept"), then, greedily, the latent that most
  raises the F1 of "any main latent fires", while it raises it by ``MIN_GAIN`` or more, up to
  ``MAX_MAIN`` latents.  Chosen on training tokens, scored on held-out ones.
* On the held-out tokens: the main latents' detection F1, precision and recall; and on the
  concept's tokens that the probe reads correctly from the model's activation (the positives):
  ``absorbed``, the share where no main latent fires and yet the probe still reads the concept from
  the SAE's reconstruction (other latents carry it: absorption, Chanin et al.'s false negatives
  with the information kept); ``lost``, the share where no main latent fires and the
  reconstruction does not read as the concept either.
* Where the parent sits: the first main latent's position as a share of n (Matryoshka modes should
  put a general feature early).  The absorbing latents (per absorbed token, the firing latent with
  the largest contribution ``a_j (W_dec[j] . w)`` to the reconstruction's probe reading): how many
  distinct ones, how token-specific they are (the share of their held-out firings on their most
  common token type), where they sit, and the cosine of their decoder row with the probe direction
  (the parent's direction folded into a child's row, as the toy studies see absorption; two random
  directions in d = 384 have |cosine| ~0.05), and the share of the token's probe reading ``x . u``
  (``u`` the unit probe direction) that the largest one carries, ``a_j (W_dec[j] . u) / (x . u)``
  (near 1: one latent took the feature over; well under 1: several share it).
* By child frequency: the absorbed share of the positives in bins of their token type's frequency
  (absorption is expected on the frequent children, those worth a latent of their own).
* SAEBench's two scores (:func:`saebench_absorption`, the rules of SAEBench's absorption eval:
  Chanin et al.'s full absorption and Till's absorption fraction), on the same positives, main
  latents and probe, as a second reading that counts partial absorption too.  With ``u`` the unit
  probe direction, a latent's reading is ``a_j (W_dec[j] . u)`` and the token's is ``x . u``.  The
  *absorption fraction* is the share of the token's reading that non-main latents aligned with the
  probe (cosine >= 0.1, at most 3, largest first) carry in place of the main ones, counted only
  when they carry at least 40% of it; *full absorption*: no main latent fires and the single
  largest reading, of a latent at cosine >= 0.025, is at least 40% of the token's.  The ``absorbed``
  share above needs no threshold but the probe's own; these need SAEBench's, and see absorption
  that leaves a main latent firing weakly.

Tables give mean ± 95% CI over seeds (Student t).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
from tqdm.auto import tqdm

from ..activation_store import ActivationStore
from ..durable_files import replace_file
from ..realdata import cache_activations, cached_token_ids, load_tokenizer
from ..sae import SparseAutoencoder
from ..sparse_acts import SparseActs
from .common import RUN_CACHE, format_table, run_many, write_outputs
from .plots import _save, mode_colors, plt
from .real_compare import DEFAULT_TOKENS, FULL, QUICK, QUICK_TOKENS, _activation, _cell, _kinds, ci95, train_study_sae

MODES = ("vanilla", "groups", "every")
DEFAULT_STEPS = 2000
QUICK_STEPS = 20
DEFAULT_SEEDS = 5
RUN_FILE = "run.json"
# Parent features: name -> (regex the whole WordPiece token must match, what it means).  Candidates, each
# kept only if its probe generalises to unseen token types (module doc).
CONCEPTS = {
    "word piece": (r"##[a-z]+", "a WordPiece continuation of a word (##ing, ##s, ...)"),
    "number": (r"(##)?[0-9]+", "a digit string"),
    "-ed word": (r"[a-z]{2,}ed", "a whole word ending in -ed"),
    "-s word": (r"[a-z]{3,}s", "a whole word of 4+ letters ending in -s"),
    "-ly word": (r"[a-z]{3,}ly", "a whole word ending in -ly"),
    "-ing word": (r"[a-z]{2,}ing", "a whole word ending in -ing"),
    "-tion word": (r"[a-z]+tion", "a whole word ending in -tion"),
    "s- word": (r"s[a-z]{2,}", "a whole word starting with s (Chanin et al.'s first-letter parents)"),
}
PROBE_ROWS = 131_072  # training tokens for the probes and the choice of main latents (whole blocks)
QUICK_PROBE_ROWS = 8192
UNSEEN_TYPES = 0.2  # share of token types held out of the generalisation probe
GENERALISES = 0.8  # the unseen-type F1 a concept's probe needs to count as a feature of the model
PROBE_L2 = 1e-4
MIN_GAIN = 0.03  # F1 a further main latent must add (SAEBench's k-sparse probing threshold)
MAX_MAIN = 5
FREQUENCY_BINS = 5  # child-frequency bins (quantiles of the positives' token-type frequency)
# SAEBench's absorption thresholds (its FeatureAbsorptionCalculator defaults), see saebench_absorption.
FRACTION_COSINE = 0.1  # least probe cosine of a latent counted in the absorption fraction
FULL_COSINE = 0.025  # least probe cosine of the single absorbing latent in full absorption
CARRIED_SHARE = 0.4  # least share of the token's probe reading the absorbing latent(s) must carry
MAX_ABSORBING = 3  # latents summed in the absorption fraction
METRICS = {"f1": "main F1", "precision": "main precision", "recall": "main recall", "absorbed": "absorbed",
           "lost": "lost", "main_count": "main latents", "main_position": "main position (of n)",
           "absorbers": "absorbers", "absorber_purity": "absorber token purity",
           "absorber_position": "absorber position (of n)", "absorber_cosine": "absorber cosine with probe",
           "absorber_share": "absorber share of x . u",
           "absorption_fraction": "absorption fraction (SAEBench)", "full_absorption": "full absorption (SAEBench)"}


def concept_labels(token_ids: np.ndarray, vocabulary: list[str]) -> dict[str, np.ndarray]:
    """Per concept, a bool per row: whether the row's token matches the concept's regex."""
    labels = {}
    for name, (pattern, _) in CONCEPTS.items():
        regex = re.compile(pattern)
        by_type = np.array([regex.fullmatch(token) is not None for token in vocabulary])
        labels[name] = by_type[token_ids]
    return labels


def f1_score(predicted: np.ndarray, truth: np.ndarray) -> float:
    """F1 of bool predictions against bool truth (0 when both are empty)."""
    tp = float((predicted & truth).sum())
    total = float(predicted.sum() + truth.sum())
    return 2 * tp / total if total else 0.0


def fit_probe(x: torch.Tensor, y: np.ndarray, steps: int = 200) -> tuple[np.ndarray, float]:
    """Logistic regression of bool ``y`` on rows ``x`` (full-batch L-BFGS, L2 ``PROBE_L2``, float64):
    ``(w, b)``, the concept read as ``x @ w + b > 0``."""
    x = x.double()
    target = torch.as_tensor(y, dtype=torch.float64)
    rate = float(target.mean().clamp(1e-6, 1 - 1e-6))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([np.log(rate / (1 - rate))], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, target) + PROBE_L2 * w.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach().numpy(), float(b.detach())


def concept_probes(x: torch.Tensor, token_ids: np.ndarray, labels: dict[str, np.ndarray], seed: int = 0) -> dict:
    """Per concept: the probe fitted on all rows ``x`` and the F1 on unseen token types of one fitted
    on the other types (``UNSEEN_TYPES`` of the types held out at random, seeded)."""
    types = np.unique(token_ids)
    unseen_types = np.random.default_rng(seed).choice(types, int(round(UNSEEN_TYPES * types.size)), replace=False)
    unseen = np.isin(token_ids, unseen_types)
    probes = {}
    for name, y in labels.items():
        if not y.any() or y.all():
            probes[name] = {"w": None, "b": None, "share": float(y.mean()), "unseen_f1": float("nan"),
                            "seen_f1": float("nan"), "generalises": False}
            continue
        w_split, b_split = fit_probe(x[torch.as_tensor(~unseen)], y[~unseen])
        unseen_f1 = f1_score((x[torch.as_tensor(unseen)].double().numpy() @ w_split + b_split) > 0, y[unseen])
        w, b = fit_probe(x, y)
        seen_f1 = f1_score((x.double().numpy() @ w + b) > 0, y)
        probes[name] = {"w": w.tolist(), "b": b, "share": float(y.mean()), "unseen_f1": unseen_f1, "seen_f1": seen_f1,
                        "generalises": bool(unseen_f1 >= GENERALISES)}
    return probes


def sparse_codes(sae: SparseAutoencoder, x: torch.Tensor, batch: int = 4096) -> tuple[scipy.sparse.csr_matrix, torch.Tensor]:
    """The SAE's activations on rows ``x`` as a sparse ``(rows, n)`` matrix, and its reconstructions."""
    rows, cols, values, recons = [], [], [], []
    with torch.no_grad():
        for start, part in zip(range(0, x.shape[0], batch), x.split(batch)):
            out = sae(part)
            acts = out.acts if isinstance(out.acts, SparseActs) else None
            if acts is None:
                raise ValueError(f"the absorption probe reads sparse (TopK/BatchTopK) SAEs, not {sae.config.activation!r}")
            token, slot = acts.active().nonzero(as_tuple=True)
            rows.append((token + start).numpy())
            cols.append(acts.indices[token, slot].numpy())
            values.append(acts.values[token, slot].double().numpy())
            recons.append(out.recon)
    codes = scipy.sparse.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                                    shape=(x.shape[0], sae.config.n))
    return codes, torch.cat(recons)


def main_latents(fired: scipy.sparse.csr_matrix, y: np.ndarray) -> list[int]:
    """k-sparse probing (module doc): latents whose firing together best detects bool ``y``."""
    fired = fired.tocsc()
    positives, total = float(y.sum()), y.size
    chosen: list[int] = []
    detected = np.zeros(total, dtype=bool)
    best_f1 = 0.0
    while len(chosen) < MAX_MAIN:
        # Each latent's F1 if added: the rows it newly detects, split into true and false.
        fresh = fired.multiply((~detected)[:, None]).tocsc()
        new_true = np.asarray(fresh.multiply(y[:, None]).sum(0)).ravel()
        new_all = np.asarray(fresh.sum(0)).ravel()
        tp = float((detected & y).sum()) + new_true
        f1 = 2 * tp / (detected.sum() + new_all + positives)
        f1[chosen] = -1.0
        latent = int(f1.argmax())
        if chosen and f1[latent] < best_f1 + MIN_GAIN:
            break
        chosen.append(latent)
        best_f1 = float(f1[latent])
        detected |= fired[:, latent].toarray().ravel() > 0
    return chosen


def _child_bins(token_ids: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Per positive row, its frequency bin (0 = rarest types) by its token type's count among positives."""
    types, inverse, counts = np.unique(token_ids[positives], return_inverse=True, return_counts=True)
    frequency = counts[inverse]
    edges = np.quantile(frequency, np.linspace(0, 1, FREQUENCY_BINS + 1)[1:-1])
    return np.searchsorted(edges, frequency, side="right")


def _most_absorbed(token_ids: np.ndarray, positives: np.ndarray, absorbed: np.ndarray, top: int = 5) -> list[list[int]]:
    """The ``top`` token types with the most absorbed tokens: ``[token id, absorbed, positives]`` each."""
    absorbed_count = np.bincount(token_ids[absorbed], minlength=token_ids.max() + 1)
    positive_count = np.bincount(token_ids[positives], minlength=token_ids.max() + 1)
    order = np.argsort(-absorbed_count, kind="stable")[:top]
    return [[int(t), int(absorbed_count[t]), int(positive_count[t])] for t in order if absorbed_count[t] > 0]


def saebench_absorption(reading: scipy.sparse.csr_matrix, main: list[int], fires_main: np.ndarray,
                        token_reading: np.ndarray, cosine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token, SAEBench's absorption fraction (float) and full absorption (bool), module doc.

    ``reading``: ``(tokens, n)``, each firing latent's ``a_j (W_dec[j] . u)`` for the unit probe
    direction ``u``; ``main``: the main latents; ``fires_main``: per token, whether one of them
    fires; ``token_reading``: ``x . u`` of the model's activation; ``cosine``: per latent, its decoder
    row's cosine with ``u``.  A token whose own reading is not positive has neither (SAEBench's full
    rule; its fraction rule would divide by it).
    """
    tokens = reading.shape[0]
    if tokens == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    main_reading = np.asarray(reading[:, main].sum(1)).ravel() if main else np.zeros(tokens)
    # The absorbing candidates: firing non-main latents aligned with the probe (activations are not
    # negative, so they read it positively); per token the MAX_ABSORBING largest, summed (rank within
    # the token by a sort on token, then -reading).
    firing = reading.tocoo()
    keep = (cosine[firing.col] >= FRACTION_COSINE) & ~np.isin(firing.col, main)
    token, value = firing.row[keep], firing.data[keep]
    order = np.lexsort((-value, token))
    token, value = token[order], value[order]
    top = np.arange(token.size) - np.searchsorted(token, token) < MAX_ABSORBING
    carried = np.bincount(token[top], weights=value[top], minlength=tokens)
    positive = token_reading > 0
    own = np.where(positive, token_reading, 1.0)  # (a stand-in where the token's reading is not positive)
    absorbed_reading = np.minimum(carried, own - main_reading)
    with np.errstate(divide="ignore", invalid="ignore"):
        partial = np.clip(absorbed_reading / (absorbed_reading + main_reading), 0.0, 1.0)
    fraction = np.where(main_reading <= 0, 1.0, partial)
    fraction = np.where(positive & (main_reading < own) & (carried >= CARRIED_SHARE * own), fraction, 0.0)
    largest = np.asarray(reading.argmax(1)).ravel()  # (an implicit zero's column when none reads positively)
    largest_reading = reading.max(1).toarray().ravel()
    full = (~fires_main & positive & (cosine[largest] >= FULL_COSINE) & (largest_reading >= CARRIED_SHARE * own))
    return fraction, full


def absorption_metrics(sae: SparseAutoencoder, probes: dict, select: tuple, held_out: tuple) -> dict:
    """The per-concept measurements of the module doc for one SAE.  ``select``: ``(x, labels)`` of the
    probe's training tokens (main latents are chosen there); ``held_out``: ``(x, labels, token_ids)``."""
    sae.eval()
    n = sae.config.n
    x_select, labels_select = select
    x, labels, token_ids = held_out
    fired_select = (sparse_codes(sae, x_select)[0] > 0).astype(np.float32).tocsc()  # (main_latents reads columns)
    codes, recon = sparse_codes(sae, x)
    fired = codes > 0
    firings = np.asarray(fired.sum(0)).ravel()
    # A latent's token purity: the share of its held-out firings on its most common token type.
    firing = fired.tocoo()
    by_type = scipy.sparse.csr_matrix((np.ones(fired.nnz), (firing.col, token_ids[firing.row])),
                                      shape=(n, int(token_ids.max()) + 1))
    purity = np.asarray(by_type.max(1).todense()).ravel() / np.maximum(firings, 1)
    W = sae.W_dec.detach().double().numpy()
    x_np, recon_np = x.double().numpy(), recon.double().numpy()
    b_dec = sae.b_dec.detach().double().numpy()
    out = {}
    for name, probe in probes.items():
        if probe["w"] is None:
            continue
        w, b = np.asarray(probe["w"]), probe["b"]
        u = w / np.linalg.norm(w)
        main = main_latents(fired_select, labels_select[name])
        y = labels[name]
        detected = np.asarray(fired[:, main].sum(1)).ravel() > 0
        positives = y & ((x_np @ w + b) > 0)
        kept = (recon_np @ w + b) > 0
        # Each firing latent's contribution a_j (W_dec[j] . u) to the reconstruction's probe reading.
        contribution = codes.multiply((W @ u)[None, :]).tocsr()
        absorbed = positives & ~detected & kept
        absorbed_contribution = contribution[absorbed]
        absorber = np.asarray(absorbed_contribution.argmax(1)).ravel()
        cosine = W @ u / np.linalg.norm(W, axis=1)
        token_reading = x_np @ u
        fraction, full = saebench_absorption(contribution[positives], main, detected[positives],
                                             token_reading[positives], cosine)
        bins = _child_bins(token_ids, positives)
        share = lambda mask: float(mask.sum() / max(1, positives.sum()))  # noqa: E731  (of the positives)
        out[name] = {
            "positives": int(positives.sum()), "main": main, "main_count": len(main),
            "f1": f1_score(detected, y), "precision": float((detected & y).sum() / max(1, detected.sum())),
            "recall": float(detected[positives].mean()) if positives.any() else float("nan"),
            "absorbed": share(absorbed), "lost": share(positives & ~detected & ~kept),
            "main_position": main[0] / max(1, n - 1),
            "absorbers": int(np.unique(absorber).size),
            "absorber_purity": float(np.median(purity[absorber])) if absorber.size else float("nan"),
            "absorber_position": float(np.median(absorber) / max(1, n - 1)) if absorber.size else float("nan"),
            "absorber_cosine": float(np.median(cosine[absorber])) if absorber.size else float("nan"),
            "absorber_share": float(np.median(absorbed_contribution.max(1).toarray().ravel() / token_reading[absorbed]))
            if absorber.size else float("nan"),
            "absorbed_by_frequency": [float((absorbed[positives][bins == i]).mean()) if (bins == i).any() else float("nan")
                                      for i in range(FREQUENCY_BINS)],
            "absorption_fraction": float(fraction.mean()) if positives.any() else float("nan"),
            "full_absorption": float(full.mean()) if positives.any() else float("nan"),
            "bias_reads_concept": bool(b_dec @ w + b > 0),
            "most_absorbed_types": _most_absorbed(token_ids, positives, absorbed),
        }
    sae.train()
    return out


def train_one(spec: dict) -> dict:
    """Train one SAE by the real-data recipe (:func:`.real_compare.train_study_sae`) and save it, with
    its spec and training record in ``run.json``, to ``spec["saes"]/<mode>-seed<seed>`` (a worker)."""
    sae, _, result, seconds = train_study_sae(spec)
    folder = Path(spec["saes"]) / f"{spec['mode']}-seed{spec['seed']}"
    sae.save(folder)
    run = {"spec": spec, "seconds": seconds, "seconds_per_step": seconds / spec["steps"], "history": result.history,
           "last_fired": (spec["steps"] - result.since_fired).tolist()}
    replace_file(folder / RUN_FILE, json.dumps(run).encode())
    return {"folder": str(folder), "seconds": seconds, "seconds_per_step": run["seconds_per_step"]}


def _probe_sample(store: ActivationStore, rows: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``rows`` scaled training rows in whole blocks drawn without replacement (seeded), with their row indices."""
    blocks = np.random.default_rng(seed).choice(len(store.train_blocks), min(len(store.train_blocks),
                                                -(-rows // store.block_rows)), replace=False)
    return store.training_block_rows(sorted(blocks.tolist()))


def real_absorption(out: Path, acts: Path = Path("runs/real/acts"), steps: int = DEFAULT_STEPS,
                    seeds: int = DEFAULT_SEEDS, jobs: int = 2, modes: tuple[str, ...] = MODES,
                    tokens: int = DEFAULT_TOKENS, quick: bool = False, docs: Path | None = None,
                    measure_only: bool = False) -> dict:
    """Train the SAEs (unless ``measure_only``: those already in ``OUT/saes``), then measure and
    :func:`report` them."""
    start = time.perf_counter()
    for mode in modes:
        _activation(mode)
    sizes = QUICK if quick else FULL
    if not measure_only:
        if not (acts.exists() and any(acts.glob("*.npy"))):
            print(f"no activations at {acts}: caching {QUICK_TOKENS if quick else tokens} tokens first")
            cache_activations(acts, tokens=QUICK_TOKENS if quick else tokens)
        store = ActivationStore(acts, held_out_rows=sizes["held_out"])
        specs = [{"acts": str(acts), "rows": store.rows, "scale": store.scale, "mode": mode, "seed": seed,
                  "steps": steps, "every_weights": "exact", "saes": str(out / "saes"), **sizes}
                 for mode in modes for seed in range(seeds)]
        print(f"{_kinds(modes)} n={sizes['n']} k={sizes['k']}, {steps} steps, modes {', '.join(modes)}, seeds "
              f"0..{seeds - 1}, {jobs} process(es); SAEs saved to {out / 'saes'}")
        run_many(specs, jobs, desc="real-absorption", worker=train_one, cache=out / RUN_CACHE)
    return measure(out, acts, modes, quick, docs, start)


def cached_tokens(acts: Path) -> tuple[np.ndarray, list[str]]:
    """The token id of every cached row (:func:`matryoshka.realdata.cached_token_ids`) and the
    tokenizer's vocabulary (its token strings by id)."""
    tokenizer = load_tokenizer()
    return cached_token_ids(acts, tokenizer), tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def _saved_runs(out: Path, modes: tuple[str, ...]) -> list[tuple[Path, dict]]:
    runs = []
    for mode in modes:
        folders = sorted((out / "saes").glob(f"{mode}-seed*"), key=lambda f: int(f.name.rsplit("seed", 1)[1]))
        runs += [(f, json.loads((f / RUN_FILE).read_text())) for f in folders if (f / RUN_FILE).exists()]
    if not runs:
        raise FileNotFoundError(f"no trained SAEs of modes {', '.join(modes)} in {out / 'saes'}: run without --measure first")
    return runs


def measure(out: Path, acts: Path, modes: tuple[str, ...], quick: bool, docs: Path | None, start: float) -> dict:
    """Measure every saved SAE of ``modes`` in ``OUT/saes`` (module doc) and :func:`report` them."""
    runs = _saved_runs(out, modes)
    spec = runs[0][1]["spec"]
    store = ActivationStore(acts, held_out_rows=spec["held_out"], scale=spec["scale"])
    token_ids, vocabulary = cached_tokens(acts)
    labels = concept_labels(token_ids, vocabulary)
    x_probe, probe_rows = _probe_sample(store, QUICK_PROBE_ROWS if quick else PROBE_ROWS)
    probe_labels = {name: y[probe_rows] for name, y in labels.items()}
    print(f"probes: {len(CONCEPTS)} candidate concepts on {x_probe.shape[0]} training tokens")
    probes = concept_probes(x_probe, token_ids[probe_rows], probe_labels)
    held_rows = store.held_out_row_indices()
    held_out = (store.held_out(), {name: y[held_rows] for name, y in labels.items()}, token_ids[held_rows])
    results = []
    for folder, run in tqdm(runs, desc="measuring", unit="SAE", leave=False):
        sae = SparseAutoencoder.load(folder)
        results.append({"mode": run["spec"]["mode"], "seed": run["spec"]["seed"], "folder": str(folder),
                        "seconds_per_step": run["seconds_per_step"],
                        "concepts": absorption_metrics(sae, probes, (x_probe, probe_labels), held_out)})
        for concept in results[-1]["concepts"].values():  # token ids to their strings, for the tables
            concept["most_absorbed_types"] = [[vocabulary[t], a, p] for t, a, p in concept["most_absorbed_types"]]
    payload = {"study": "real-absorption", "data": store.describe(), "sizes": {k: spec[k] for k in ("n", "k", "batch", "held_out")},
               "steps": spec["steps"], "seeds": max(r["seed"] for r in results) + 1, "modes": list(modes),
               "concepts": {name: {"regex": pattern, "meaning": meaning, **{k: v for k, v in probes[name].items() if k not in ("w", "b")}}
                            for name, (pattern, meaning) in CONCEPTS.items()},
               "runtime_s": time.perf_counter() - start, "runs": results}
    return report(out, payload, docs)


def _mean(values) -> float:
    """Mean of the finite values (``None`` is JSON's NaN); NaN when there is none."""
    x = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    return float(x[np.isfinite(x)].mean()) if np.isfinite(x).any() else float("nan")


def _summary(payload: dict) -> dict:
    """Per mode: per concept and averaged over the concepts that generalise, mean ± 95% CI over seeds."""
    features = [name for name, c in payload["concepts"].items() if c["generalises"]]
    summary = {}
    for mode in payload["modes"]:
        runs = [r for r in payload["runs"] if r["mode"] == mode]
        per_concept = {name: {k: ci95([_mean([r["concepts"][name][k]]) for r in runs if name in r["concepts"]])
                              for k in METRICS} for name in payload["concepts"]}
        averaged = {k: ci95([_mean([r["concepts"][name][k] for name in features]) for r in runs]) for k in METRICS}
        by_frequency = [ci95([_mean([r["concepts"][name]["absorbed_by_frequency"][i] for name in features])
                              for r in runs]) for i in range(FREQUENCY_BINS)]
        summary[mode] = {"concepts": per_concept, "features": averaged, "absorbed_by_frequency": by_frequency}
    return summary


def _tables(payload: dict, summary: dict) -> str:
    modes, concepts = payload["modes"], payload["concepts"]
    probe_rows = [[name, f"{c['share']:.3f}", f"{_mean([c['seen_f1']]):.3f}", f"{_mean([c['unseen_f1']]):.3f}",
                   "yes" if c["generalises"] else "no"] for name, c in concepts.items()]
    probe_table = format_table(probe_rows, ["concept", "share of tokens", "probe F1", "F1 unseen types",
                                            f"feature (>= {GENERALISES})"])
    features = [name for name, c in concepts.items() if c["generalises"]]
    averaged = format_table([[label] + [_cell(summary[m]["features"][k]) for m in modes] for k, label in METRICS.items()],
                            [f"mean over the {len(features)} features"] + modes)
    main = {"recall", "absorbed", "lost", "absorber_cosine", "absorption_fraction"}
    per_concept = format_table([[f"{name}: {METRICS[k]}"] + [_cell(summary[m]["concepts"][name][k]) for m in modes]
                                for name in features for k in METRICS if k in main], ["feature"] + modes)
    first = {m: next(r for r in payload["runs"] if r["mode"] == m) for m in modes}
    examples = "\n".join(f"{name}, {m} seed {first[m]['seed']}: " + (", ".join(
        f"{token} {absorbed}/{positives}" for token, absorbed, positives in first[m]["concepts"][name]["most_absorbed_types"])
        or "none") for name in features for m in modes)
    return (f"probes ({len(concepts)} candidate concepts)\n{probe_table}\n\n{averaged}\n\n"
            f"{per_concept}\n\nmost absorbed token types (absorbed / positives of the type)\n{examples}")


def _figures(payload: dict, summary: dict, folder: Path, title: str) -> list[Path]:
    modes = payload["modes"]
    features = [name for name, c in payload["concepts"].items() if c["generalises"]]
    colors = mode_colors(modes)
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    width = 0.8 / len(modes)
    for panel, key in zip(axes[:3], ("recall", "absorbed", "absorption_fraction")):
        for i, mode in enumerate(modes):
            stats = [summary[mode]["concepts"][name][key] for name in features]
            panel.bar(np.arange(len(features)) + (i - (len(modes) - 1) / 2) * width, [s["mean"] for s in stats], width,
                      yerr=[np.nan_to_num(s["ci95"]) for s in stats], color=colors[mode], label=mode, capsize=2)
        panel.set_xticks(range(len(features)), features, rotation=20)
        panel.set(ylabel=f"{METRICS[key]} (share of the feature's tokens)", ylim=(0, 1))
    axes[0].set_title("main latents fire\non the feature's tokens")
    axes[1].set_title("no main latent fires,\nthe reconstruction still has it")
    axes[2].set_title("SAEBench absorption fraction:\nthe probe reading other latents carry")
    axes[2].set_ylabel("absorption fraction (mean over the feature's tokens)")
    for mode in modes:
        stats = summary[mode]["absorbed_by_frequency"]
        axes[3].errorbar(range(1, FREQUENCY_BINS + 1), [s["mean"] for s in stats],
                         yerr=[np.nan_to_num(s["ci95"]) for s in stats], color=colors[mode], marker="o", capsize=2,
                         label=mode)
    axes[3].set(xlabel=f"child token type's frequency ({FREQUENCY_BINS} quantile bins, 1 rarest)",
                ylabel="absorbed (mean over features)", title="absorption by child frequency", ylim=(0, 1))
    handles, names = axes[0].get_legend_handles_labels()  # below the panels: the bars fill them
    fig.legend(handles, names, loc="upper center", ncol=len(modes), bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"{title}: absorption of general features on held-out tokens (mean ± 95% CI over seeds)", y=1.1)
    path = folder / "real_absorption.png"
    _save(fig, path)
    return [path]


def report(out: Path, payload: dict, docs: Path | None = None) -> dict:
    """Summarise a results payload, print the tables and write ``results.json``, ``results.md`` and the
    figure into ``out`` (the figure and ``real_absorption.md`` into ``docs`` when given)."""
    summary = _summary(payload)
    tables = _tables(payload, summary)
    print()
    print(tables)
    sizes, data = payload["sizes"], payload["data"]
    title = f"{_kinds(payload['modes'])} n={sizes['n']} k={sizes['k']}, {payload['steps']} steps, {payload['seeds']} seed(s)"
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(payload, summary, out, title)
    header = (f"# real-absorption: {title}\n\nData: {data['rows']} tokens from {data['path']}; {data['held_out_rows']} "
              f"held-out tokens. Main latents chosen on {PROBE_ROWS} training tokens (k-sparse probing, gain >= "
              f"{MIN_GAIN}, at most {MAX_MAIN}). Mean ± 95% CI over seeds. Measured in {payload['runtime_s']:.0f} s.\n\n")
    markdown = header + "```\n" + tables + "\n```\n"
    write_outputs(out, "results.json", {**payload, "summary": summary}, "results.md", [markdown], figures, docs,
                  "real_absorption.md")
    return {"summary": summary, "runs": payload["runs"]}


def replot(out: Path, docs: Path | None = None) -> dict:
    """Redo the summary, tables and figure from ``OUT/results.json`` without measuring."""
    return report(out, json.loads((out / "results.json").read_text()), docs)
