"""``benchmarks.sanitize``'s tuning-launch cases (what ``make gpu`` runs under compute-sanitizer):
they agree with the default launch, and a launch that computes something else is reported."""

from __future__ import annotations

import torch

from benchmarks import sanitize

from .conftest import DEVICE


def test_the_tuning_launches_agree_with_the_default_launch(one_thread):
    cases, failures = sanitize.launch_cases(sanitize.SHAPES[:1], {"fp32": torch.float32}, DEVICE, (False, True), 0)
    assert (cases, failures) == (2 * len(sanitize.LAUNCHES), 0)


def test_a_launch_that_differs_is_a_failure(monkeypatch, one_thread, capsys):
    real = sanitize.run_candidate

    def wrong_dw_for_tuned_launches(launch, inputs):
        out = real(launch, inputs)
        return out if launch is None else (*out[:4], 2 * out[4])

    monkeypatch.setattr(sanitize, "run_candidate", wrong_dw_for_tuned_launches)
    cases, failures = sanitize.launch_cases(sanitize.SHAPES[:1], {"fp32": torch.float32}, DEVICE, (False,), 0)
    assert failures == cases == len(sanitize.LAUNCHES)
    assert capsys.readouterr().out.count("FAIL sparse fp32") == cases
