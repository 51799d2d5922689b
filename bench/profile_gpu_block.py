"""Where one GPU block's time goes (issue 9): the float32 'full' E-step stages on one block, timed apart.

One block as dgmm's GPU layout runs it (``GPU_BLOCK_ELEMENTS`` / (k d) rows, sub-blocks of
``FLOAT32_SUB_BLOCK_ROWS``), each stage timed with CUDA events (median of 20 after 3 warm-ups),
with the bytes it must move at least and the rate that gives. Variants of the two GEMMs show what
the layout costs. Needs CuPy and a GPU.

    python bench/profile_gpu_block.py            # d=32, k=16
"""

from __future__ import annotations

import argparse
import statistics

import cupy as cp
import numpy as np

from dgmm import chunk


def timed(fn, repeats=20):
    for _ in range(3):
        fn()
    cp.cuda.Device().synchronize()
    out = []
    for _ in range(repeats):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    return statistics.median(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--k", type=int, default=16)
    args = p.parse_args()
    d, k = args.d, args.k
    n = chunk.GPU_BLOCK_ELEMENTS // (k * d)
    m = chunk.FLOAT32_SUB_BLOCK_ROWS
    S = n // m
    f32 = np.float32
    rng = cp.random.RandomState(0)
    X = rng.standard_normal((n, d), dtype=f32)
    AT = rng.standard_normal((k * d, d + 1), dtype=f32)
    head_t = cp.empty((d + 1, n), f32)
    z = cp.empty((S, k * d, m), f32)
    L = rng.standard_normal((k, n)).astype(cp.float64)
    center = cp.zeros(d, f32)
    rows = []

    def report(name, seconds, nbytes=None, flops=None):
        extra = ""
        if nbytes:
            extra += f"  {nbytes / seconds / 1e9:7.0f} GB/s"
        if flops:
            extra += f"  {flops / seconds / 1e12:6.1f} TFLOP/s"
        rows.append(f"{name:58s} {seconds * 1e3:8.3f} ms{extra}")
        print(rows[-1], flush=True)

    zb = z.nbytes
    print(f"block: n={n} rows, d={d}, k={k}, sub-blocks S={S} x m={m}; z = {zb / 2**20:.0f} MiB float32")

    def head():
        head_t[0] = 1.0
        cp.subtract(X.T, center[:, None], out=head_t[1:], dtype=f32, casting="unsafe")

    report("head [1 | y]^T (d+1, n)", timed(head), X.nbytes + head_t.nbytes)
    head()
    h3 = head_t.reshape(d + 1, S, m).transpose(1, 0, 2)
    gemm_flops = 2 * n * k * d * (d + 1)
    report("z = AT[None] @ head3, out=z (dgmm)", timed(lambda: cp.matmul(AT[None], h3, out=z)), zb, gemm_flops)
    report("z = AT[None] @ head3 (no out)", timed(lambda: cp.matmul(AT[None], h3)), zb, gemm_flops)
    report("z2 = AT @ head_t, 2-D (k d, n)", timed(lambda: AT @ head_t), zb, gemm_flops)
    cp.matmul(AT[None], h3, out=z)
    z4 = z.reshape(S, k, d, m)
    report("quad = (z*z).sum(axis=2) (dgmm)", timed(lambda: (z4 * z4).sum(axis=2)), 2 * zb)
    report("quad = einsum('skdm,skdm->skm')", timed(lambda: cp.einsum("skdm,skdm->skm", z4, z4)), zb)
    report("L: softmax + r32 (whole block)", timed(lambda: cp.exp(L - L.max(axis=0, keepdims=True))), 2 * L.nbytes)
    scale = cp.sqrt(cp.abs(L)).astype(f32)

    def scale_z():
        z4.__imul__(scale.reshape(k, S, m).transpose(1, 0, 2)[:, :, None, :])

    report("z *= sqrt(r) (dgmm)", timed(scale_z), 2 * zb)
    m_flops = 2 * n * k * d * d
    report("M = matmul(z4, z4^T).sum(0, f64) (dgmm)",
           timed(lambda: cp.matmul(z4, z4.transpose(0, 1, 3, 2)).sum(axis=0, dtype=cp.float64)), zb, m_flops)
    z3 = z.reshape(S * k, d, m)
    report("M batched 3-D matmul only", timed(lambda: cp.matmul(z3, z3.transpose(0, 2, 1))), zb, m_flops)
    # Variants (measurements for the next step; dgmm does not use them yet).
    for name, fn in (
        ("quad = cupy.vecdot(z4, z4, axis=2)", lambda: cp.vecdot(z4, z4, axis=2)),
        ("quad = cupy.square(z4).sum(axis=2)", lambda: cp.square(z4).sum(axis=2)),
    ):
        try:
            report(name, timed(fn), zb)
        except Exception as error:  # a function CuPy lacks
            rows.append(f"{name:58s} failed: {type(error).__name__}: {error}"[:160])
            print(rows[-1], flush=True)
    fused_quad = cp.ReductionKernel("T z", "T q", "z * z", "a + b", "q = a", "0", "dgmm_quad")
    report("quad fused ReductionKernel (one read of z; CuPy-only)", timed(lambda: fused_quad(z4, axis=2)), zb)
    for sub in (1024, 16384, 65536, n):
        zs = z.reshape(-1)[: k * d * n].reshape(n // sub, k, d, sub)
        zs3 = zs.reshape(-1, d, sub)
        report(f"M batched matmul, sub-blocks of {sub} rows (batch {zs3.shape[0]})",
               timed(lambda: cp.matmul(zs3, zs3.transpose(0, 2, 1))), zb, m_flops)
    # The real kernel on one block of the same size (all stages, as dgmm runs it).
    Xb = rng.standard_normal((n, d), dtype=f32) * 2
    means = rng.standard_normal((k, d)).get() * 3
    prec = np.stack([np.eye(d)] * k)
    params = chunk.chunk_params(np.full(k, 1 / k), means, prec, "full", input_dtype=f32)
    report("dgmm chunk.e_step_statistics, one block (float32, full)",
           timed(lambda: chunk.e_step_statistics(Xb, (params,)), repeats=10), Xb.nbytes, gemm_flops + m_flops)
    X64 = Xb.astype(cp.float64)
    report("dgmm chunk.e_step_statistics, one block (float64, full)",
           timed(lambda: chunk.e_step_statistics(X64, (params,)), repeats=10), X64.nbytes, gemm_flops + m_flops)
    print("\n".join(["", "summary:"] + rows))


if __name__ == "__main__":
    main()
