"""Retry delays: exponential from a first delay, capped, and jittered.

Every loop that retries something it does not control waits this way: a failed handler or a lost
database in a runner (`runner/error_policy.py`), the listener's and the ownership session's
reconnects (`daemon/listener.py`, `daemon/ownership.py`), and the dispatcher's pause after a
version conflict (`commands/dispatch.py`, which jitters over the whole nominal delay). The
jitter (between half and all of the nominal delay) keeps daemons that lost the same server from
coming back in step. One function, so the bounds are stated and tested once
(tests/unit/test_error_policy.py).
"""

from __future__ import annotations

import random

_MAX_DOUBLINGS = 64  # beyond any cap in use; keeps 2**step a finite float


def nominal_delay(step: int, first: float, cap: float) -> float:
    """`first` doubled `step` times, at most `cap` (seconds)."""
    return min(cap, first * 2.0 ** min(step, _MAX_DOUBLINGS))


def jittered_delay(step: int, first: float, cap: float) -> float:
    """The nominal delay of `step`, times a random factor in [0.5, 1]."""
    return nominal_delay(step, first, cap) * random.uniform(0.5, 1.0)
