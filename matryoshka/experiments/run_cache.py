"""Finished runs of a study kept on disk, so that a study stopped by a crash, Ctrl-C or a kill and
started again reruns only the runs it had not finished.

One JSON file per run in the study's cache folder (``OUT/run_cache``), named by the SHA-256 of the
worker's name, the run's spec and the *code identity*: the SHA-256 of every Python source of this
package and torch's version.  A run is reused only when all three match, so a cached result is the
result the code would compute now (the toy runs are deterministic on the CPU, whatever the number
of processes), bar its recorded CPU seconds.  Changing any source file retires the whole cache;
delete the folder to rerun everything.

A result goes through JSON whether it is fresh or reused (tuples come back as lists, NumPy scalars
as Python numbers), so a study sees the same values either way.  Files are written to a temporary
name and renamed into place (:func:`matryoshka.durable_files.replace_file`): a kill mid-write
leaves a whole file or none.  An unreadable file is ignored (its run is done again) with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import torch

from ..durable_files import replace_file

__all__ = ["RunCache", "code_identity"]

PACKAGE = Path(__file__).resolve().parents[1]


@cache
def code_identity() -> str:
    """SHA-256 of this package's Python sources (path and bytes, in path order) and torch's version."""
    digest = hashlib.sha256(f"torch {torch.__version__}\n".encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(f"{path.relative_to(PACKAGE).as_posix()}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _plain(value):
    """NumPy scalars as Python numbers, for ``json.dumps``."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a study result holds a {type(value).__name__}, which JSON cannot store")


class RunCache:
    """The cache folder of one study and ``worker`` (see the module doc)."""

    def __init__(self, folder: str | Path, worker) -> None:
        self.folder = Path(folder)
        self.worker = f"{worker.__module__}.{worker.__qualname__}"

    def _file(self, spec) -> Path:
        fields = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else spec
        key = json.dumps({"worker": self.worker, "spec": fields, "code": code_identity()}, sort_keys=True,
                         default=_plain)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def get(self, spec) -> dict | None:
        """The cached result of ``spec``, or ``None``."""
        file = self._file(spec)
        if not file.exists():
            return None
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            warnings.warn(f"run cache: {file} cannot be read ({exc}); running that run again", stacklevel=2)
            return None

    def put(self, spec, result: dict) -> dict:
        """Store ``result`` for ``spec`` and return it as JSON reads it back."""
        text = json.dumps(result, default=_plain)
        self.folder.mkdir(parents=True, exist_ok=True)
        replace_file(self._file(spec), text.encode())
        return json.loads(text)
