"""The real-data absorption study (matryoshka.experiments.real_absorption): concept labels, probes and
their generalisation gate, k-sparse probing, and the absorbed / lost split on an SAE built to absorb."""

import hashlib
import json

import numpy as np
import pytest
import torch

from matryoshka.__main__ import main
from matryoshka.activation_store import ActivationStore
from matryoshka.experiments import real_absorption as study
from matryoshka.sae import SAEConfig, SparseAutoencoder

from .fake_model import FakeEncoder, FakeTokenizer


def test_concepts_match_whole_wordpiece_tokens():
    vocabulary = ["##ing", "##s", "running", "12", "##34", "cats", "is", "walked", "red", "##ed", "quickly", "station", "a1",
                  "sum", "so"]
    labels = study.concept_labels(np.arange(len(vocabulary)), vocabulary)
    chosen = {name: [vocabulary[i] for i in np.nonzero(y)[0]] for name, y in labels.items()}
    assert chosen == {"word piece": ["##ing", "##s", "##ed"], "number": ["12", "##34"], "-ed word": ["walked"],
                      "-s word": ["cats"], "-ly word": ["quickly"], "-ing word": ["running"], "-tion word": ["station"],
                      "s- word": ["station", "sum"]}


def test_f1_score():
    truth = np.array([1, 1, 0, 0, 1], dtype=bool)
    assert study.f1_score(np.array([1, 0, 1, 0, 1], dtype=bool), truth) == pytest.approx(2 * 2 / (3 + 3))
    assert study.f1_score(np.zeros(5, bool), np.zeros(5, bool)) == 0.0


def _typed_rows(types: int, rows: int, d: int, seed: int, shared: np.ndarray | None, labelled: np.ndarray):
    """Rows of token types with their own random embedding; labelled types also get ``shared`` (if any)."""
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((types, d))
    token_ids = rng.integers(0, types, rows)
    x = embedding[token_ids] + 0.1 * rng.standard_normal((rows, d))
    if shared is not None:
        x += 6.0 * labelled[token_ids, None] * shared[None, :]
    return torch.tensor(x, dtype=torch.float32), token_ids


def test_the_gate_keeps_a_shared_direction_and_drops_a_memorised_list_of_tokens():
    """A property the model writes in one direction for every type generalises to unseen types; a
    property that is only a list of types (each type's own random embedding) is fitted but does not."""
    types, d = 60, 64  # fewer types than dimensions: any labelling of them can be fitted
    labelled = np.random.default_rng(5).random(types) < 0.3
    shared = np.random.default_rng(6).standard_normal(d)
    for direction, generalises in ((shared / np.linalg.norm(shared), True), (None, False)):
        x, token_ids = _typed_rows(types, 6000, d, 7, direction, labelled)
        probes = study.concept_probes(x, token_ids, {"concept": labelled[token_ids]})
        assert probes["concept"]["seen_f1"] > 0.9
        assert probes["concept"]["generalises"] is generalises, probes["concept"]["unseen_f1"]


def test_k_sparse_probing_takes_latents_while_they_add_enough_f1():
    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.3
    fired = np.zeros((2000, 6), dtype=np.float32)
    fired[:, 3] = y & (rng.random(2000) < 0.7)  # detects 70% of the concept, no false alarm
    fired[:, 1] = y & ~fired[:, 3].astype(bool)  # the rest of it
    fired[:, 0] = rng.random(2000) < 0.5  # noise
    fired[:, 5] = y & (rng.random(2000) < 0.01)  # adds almost nothing
    fired[:, 4] = fired[:, 3]  # a duplicate: adds nothing once latent 3 is in
    import scipy.sparse

    assert study.main_latents(scipy.sparse.csr_matrix(fired), y) == [3, 1]
    fired[:, 1] = 0
    assert study.main_latents(scipy.sparse.csr_matrix(fired), y) == [3]


