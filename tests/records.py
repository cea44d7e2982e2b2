"""Comparing a recomputation with a record committed to the repository.

The records (docs/experiments/*.json, docs/reproduction/, the benchmark's JSON)
were computed on one CPU. XLA's CPU kernels differ between processors (vector
width, FMA, the thread count's split of a reduction) in the last bits of
float32, so a recomputation on another machine agrees with a record to
round-off, not bit for bit. Where both sides are computed in the same run,
tests compare exactly; against a record, they use these tolerances.
"""

from __future__ import annotations

import math
from typing import Any

#: Relative tolerance of a float recomputed against its record: float32 round-off (2**-24 = 6e-8 per
#: operation) accumulated over the sums and the N NMF iterations of a network stays far below it.
RECORD_RTOL = 1e-5
#: Absolute floor of the same comparison, for values that are round-off themselves (near zero).
RECORD_ATOL = 1e-7


def accuracy_tolerance(images: int, flips: int = 1) -> float:
    """How far a recomputed accuracy on ``images`` test images may lie from its record: ``flips``
    images whose two best logits are a round-off apart may go the other way on another CPU.
    """
    return flips / images + RECORD_ATOL


def _close(made: float, recorded: float, atol: float) -> bool:
    return math.isclose(made, recorded, rel_tol=RECORD_RTOL, abs_tol=max(atol, RECORD_ATOL))


#: The fraction of a histogram's values that may lie in a neighbouring bin in a recomputation: a value
#: within round-off of a bin edge may cross it (with 20 bins and values known to 1e-5, about 4e-4 of
#: uniformly spread values lie that close to an edge).
HISTOGRAM_MOVED_FRACTION = 1e-3


def assert_matches_record(
    made: Any, recorded: Any, *, atol: float = 0.0, histograms: bool = False, where: str = ""
) -> None:
    """``made`` equals ``recorded`` (nested dicts and lists of JSON values): the same keys, lengths,
    strings and booleans, floats within :data:`RECORD_RTOL` (or ``atol``, for accuracies see
    :func:`accuracy_tolerance`), and integers exactly; with ``histograms``, a list of integers is a
    histogram whose total is exact and of whose values :data:`HISTOGRAM_MOVED_FRACTION` may have
    moved to another bin.
    """
    if isinstance(recorded, dict):
        assert isinstance(made, dict) and made.keys() == recorded.keys(), (where, sorted(made), sorted(recorded))
        for key, value in recorded.items():
            assert_matches_record(made[key], value, atol=atol, histograms=histograms, where=f"{where}/{key}")
    elif isinstance(recorded, list):
        assert isinstance(made, list) and len(made) == len(recorded), (where, made, recorded)
        if histograms and recorded and all(type(value) is int for value in recorded):
            changed = sum(abs(a - b) for a, b in zip(made, recorded, strict=True))  # each move changes two bins
            allowed = 2 * math.ceil(HISTOGRAM_MOVED_FRACTION * sum(recorded))
            assert sum(made) == sum(recorded) and changed <= allowed, (where, made, recorded)
            return
        for index, (ours, theirs) in enumerate(zip(made, recorded, strict=True)):
            assert_matches_record(ours, theirs, atol=atol, histograms=histograms, where=f"{where}[{index}]")
    elif isinstance(recorded, float) and not isinstance(made, bool) and isinstance(made, (int, float)):
        assert _close(float(made), recorded, atol), (where, made, recorded)
    else:
        assert type(made) is type(recorded) and made == recorded, (where, made, recorded)


#: How far a short training may end from its record on another machine. Training amplifies round-off:
#: the quick start's 40 steps, rerun on this CPU with XLA limited to SSE4.2 or with one device instead of
#: two, moved the losses by up to 2e-4 (relative) and the accuracies by up to 4 of 2,000 images.
TRAINING_LOSS_RTOL = 1e-3
TRAINING_ACCURACY_ATOL = 0.01


def assert_training_matches_record(made: dict, recorded: dict) -> None:
    """A metrics row of a rerun training against its recorded row: the same epoch, losses within
    :data:`TRAINING_LOSS_RTOL`, accuracies within :data:`TRAINING_ACCURACY_ATOL`.
    """
    assert made["epoch"] == recorded["epoch"]
    for key in ("train_loss", "test_loss"):
        assert math.isclose(made[key], recorded[key], rel_tol=TRAINING_LOSS_RTOL), (key, made[key], recorded[key])
    for key in ("train_accuracy", "test_accuracy"):
        assert abs(made[key] - recorded[key]) <= TRAINING_ACCURACY_ATOL, (key, made[key], recorded[key])
