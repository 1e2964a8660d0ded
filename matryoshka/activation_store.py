"""Activations on disk as training data: memory-mapped files, a seeded shuffle, SAELens-style scaling.

Files.  ``PATH`` is one file or a folder of files (read in sorted name order), each a 2-D
``(tokens, d)`` array of float16, bfloat16 (safetensors only), float32 or float64:

* ``.npy``: opened with ``np.load(mmap_mode="r")``;
* ``.safetensors``: the tensor named ``activations``, or the file's only tensor, read through
  ``safe_open(...).get_slice`` one block of rows at a time.

Nothing is ever loaded whole: a draw reads only the blocks it picked, so a store can be far larger
than memory.  Every file is checked when the store opens (suffix, dtype, shape, the same ``d`` for
all), and a bad one raises :class:`ActivationFileError` naming the file and what was expected.

Sampling (:meth:`ActivationStore.sample`, the ``sample(rows, generator)`` of
:func:`matryoshka.train.train`).  The rows are cut into aligned blocks of ``block_rows``
consecutive tokens.  One draw picks ``ceil(rows / block_rows)`` training blocks uniformly at random
(with replacement), reads them (contiguous reads, cheap on any disk), pools them into one buffer
and returns ``rows`` of the buffer in a random order.  Both choices come from the caller's
generator and nothing else, so a draw is a pure function of ``(rows, generator state)``: that is
what makes a run reproducible and its resume exact, since the trainer's checkpoint keeps the
generator state at the start of the current data chunk and redraws that chunk (a stateful shuffle
buffer would have to be checkpointed separately, and would break the trainer's data-parallel rule
that every rank draws the same data).  Blocks keep disk reads sequential; the buffer (one trainer
chunk, e.g. 100 steps x 512 rows = 200 blocks of 256) spreads each block's correlated neighbouring
tokens over many batches.  With replacement means no epochs: after ``T`` drawn rows a fraction
``1 - exp(-T / N)`` of the ``N`` training rows has been seen.

Held-out rows: the last ``held_out_rows`` (rounded up to whole blocks) of the last file(s), never
drawn for training; contiguous, so no text leaks from training into evaluation.

Normalisation, as SAELens's ``normalize_activations="expected_average_only_in"``: every row is
multiplied by one constant ``scale`` so that the mean squared norm of the training rows is ``d``.
The scale is estimated once from ``scale_rows`` rows drawn with a fixed seed (``scale_seed``), or
given (to reuse a saved run's).  SAELens computes ``sqrt(d) / mean ||x||`` (mean *norm* ``sqrt(d)``);
here it is ``sqrt(d / mean ||x||^2)`` (mean *squared* norm exactly ``d``), equal when all norms are
equal.  Train and evaluate on scaled rows; divide a reconstruction by ``scale`` for original units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

__all__ = ["ActivationFileError", "ActivationStore", "SUFFIXES", "TENSOR_KEY"]

SUFFIXES = (".npy", ".safetensors")
TENSOR_KEY = "activations"

_NUMPY_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_SAFETENSORS_FLOATS = {"F16", "BF16", "F32", "F64"}


class ActivationFileError(ValueError):
    """An activation file that cannot be used: wrong suffix, unreadable, wrong dtype or shape."""


@dataclass
class _Source:
    """One activation file: its rows, width, and a reader of row ranges (as float32 tensors)."""

    path: Path
    rows: int
    d: int
    dtype: str
    array: np.ndarray | None = None  # the memory map of a .npy file
    handle: object | None = None  # the safe_open handle of a .safetensors file
    key: str | None = None

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.array is not None:
            # np.array copies just these rows out of the memory map (float32: torch has no view of
            # a read-only map, and the SAE trains in float32 anyway).
            return torch.from_numpy(np.array(self.array[start:stop], dtype=np.float32))
        return self.handle.get_slice(self.key)[start:stop].to(torch.float32)


def _expected(path: Path, what: str) -> ActivationFileError:
    return ActivationFileError(
        f"activation file {str(path)!r}: {what}; expected a 2-D (tokens, d) array of float16, bfloat16 "
        f"(safetensors only), float32 or float64 in a .npy file or a .safetensors file (tensor "
        f"{TENSOR_KEY!r} or its only tensor)")


def _open_npy(path: Path) -> _Source:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # not an .npy file, truncated, or object dtype
        raise _expected(path, f"cannot be read as a .npy array ({exc})") from exc
    if not isinstance(array, np.memmap):
        raise _expected(path, "is not a plain .npy array (np.load did not memory-map it)")
    if array.dtype not in _NUMPY_FLOATS:
        raise _expected(path, f"has dtype {array.dtype}")
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise _expected(path, f"has shape {tuple(array.shape)} (reshape (batch, seq, d) to (batch * seq, d))")
    return _Source(path, int(array.shape[0]), int(array.shape[1]), str(array.dtype), array=array)


def _open_safetensors(path: Path) -> _Source:
    try:
        handle = safe_open(str(path), framework="pt")
        keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError) for bad headers
        raise _expected(path, f"cannot be read as safetensors ({exc})") from exc
    if TENSOR_KEY in keys:
        key = TENSOR_KEY
    elif len(keys) == 1:
        key = keys[0]
    else:
        raise _expected(path, f"holds tensors {keys[:8]} and none is named {TENSOR_KEY!r}")
    view = handle.get_slice(key)
    dtype, shape = view.get_dtype(), view.get_shape()
    if dtype not in _SAFETENSORS_FLOATS:
        raise _expected(path, f"tensor {key!r} has dtype {dtype}")
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise _expected(path, f"tensor {key!r} has shape {tuple(shape)} (reshape (batch, seq, d) to (batch * seq, d))")
    return _Source(path, int(shape[0]), int(shape[1]), dtype, handle=handle, key=key)


def activation_files(path: str | Path) -> list[Path]:
    """The activation files at ``path``: the file itself, or a folder's ``.npy``/``.safetensors``
    files in sorted order.  Raises ``FileNotFoundError`` or :class:`ActivationFileError`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"activations path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise ActivationFileError(f"activations folder {str(path)!r} holds no {' or '.join(SUFFIXES)} files")
        return files
    if path.suffix not in SUFFIXES:
        raise _expected(path, f"has suffix {path.suffix!r}, not {' or '.join(SUFFIXES)}")
    return [path]


