"""Fits the rational erf approximation the CPU backend's generated kernels use
(backends/src/cpu/jit/emit.rs, `E::erf`) and measures it in f32.

erf(x) ~ x * P(x^2) / Q(x^2) on [0, LIMIT], P and Q of degree 5 in x^2, Q(0) = 1:
a linearised least-squares fit of the relative error, re-weighted (Lawson) towards
the minimax. The f32 evaluation (Horner with f32 rounding at each step, x clamped
to [-CLAMP, CLAMP], the result to [-1, 1]) is then compared with f64 math.erf.

    python3 scripts/fit_erf.py      # prints the coefficients (highest first) and the error
"""
import math

import numpy as np

LIMIT = 3.92  # the fit's range: f32 erf(x) rounds to 1 from here on
CLAMP = 4.0  # x is clamped here: the rational is past 1 (so the result clamps to exactly 1)
DEG = 6  # coefficients of P and of Q


def fit():
    erf = np.vectorize(math.erf)
    x = np.linspace(1e-5, LIMIT, 40000)
    y = erf(x)
    z = x * x
    w = np.ones_like(x)
    q_prev = np.ones_like(x)
    best = None
    for _ in range(60):
        a = np.concatenate(
            [np.stack([x * z**i for i in range(DEG)], 1), np.stack([-y * z**i for i in range(1, DEG)], 1)],
            1,
        )
        weight = w / (y * q_prev)
        sol, *_ = np.linalg.lstsq(a * weight[:, None], y * weight, rcond=None)
        p = sol[:DEG]
        q = np.concatenate([[1.0], sol[DEG:]])
        pz = sum(p[i] * z**i for i in range(DEG))
        qz = sum(q[i] * z**i for i in range(DEG))
        err = (x * pz / qz - y) / y
        q_prev = qz
        e = np.abs(err).max()
        if best is None or e < best[2]:
            best = (p, q, e)
        w = w * np.abs(err) ** 0.5 + 1e-30
        w /= w.max()
    return best


def f32_erf(p, q, x):
    f = np.float32
    x = np.clip(f(x), f(-CLAMP), f(CLAMP))
    z = f(x * x)
    pz = f(p[-1])
    for c in p[-2::-1]:
        pz = f(f(pz * z) + f(c))
    qz = f(q[-1])
    for c in q[-2::-1]:
        qz = f(f(qz * z) + f(c))
    return np.clip(f(f(x * pz) / qz), f(-1), f(1))


def main():
    p, q, e = fit()
    p32 = [float(np.float32(c)) for c in p]
    q32 = [float(np.float32(c)) for c in q]
    xs = np.concatenate([np.linspace(1e-7, 1e-3, 1000), np.linspace(1e-3, 6, 400001)]).astype(np.float32)
    got = f32_erf(p32, q32, xs).astype(np.float64)
    ref = np.vectorize(math.erf)(xs.astype(np.float64))
    d = np.abs(got - ref)
    print(f"fit: max relative error {e:.2e} (f64)")
    print(f"f32: max absolute {d.max():.2e}, max relative {(d / ref).max():.2e}")
    at_clamp = f32_erf(p32, q32, np.float32(CLAMP))
    assert at_clamp == 1.0, f"erf({CLAMP}) = {at_clamp}: must clamp to exactly 1"
    print("P (highest degree first):", p32[::-1])
    print("Q (highest degree first):", q32[::-1])


if __name__ == "__main__":
    main()
