"""The spin barrier (lstm_infer/gang.py) that gangs of threads meet at between steps."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from lstm_infer import gang
from lstm_infer.workers import Workers


@njit(nogil=True, cache=True)
def _rounds(flags, me, members, slots, rounds, stale):
    """Each round every member writes the round into its slot, meets the others, then reads every slot:
    a slot below the round means the barrier let a member through early. A second meeting keeps anyone
    from writing the next round before all have read."""
    for r in range(1, rounds + 1):
        slots[me * 16] = r
        gang.arrive_wait(flags, me, members, 2 * r - 1)
        for k in range(members):
            if slots[k * 16] != r:
                stale[me] += 1
        gang.arrive_wait(flags, me, members, 2 * r)


@pytest.mark.parametrize("members", [1, 2, 3])
def test_arrive_wait_holds_everyone_until_all_arrive(members):
    """3 members on a 2-core machine also exercises the yielding path."""
    wk = Workers(members)
    slots, stale = np.zeros(16 * members, np.int64), np.zeros(members, np.int64)
    flags = gang.new_flags(members)
    wk.gang(lambda me, n: _rounds(flags, me, n, slots, 2000, stale), members)
    assert stale.tolist() == [0] * members
    assert (slots[::16] == 2000).all()


def test_gang_needs_enough_threads():
    with pytest.raises(ValueError, match="needs as many threads"):
        Workers(2).gang(lambda me, n: None, 3)
