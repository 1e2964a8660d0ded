"""Training checkpoints on disk: atomic writes, integrity checks, and errors that name what is wrong.

A checkpoint is a folder ``step_0000123/`` in the run's checkpoint folder holding

* ``config.json``, ``sae.safetensors``: the SAE exactly as :meth:`SparseAutoencoder.save` writes it,
  so ``SparseAutoencoder.load(".../step_0000123")`` loads the model of any checkpoint;
* ``trainer.safetensors``: the trainer's tensors (optimiser moments, generator states, ...);
* ``trainer.json``: the trainer's other state (step, history, ...) and the configs of the run;
* ``manifest.json``: the size and SHA-256 of each file above.

Why safetensors and JSON rather than ``torch.save``: loading them runs no pickle (a checkpoint from
elsewhere cannot execute code), both are readable without this package, and the SAE part is the
ordinary saved-model format.  The manifest catches what the formats cannot: a truncated or
bit-flipped file loads "fine" as safetensors or JSON more often than not.

Atomicity: every file is written into a hidden temporary folder next to the final one and
fsync'ed, then the folder is renamed into place (``os.replace``, atomic on POSIX) and the parent
folder fsync'ed.  A kill at any moment leaves either the complete checkpoint or none, plus perhaps a
hidden ``.step_*.tmp-*`` folder that :func:`latest` never looks at (and :func:`remove_partial`
clears).  Checkpoint folders are never modified after the rename.  :func:`prune` deletes old ones
the same way round: renamed out of sight first (atomic), then deleted, so a kill mid-delete never
leaves a half-deleted folder that looks like a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load, save

from .durable_files import fsync_folder, write_synced

__all__ = ["CheckpointError", "check_writable", "checkpoints", "latest", "load_checkpoint", "prune",
           "remove_partial", "save_checkpoint"]

FORMAT = 1
MANIFEST = "manifest.json"
_NAME = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, truncated, corrupted, or from another
    run); the message names the file and what differs."""


def check_writable(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written there; ``what`` names the
    folder in the error (e.g. ``"checkpoint_dir"``).  Called before a run starts, so that an
    unwritable folder fails in a second rather than at the first save, hours later."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PermissionError(f"{what} {str(folder)!r} is not a writable folder: {exc}") from exc
    return folder


def checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in ``folder``, or ``None`` when there is none."""
    found = checkpoints(folder)
    return found[-1] if found else None


def remove_partial(folder: str | Path) -> None:
    """Delete temporary folders that a killed write left behind in ``folder``."""
    for path in Path(folder).glob(".step_*.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def prune(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` (>= 1) complete checkpoints in ``folder`` (module doc)."""
    for old in checkpoints(folder)[:-keep]:
        hidden = old.with_name(f".{old.name}.tmp-pruned")
        os.replace(old, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def save_checkpoint(folder: str | Path, step: int, sae_files: dict[str, bytes],
                    tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write the checkpoint of ``step`` atomically (see module doc) and return its folder.

    ``sae_files``: :meth:`SparseAutoencoder.state_files`; ``tensors``: the trainer's tensors (any
    device); ``state``: JSON-able trainer state, including the configs :func:`load_checkpoint`
    compares against.
    """
    folder = Path(folder)
    final = folder / f"step_{step:07d}"
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists; a checkpoint folder is never overwritten")
    files = dict(sae_files)
    files["trainer.safetensors"] = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    files["trainer.json"] = json.dumps({"format": FORMAT, "step": step, **state}, allow_nan=False).encode()
    manifest = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for name, data in files.items()}
    files[MANIFEST] = json.dumps({"format": FORMAT, "files": manifest}, indent=1).encode()
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=folder))
    for name, data in files.items():
        write_synced(temporary / name, data)
    fsync_folder(temporary)
    _publish(temporary, final)
    fsync_folder(folder)
    return final


def _publish(temporary: Path, final: Path) -> None:
    """Rename the finished temporary folder into place: the one atomic step of a save."""
    os.replace(temporary, final)


def load_checkpoint(path: str | Path, expected: dict,
                    device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Read and verify checkpoint ``path``: ``(sae_state, trainer_tensors, trainer_state)``.

    Every file's size and SHA-256 must match the manifest, and every entry of ``expected`` (e.g.
    ``{"train_config": {...}, "sae_config": {...}}``) must equal the checkpoint's; otherwise a
    :class:`CheckpointError` names the file and each differing field.  Tensors land on ``device``.
    """
    path = Path(path)
    files = _verified_files(path)
    state = _json(path / "trainer.json", files["trainer.json"])
    differences = [f"{section}.{field}: checkpoint {theirs!r}, this run {ours!r}"
                   for section, ours_all in expected.items()
                   for field, ours, theirs in _differing(ours_all, state.get(section, {}))]
    if differences:
        raise CheckpointError(f"checkpoint {path / 'trainer.json'} belongs to another run; differing "
                              f"settings: " + "; ".join(differences))
    return (_tensors(path / "sae.safetensors", files["sae.safetensors"], device),
            _tensors(path / "trainer.safetensors", files["trainer.safetensors"], device), state)


def _verified_files(path: Path) -> dict[str, bytes]:
    """The checkpoint's files, each checked against the manifest's size and SHA-256."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: not a checkpoint folder, or damaged")
    manifest = _json(manifest_path, manifest_path.read_bytes())
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: expected format {FORMAT} with a 'files' table, "
                              f"got format {manifest.get('format')!r}")
    files = {}
    for name, want in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        data = file.read_bytes()
        if len(data) != want["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is truncated or damaged: {len(data)} bytes, "
                                  f"the manifest says {want['bytes']}")
        if hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise CheckpointError(f"checkpoint file {file} is corrupted: its SHA-256 differs from the manifest's")
        files[name] = data
    for name in ("config.json", "sae.safetensors", "trainer.safetensors", "trainer.json"):
        if name not in files:
            raise CheckpointError(f"{manifest_path} does not list {name}")
    return files


def _json(file: Path, data: bytes) -> dict:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint file {file} is not valid JSON: {exc}") from exc


def _tensors(file: Path, data: bytes, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        return {k: v.to(device) for k, v in load(data).items()}
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"checkpoint file {file} is not a valid safetensors file: {exc}") from exc


def _differing(ours: dict, theirs: dict) -> list[tuple[str, object, object]]:
    """``(field, ours, theirs)`` for each field whose JSON values differ (tuples equal lists)."""
    ours, theirs = json.loads(json.dumps(ours)), json.loads(json.dumps(theirs))
    return [(f, ours.get(f), theirs.get(f)) for f in sorted(set(ours) | set(theirs)) if ours.get(f) != theirs.get(f)]
