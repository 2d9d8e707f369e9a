"""Small statistics used by the evaluator: Wilson intervals and position aggregates.

Everything is computed in float64 on the CPU; an empty input gives NaN and a RuntimeWarning,
never an exception, so one empty split cannot crash a sweep.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps its coverage
    at rates near 0 or 1, which is exactly where refusal rates of an edited model sit.
    """
    if n <= 0:
        warnings.warn("Wilson interval of an empty sample is undefined (NaN)", RuntimeWarning, stacklevel=2)
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes={successes} must lie in [0, n={n}]")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At p = 0 or 1 one bound is exactly 0 or 1; the formula leaves rounding residue (~1e-18).
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def proportion(flags: Sequence[bool], z: float = Z95) -> dict[str, float]:
    """Rate, 95% Wilson bounds and count of a list of booleans."""
    n = len(flags)
    k = int(sum(bool(f) for f in flags))
    lo, hi = wilson_interval(k, n, z) if n else (float("nan"), float("nan"))
    return {"rate": k / n if n else float("nan"), "lo": lo, "hi": hi, "k": k, "n": n}


def aggregate(values: np.ndarray | Sequence[float], what: str = "values") -> dict[str, float]:
    """mean, rmse, p95 and max of finite values (float64); NaN for all four on an empty input.

    rmse, p95 and max are reported next to the mean because a few incoherent positions are
    diluted by the mean over many well-behaved ones but dominate these three.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        warnings.warn(f"{what}: no valid entries to aggregate; reporting NaN", RuntimeWarning, stacklevel=2)
        nan = float("nan")
        return {"mean": nan, "rmse": nan, "p95": nan, "max": nan, "n": 0}
    return {
        "mean": float(x.mean()),
        "rmse": float(math.sqrt(float(np.mean(x * x)))),
        "p95": float(np.quantile(x, 0.95)),
        "max": float(x.max()),
        "n": int(x.size),
    }
