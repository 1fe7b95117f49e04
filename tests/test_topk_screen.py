"""The screen of the candidate kernel's epilogue (``screen_bound`` in cuda/gsfi_topk.cu), checked on the CPU over
every bfloat16 and float16 bound: a float32 sum whose rounding to the 16-bit type is at or above the bound ``b`` is
never below the screen ``s = b - |b| 2^-7 - 2^-24`` (computed as the kernel does: one fused multiply-add, then one
addition, both rounded to nearest), so comparing the unrounded sums against ``s`` misses no candidate. The GPU test
``test_candidate_lists_hold_exactly_the_logits_at_or_above_the_bound`` checks the kernel itself."""

import numpy as np
import pytest


def _screen(b: np.ndarray, largest_finite: float) -> np.ndarray:
    """The kernel's screen_bound for float32 bounds ``b`` (no NaN)."""
    b64 = b.astype(np.float64)
    b64 = np.where(np.isinf(b64), 0.0, b64)  # (infinite bounds are set below)
    # fma.rn(-|b|, 2^-7, b): the exact value (b - |b| 2^-7 needs at most 32 significant bits) rounded once
    with np.errstate(over="ignore"):
        s = (b64 - np.abs(b64) * 2.0**-7).astype(np.float32)  # overflows to -inf below about -3.37e38
    s = s + np.float32(-(2.0**-24))  # add.rn.f32
    s = np.where(np.isposinf(b), np.float32(largest_finite), s)
    return np.where(np.isneginf(b), np.float32(-np.inf), s).astype(np.float32)


def _round_bf16(z: np.ndarray) -> np.ndarray:
    bits = z.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # to nearest, ties to even; overflow to inf
    return rounded.astype(np.uint32).view(np.float32)


def _round_f16(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return z.astype(np.float16).astype(np.float32)


def _all_finite(dtype: str) -> np.ndarray:
    """Every finite value of the 16-bit type as float32, ascending, -0.0 dropped (it equals 0.0)."""
    bits = np.arange(2**16, dtype=np.uint32)
    if dtype == "bfloat16":
        values = (bits << 16).view(np.float32)
    else:
        values = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    values = values[np.isfinite(values) & ~((values == 0) & np.signbit(values))]
    return np.sort(values)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_no_sum_that_rounds_to_the_bound_or_above_is_below_the_screen(dtype):
    values = _all_finite(dtype)
    round_t = _round_bf16 if dtype == "bfloat16" else _round_f16
    largest = float(values[-1])
    # the float32 sums nearest each rounding boundary (the midpoints between neighbours, and the one above the
    # largest finite value where rounding goes to +inf), a few units of float32's last place either side
    above_largest = largest + (largest - float(values[-2])) / 2
    mids = np.concatenate([(values[:-1].astype(np.float64) + values[1:]) / 2, [above_largest]]).astype(np.float32)
    steps = np.arange(-3, 4)
    z = mids[:, None].view(np.int32) + np.where(mids[:, None] < 0, -steps, steps)
    next_values = np.concatenate([values[1:], values[-1:]])[:, None]
    z = np.concatenate([z.view(np.float32), next_values, mids[:, None]], axis=1)  # [boundaries, sums]
    rounded = round_t(z)
    # bounds: each value above the boundary, one just above the value below it (a float32 bound between two
    # 16-bit values), and +inf for the last boundary
    upper = np.concatenate([values[1:], [np.inf]]).astype(np.float32)
    between = np.nextafter(values, np.float32(np.inf)).astype(np.float32)
    for bounds in (upper, between):
        screen = _screen(bounds, largest)
        reaching = rounded >= bounds[:, None]
        missed = reaching & (z < screen[:, None])
        assert not missed.any(), (bounds[missed.any(axis=1)][:5], z[missed][:5])
        # the screen stays close: it lets through little below the bound (at most about |b| 2^-6 + 2^-23; -inf,
        # which lets everything through, only where b - |b| 2^-7 overflows, at the very bottom of bfloat16's range)
        finite = np.isfinite(bounds) & np.isfinite(screen)
        assert (np.isfinite(screen) | (bounds < -3.37e38) | np.isposinf(bounds) | np.isneginf(bounds)).all()
        slack = bounds[finite].astype(np.float64) - screen[finite]
        assert (slack <= np.abs(bounds[finite]) * 2.0**-6 + 2.0**-23).all()


def test_the_screen_of_infinite_bounds():
    screen = _screen(np.array([np.inf, -np.inf], dtype=np.float32), 3.3895314e38)
    assert screen[0] == np.float32(3.3895314e38) and screen[1] == -np.inf
