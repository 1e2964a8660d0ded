"""The sweep's headline for dense activations (each dense backend against one dense decode, and the
routing record, dense kernel against the PyTorch scan, that decides what ``"auto"`` runs on CUDA),
and the order of its units."""

from __future__ import annotations

import json

from benchmarks import sweep
from benchmarks.sweep import headline


def _record(method, g_kind, seconds):
    return dict(kind="loss", n=4096, k=32, d=256, dtype="bf16", B=512, method=method, g_kind=g_kind,
                status="ok", median_s=seconds, min_s=seconds, times_s=[seconds, seconds])


def _items(rows, fused):
    return [item for row in rows if row.get("fused") == fused for item in row["items"]]


def test_dense_backends_against_one_decode_and_the_routing_record():
    records = [_record("vanilla_floor", None, 1.0),
               _record("fused_dense_triton", "n", 3.0), _record("fused_dense_torch", "n", 1.2),
               _record("fused_dense_triton", "5", 1.1), _record("fused_dense_torch", "5", 2.2)]
    rows = headline(records, "cuda")
    [kernel] = _items(rows, "fused_dense_triton")
    [scan] = _items(rows, "fused_dense_torch")
    assert (kernel["ratio_of_medians"], kernel["met"]) == (3.0, False)
    assert (scan["ratio_of_medians"], scan["met"]) == (1.2, True)
    routing = {item["name"].split(" at ")[1].split(" ")[0]: item for item in _items(rows, "dense routing")}
    assert routing["G=n"]["ratio_of_medians"] == 2.5 and routing["G=5"]["ratio_of_medians"] == 0.5
    assert all(item["met"] is None and not item["target_applies"] for item in routing.values())
    # On the CPU the 1.3x target does not apply, and without both dense backends there is no routing row.
    cpu = headline([r for r in records if r["method"] != "fused_dense_triton"], "cpu")
    assert _items(cpu, "fused_dense_torch")[0]["met"] is None and not _items(cpu, "dense routing")


def test_e2e_first_times_the_training_steps_before_the_loss_grid(tmp_path, one_thread):
    sweep.main(["--device", "cpu", "--quick", "--G", "1", "n", "--methods", "fused_torch", "sparse_floor",
                "--activations", "topk", "--e2e-first", "--out", str(tmp_path), "--tag", "_order"])
    records = json.loads(next(tmp_path.glob("sweep_*_order.json")).read_text())["records"]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "e2e" and "loss" in kinds and kinds.index("loss") > max(i for i, k in enumerate(kinds) if k == "e2e")


def test_results_files_are_replaced_whole(tmp_path, monkeypatch):
    """The sweep rewrites its JSON after every configuration: each results file goes through the
    atomic replace, so a kill mid-write leaves the previous whole file."""
    from benchmarks import harness

    replaced = []
    real_replace = harness.replace_file
    monkeypatch.setattr(harness, "replace_file", lambda path, data: (replaced.append(path), real_replace(path, data)))
    stem = tmp_path / "sweep_x"
    stem.with_suffix(".json").write_text("old")
    harness.write_results(stem, {"ratio": 1.5, "device": tmp_path}, "| table |\n")
    sweep.write_csv([_record("fused_triton", "n", 2.0)], stem.with_suffix(".csv"))
    assert sorted(p.name for p in replaced) == ["sweep_x.csv", "sweep_x.json", "sweep_x.md"]
    assert json.loads(stem.with_suffix(".json").read_text()) == {"ratio": 1.5, "device": str(tmp_path)}
    assert stem.with_suffix(".csv").read_text().splitlines()[1].startswith("loss,fused_triton,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep_x.csv", "sweep_x.json", "sweep_x.md"]
