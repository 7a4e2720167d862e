"""The kernel and model tests' closeness check: max |a - e| <= tol * max(1, max |e|), a
relative bound that tolerates tiny values. Each test file keeps its own per-dtype TOL."""
from __future__ import annotations


def within(actual, expected, tol: float, what: str = "") -> float:
    """Assert the bound (compared in fp32) and return the max abs error."""
    err = (actual.float() - expected.float()).abs().max().item()
    bound = tol * max(1.0, expected.float().abs().max().item())
    assert err <= bound, f"{what + ': ' if what else ''}max abs error {err:.3e} > {bound:.3e}"
    return err


def closeness(tols: dict):
    """close(actual, expected, dtype) for a file's per-dtype tolerance table."""
    def close(actual, expected, dtype) -> float:
        return within(actual, expected, tols[dtype])
    return close