def _absorbing_sae(d: int = 10) -> SparseAutoencoder:
    """TopK k = 1, unit decoder rows, encoder = decoder transposed.  Latent 0 is the parent p = e0;
    latents 1..6 are children absorbed into p + c_i (c_i = e_i); latent 7 is c_7 alone (it drops the
    parent); latents 8 and 9 are e8 (the negatives) and e9 (a token whose parent the probe misses)."""
    sae = SparseAutoencoder(SAEConfig(d=d, n=10, activation="topk", k=1))
    W = torch.zeros(10, d)
    W[0, 0] = 1.0
    for i in range(1, 7):
        W[i, 0] = W[i, i] = 2 ** -0.5
    for i in (7, 8, 9):
        W[i, i] = 1.0
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_absorbed_and_lost_on_an_sae_built_to_absorb():
    d = 10
    eye = torch.eye(d)
    token_ids = np.array([0] * 1000 + [i for i in range(1, 7) for _ in range(5)] + [7] * 5 + [8] * 500 + [9] * 5)
    rows = {0: eye[0], 7: eye[0] + 2 * eye[7], 8: eye[8], 9: 0.3 * eye[0] + eye[9]}  # 1..6: p + c_i
    x = torch.stack([rows.get(t, eye[0] + eye[t]) for t in token_ids])
    labels = {"parent": (token_ids <= 7) | (token_ids == 9)}  # the probe misreads type 9: not a positive
    probes = {"parent": {"w": (3 * eye[0]).double().numpy().tolist(), "b": -1.5}}  # (not a unit direction)
    sae = _absorbing_sae(d)
    out = study.absorption_metrics(sae, probes, (x, labels), (x, labels, token_ids))["parent"]
    positives = 1000 + 30 + 5
    assert out["main"] == [0] and out["positives"] == positives
    assert out["recall"] == pytest.approx(1000 / positives)
    assert out["absorbed"] == pytest.approx(30 / positives)  # the children fold p in
    assert out["lost"] == pytest.approx(5 / positives)  # latent 7 drops it
    assert out["precision"] == 1.0 and out["f1"] == pytest.approx(2 * 1000 / (1000 + positives + 5))
    assert out["absorbers"] == 6 and out["absorber_purity"] == 1.0
    assert out["absorber_cosine"] == pytest.approx(2 ** -0.5)
    assert out["absorber_share"] == pytest.approx(1.0)  # a_i (W_i . u) = sqrt(2) / sqrt(2) of x . u = 1
    assert out["main_position"] == 0.0
    assert out["bias_reads_concept"] is False
    # SAEBench's scores: each child's latent carries all of the token's probe reading, at cosine 0.71.
    assert out["absorption_fraction"] == pytest.approx(30 / positives)
    assert out["full_absorption"] == pytest.approx(30 / positives)
    assert out["most_absorbed_types"] == [[t, 5, 5] for t in range(1, 6)]  # (ties: lower ids first)
    # Every absorbed child is of the rarest types (5 tokens against the parent-only type's 1000).
    assert out["absorbed_by_frequency"][0] > 0 and out["absorbed_by_frequency"][-1] == 0


def test_saebench_scores_count_partial_absorption_by_its_thresholds():
    """Latents 0 and 7 are the main ones (7 against the probe); 1..4 read the probe at cosine 0.5, 5 at
    0.05 (enough for full absorption's single latent, not for the fraction's), 6 against it, 8 at 0.01
    (too little for either)."""
    cosine = np.array([0.9, 0.5, 0.5, 0.5, 0.5, 0.05, -0.3, -0.4, 0.01])
    tokens = {  # latent readings a_j (W_dec[j] . u), the token's own reading x . u, fraction, full
        "main carries it": ({0: 1.0}, 1.0, 0.0, False),
        "partial, top 3 of 4 absorbers": ({0: 0.2, 1: 0.3, 2: 0.2, 3: 0.1, 4: 0.05}, 1.0, 0.6 / 0.8, False),
        "partial, absorbers under 40%": ({0: 0.7, 1: 0.3}, 1.0, 0.0, False),
        "full": ({1: 0.8, 2: 0.1}, 1.0, 1.0, True),
        "absorber at cosine 0.05": ({5: 0.9}, 1.0, 0.0, True),
        "absorber at cosine 0.01": ({8: 0.9}, 1.0, 0.0, False),
        "a latent against the probe does not count": ({0: 0.5, 1: 0.6, 6: -0.3}, 1.0, 0.5, False),
        "the main latents read against the probe": ({7: -0.6, 1: 0.5}, 1.0, 1.0, False),
        "absorbers carry more than is missing": ({0: 0.2, 1: 0.9}, 1.0, 0.8 / (0.8 + 0.2), False),
        "the token does not read as the concept": ({1: 0.8}, -0.1, 0.0, False),
    }
    reading = np.zeros((len(tokens), cosine.size))
    for row, (latents, _, _, _) in enumerate(tokens.values()):
        for latent, value in latents.items():
            reading[row, latent] = value
    fires_main = (reading[:, 0] != 0) | (reading[:, 7] != 0)
    own = np.array([t[1] for t in tokens.values()])
    import scipy.sparse

    fraction, full = study.saebench_absorption(scipy.sparse.csr_matrix(reading), [0, 7], fires_main, own, cosine)
    for (name, (_, _, want_fraction, want_full)), got_fraction, got_full in zip(tokens.items(), fraction, full):
        assert got_fraction == pytest.approx(want_fraction), name
        assert bool(got_full) is want_full, name
    empty = study.saebench_absorption(scipy.sparse.csr_matrix((0, cosine.size)), [0], np.zeros(0, bool), np.zeros(0), cosine)
    assert empty[0].size == 0 and empty[1].size == 0


