"""The activation store: memory mapping, the seeded block shuffle, held-out rows, scaling, bad files."""

import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from matryoshka.activation_store import ActivationFileError, ActivationStore


def _rows(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32) * 3.0


def test_npy_is_memory_mapped_and_only_picked_blocks_are_read(tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", _rows(4096))
    store = ActivationStore(tmp_path / "a.npy", block_rows=64, scale=1.0)
    source = store.sources[0]
    assert isinstance(source.array, np.memmap)  # a map of the file, not a loaded array
    reads = []
    original = type(source).read
    monkeypatch.setattr(type(source), "read", lambda self, a, b: reads.append(b - a) or original(self, a, b))
    store.sample(100, torch.Generator().manual_seed(0))
    assert sum(reads) == 128 < source.rows  # two blocks of 64 rows out of 4096


def test_sample_is_a_pure_function_of_the_generator_and_shuffles(tmp_path):
    data = _rows(2048)
    np.save(tmp_path / "a.npy", data)
    store = ActivationStore(tmp_path, block_rows=32, scale=1.0)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    first = store.sample(300, g)
    g.set_state(state)  # what a resumed run does: same state, same rows
    assert torch.equal(store.sample(300, g), first)
    assert not torch.equal(store.sample(300, g), first)  # the generator moved on
    # every row is a real row, and rows of one block are scattered, not kept in order
    index = {row.tobytes(): i for i, row in enumerate(data)}
    positions = [index[r.numpy().tobytes()] for r in first]
    assert sorted(positions) != positions


def test_held_out_rows_are_never_drawn_and_scale_gives_mean_square_norm_d(tmp_path):
    np.save(tmp_path / "a.npy", _rows(1000))
    np.save(tmp_path / "b.npy", _rows(1000, seed=1))
    store = ActivationStore(tmp_path, block_rows=100, held_out_rows=150, scale_rows=4000)
    assert store.held_out_rows == 200 and store.held_out_blocks == [(1, 800), (1, 900)]
    assert all(b not in store.held_out_blocks for b in store.train_blocks)
    raw = np.load(tmp_path / "b.npy")[800:]
    assert torch.allclose(store.held_out(), torch.from_numpy(raw) * store.scale)
    sample = store.sample(4000, torch.Generator().manual_seed(1))
    assert abs(sample.pow(2).sum(1).mean().item() / store.d - 1) < 0.05
    assert math.isclose(ActivationStore(tmp_path, scale=2.5).scale, 2.5)


def test_safetensors_float16_and_bfloat16_read_by_slices(tmp_path):
    data = _rows(512)
    save_file({"activations": data.astype(np.float16)}, tmp_path / "a.safetensors")
    from safetensors.torch import save_file as save_torch
    save_torch({"x": torch.from_numpy(data).bfloat16()}, tmp_path / "b.safetensors")
    store = ActivationStore(tmp_path, block_rows=64, scale=1.0)
    assert [s.dtype for s in store.sources] == ["F16", "BF16"] and store.rows == 1024
    out = store.sample(256, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (256, 8)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p / "a.npy", np.zeros((10, 4), dtype=np.int64)), "dtype int64"),
    (lambda p: np.save(p / "a.npy", np.zeros((2, 5, 4), dtype=np.float32)), "shape (2, 5, 4)"),
    (lambda p: (p / "a.npy").write_bytes(b"not an array"), "cannot be read as a .npy"),
    (lambda p: (p / "a.safetensors").write_bytes(b"\x00" * 20), "cannot be read as safetensors"),
    (lambda p: save_file({"u": np.zeros((3, 4), np.float32), "v": np.zeros((3, 4), np.float32)},
                         p / "a.safetensors"), "none is named 'activations'"),
    (lambda p: (np.save(p / "a.npy", np.ones((10, 4), np.float32)), np.save(p / "b.npy", np.ones((10, 5), np.float32))),
     "has d = 5 but a.npy has d = 4"),
    (lambda p: np.save(p / "a.npy", np.full((10, 4), np.nan, np.float32)), "holds NaN/inf"),
    (lambda p: (p / "notes.txt").write_text("hi"), "holds no .npy or .safetensors"),
])
def test_bad_files_are_named_in_the_error(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(ActivationFileError, match=None) as error:
        ActivationStore(tmp_path)
    assert message in str(error.value)
    if "notes" not in message and "holds no" not in message:
        assert str(tmp_path) in str(error.value)


def test_missing_path_and_held_out_too_large(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationStore(tmp_path / "nope.npy")
    np.save(tmp_path / "a.npy", _rows(100))
    with pytest.raises(ValueError, match="leaves no training rows"):
        ActivationStore(tmp_path, block_rows=50, held_out_rows=100)
