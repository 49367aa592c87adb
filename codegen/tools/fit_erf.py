"""Fits the two polynomials of the inline and runtime erf (runtime/src/vector.rs, ERF_SMALL and
ERFC_SCALED_LARGE) and reports their worst error in f32 arithmetic against math.erf.

Each fit is least squares on the relative error at Chebyshev points, reweighted a few dozen times
towards the minimax solution. Needs numpy: `python3 codegen/tools/fit_erf.py`.
"""
import math

import numpy as np
from fitting import fit

erf = np.vectorize(math.erf)
erfc = np.vectorize(math.erfc)


def horner(coefficients, t):
    r = np.full_like(t, coefficients[0])
    for c in coefficients[1:]:
        r = (r * t + c).astype(np.float32)
    return r


def erf_over_x(x):
    safe = np.where(x == 0, 1, x)
    return np.where(x == 0, 2 / np.sqrt(np.pi), erf(x) / safe)


small = fit(erf_over_x, 0, 1, 6, lambda x: x * x)
small[-1] -= 1  # x + x q(x^2) rounds better than x p(x^2)
large = fit(lambda x: erfc(x) * np.exp(x * x), 1, 4, 9, lambda x: 1 / x)
small32, large32 = small.astype(np.float32), large.astype(np.float32)

xs = np.concatenate(
    [np.linspace(0, 4.5, 3_000_001), 2.0 ** -np.arange(1, 140, 0.01)]
).astype(np.float32)
a = np.abs(xs)
near = (xs + xs * horner(small32, xs * xs)).astype(np.float32)
clamped = np.minimum(np.maximum(a, np.float32(1)), np.float32(4))
gaussian = np.exp(-(clamped * clamped)).astype(np.float32)
tail = gaussian * horner(large32, (np.float32(1) / clamped).astype(np.float32))
far = (np.float32(1) - tail).astype(np.float32)
y = np.where(a < 1, near, far).astype(np.float32)
want = erf(xs.astype(np.float64))
ulps = np.abs(y.astype(np.float64) - want) / np.spacing(np.abs(want).astype(np.float32))
print("ERF_SMALL", [str(c) for c in small32])
print("ERFC_SCALED_LARGE", [str(c) for c in large32])
print(f"worst error {ulps.max():.2f} ulp at x = {xs[ulps.argmax()]}")
