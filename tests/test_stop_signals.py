"""SIGINT and SIGTERM stop a run at a step boundary with a checkpoint of that step, and a resumed run
ends bit for bit where an uninterrupted one does; a second signal acts at once; the handlers that
were there before come back.  (Data-parallel ranks stopping together: tests/test_distributed.py.)"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from matryoshka import checkpoint
from matryoshka.stop_signals import DeferredSignals
from matryoshka.train import TrainingInterrupted, train
from tests.test_checkpoint import _assert_same_run, _uninterrupted
from tests.tiny_runs import on_second_chunk, sample, tiny_config, tiny_sae

ROOT = Path(__file__).resolve().parent.parent


class _Signalled(Exception):
    pass


def _raise_signalled(signum, frame):
    raise _Signalled(signal.Signals(signum).name)


@pytest.fixture(autouse=True)
def handlers_that_raise():
    """SIGINT and SIGTERM raise ``_Signalled`` here, should the trainer not defer them: the test
    fails, instead of the signal killing the test process (SIGTERM) or aborting the session (SIGINT)."""
    before = {s: signal.signal(s, _raise_signalled) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def _signal_at(step: int, signum: signal.Signals, times: int = 1):
    """A callback (called every 3 steps) that sends ``signum`` to this process at ``step``."""
    def callback(done, sae, logs):
        if done == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
    return callback


def _signal_mid_chunk(signum: signal.Signals):
    """``sample`` that sends ``signum`` while drawing the second data chunk, inside step 4 of 0..15."""
    return on_second_chunk(lambda data: os.kill(os.getpid(), signum))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
def test_a_signal_stops_at_the_step_end_with_a_checkpoint_and_resumes_bit_exact(tmp_path, one_thread, signum,
                                                                                 activation):
    want_state, want_history = _uninterrupted(activation)
    with pytest.raises(TrainingInterrupted) as stopped:  # checkpoints every 5 steps; signal at 6
        train(tiny_sae(activation), sample, tiny_config(activation), callback=_signal_at(6, signum),
              checkpoint_dir=tmp_path)
    error = stopped.value
    assert (error.signal, error.step, error.exit_code) == (signum, 6, 128 + signum)
    assert error.checkpoint == tmp_path / "step_0000006"
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_0000005", "step_0000006"]
    assert [row["step"] for row in error.result.history] == [3, 6]
    assert str(error) == (f"training stopped by {signum.name} after step 6 of 16; checkpoint {tmp_path / 'step_0000006'}; "
                          f"continue with train(..., checkpoint_dir={str(tmp_path)!r}, resume=True) (CLI: --resume)")
    # It crosses from a study's worker process to the parent.
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.signal, copy.step, copy.checkpoint) == (str(error), signum, 6, error.checkpoint)
    assert copy.result.history == error.result.history

    sae = tiny_sae(activation, seed=99)
    result = train(sae, sample, tiny_config(activation), checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(sae, result.history, want_state, want_history)


def test_a_signal_inside_a_step_waits_for_its_end_and_a_due_checkpoint_is_written_once(tmp_path, one_thread):
    """SIGTERM while step 4 (of 0..15) draws its data chunk: the step finishes, its periodic checkpoint
    (step 5 done) is the one the stop names, and the resume redraws the chunk (steps 4..7)."""
    want_state, want_history = _uninterrupted("topk")
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny_sae("topk"), _signal_mid_chunk(signal.SIGTERM), tiny_config("topk"), checkpoint_dir=tmp_path)
    assert (stopped.value.step, stopped.value.checkpoint) == (5, tmp_path / "step_0000005")
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_0000005"]
    sae = tiny_sae("topk", seed=99)
    result = train(sae, sample, tiny_config("topk"), checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(sae, result.history, want_state, want_history)


def test_without_a_checkpoint_folder_the_error_says_nothing_was_saved(one_thread):
    with pytest.raises(TrainingInterrupted, match=r"^training stopped by SIGTERM after step 9 of 16; no "
                                                  r"checkpoint_dir, so nothing was saved; the SAE holds the "
                                                  r"parameters after step 9$") as stopped:
        train(tiny_sae("relu"), sample, tiny_config("relu"), callback=_signal_at(9, signal.SIGTERM))
    assert stopped.value.checkpoint is None


def test_a_second_signal_acts_at_once(tmp_path, one_thread):
    """Two Ctrl-C: the handler that was there before comes back and gets the second one inside the
    callback, and no checkpoint of the unfinished step is written."""
    with pytest.raises(_Signalled, match="SIGINT"):
        train(tiny_sae("relu"), sample, tiny_config("relu"), callback=_signal_at(6, signal.SIGINT, times=2),
              checkpoint_dir=tmp_path)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_0000005"]


def test_the_previous_handlers_come_back(one_thread):
    train(tiny_sae("relu"), sample, tiny_config("relu", steps=3))
    assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is _raise_signalled
    with pytest.raises(TrainingInterrupted):
        train(tiny_sae("relu"), sample, tiny_config("relu"), callback=_signal_at(3, signal.SIGINT))
    assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is _raise_signalled


def test_outside_the_main_thread_nothing_is_deferred():
    seen = []

    def enter():
        with DeferredSignals():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [_raise_signalled]


def test_the_cli_exits_with_the_signals_status_after_writing_a_checkpoint(tmp_path):
    """``train-toy`` killed with SIGTERM (as a scheduler pre-empts a job): exit status 143, the
    message names the checkpoint of the step it stopped at."""
    command = [sys.executable, "-m", "matryoshka", "train-toy", "--steps", "1000000", "--checkpoint-every", "50",
               "--out", str(tmp_path)]
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not checkpoint.checkpoints(tmp_path / "checkpoints"):
        assert child.poll() is None, f"train-toy ended early: {child.communicate()[1]}"
        assert time.monotonic() < deadline, "train-toy wrote no checkpoint within 120 s"
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    stopped = re.search(r"train-toy: training stopped by SIGTERM after step (\d+) of 1000000; checkpoint (\S+);", stderr)
    assert stopped, stderr
    step, written = int(stopped.group(1)), Path(stopped.group(2))
    assert step >= 50 and written == tmp_path / "checkpoints" / f"step_{step:07d}"
    assert checkpoint.latest(tmp_path / "checkpoints") == written


def test_an_ignored_signal_stays_ignored(one_thread):
    """A run under ``nohup`` ignores SIGINT (and a background job of a script too): it must not start
    stopping on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = train(tiny_sae("relu"), sample, tiny_config("relu"), callback=_signal_at(6, signal.SIGINT))
    except TrainingInterrupted as stop:  # caught here: a KeyboardInterrupt would abort the test session
        pytest.fail(f"an ignored SIGINT stopped the run: {stop}")
    assert result.history[-1]["step"] == 16
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_the_cli_reports_a_stopped_study_with_ctrl_cs_status(tmp_path, monkeypatch, capsys):
    from matryoshka import __main__ as cli

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("compare: stopped with 3 of 20 runs finished, kept in X; the same command continues")
    monkeypatch.setattr(cli.compare, "compare", stopped)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", "--quick", "--out", str(tmp_path)])
    assert exit_.value.code == 130
    assert capsys.readouterr().err == ("python -m matryoshka compare: compare: stopped with 3 of 20 runs finished, "
                                       "kept in X; the same command continues\n")


def test_terminate_as_interrupt_raises_names_the_signal_and_restores(monkeypatch):
    from matryoshka.stop_signals import Interrupted, TerminateAsInterrupt

    before = signal.signal(signal.SIGTERM, _raise_signalled)
    try:
        with pytest.raises(Interrupted, match="^stopped by SIGTERM$") as stop:
            with TerminateAsInterrupt():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs before this ends
        assert stop.value.signal == signal.SIGTERM and stop.value.exit_code == 143
        assert signal.getsignal(signal.SIGTERM) is _raise_signalled  # the previous handler is back
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # an ignored SIGTERM stays ignored
        with TerminateAsInterrupt():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