class ActivationStore:
    """Training rows from activation files on disk (see the module doc for the format and the design).

    ``block_rows``: consecutive rows read together (shrunk to the smallest file's rows).
    ``held_out_rows``: rows kept out of training at the end (rounded up to whole blocks).
    ``scale``: the normalisation factor; ``None`` estimates it from ``scale_rows`` training rows.
    Calling the store is :meth:`sample`, so it can be passed to :func:`matryoshka.train.train`.
    """

    def __init__(self, path: str | Path, block_rows: int = 256, held_out_rows: int = 0,
                 scale: float | None = None, scale_rows: int = 8192, scale_seed: int = 0) -> None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        if held_out_rows < 0:
            raise ValueError(f"held_out_rows must be >= 0, got {held_out_rows}")
        self.path = Path(path)
        self.sources = [_open_npy(p) if p.suffix == ".npy" else _open_safetensors(p) for p in activation_files(path)]
        first = self.sources[0]
        for source in self.sources[1:]:
            if source.d != first.d:
                raise _expected(source.path, f"has d = {source.d} but {first.path.name} has d = {first.d}; "
                                             f"all files of one store must have the same width")
        self.d = first.d
        self.rows = sum(s.rows for s in self.sources)
        self.block_rows = min(block_rows, min(s.rows for s in self.sources))
        # (source index, first row) of every whole block; a file's last rows short of a block are unused.
        blocks = [(i, start) for i, s in enumerate(self.sources)
                  for start in range(0, s.rows - self.block_rows + 1, self.block_rows)]
        held = math.ceil(held_out_rows / self.block_rows)
        if held >= len(blocks):
            raise ValueError(f"held_out_rows = {held_out_rows} leaves no training rows: {str(self.path)!r} has "
                             f"{len(blocks)} blocks of {self.block_rows} rows ({self.rows} rows)")
        self.train_blocks = blocks[:len(blocks) - held]
        self.held_out_blocks = blocks[len(blocks) - held:]
        self.scale_rows = scale_rows
        if scale is None:
            mean_square = float(self._draw(scale_rows, torch.Generator().manual_seed(scale_seed)).pow(2).sum(1).mean())
            if not mean_square > 0:
                raise ActivationFileError(f"activations at {str(self.path)!r} are all zero in {scale_rows} sampled rows: "
                                          f"nothing to normalise or train on")
            scale = math.sqrt(self.d / mean_square)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        self.scale = float(scale)

    @property
    def train_rows(self) -> int:
        return len(self.train_blocks) * self.block_rows

    @property
    def held_out_rows(self) -> int:
        return len(self.held_out_blocks) * self.block_rows

    def _read_block(self, block: tuple[int, int]) -> torch.Tensor:
        source_index, start = block
        source = self.sources[source_index]
        rows = source.read(start, start + self.block_rows)
        if not bool(torch.isfinite(rows).all()):
            bad = start + int((~torch.isfinite(rows)).any(1).nonzero()[0])
            raise ActivationFileError(f"activation file {str(source.path)!r}: row {bad} holds NaN/inf")
        return rows

    def _draw(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """``rows`` unscaled training rows: random blocks pooled, then shuffled (module doc)."""
        picks = torch.randint(len(self.train_blocks), (math.ceil(rows / self.block_rows),), generator=generator)
        pool = torch.cat([self._read_block(self.train_blocks[i]) for i in picks.tolist()])
        return pool[torch.randperm(pool.shape[0], generator=generator)[:rows]]

    def sample(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """``(rows, d)`` float32 normalised training rows; a pure function of ``rows`` and the
        generator's state (which it advances)."""
        return self._draw(rows, generator).mul_(self.scale)

    __call__ = sample

    def held_out(self, max_rows: int | None = None) -> torch.Tensor:
        """The held-out rows in file order, normalised: ``(min(max_rows, held_out_rows), d)`` float32."""
        blocks = self.held_out_blocks
        if max_rows is not None:
            blocks = blocks[:math.ceil(max_rows / self.block_rows)]
        if not blocks:
            raise ValueError(f"the store at {str(self.path)!r} has no held-out rows (held_out_rows=0)")
        return torch.cat([self._read_block(b) for b in blocks])[:max_rows].mul_(self.scale)

    def _row_indices(self, blocks: list[tuple[int, int]]) -> np.ndarray:
        """The rows (indices over all files, in file order) that ``blocks`` hold."""
        offsets = np.cumsum([0] + [s.rows for s in self.sources])
        return np.concatenate([np.arange(offsets[i] + start, offsets[i] + start + self.block_rows)
                               for i, start in blocks]) if blocks else np.zeros(0, dtype=np.int64)

    def training_block_rows(self, block_ids: list[int]) -> tuple[torch.Tensor, np.ndarray]:
        """The normalised rows of the training blocks ``block_ids`` (positions in the training
        blocks), and their row indices over all files: for labelling rows by what they came from
        (e.g. their token ids)."""
        if any(not 0 <= b < len(self.train_blocks) for b in block_ids):
            raise ValueError(f"block_ids must be in 0..{len(self.train_blocks) - 1}, got {block_ids}")
        blocks = [self.train_blocks[b] for b in block_ids]
        return torch.cat([self._read_block(b) for b in blocks]).mul_(self.scale), self._row_indices(blocks)

    def held_out_row_indices(self) -> np.ndarray:
        """The row indices over all files of :meth:`held_out`'s rows, in its order."""
        return self._row_indices(self.held_out_blocks)

    def describe(self) -> dict:
        """What a run should record about its data (JSON-able)."""
        return {
            "path": str(self.path), "files": [s.path.name for s in self.sources], "d": self.d, "rows": self.rows,
            "dtypes": sorted({s.dtype for s in self.sources}), "block_rows": self.block_rows,
            "train_rows": self.train_rows, "held_out_rows": self.held_out_rows,
            "scale": self.scale, "scale_rows": self.scale_rows,
            "normalisation": "x * scale, scale = sqrt(d / mean ||x||^2) over the sampled training rows",
        }
