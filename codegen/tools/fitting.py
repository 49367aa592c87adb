"""What the polynomial fits share (fit_erf.py, fit_tanh.py): a least-squares fit of the relative
error at Chebyshev points, reweighted a few dozen times towards the minimax solution."""
import numpy as np


def fit(f, lo, hi, degree, variable):
    """Coefficients, highest power first, of a polynomial in variable(x) close to f(x) on
    [lo, hi] in relative error."""
    xs = (lo + hi) / 2 + (hi - lo) / 2 * np.cos(np.linspace(0, np.pi, 4000))
    t, y = variable(xs), f(xs)
    weights = 1 / np.abs(y)
    for _ in range(30):
        a = np.vander(t, degree + 1) * weights[:, None]
        coefficients, *_ = np.linalg.lstsq(a, y * weights, rcond=None)
        error = np.abs(np.polyval(coefficients, t) - y) / np.abs(y)
        weights = weights * (error / error.max() + 0.05) ** 0.5
    return coefficients
