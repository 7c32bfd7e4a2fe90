"""What ``steps=`` means, everywhere: recorders, edits, ablations, analysis and widgets.

``steps`` selects step indices of a trajectory of ``n`` steps:

* ``None``: every step;
* an ``int``: that step (negative counts from the end);
* a ``list``, ``range``, ``set`` or array of ints: those steps;
* a ``slice``: those steps (``slice(2, None)``);
* a pair ``(first, last)`` (a tuple of two numbers): a window. Two ints are step indices, both ends
  included; two floats are fractions of the trajectory in [0, 1], and step ``i`` is in the window when
  ``first <= i / n`` and ``(i + 1) / n <= last`` (diffusers' ``control_guidance_start/end`` rule, so a
  window means the same steps for an edit and for a ControlNet). Mixed ends are refused.
"""
from __future__ import annotations

import math
import numbers


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def in_fraction_window(i: int, n: int, start: float, end: float) -> bool:
    """Step ``i`` of ``n`` lies in ``[start, end]`` (fractions): diffusers' ``controlnet_keep`` rule."""
    return not (i / n < start or (i + 1) / n > end + 1e-9)


def select_steps(steps, n: int) -> list[int]:
    """The sorted step indices ``steps`` selects out of ``n`` (see the module docstring); ValueError for
    anything else, naming what was given."""
    if steps is None:
        return list(range(n))
    if _is_int(steps):
        i = int(steps) + (n if steps < 0 else 0)
        if not 0 <= i < n:
            raise ValueError(f"step {steps} is outside the {n} steps of this trajectory")
        return [i]
    if isinstance(steps, slice):
        return list(range(n))[steps]
    if isinstance(steps, tuple) and len(steps) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                             for v in steps):
        a, b = steps
        if _is_int(a) and _is_int(b):
            lo, hi = (int(a) + (n if a < 0 else 0)), (int(b) + (n if b < 0 else 0))
            if not (0 <= lo <= hi < n):
                raise ValueError(f"steps window {steps} must satisfy 0 <= first <= last < {n}")
            return list(range(lo, hi + 1))
        if isinstance(a, float) and isinstance(b, float):
            if not (math.isfinite(a) and math.isfinite(b) and 0.0 <= a <= b <= 1.0):
                raise ValueError(f"a steps window of fractions must satisfy 0 <= first <= last <= 1, got {steps}")
            return [i for i in range(n) if in_fraction_window(i, n, a, b)]
        raise ValueError(f"steps window {steps!r} mixes an int and a float: give both ends as step indices "
                         f"(first, last) or both as fractions of the trajectory (0.0, 0.8)")
    try:
        items = list(steps)
    except TypeError:
        raise ValueError(f"steps must be None, an int, a list/range of ints, a slice or a (first, last) window; "
                         f"got {steps!r}") from None
    if not all(_is_int(v) for v in items):
        raise ValueError(f"a list of steps must hold step indices (ints), got {steps!r}; a window of fractions is a "
                         f"tuple such as (0.0, 0.8)")
    out = sorted({int(v) + (n if v < 0 else 0) for v in items})
    bad = [v for v in out if not 0 <= v < n]
    if bad:
        raise ValueError(f"steps {bad} are outside the {n} steps of this trajectory")
    return out


def check_steps(steps) -> None:
    """Refuse a ``steps=`` value that no trajectory could accept (before any model work; negative indices are
    checked against a trajectory long enough to hold them)."""
    if steps is None or isinstance(steps, slice):
        return
    fractions = isinstance(steps, tuple) and len(steps) == 2 and all(isinstance(v, float) for v in steps)
    try:
        ints = [abs(int(v)) for v in ((steps,) if _is_int(steps) else steps) if _is_int(v)]
    except TypeError:
        ints = []
    select_steps(steps, 1 if fractions else 2 * max(ints, default=0) + 1)
