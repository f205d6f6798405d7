"""A register-blocked float32 GEMM micro-kernel written in LLVM IR, for the fused recurrent steps.

Numba's own loops reach ~65% of the sgemm peak on a step's W_hh @ h: LLVM vectorises a dot product
along K and pays a horizontal reduction per output, and it never keeps an outer-product tile in
registers. ``panel`` is that tile, spelled out as vector IR through numba.extending.intrinsic:

    out[r, 0:16*NV] = sum_k w[r, k] * h[k, 0:16*NV]      for r < R

R*NV accumulators of 16 floats live in registers for the whole K loop; each k loads NV vectors of h
and broadcasts R weights, so every weight loaded feeds NV FMAs and every h vector R of them. Measured
on one Zen 5 core (K = 512-650): R=8 x NV=2 260 GFLOP/s, R=8 x NV=3 272, R=6 x NV=4 268, against 260
for OpenBLAS's 4096^3 sgemm; R=12 x NV=2 spills and drops to 144.

LLVM lowers the <16 x float> operations to whatever the CPU has (AVX-512: one zmm each; AVX2: two
ymm), so the code stays portable. ``tests/test_fused.py`` checks it against NumPy.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .kernels import FAST

LANES = 16  # floats per vector: one AVX-512 register
ROWS = (0, 8, 8, 8, 6)  # tile rows R for NV = 1..4 vectors of batch columns (24-32 registers in use)


def _make_panel(R: int, NV: int, segments: int = 1):
    """The intrinsic panel(w, ldw, h, ldh, K, out, ldo) for one tile shape; pointers are integer addresses
    of float32 data, ld* row strides in floats. With ``segments=2`` it is panel(w, ldw, h, ldh, K,
    w2, ldw2, h2, ldh2, K2, out, ldo): out = w h + w2 h2, the accumulators carried from the first loop to
    the second (a layer's input and recurrent products in one tile, without storing it in between)."""

    seg = (types.uintp, types.intp, types.uintp, types.intp, types.intp)
    sig = types.void(*(seg * segments), types.uintp, types.intp)

    def codegen(context, builder, signature, args):
        out, ldo = args[-2:]
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        vec = ir.VectorType(f32, LANES)
        pf, pv = f32.as_pointer(), vec.as_pointer()
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), "llvm.fma.v16f32")
        op = builder.inttoptr(out, pf)
        undef = ir.Constant(vec, ir.Undefined)
        splat = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
        cur = [ir.Constant(vec, None)] * (R * NV)  # zeros
        for sg in range(segments):
            w, ldw, h, ldh, K = args[5 * sg:5 * sg + 5]
            wp, hp = builder.inttoptr(w, pf), builder.inttoptr(h, pf)
            pre = builder.block
            loop = builder.append_basic_block("panel.loop")
            done = builder.append_basic_block("panel.done")
            builder.cbranch(builder.icmp_signed(">", K, ir.Constant(i64, 0)), loop, done)

            builder.position_at_end(loop)
            k = builder.phi(i64)
            acc = [builder.phi(vec) for _ in range(R * NV)]
            hrow = builder.gep(hp, [builder.mul(k, ldh)])
            hv = [builder.load(builder.bitcast(builder.gep(hrow, [ir.Constant(i64, LANES * v)]), pv), align=4)
                  for v in range(NV)]
            new = []
            for r in range(R):
                wk = builder.load(builder.gep(wp, [builder.add(builder.mul(ir.Constant(i64, r), ldw), k)]),
                                  align=4)
                wb = builder.shuffle_vector(builder.insert_element(undef, wk, ir.Constant(i32, 0)), undef, splat)
                new += [builder.call(fma, [wb, hv[v], acc[r * NV + v]]) for v in range(NV)]
            k1 = builder.add(k, ir.Constant(i64, 1))
            end = builder.block
            k.add_incoming(ir.Constant(i64, 0), pre)
            k.add_incoming(k1, end)
            for a, n, c in zip(acc, new, cur):
                a.add_incoming(c, pre)
                a.add_incoming(n, end)
            builder.cbranch(builder.icmp_signed("<", k1, K), loop, done)

            builder.position_at_end(done)
            res = [builder.phi(vec) for _ in range(R * NV)]  # phis first: LLVM wants them atop the block
            for p, n, c in zip(res, new, cur):
                p.add_incoming(c, pre)
                p.add_incoming(n, end)
            cur = res
        for r in range(R):
            orow = builder.gep(op, [builder.mul(ir.Constant(i64, r), ldo)])
            for v in range(NV):
                dst = builder.bitcast(builder.gep(orow, [ir.Constant(i64, LANES * v)]), pv)
                builder.store(cur[r * NV + v], dst, align=4)
        return context.get_dummy_value()

    if segments == 1:
        @intrinsic
        def panel(typingctx, w, ldw, h, ldh, K, out, ldo):
            return sig, codegen
    else:
        @intrinsic
        def panel(typingctx, w, ldw, h, ldh, K, w2, ldw2, h2, ldh2, K2, out, ldo):
            return sig, codegen
    return panel


