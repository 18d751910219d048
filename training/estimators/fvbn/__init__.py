"""Fully-visible belief nets (``genserve train fvbn``): LARC for binary rows, MADE with
mixture-of-Gaussian conditionals for continuous rows. See ``estimator`` for the maths."""

from training.estimators.fvbn.estimator import FVBNDensity

__all__ = ["FVBNDensity"]
