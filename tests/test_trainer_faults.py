"""Fault and bad-input probes of the trainer and the CLI: each gives a clear message (naming the
argument or folder and what was expected) and, on the CLI, a non-zero exit; none leaves a silently
poisoned model or checkpoint behind.

Not probed here: activation files of the wrong shape or dtype, which belong to the activation-file
``train`` command of another issue (it does not exist yet).
"""

from __future__ import annotations

import pytest
import torch

from matryoshka import checkpoint
from matryoshka.__main__ import main
from matryoshka.train import train
from tests.tiny_runs import D, poisoned_sample, sample, tiny_config, tiny_sae


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_data_stops_before_reaching_the_model(tmp_path, one_thread, value):
    sae = tiny_sae("relu")
    with pytest.raises(ValueError, match=r"sample\(\) returned 1 NaN/inf values \(1 rows, first row 7\) "
                                         r"in the data of steps 4\.\.7; training stops before"):
        train(sae, poisoned_sample(7, value), tiny_config("relu", checkpoint_every=2), checkpoint_dir=tmp_path)
    assert all(bool(torch.isfinite(p).all()) for p in sae.parameters())
    # The run stopped after its 4th step, the last of the clean chunk.
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_0000002", "step_0000004"]


@pytest.mark.parametrize("bad", ["shape", "dtype", "list"])
def test_sampler_output_of_the_wrong_kind_is_named(bad):
    def wrong(rows, generator):
        data = sample(rows, generator)
        return {"shape": data[:, :-1], "dtype": data.to(torch.int64), "list": data.tolist()}[bad]
    got = {"shape": r"\(64, 7\) torch.float32", "dtype": r"\(64, 8\) torch.int64", "list": "list$"}[bad]
    with pytest.raises(ValueError, match=rf"sample\(64, generator\) must return a \(64, {D}\) floating-point "
                                         rf"tensor \(d = the SAE's input size\), got {got}"):
        train(tiny_sae("relu"), wrong, tiny_config("relu"))


def _overflowing(rows, generator):
    """Finite data whose squares overflow float32: the loss turns inf, the parameters NaN."""
    return sample(rows, generator) * 1e30


def test_divergence_raises_at_the_next_read_out(one_thread):
    with pytest.raises(FloatingPointError, match=r"training diverged: the mean loss of steps 0\.\.2 is (inf|nan)"):
        train(tiny_sae("relu"), _overflowing, tiny_config("relu"))


def test_no_checkpoint_is_written_from_a_poisoned_model(tmp_path, one_thread):
    with pytest.raises(FloatingPointError, match=r"parameter W_dec holds NaN/inf at step 1; refusing to write"):
        train(tiny_sae("relu"), _overflowing, tiny_config("relu", checkpoint_every=1), checkpoint_dir=tmp_path)
    assert checkpoint.checkpoints(tmp_path) == [] and not list(tmp_path.glob(".step*"))


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder cannot be made inside a file, not even by root
    with pytest.raises(PermissionError, match=r"checkpoint_dir '.*a_file/ckpt' is not a writable folder"):
        train(tiny_sae("relu"), sample, tiny_config("relu"), checkpoint_dir=blocker / "ckpt")


@pytest.mark.parametrize("argv", [
    ["train-toy", "--bogus"], ["compare", "--stepz", "3"], ["--nope"], ["train-toy", "--steps", "many"],
])
def test_cli_rejects_unknown_or_malformed_options(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train-toy", "compare", "child-magnitude"])
def test_cli_unwritable_output_folder(tmp_path, capsys, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main([command, "--out", str(blocker / "out")])
    assert exit_.value.code == 1
    assert f"python -m matryoshka {command}: error: --out '{blocker / 'out'}' is not a writable folder" \
        in capsys.readouterr().err


def test_cli_keeps_the_three_newest_checkpoints_unless_told(tmp_path, one_thread):
    args = ["train-toy", "--steps", "10", "--batch-size", "20", "--checkpoint-every", "2"]
    main(args + ["--out", str(tmp_path / "default")])
    main(args + ["--out", str(tmp_path / "all"), "--keep-checkpoints", "0"])
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "default" / "checkpoints")] == [
        "step_0000006", "step_0000008", "step_0000010"]
    assert len(checkpoint.checkpoints(tmp_path / "all" / "checkpoints")) == 5


def test_cli_bad_settings_and_resume(tmp_path, capsys, one_thread):
    with pytest.raises(SystemExit) as exit_:
        main(["train-toy", "--out", str(tmp_path), "--activation", "topk"])
    assert exit_.value.code == 1
    assert "error: activation 'topk' needs an integer 1 <= k <= n=20, got k=None" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # the trainer's check, named, reaches the command line
        main(["train-toy", "--out", str(tmp_path), "--resample-every", "-1"])
    assert exit_.value.code == 1
    assert "TrainConfig.resample_every must be an integer >= 0 (0: never), got -1" in capsys.readouterr().err

    args = ["train-toy", "--out", str(tmp_path), "--steps", "8", "--batch-size", "20", "--checkpoint-every", "4"]
    main(args)
    with pytest.raises(SystemExit) as exit_:  # the folder holds that run's checkpoints now
        main(args)
    assert exit_.value.code == 1 and "pass resume=True (CLI: --resume)" in capsys.readouterr().err
    main(args + ["--resume"])  # already at step 8: nothing to do, same SAE saved again
    assert "step 8: loss" in capsys.readouterr().out
