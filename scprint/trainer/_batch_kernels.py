"""Compiled inner loop of :mod:`scprint.trainer.batches` (numba, cached on disk).

Imported lazily: the first call compiles (~2 s) unless the on-disk cache is warm.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, inline="always")
def _next(state):
    """xorshift64* step: a fast generator for the per-gene draws (MT19937 costs ~4x)."""
    v = state[0]
    v ^= v >> np.uint64(12)
    v ^= v << np.uint64(25)
    v ^= v >> np.uint64(27)
    state[0] = v
    return v * np.uint64(2685821657736338717)


@numba.njit(cache=True, inline="always")
def _below(state, n):
    """A uniform integer in [0, n) (n < 2**32; Lemire's multiply-shift)."""
    return np.int64(((_next(state) >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


@numba.njit(cache=True, nogil=True)
def select_genes(
    data, index, token_of, starts, lengths, order, lo, hi, most_expr, seed, stamp, x, genes, depth
):
    """Fill ``x``/``genes``/``depth`` (batch rows) from the non-zeros of each read cell.

    Piece p = ``data/index[starts[p] : starts[p] + lengths[p]]`` is the cell of batch
    row ``order[p]``; ``token_of[index]`` is a non-zero's gene in the vocabulary (-1:
    none); a non-zero counts as expressed when its count is > 0 and its token
    lies in the row's organism block [lo, hi). Expressed genes first: all of them in gene
    order, or when there are more than L, a random L ("random expr") or the L highest
    counts, highest first, ties in gene order ("most expr"). Then distinct random genes of
    the block that the cell does not express, by rejection against ``stamp`` (one int
    per vocabulary gene; each row uses a new stamp value, so it is never cleared).
    """
    state = np.empty(1, dtype=np.uint64)
    state[0] = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) | np.uint64(1)
    B, L = x.shape
    mark = stamp[-1]
    idx = np.empty(lengths.max() if len(lengths) else 0, dtype=np.int64)
    for p in range(len(starts)):
        row = order[p]
        a, b = starts[p], starts[p] + lengths[p]
        lo_r, hi_r = lo[row], hi[row]
        total = 0.0
        n = 0
        for j in range(a, b):
            v = data[j]
            total += v
            t = token_of[index[j]]
            if v > 0 and t >= lo_r and t < hi_r:
                idx[n] = j
                n += 1
        depth[row] = total
        if most_expr and n > 0:
            vals = np.empty(n, dtype=np.float32)
            for k in range(n):
                vals[k] = -data[idx[k]]
            idx[:n] = idx[:n][np.argsort(vals, kind="mergesort")]
        elif n > L:  # partial Fisher-Yates: a random L, in random order
            for k in range(L):
                m = k + _below(state, n - k)
                idx[k], idx[m] = idx[m], idx[k]
        taken = min(n, L)
        for k in range(taken):
            x[row, k] = data[idx[k]]
            genes[row, k] = token_of[index[idx[k]]]
        mark += 1
        for k in range(n):
            stamp[token_of[index[idx[k]]]] = mark
        span = hi_r - lo_r
        k = taken
        while k < L:
            g = lo_r + _below(state, span)
            if stamp[g] != mark:
                stamp[g] = mark
                genes[row, k] = g
                k += 1
    stamp[-1] = mark
