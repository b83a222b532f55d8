"""The GPU compaction check's verdict: it passes only when blocks moved, nothing changed, and
the no-copy control shows that a lost copy would have changed something."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Loaded from its file: scripts/gpu on sys.path would make its sglang/ folder shadow SGLang
# (a namespace package) for every test collected after this one.
_spec = importlib.util.spec_from_file_location(
    "compaction_check", Path(__file__).resolve().parents[2] / "scripts" / "gpu" / "compaction_check.py"
)
assert _spec is not None and _spec.loader is not None
_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_check)
max_delta, verdict = _check.max_delta, _check.verdict


def run(tokens: list[list[int]], logprobs: list[list[float]], moved: int = 12) -> dict:
    return {"tokens": tokens, "logprobs": logprobs, "moved_blocks": moved}


OFF = run([[5, 6, 7], [8, 9]], [[-0.5, -1.0, -2.0], [-0.25, -0.75]], moved=0)


def copy_of(r: dict, moved: int = 12, at: dict | None = None) -> dict:
    """``r`` with ``moved`` blocks moved and, at each (request, position) of ``at``, another
    (token, logprob)."""
    out = run([list(t) for t in r["tokens"]], [list(lp) for lp in r["logprobs"]], moved)
    for (req, pos), (token, logprob) in (at or {}).items():
        out["tokens"][req][pos], out["logprobs"][req][pos] = token, logprob
    return out


def test_passes_when_moved_blocks_change_nothing_and_the_control_changes_something():
    control = copy_of(OFF, at={(0, 1): (6, -1.5)})
    passed, line = verdict(OFF, copy_of(OFF), control)
    assert passed
    assert line.startswith("PASS: tokens and logprobs on = off for 2/2 requests (12 blocks moved, max |dlogprob| 0)")
    assert line.endswith("without the copy 1 differ (max |dlogprob| 0.5)")


def test_one_changed_logprob_fails_even_with_the_same_tokens():
    on = copy_of(OFF, at={(1, 1): (9, -0.7490234375)})
    passed, line = verdict(OFF, on, copy_of(OFF, at={(0, 0): (4, -3.0)}))
    assert not passed
    assert line.startswith("FAIL (compaction changed the output): tokens and logprobs on = off for 1/2 requests")


def test_nothing_moved_proves_nothing():
    passed, line = verdict(OFF, copy_of(OFF, moved=0), copy_of(OFF, at={(0, 0): (4, -3.0)}))
    assert not passed and line.startswith("FAIL (no block moved)")


def test_a_control_that_changes_nothing_fails_the_check():
    passed, line = verdict(OFF, copy_of(OFF), copy_of(OFF))
    assert not passed
    assert line.startswith("FAIL (the control changed nothing, so a lost copy could not show)")


def test_a_control_that_moved_nothing_says_so_and_fails():
    passed, line = verdict(OFF, copy_of(OFF), copy_of(OFF, moved=0, at={(0, 0): (4, -3.0)}))
    assert not passed and line.startswith("FAIL (the control moved no block)")


def test_a_failed_run_fails_the_check():
    assert verdict(OFF, {"rc": -6, "crashes": []}, copy_of(OFF)) == (False, "FAIL: a run failed")


def test_max_delta_counts_the_first_differing_token_and_nothing_after_it():
    b = copy_of(OFF, at={(0, 1): (60, -1.25)})
    b["logprobs"][0][2] = -9.0  # after the first differing token: another context, not counted
    assert max_delta(OFF, b) == 0.25
    assert max_delta(OFF, OFF) == 0.0


def test_max_delta_compares_runs_of_different_lengths_up_to_the_shorter():
    b = copy_of(OFF)
    b["tokens"][1], b["logprobs"][1] = [8], [-0.5]
    assert max_delta(OFF, b) == 0.25
