"""Gangs of threads that run a whole loop of steps together, sharing each step's blocks of work.

A Numba parallel region per recurrent step costs 5-10 us on this 2-core host (TBB's fork and join),
against a 25 us batch-1 step of a 512-unit LSTM: a third of the time. A gang instead starts once per
chunk of steps (its members are Python worker threads running a nogil kernel, workers.Workers.gang) and
hands out each step's blocks through atomic counters:

    for each step s:   while (k = take(counters, s, me, ...)) >= 0: work on block k; finish(counters, s, ...)
                       wait_all(counters, s, ...)     # the next step reads every block's output

Each member owns a share of the blocks and does them step after step (its rows of W_hh and of the state
stay in its cache), but takes another's leftovers once its own are done. So a member the OS has not
scheduled (after an idle spell Linux may wake both on one core and spread them only later) holds
nothing up: with fixed shares and a barrier, a bundled-model batch ran at 51 instead of 28 ms after
0.2 s of idle. Handing every block to whoever asked first cost 15% in steady state (30.7 vs 27.6 ms):
blocks changed cores from step to step.

Counters sit 128 bytes apart (no false sharing). A waiter spins with the CPU's pause hint and
yields its core after a few thousand turns, so an oversubscribed host degrades to context switches
rather than burnt time slices.
"""

from __future__ import annotations

import os
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

STRIDE = 16  # int64 per counter
SPINS = 4096  # turns of the pause hint before a waiter starts yielding its core
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _load_acquire(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.load_atomic(builder.inttoptr(args[0], ir.IntType(64).as_pointer()), "acquire", 8)

    return types.int64(types.uintp), codegen


@intrinsic
def _pause(typingctx):
    def codegen(context, builder, signature, args):
        if _X86:
            fn = ir.FunctionType(ir.VoidType(), [])
            builder.call(cgutils.get_or_insert_function(builder.module, fn, "llvm.x86.sse2.pause"), [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _yield(typingctx):
    def codegen(context, builder, signature, args):
        if os.name == "posix":  # elsewhere the waiter only spins
            fn = ir.FunctionType(ir.IntType(32), [])
            builder.call(cgutils.get_or_insert_function(builder.module, fn, "sched_yield"), [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _fetch_add(typingctx, addr, value):
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", ptr, args[1], "acq_rel")

    return types.int64(types.uintp, types.int64), codegen


def new_counters(steps: int, members: int) -> np.ndarray:
    """Zeroed counters for ``steps`` steps of block sharing among ``members``."""
    return np.zeros((steps, (members + 1) * STRIDE), np.int64)


@njit(cache=True, nogil=True)
def take(counters, s, me, members, blocks):
    """A block of step s for member ``me``, or -1 when none is left. Member m owns blocks
    [blocks*m/members, blocks*(m+1)/members) and takes them first, in order, then takes the others'
    leftovers: each block is handed out once, and a member that keeps up keeps its own units (and their
    weights, state and scratch in its cache) from step to step."""
    base = counters[s].ctypes.data
    for i in range(members):
        m = (me + i) % members
        lo, hi = blocks * m // members, blocks * (m + 1) // members
        if lo + _load_acquire(base + m * (STRIDE * 8)) >= hi:
            continue  # a plain look first: no atomic on a share that is gone
        k = lo + _fetch_add(base + m * (STRIDE * 8), 1)
        if k < hi:
            return k
    return -1


@njit(cache=True, nogil=True)
def finish(counters, s, members):
    """One block of step s is done; what its taker wrote is visible to whoever wait_all sees it."""
    _fetch_add(counters[s].ctypes.data + members * (STRIDE * 8), 1)


@njit(cache=True, nogil=True)
def wait_all(counters, s, members, blocks):
    """Return once all ``blocks`` blocks of step s are finished."""
    addr = counters[s].ctypes.data + members * (STRIDE * 8)
    spins = 0
    while _load_acquire(addr) < blocks:
        _pause()
        spins += 1
        if spins > SPINS:
            _yield()
