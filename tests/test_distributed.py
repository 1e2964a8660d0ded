"""Data-parallel training on two gloo ranks on the CPU: 2 ranks x batch B/2 reach the parameters of
1 rank x batch B (float tolerance), the ranks stay bit-identical, BatchTopK's threshold and the
adaptive L1 coefficient are synchronised, the decoder orthogonality penalty's random chunks agree,
dead latents are restarted alike, rank 0 writes checkpoints, and a checkpoint resumes under another
world size."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from matryoshka import distributed
from matryoshka.train import TrainingInterrupted, train
from tests.tiny_runs import final_state, on_second_chunk, poisoned_sample, sample, tiny_config, tiny_sae

# Two ranks that have not finished by then are hung (a lost collective, a deadlock at teardown): they
# are killed and the test fails, instead of holding CI until its limit.  A healthy run takes < 10 s.
RANKS_TIMEOUT_S = 300

# relu: the adaptive L1 coefficient; topk: per-row selection and the AuxK loss; batchtopk: the
# batch-global selection, its threshold and row width.  Enough steps for re-sorts and dead latents.
ACTIVATIONS = ("relu", "topk", "batchtopk")
STEPS = 20
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float32: the two half-batch means sum in another order


def _config(activation: str, **overrides):
    if activation == "relu":  # near the L0 it reaches: the clipped update must not saturate
        overrides["target_l0"] = 6.0
        # and the decoder orthogonality penalty in random chunks (12 latents, chunks of <= 5): every
        # rank must draw the same chunks, as one process does
        overrides |= {"orthogonality_coeff": 0.5, "orthogonality_chunk": 5}
    if activation == "topk":  # dead latents restarted on the residuals of the whole (all-gathered) batch
        overrides |= {"resample_every": 5, "dead_after": 1}
    return tiny_config(activation, steps=STEPS, checkpoint_every=10, **overrides)


def _run(activation: str, folder: Path | None = None, resume: bool = False) -> dict:
    sae = tiny_sae(activation)
    history = train(sae, sample, _config(activation), checkpoint_dir=folder, resume=resume).history
    return {"state": final_state(sae), "history": history, "row_width": sae.row_width}


def _ddp_models_alive() -> int:
    # Without gc.collect(): a DDP model freed only by the garbage collector could outlive the group.
    return sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())


def _rank_main(rank: int, folder: Path) -> None:
    """One of two ranks: every scenario, results to ``folder / f"rank{rank}.pt"``."""
    results = {a: _run(a, folder / f"ddp_{a}") for a in ACTIVATIONS}
    results["resumed"] = _run("relu", folder / "from_one_rank", resume=True)
    try:
        train(tiny_sae("topk"), sample, _config("topk", batch_size=15))
    except ValueError as exc:
        results["odd_batch"] = str(exc)
    results["ddp_models_alive"] = _ddp_models_alive()
    results["stopped"] = _stopped_by_a_signal_to_rank_one(rank, folder / "ddp_stopped")
    with warnings.catch_warnings(record=True) as caught:  # rank 0 says it, once for the run
        warnings.simplefilter("always")
        train(tiny_sae("relu"), sample, tiny_config("relu", steps=4, checkpoint_every=0), checkpoint_dir=folder / "none",
              resume=True)
    results["warnings"] = sorted(str(w.message).split(":")[0] for w in caught if w.category is UserWarning)
    try:
        train(tiny_sae("topk"), poisoned_sample(7, float("nan")), _config("topk"))
    except ValueError as exc:
        # Counted while the error is in flight: where the CLI's `finally` destroys the group.
        results["ddp_models_alive_in_error"] = _ddp_models_alive()
        results["nan_error"] = str(exc)
    torch.save(results, folder / f"rank{rank}.pt")


def _stopped_by_a_signal_to_rank_one(rank: int, folder: Path) -> dict:
    """Rank 1 alone gets SIGTERM while drawing its data for step 4; what each rank's stop says."""
    def signal_rank_one(data):
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    sampler = on_second_chunk(signal_rank_one)
    try:
        train(tiny_sae("relu"), sampler, _config("relu"), checkpoint_dir=folder)
    except TrainingInterrupted as stop:
        return {"signal": stop.signal.name, "step": stop.step, "checkpoint": stop.checkpoint}
    return {"signal": None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, Path]:
    """(one-rank results, [rank 0, rank 1] results, folder)."""
    folder = tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {a: _run(a, folder / f"single_{a}") for a in ACTIVATIONS}
        # The two ranks resume the one-rank relu run from its step-10 checkpoint.
        shutil.copytree(folder / "single_relu" / "step_0000010", folder / "from_one_rank" / "step_0000010")
        _run_two_ranks(_rank_main, folder)
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return single, ranks, folder