# Few rows by 64 columns (4 vectors), for decoding: R = 1..6 rows (beams, samples) broadcast against 64
# output columns of a transposed weight matrix; 4R accumulators, no horizontal sums. The 6-row one is also
# rows_gemm's 4-vector tile (ROWS[4] = 6).
_S1, _S2, _S3, _S4, _S5, _S6 = (_make_panel(r, 4) for r in range(1, 7))
SMALL_ROWS = 6
_P1, _P2, _P3 = (_make_panel(ROWS[nv], nv) for nv in (1, 2, 3))
_P4 = _S6
_Q1, _Q2, _Q3, _Q4 = (_make_panel(ROWS[nv], nv, 2) for nv in (1, 2, 3, 4))
_F4 = np.intp(4)  # bytes per float32


@njit(**FAST)
def small_rows(nr, w, ldw, h, ldh, K, out, ldo):
    """out[r, 0:64] = sum_k w[r, k] * h[k, 0:64] for r < nr <= SMALL_ROWS; pointers and strides as in
    ``panel`` (w: the rows, h: 64 columns of a (K, *) matrix, out: (nr, *))."""
    if nr == 1:
        _S1(w, ldw, h, ldh, K, out, ldo)
    elif nr == 2:
        _S2(w, ldw, h, ldh, K, out, ldo)
    elif nr == 3:
        _S3(w, ldw, h, ldh, K, out, ldo)
    elif nr == 4:
        _S4(w, ldw, h, ldh, K, out, ldo)
    elif nr == 5:
        _S5(w, ldw, h, ldh, K, out, ldo)
    else:
        _S6(w, ldw, h, ldh, K, out, ldo)


@njit(**FAST)
def _panels(nv, w, ldw, h, ldh, K, out, ldo):
    if nv == 1:
        _P1(w, ldw, h, ldh, K, out, ldo)
    elif nv == 2:
        _P2(w, ldw, h, ldh, K, out, ldo)
    elif nv == 3:
        _P3(w, ldw, h, ldh, K, out, ldo)
    else:
        _P4(w, ldw, h, ldh, K, out, ldo)


@njit(**FAST)
def rows_gemm(w, r0, r1, h, out, o0, wide):
    """out[o0 + i, :] = w[r0 + i] @ h for i < r1 - r0: w (M, K), h (K, N), out (*, N), all C-contiguous,
    N a multiple of LANES, r1 - r0 >= 8 (a short tail re-runs rows of the tile before it).

    Columns go in groups of up to 3 vectors (8-row tiles), or 4 (6-row tiles) when ``wide``: 4 reads the
    weights fewer times (the head's 10k-row matrix), 3 suits short row ranges (a step's 8-16 units per
    gate, where 6-row tiles would re-run a third of the rows). Four vectors' worth take 2 + 2.
    """
    K, N = h.shape
    wp, hp, op = w.ctypes.data, h.ctypes.data, out.ctypes.data
    c0 = 0
    while c0 < N:
        left = (N - c0) // LANES
        nv = min(4, left) if wide else (2 if left == 4 else min(3, left))
        R = ROWS[nv]
        r = r0
        while r < r1:
            rr = min(r, r1 - R)
            _panels(nv, wp + rr * K * _F4, K, hp + c0 * _F4, N, K, op + ((o0 + rr - r0) * N + c0) * _F4, N)
            r += R
        c0 += nv * LANES


@njit(**FAST)
def _panels2(nv, w, ldw, h, ldh, K, w2, ldw2, h2, ldh2, K2, out, ldo):
    if nv == 1:
        _Q1(w, ldw, h, ldh, K, w2, ldw2, h2, ldh2, K2, out, ldo)
    elif nv == 2:
        _Q2(w, ldw, h, ldh, K, w2, ldw2, h2, ldh2, K2, out, ldo)
    elif nv == 3:
        _Q3(w, ldw, h, ldh, K, w2, ldw2, h2, ldh2, K2, out, ldo)
    else:
        _Q4(w, ldw, h, ldh, K, w2, ldw2, h2, ldh2, K2, out, ldo)


@njit(**FAST)
def rows_gemm2(w, h, w2, h2, r0, r1, out, o0):
    """out[o0 + i, :] = w[r0 + i] @ h + w2[r0 + i] @ h2 for i < r1 - r0: w (M, K), h (K, N), w2 (M, K2),
    h2 (K2, N), out (*, N), as rows_gemm with ``wide`` False. Both products sum in the tile's registers,
    so a tail that re-runs rows of the tile before it writes the same values again."""
    K, N = h.shape
    K2 = h2.shape[0]
    wp, hp, w2p, h2p, op = w.ctypes.data, h.ctypes.data, w2.ctypes.data, h2.ctypes.data, out.ctypes.data
    c0 = 0
    while c0 < N:
        left = (N - c0) // LANES
        nv = 2 if left == 4 else min(3, left)
        R = ROWS[nv]
        r = r0
        while r < r1:
            rr = min(r, r1 - R)
            _panels2(nv, wp + rr * K * _F4, K, hp + c0 * _F4, N, K, w2p + rr * K2 * _F4, K2, h2p + c0 * _F4, N, K2,
                     op + ((o0 + rr - r0) * N + c0) * _F4, N)
            r += R
        c0 += nv * LANES