def _fake_tokens(rows: int, seed: int = 0):
    """Token ids and a vocabulary of 90 types, a third of them word pieces; no other concept matches."""
    letters = lambda i: "".join(chr(97 + (i // 26 ** j) % 26) for j in range(3))  # noqa: E731
    vocabulary = [f"##{letters(i)}" if i % 3 == 0 else f"w{letters(i)}q" for i in range(90)]
    return np.random.default_rng(seed).integers(0, len(vocabulary), rows), vocabulary


def test_real_absorption_trains_saves_measures_again_and_replots(tmp_path, capsys, monkeypatch):
    rows, d = 4096, 12
    token_ids, vocabulary = _fake_tokens(rows)
    rng = np.random.default_rng(1)
    piece = np.array([v.startswith("##") for v in vocabulary])
    direction = rng.standard_normal(d)
    x = rng.standard_normal((rows, d)) + 4.0 * piece[token_ids, None] * direction / np.linalg.norm(direction)
    acts = tmp_path / "acts"
    acts.mkdir()
    np.save(acts / "shard_000.npy", x.astype(np.float32))
    monkeypatch.setattr(study, "cached_tokens", lambda folder: (token_ids, vocabulary))
    out = tmp_path / "out"
    first = study.real_absorption(out, acts=acts, steps=6, seeds=1, jobs=1, modes=("vanilla", "every"), quick=True)
    printed = capsys.readouterr().out
    assert "word piece" in printed and "absorbed" in printed
    assert sorted(p.name for p in (out / "saes").iterdir()) == ["every-seed0", "vanilla-seed0"]
    run = json.loads((out / "saes" / "every-seed0" / study.RUN_FILE).read_text())
    assert run["spec"]["mode"] == "every" and run["history"][-1]["step"] == 6
    results = json.loads((out / "results.json").read_text())
    assert results["concepts"]["word piece"]["generalises"] is True
    assert results["concepts"]["-ly word"]["share"] == 0.0 and results["concepts"]["-ly word"]["generalises"] is False
    assert [r["mode"] for r in results["runs"]] == ["vanilla", "every"]
    assert 0 <= first["summary"]["every"]["features"]["recall"]["mean"] <= 1
    assert (out / "real_absorption.png").exists()
    # Measured again from the saved SAEs, no training: the same numbers.
    saved = (out / "saes" / "every-seed0" / "sae.safetensors").stat().st_mtime_ns
    main(["real-absorption", "--out", str(out), "--acts", str(acts), "--modes", "vanilla", "every", "--quick",
          "--measure"])
    assert (out / "saes" / "every-seed0" / "sae.safetensors").stat().st_mtime_ns == saved
    again = json.loads((out / "results.json").read_text())
    assert json.dumps(again["summary"]) == json.dumps(results["summary"])
    assert json.dumps(study.replot(out)["summary"]) == json.dumps(first["summary"])  # (NaN CIs: one seed)


def test_measure_without_saved_saes_says_so(tmp_path, capsys):
    acts = tmp_path / "acts"
    acts.mkdir()
    np.save(acts / "shard_000.npy", np.ones((1024, 4), np.float32))
    with pytest.raises(SystemExit):
        main(["real-absorption", "--out", str(tmp_path / "out"), "--acts", str(acts), "--measure", "--quick"])
    assert "no trained SAEs of modes vanilla, groups, every" in capsys.readouterr().err


def test_training_block_rows_and_held_out_rows_carry_their_row_indices(tmp_path):
    for i, count in enumerate((300, 600)):
        rows = np.arange(count * 3, dtype=np.float32).reshape(count, 3) + (0 if i == 0 else 900)
        np.save(tmp_path / f"a{i}.npy", rows)
    store = ActivationStore(tmp_path, block_rows=100, held_out_rows=150, scale=1.0)
    x, index = store.training_block_rows([0, 3])
    everything = np.concatenate([np.load(tmp_path / "a0.npy"), np.load(tmp_path / "a1.npy")])
    assert np.array_equal(x.numpy(), everything[index]) and index[0] == 0 and index[100] == 300
    held = store.held_out_row_indices()
    assert np.array_equal(store.held_out().numpy(), everything[held]) and held[-1] == 899
    with pytest.raises(ValueError, match="block_ids must be in 0..6"):
        store.training_block_rows([7])


def test_token_ids_are_made_again_and_checked_against_the_cache(tmp_path, monkeypatch):
    from matryoshka import realdata

    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i} says that a quick brown fox jumps over the lazy dogs." for i in range(9)))
    monkeypatch.setattr(realdata, "load_model", lambda layer: (FakeTokenizer(), FakeEncoder()))
    monkeypatch.setattr(realdata, "load_tokenizer", lambda: FakeTokenizer())
    meta = realdata.cache_activations(tmp_path / "acts", layer=1, tokens=60, seq_len=12, corpus=corpus, batch=2,
                                      progress=False)
    ids = realdata.cached_token_ids(tmp_path / "acts")
    rows = np.load(tmp_path / "acts" / "acts_00000.npy")
    assert ids.shape == (meta["tokens"],) and np.array_equal(rows[:, 0], ids)  # (the fake encoder's rows are the ids)
    # The digest covers each window as the model reads it: [CLS] (101), its 10 ids, [SEP] (102).
    framed = np.array([[101, *window, 102] for window in ids.reshape(-1, 10)], dtype=np.int32)
    assert hashlib.sha256(framed.tobytes()).hexdigest() == meta["token_ids_sha256"]
    corpus.write_text(corpus.read_text().replace("quick", "slow"))
    with pytest.raises(ValueError, match="do not match the cache"):
        realdata.cached_token_ids(tmp_path / "acts")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        realdata.cached_token_ids(tmp_path)