def _in_group(rank: int, main, folder: Path, *args) -> None:
    """One rank: one thread, a fresh gloo group, ``main(rank, folder, *args)``, then the group
    destroyed.  ``main`` has returned by then, so whatever DDP model it made is gone first: a DDP model
    that outlives its group owns it last, and freeing it runs gloo's destructor with the GIL held, which
    joins a worker thread that may still need the GIL (a deadlock; CI hung on it once)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=2)
    try:
        main(rank, folder, *args)
    finally:
        dist.destroy_process_group()


def _run_two_ranks(main, folder: Path, *args) -> None:
    """``main(rank, folder, *args)`` on ranks 0 and 1 of a gloo group (``_in_group``), each in a
    process of its own; fails after ``RANKS_TIMEOUT_S``, with both processes killed.

    The processes come from a fork server: a fresh, single-threaded interpreter that imports torch and
    this module once for the session, so the ranks inherit nothing of the suite (this file takes ~6 s
    longer than with forked ranks: 9.2 s against 3.5 s on a quiet 2-core machine).
    Forking pytest itself would copy a process that by then runs other threads (OpenMP's, Triton's),
    with whatever locks they hold (Python 3.12 warns about such forks).
    """
    forkserver = mp.get_context("forkserver")
    forkserver.set_forkserver_preload(["torch", "matryoshka.train", __name__])
    ranks = mp.start_processes(_in_group, args=(main, folder, *args), nprocs=2, join=False, start_method="forkserver")
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    while not ranks.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"{main.__name__}: the two ranks did not finish within {RANKS_TIMEOUT_S} s (killed)")


def _assert_close_runs(got: dict, want: dict) -> None:
    for name, value in want["state"].items():
        if name != "row_stats":  # rank-local counters
            torch.testing.assert_close(got["state"][name], value, **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")
    assert [row["step"] for row in got["history"]] == [row["step"] for row in want["history"]]
    for key in ("loss", "recon", "l0", "sparsity_coeff"):
        torch.testing.assert_close(torch.tensor([row[key] for row in got["history"]], dtype=torch.float64),
                                   torch.tensor([row[key] for row in want["history"]], dtype=torch.float64),
                                   **TOLERANCE, msg=lambda m, k=key: f"history {k}: {m}")
    assert [row["dead"] for row in got["history"]] == [row["dead"] for row in want["history"]]
    assert [row.get("resampled") for row in got["history"]] == [row.get("resampled") for row in want["history"]]
    assert got["row_width"] == want["row_width"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_two_ranks_with_half_batches_equal_one_rank(runs, activation):
    single, ranks, _ = runs
    _assert_close_runs(ranks[0][activation], single[activation])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ranks_stay_bit_identical(runs, activation):
    """Parameters, the BatchTopK threshold, the adaptive coefficient, the permutations: all equal."""
    _, ranks, _ = runs
    a, b = ranks[0][activation], ranks[1][activation]
    for name, value in a["state"].items():
        if name != "row_stats":
            assert torch.equal(value, b["state"][name]), name
    assert a["history"] == b["history"] and a["row_width"] == b["row_width"]


def test_two_ranks_restart_dead_latents_as_one_rank_does(runs):
    """The restarts themselves are compared by the two tests above (counts in the history, the
    restarted parameters in the state); this one makes sure there are some to compare."""
    single, ranks, _ = runs
    assert single["topk"]["history"][-1]["resampled"] >= 2
    assert ranks[0]["topk"]["history"][-1]["resampled"] == single["topk"]["history"][-1]["resampled"]


def test_batchtopk_threshold_and_adaptive_l1_are_synchronised(runs):
    single, ranks, _ = runs
    for rank in ranks:
        torch.testing.assert_close(rank["batchtopk"]["state"]["threshold"], single["batchtopk"]["state"]["threshold"],
                                   **TOLERANCE)
    assert float(single["batchtopk"]["state"]["threshold"]) > 0, "the threshold EMA must have started"
    coeffs = [row["sparsity_coeff"] for row in single["relu"]["history"]]
    assert len(set(coeffs)) == len(coeffs), "the adaptive coefficient must move every interval"


def test_rank_zero_writes_checkpoints_any_world_size_resumes(runs, one_thread):
    single, ranks, folder = runs
    assert sorted(p.name for p in (folder / "ddp_relu").iterdir()) == ["step_0000010", "step_0000020"]
    # One rank's checkpoint resumed by two ranks, and two ranks' checkpoint resumed by one.
    _assert_close_runs(ranks[0]["resumed"], single["relu"])
    shutil.copytree(folder / "ddp_relu" / "step_0000010", folder / "from_two_ranks" / "step_0000010")
    _assert_close_runs(_run("relu", folder / "from_two_ranks", resume=True), single["relu"])


def test_only_rank_zero_warns_of_a_folder_it_will_not_write(runs):
    assert [rank["warnings"] for rank in runs[1]] == [["checkpoint_dir '{}' is given but checkpoint_every is 0".format(
        runs[2] / "none"), "resume"], []]


def test_batch_must_split_evenly(runs):
    assert runs[1][0]["odd_batch"] == "batch_size=15 must be divisible by the world size 2"


def test_train_frees_its_ddp_model_before_the_group_is_destroyed(runs):
    """A DDP model that outlives its process group deadlocks at teardown (distributed.data_parallel):
    ``train`` frees it when it returns, and when it raises, before the caller handles the error."""
    assert [rank["ddp_models_alive"] for rank in runs[1]] == [0, 0]
    assert all("steps 4..7" in rank["nan_error"] for rank in runs[1])  # after 4 DDP steps
    assert [rank["ddp_models_alive_in_error"] for rank in runs[1]] == [0, 0]


def test_a_signal_to_one_rank_stops_both_at_the_next_read_out_with_a_checkpoint(runs, one_thread):
    """The ranks agree at the read-out after step 6 (log_every 3); rank 0 writes the checkpoint
    there (none was due before step 10), and a one-process resume ends where an unstopped run ends."""
    single, ranks, folder = runs
    assert [rank["stopped"] for rank in ranks] == [
        {"signal": "SIGTERM", "step": 6, "checkpoint": folder / "ddp_stopped" / "step_0000006"},
        {"signal": "SIGTERM", "step": 6, "checkpoint": None},
    ]
    assert [p.name for p in (folder / "ddp_stopped").iterdir()] == ["step_0000006"]
    _assert_close_runs(_run("relu", folder / "ddp_stopped", resume=True), single["relu"])


class _Counter(torch.nn.Module):
    """A parameter and a buffer that start at the rank's number; each forward adds 1 to the buffer."""

    def __init__(self, rank: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((2,), float(rank)))
        self.register_buffer("count", torch.full((1,), float(rank)))

    def forward(self, x):
        self.count += 1
        return (x * self.weight).sum()


