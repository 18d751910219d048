"""``all_finite`` (the finiteness check of every request) against ``np.isfinite(x).all()``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from serving.models.validation import all_finite


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (1024, 64), (5, 3, 4), (3, 1)])
def test_agrees_with_isfinite_for_every_bad_value_and_place(dtype, shape):
    rng = np.random.default_rng(abs(hash((np.dtype(dtype).name, shape))) % 2**32)
    x = rng.standard_normal(shape).astype(dtype)
    assert all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        for _ in range(20):
            y = x.copy()
            y[tuple(rng.integers(0, n) for n in shape)] = bad
            assert not all_finite(y) and not np.isfinite(y).all()
    y = x.copy()
    y.flat[0], y.flat[-1] = np.inf, -np.inf  # the two infinities of a sum cancel into NaN: still caught
    assert not all_finite(y)


def test_finite_values_whose_sum_overflows_are_finite():
    big = np.finfo(np.float32).max
    x = np.full((16, 64), big, dtype=np.float32)  # every row sum overflows to +inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no RuntimeWarning on the way
        assert all_finite(x)
        x[3, 5] = np.nan
        assert not all_finite(x)


def test_non_contiguous_and_integer_arrays():
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    view = x[::2, ::3]
    assert all_finite(view)
    x[10, 9] = np.nan
    assert not all_finite(x[::2, ::3])  # row 10, column 9 are in the view
    assert all_finite(x[1::2])  # the odd rows only
    assert all_finite(np.arange(12).reshape(3, 4))


def test_complex_arrays_are_checked_like_floats():
    x = np.ones((128, 64), dtype=np.complex64)
    assert all_finite(x)
    x[70, 1] = complex(0, np.nan)
    assert not all_finite(x)
    assert not all_finite(np.array([np.inf + 0j]))


def test_check_finite_names_the_first_bad_row_for_both_apis():
    from serving.models.errors import InvalidArgument
    from serving.models.validation import check_finite

    x = np.zeros((4, 3), dtype=np.float32)
    x[2, 1], x[3, 0] = np.inf, np.nan
    with pytest.raises(InvalidArgument) as info:
        check_finite(x, "x")
    assert info.value.message == "x: row 2 contains Inf; expected finite values (2 of 4 rows are not finite)"
    with pytest.raises(InvalidArgument) as info:
        check_finite(np.array(np.nan, dtype=np.float32), "t")  # a scalar input is one row
    assert info.value.message == "t: row 0 contains NaN; expected finite values (1 of 1 rows are not finite)"
    check_finite(np.zeros((0, 3), dtype=np.float32), "x")  # an empty batch has nothing to reject
