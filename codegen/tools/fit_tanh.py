"""Fits the polynomial of the runtime's tanh for |x| < 0.625 (runtime/src/vector.rs, TANH_SMALL:
tanh(x) = x + x^3 q(x^2)) and reports its worst error in f32 arithmetic against math.tanh; above
0.625 the runtime computes 1 - 2 / (e^(2|x|) + 1).

Least squares on the relative error at Chebyshev points, reweighted towards the minimax solution.
Needs numpy: `python3 codegen/tools/fit_tanh.py`.
"""
import math

import numpy as np
from fitting import fit

tanh = np.vectorize(math.tanh)
LIMIT = 0.625


def correction(x):
    """(tanh(x) - x) / x^3, with its limit -1/3 at 0."""
    safe = np.where(x == 0, 1, x)
    return np.where(x == 0, -1 / 3, (tanh(x) - x) / safe**3)


small = fit(correction, 1e-4, LIMIT, 5, lambda x: x * x).astype(np.float32)
xs = np.concatenate(
    [np.linspace(0, LIMIT, 2_000_001), 2.0 ** -np.arange(1, 140, 0.01)]
).astype(np.float32)
xs = xs[xs < LIMIT]
t = (xs * xs).astype(np.float32)
poly = np.full_like(t, small[0])
for c in small[1:]:
    poly = (poly * t + c).astype(np.float32)
y = (xs + (xs * t).astype(np.float32) * poly).astype(np.float32)
want = tanh(xs.astype(np.float64))
ulps = np.abs(y.astype(np.float64) - want) / np.spacing(np.abs(want).astype(np.float32))
print("TANH_SMALL", [str(c) for c in small])
print(f"worst error below {LIMIT}: {ulps.max():.2f} ulp at x = {xs[ulps.argmax()]}")
