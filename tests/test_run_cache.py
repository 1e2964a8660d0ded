"""A study's finished runs are kept as they end and reused when it is started again (after a crash,
Ctrl-C or a kill), only for the same worker, spec and code; results read the same either way."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from matryoshka.experiments import run_cache
from matryoshka.experiments.common import run_many

CALLS: list[int] = []
FAIL_AT: list[int] = []


def _square(spec: dict) -> dict:
    """A cheap worker that records its calls and fails at the specs listed in ``FAIL_AT`` (a negative
    entry: Ctrl-C at spec ``-entry``)."""
    if spec["x"] in FAIL_AT:
        raise RuntimeError(f"run {spec['x']} crashed")
    if -spec["x"] in FAIL_AT:
        raise KeyboardInterrupt
    CALLS.append(spec["x"])
    return {"spec": spec, "square": spec["x"] ** 2, "pair": (1, 2), "nan": float("nan"), "half": np.float32(0.5)}


SPECS = [{"x": x} for x in range(4)]


@pytest.fixture(autouse=True)
def fresh_counters():
    CALLS.clear()
    FAIL_AT.clear()
    yield
    FAIL_AT.clear()


def test_a_crashed_study_keeps_its_finished_runs_and_reruns_only_the_rest(tmp_path, capsys):
    FAIL_AT.append(2)
    with pytest.raises(RuntimeError, match="run 2 crashed"):
        run_many(SPECS, jobs=1, worker=_square, cache=tmp_path)
    assert CALLS == [0, 1] and len(list(tmp_path.glob("*.json"))) == 2
    FAIL_AT.clear()

    results = run_many(SPECS, jobs=1, worker=_square, cache=tmp_path)
    assert CALLS == [0, 1, 2, 3]  # 0 and 1 reused
    assert f"runs: 2 of 4 runs reused from {tmp_path}" in capsys.readouterr().out
    assert [r["square"] for r in results] == [0, 1, 4, 9] and results.reused == 2
    # Fresh (3) and reused (0) results read the same: as JSON gives them back.
    for result in (results[0], results[3]):
        assert result["pair"] == [1, 2] and type(result["half"]) is float and np.isnan(result["nan"])

    assert json.dumps(run_many(SPECS, jobs=1, worker=_square, cache=tmp_path)) == json.dumps(results)
    assert CALLS == [0, 1, 2, 3]  # nothing run again
    assert not list(tmp_path.glob(".*.tmp-*")), "no temporary file is left behind"


def test_ctrl_c_says_how_many_runs_are_kept(tmp_path, capsys):
    FAIL_AT.append(-3)
    with pytest.raises(KeyboardInterrupt, match=rf"^study: stopped with 3 of 4 runs finished, kept in {tmp_path}; "
                                                rf"the same command continues from there$"):
        run_many(SPECS, jobs=1, worker=_square, cache=tmp_path, desc="study")
    FAIL_AT.clear()
    run_many(SPECS, jobs=1, worker=_square, cache=tmp_path, desc="study")
    assert CALLS == [0, 1, 2, 3]


def test_other_code_or_another_worker_reruns_everything(tmp_path, monkeypatch):
    run_many(SPECS, jobs=1, worker=_square, cache=tmp_path)
    monkeypatch.setattr(run_cache, "code_identity", lambda: "an edited source file")
    run_many(SPECS, jobs=1, worker=_square, cache=tmp_path)
    assert CALLS == [0, 1, 2, 3] * 2
    monkeypatch.undo()
    run_many(SPECS, jobs=1, worker=_cube, cache=tmp_path)
    assert CALLS == [0, 1, 2, 3] * 3


def _cube(spec: dict) -> dict:
    CALLS.append(spec["x"])
    return {"cube": spec["x"] ** 3}


def test_a_spec_is_found_whatever_its_key_order_and_may_hold_numpy_numbers(tmp_path):
    """The cache folder may not exist yet (a study makes its output folder after its runs)."""
    cache = tmp_path / "study" / "run_cache"
    run_many([{"x": 1, "y": np.int64(2)}], jobs=1, worker=_square, cache=cache)
    run_many([{"y": np.int64(2), "x": 1}], jobs=1, worker=_square, cache=cache)
    assert CALLS == [1]


def test_an_unreadable_cached_run_is_run_again_with_a_warning(tmp_path):
    run_many(SPECS, jobs=1, worker=_square, cache=tmp_path)
    damaged = sorted(tmp_path.glob("*.json"))[0]
    damaged.write_text('{"square": ')
    with pytest.warns(UserWarning, match=f"run cache: {damaged} cannot be read"):
        results = run_many(SPECS, jobs=1, worker=_square, cache=tmp_path)
    assert len(CALLS) == 5 and [r["square"] for r in results] == [0, 1, 4, 9]


def test_the_code_identity_follows_the_sources(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(run_cache, "PACKAGE", tmp_path)
    run_cache.code_identity.cache_clear()
    first = run_cache.code_identity()
    (tmp_path / "a.py").write_text("x = 2\n")
    run_cache.code_identity.cache_clear()
    assert run_cache.code_identity() != first
    run_cache.code_identity.cache_clear()


def _started(spec: dict) -> dict:
    """A worker for spawned processes: marks its start in ``spec["dir"]``; spec 1 fails at once,
    spec 0 ends a second later."""
    Path(spec["dir"], f"started_{spec['x']}").touch()
    if spec["x"] == 1:
        raise RuntimeError("run 1 crashed")
    time.sleep(1.0 if spec["x"] == 0 else 0.0)
    return {"x": spec["x"]}


def test_after_a_failed_run_in_parallel_no_other_run_starts_and_the_running_one_is_kept(tmp_path):
    specs = [{"x": x, "dir": str(tmp_path)} for x in range(6)]
    with pytest.raises(RuntimeError, match="run 1 crashed"):
        run_many(specs, jobs=2, worker=_started, cache=tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.glob("started_*")) == ["started_0", "started_1"]
    assert [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")] == [{"x": 0}]


def _sleepy(spec: dict) -> dict:
    """A worker that says it has started (a file in ``spec["started"]``) and then takes a second."""
    Path(spec["started"], str(spec["x"])).touch()
    time.sleep(1.0)
    return {"spec": spec, "x": spec["x"]}


class _Killed(Exception):
    """What SIGTERM raises here should run_many not handle it: the test fails instead of dying."""


def test_sigterm_to_the_parent_keeps_the_runs_under_way_and_starts_no_more(tmp_path):
    import os
    import signal
    import threading

    from matryoshka.stop_signals import Interrupted

    started = tmp_path / "started"
    started.mkdir()
    specs = [{"x": x, "started": str(started)} for x in range(6)]

    def kill_when_both_workers_run() -> None:
        deadline = time.monotonic() + 120
        while len(list(started.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    def killed(signum, frame):
        raise _Killed

    previous = signal.signal(signal.SIGTERM, killed)
    try:
        threading.Thread(target=kill_when_both_workers_run, daemon=True).start()
        with pytest.raises(Interrupted, match=rf"^study: stopped with 2 of 6 runs finished, kept in "
                                              rf"{tmp_path / 'cache'}; the same command continues") as stop:
            run_many(specs, jobs=2, worker=_sleepy, cache=tmp_path / "cache", desc="study")
        assert signal.getsignal(signal.SIGTERM) is killed  # the handler that was there is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.signal == signal.SIGTERM and stop.value.exit_code == 128 + signal.SIGTERM
    assert sorted(p.name for p in started.iterdir()) == ["0", "1"]  # no run started after the signal
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2  # the two under way finished and were kept


def test_the_cli_exits_with_the_signal_that_stopped_a_study(tmp_path, monkeypatch):
    import signal

    from matryoshka.__main__ import main
    from matryoshka.experiments import orthogonality
    from matryoshka.stop_signals import Interrupted

    def stopped(*args, **kwargs):
        raise Interrupted("orthogonality: stopped with 3 of 10 runs finished", signal.SIGTERM)

    monkeypatch.setattr(orthogonality, "run_many", stopped)
    with pytest.raises(SystemExit) as exit_:
        main(["orthogonality", "--quick", "--out", str(tmp_path)])
    assert exit_.value.code == 128 + signal.SIGTERM
