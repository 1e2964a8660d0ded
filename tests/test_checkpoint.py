"""Checkpoint and resume: a run killed at any moment (SIGKILL, even inside a checkpoint write) and
resumed ends bit for bit where an uninterrupted run ends; damaged or foreign checkpoints fail loudly,
naming the file and what differs, and never restart the run silently."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from matryoshka import checkpoint
from matryoshka.checkpoint import CheckpointError
from matryoshka.sae import SparseAutoencoder
from matryoshka.train import train
from tests.tiny_runs import final_state, sample, tiny_config, tiny_sae

ROOT = Path(__file__).resolve().parent.parent
ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")


def _uninterrupted(activation: str, **overrides) -> tuple[dict, list]:
    sae = tiny_sae(activation)
    history = train(sae, sample, tiny_config(activation, **overrides)).history
    return final_state(sae), history


def _assert_same_run(sae, history, want_state, want_history) -> None:
    got = final_state(sae)
    assert got.keys() == want_state.keys()
    for name, value in want_state.items():
        assert torch.equal(got[name], value), f"{name} differs after resume"
    assert history == want_history


class _Crash(Exception):
    pass


def _crash_at(step: int):
    def callback(done, sae, logs):
        if done == step:
            raise _Crash
    return callback


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_resume_after_a_crash_is_bit_exact(tmp_path, one_thread, activation):
    want_state, want_history = _uninterrupted(activation)
    with pytest.raises(_Crash):  # checkpoints at 5 and 10; dies at 12
        train(tiny_sae(activation), sample, tiny_config(activation), callback=_crash_at(12), checkpoint_dir=tmp_path)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_0000005", "step_0000010"]
    sae = tiny_sae(activation, seed=99)  # another start: every parameter must come from the checkpoint
    result = train(sae, sample, tiny_config(activation), checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(sae, result.history, want_state, want_history)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_0000005", "step_0000010", "step_0000015"]


def test_keep_checkpoints_deletes_all_but_the_newest_and_the_run_still_resumes_bit_exact(tmp_path, one_thread):
    overrides = dict(checkpoint_every=3, keep_checkpoints=2)
    want_state, want_history = _uninterrupted("relu", **overrides)
    with pytest.raises(_Crash):  # checkpoints at 3, 6, 9; dies at 12 (before its save)
        train(tiny_sae("relu"), sample, tiny_config("relu", **overrides), callback=_crash_at(12), checkpoint_dir=tmp_path)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_0000006", "step_0000009"]
    sae = tiny_sae("relu", seed=99)
    result = train(sae, sample, tiny_config("relu", **overrides), checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(sae, result.history, want_state, want_history)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000012", "step_0000015"]


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, one_thread, monkeypatch):
    """Pruning renames a checkpoint out of sight before deleting it: with the delete never done (a
    kill right after the rename), only hidden folders remain, and the next start clears them."""
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda path, ignore_errors=False: None)
    train(tiny_sae("relu"), sample, tiny_config("relu", keep_checkpoints=1), checkpoint_dir=tmp_path)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_0000015"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_0000005.tmp-pruned", ".step_0000010.tmp-pruned",
                                                          "step_0000015"]
    monkeypatch.undo()
    checkpoint.remove_partial(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000015"]


def test_a_checkpoint_folder_without_checkpoint_every_warns_and_stays_empty(tmp_path, one_thread):
    with pytest.warns(UserWarning, match=r"checkpoint_dir '.*' is given but checkpoint_every is 0"):
        train(tiny_sae("relu"), sample, tiny_config("relu", checkpoint_every=0), checkpoint_dir=tmp_path)
    assert checkpoint.checkpoints(tmp_path) == []


def test_resume_from_a_data_chunk_start_with_frequency_resorting_is_bit_exact(tmp_path, one_thread):
    """Checkpoints every 4 steps land on data-chunk starts (chunks of 4), where the checkpoint holds
    the generator as it is (the next chunk's start), not the finished chunk's; re-sorting by
    firing frequency needs the frequency statistics restored."""
    overrides = dict(checkpoint_every=4, resort_by="frequency")
    want_state, want_history = _uninterrupted("relu", **overrides)
    with pytest.raises(_Crash):  # checkpoints at 4 and 8; dies at 9 (a logging step)
        train(tiny_sae("relu"), sample, tiny_config("relu", **overrides), callback=_crash_at(9), checkpoint_dir=tmp_path)
    sae = tiny_sae("relu", seed=99)
    result = train(sae, sample, tiny_config("relu", **overrides), checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(sae, result.history, want_state, want_history)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_resume_with_dead_latent_resampling_is_bit_exact(tmp_path, one_thread, activation):
    """Restarts every 2 steps of latents silent for a step: the restart counts, the reset
    statistics and the zeroed Adam moments must all come back from the checkpoint."""
    overrides = dict(resample_every=2, dead_after=1)
    want_state, want_history = _uninterrupted(activation, **overrides)
    restarts = {row["step"]: row["resampled"] for row in want_history}
    assert 0 < restarts[9] < restarts[12]  # restarts before the checkpoint at 10 and after it
    with pytest.raises(_Crash):  # checkpoints at 5 and 10; dies at 12
        train(tiny_sae(activation), sample, tiny_config(activation, **overrides), callback=_crash_at(12),
              checkpoint_dir=tmp_path)
    sae = tiny_sae(activation, seed=99)
    result = train(sae, sample, tiny_config(activation, **overrides), checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(sae, result.history, want_state, want_history)


def _killed_child(folder: str) -> None:
    """Run in a subprocess: train with checkpoints and hang inside the second checkpoint's write,
    after its files are written and before the rename publishes them, until SIGKILL comes."""
    torch.set_num_threads(1)
    publish, published = checkpoint._publish, []

    def hang_on_second(temporary, final):
        published.append(final)
        if len(published) == 2:
            (Path(folder) / "HANGING").write_text(str(final))
            time.sleep(600)
        publish(temporary, final)

    checkpoint._publish = hang_on_second
    train(tiny_sae("batchtopk"), sample, tiny_config("batchtopk"), checkpoint_dir=Path(folder) / "ckpt")


def test_sigkill_mid_checkpoint_write_then_resume_is_bit_exact(tmp_path, one_thread):
    code = f"from tests.test_checkpoint import _killed_child; _killed_child({str(tmp_path)!r})"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    want_state, want_history = _uninterrupted("batchtopk")  # meanwhile
    deadline = time.monotonic() + 120
    while not (tmp_path / "HANGING").exists():
        assert child.poll() is None, f"the training subprocess ended early: {child.stderr.read()}"
        assert time.monotonic() < deadline, "the training subprocess never reached its second checkpoint"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stderr.close()

    folder = tmp_path / "ckpt"
    assert [p.name for p in checkpoint.checkpoints(folder)] == ["step_0000005"]
    assert [p.name for p in folder.glob(".step_0000010.tmp-*")], "the kill should leave a partial write behind"
    sae = tiny_sae("batchtopk", seed=99)
    result = train(sae, sample, tiny_config("batchtopk"), checkpoint_dir=folder, resume=True)
    _assert_same_run(sae, result.history, want_state, want_history)
    assert not list(folder.glob(".step_*")), "the resumed run clears partial writes"


# ----------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A checkpoint folder holding one relu checkpoint, step 5."""
    folder = tmp_path_factory.mktemp("written")
    train(tiny_sae("relu"), sample, tiny_config("relu", steps=5), checkpoint_dir=folder)
    return folder


@pytest.fixture
def copy(written, tmp_path) -> Path:
    shutil.copytree(written, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _resume(folder: Path, activation: str = "relu", **config):
    sae = tiny_sae(activation)
    before = final_state(sae)
    try:
        return sae, train(sae, sample, tiny_config(activation, **{"steps": 5, **config}),
                          checkpoint_dir=folder, resume=True)
    except CheckpointError:  # never a silent restart: the failure comes before any training step
        assert all(torch.equal(v, before[k]) for k, v in final_state(sae).items())
        raise


def test_truncated_file_names_the_file(copy):
    file = copy / "step_0000005" / "trainer.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"step_0000005/trainer\.safetensors is truncated or damaged: 100 bytes"):
        _resume(copy)


def test_corrupted_file_names_the_file(copy):
    file = copy / "step_0000005" / "sae.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x40  # a flipped bit in a weight: still a valid safetensors file
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step_0000005/sae\.safetensors is corrupted"):
        _resume(copy)


@pytest.mark.parametrize("damage", ["missing", "not json"])
def test_damaged_manifest_names_the_file(copy, damage):
    manifest = copy / "step_0000005" / "manifest.json"
    if damage == "missing":
        manifest.unlink()
        match = r"step_0000005 has no manifest\.json"
    else:
        manifest.write_text('{"format": 1, "files": {')
        match = r"step_0000005/manifest\.json is not valid JSON"
    with pytest.raises(CheckpointError, match=match):
        _resume(copy)


def test_other_config_names_the_differing_fields(copy):
    with pytest.raises(CheckpointError) as error:
        _resume(copy, lr=1e-3, batch_size=8)
    message = str(error.value)
    assert "step_0000005/trainer.json belongs to another run" in message
    assert "train_config.lr: checkpoint 0.03, this run 0.001" in message
    assert "train_config.batch_size: checkpoint 16, this run 8" in message


def test_other_shapes_name_the_differing_fields(copy):
    with pytest.raises(CheckpointError, match=r"sae_config\.activation: checkpoint 'relu', this run 'topk'.*"
                                              r"sae_config\.k: checkpoint None, this run 2"):
        _resume(copy, "topk", target_l0=2.0)


def test_free_settings_may_change_on_resume(copy):
    with pytest.warns(UserWarning, match="checkpoint_every is 0: no checkpoint will be written"):
        sae, result = _resume(copy, progress=True, checkpoint_every=0, keep_checkpoints=1)  # change nothing computed
    assert [row["step"] for row in result.history] == [3, 5]
    assert torch.equal(sae.W_dec, SparseAutoencoder.load(copy / "step_0000005").W_dec)


def test_a_fresh_run_refuses_a_folder_with_checkpoints(copy):
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint_dir {str(copy)!r} already holds checkpoints "
                                                         "(latest: step_0000005); pass resume=True")):
        train(tiny_sae("relu"), sample, tiny_config("relu"), checkpoint_dir=copy)


def test_resume_without_checkpoints_starts_at_zero_with_a_warning(tmp_path, one_thread):
    with pytest.warns(UserWarning, match=re.escape(f"no checkpoint in {str(tmp_path)!r} yet; starting at step 0")):
        result = train(tiny_sae("topk"), sample, tiny_config("topk", steps=5), checkpoint_dir=tmp_path, resume=True)
    assert result.history[0]["step"] == 3
    with pytest.raises(ValueError, match=r"^train\(resume=True\) needs checkpoint_dir"):
        train(tiny_sae("topk"), sample, tiny_config("topk"), resume=True)


def test_checkpoint_is_a_loadable_sae_with_a_manifest(written):
    path = written / "step_0000005"
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["config.json", "sae.safetensors", "trainer.json", "trainer.safetensors"]
    assert SparseAutoencoder.load(path).config.n == tiny_sae("relu").config.n
    assert json.loads((path / "trainer.json").read_text())["world_size"] == 1