def _wrap_main(rank: int, folder: Path, old_torch: bool) -> None:
    if old_torch:  # torch < 2.13's path: no forward_sync_buffers argument
        distributed._has_forward_sync_buffers = lambda: False
    module = _Counter(rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers: deprecated in torch 2.13
        model = distributed.data_parallel(module, torch.device("cpu"))
    wrapped = dict(weight=module.weight.detach().clone(), count=module.count.clone())
    if rank == 1:
        module.count += 10  # rank-local from here on, as the BatchTopK counters after a restore
    model(torch.ones(2)).backward()
    torch.save(dict(wrapped=wrapped, count=module.count.clone()), folder / f"wrap{rank}.pt")


@pytest.mark.parametrize("old_torch", [False, True], ids=["forward_sync_buffers", "broadcast_buffers"])
def test_data_parallel_copies_rank_zeros_state_once_and_never_at_a_forward(tmp_path, old_torch):
    """What the trainer relies on, on torch 2.13 and on older torch (the H200 image's 2.11)."""
    _run_two_ranks(_wrap_main, tmp_path, old_torch)
    ranks = [torch.load(tmp_path / f"wrap{r}.pt") for r in range(2)]
    for r in ranks:  # rank 0's parameters and buffers everywhere after the wrap
        assert torch.equal(r["wrapped"]["weight"], torch.zeros(2)) and torch.equal(r["wrapped"]["count"], torch.zeros(1))
    assert [float(r["count"]) for r in ranks] == [1.0, 11.0]  # no buffer copy at the forward
