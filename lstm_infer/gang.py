"""A spin barrier for gangs of threads that run a whole loop of steps together.

A Numba parallel region per recurrent step costs 5-10 us on this 2-core host (TBB's fork and join),
against a 25 us batch-1 step of a 512-unit LSTM: a third of the time. A gang instead starts once per
chunk of steps: each member (a Python worker thread running a nogil kernel, workers.Workers.gang) owns
the same hidden units for every step, so it also reads the same rows of W_hh, and the members meet at
``arrive_wait`` between steps, which costs ~55 ns when nobody is late.

The flags are one int64 per member, 128 bytes apart (no false sharing), each written only by its member:
a release store of the phase it finished; the others wait with acquire loads until every flag reaches
the phase. The flags start at zero for each gang and phases count up from 1. A waiter spins with the
CPU's pause hint and yields its core after a few thousand turns, so an oversubscribed host degrades to
context switches rather than burnt time slices.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

STRIDE = 16  # int64 per member's flag
SPINS = 4096  # turns of the pause hint before a waiter starts yielding its core
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _load_acquire(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.load_atomic(builder.inttoptr(args[0], ir.IntType(64).as_pointer()), "acquire", 8)

    return types.int64(types.uintp), codegen


@intrinsic
def _store_release(typingctx, addr, value):
    def codegen(context, builder, signature, args):
        builder.store_atomic(args[1], builder.inttoptr(args[0], ir.IntType(64).as_pointer()), "release", 8)
        return context.get_dummy_value()

    return types.void(types.uintp, types.int64), codegen


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
        fn = ir.FunctionType(ir.IntType(32), [])
        builder.call(cgutils.get_or_insert_function(builder.module, fn, "sched_yield"), [])
        return context.get_dummy_value()

    return types.void(), codegen


def new_flags(members: int) -> np.ndarray:
    """Zeroed flags for one gang of ``members`` threads."""
    return np.zeros(members * STRIDE, np.int64)


@njit(cache=True, nogil=True)
def arrive_wait(flags, me, members, phase):
    """Member ``me`` has finished ``phase`` (1, 2, ...); return once all ``members`` have.

    Everything a member wrote before arriving is visible to every member after the wait (release/acquire).
    """
    if members == 1:
        return
    base = flags.ctypes.data
    _store_release(base + me * (STRIDE * 8), phase)
    for k in range(members):
        spins = 0
        while _load_acquire(base + k * (STRIDE * 8)) < phase:
            _pause()
            spins += 1
            if spins > SPINS:
                _yield()
