"""Comparing float32 results that were summed in different orders."""

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


def float32_bound(desired, terms: int) -> float:
  """How far two float32 evaluations of the same sums may differ: terms * eps * max|desired|.

  A sum of n float32 terms is off by at most about n * (eps / 2) * sum|terms| (Higham's bound),
  and two evaluations in another order (another dispatch, or XLA on a CPU with another vector
  width) by twice that. `terms` is the length of the sums on the way to the compared values
  (for a chain of sums, their lengths added). The scale is the whole array's, not each
  element's: an element near zero can be the sum of large terms of opposite signs, whose
  rounding is as large as any other element's.
  """
  return terms * FLOAT32_EPS * float(np.max(np.abs(np.asarray(desired, np.float64))))


def assert_close(actual, desired, *, terms: int, err_msg: str = ''):
  """Elementwise |actual - desired| <= float32_bound(desired, terms)."""
  np.testing.assert_allclose(
      np.asarray(actual),
      np.asarray(desired),
      rtol=0,
      atol=float32_bound(desired, terms),
      err_msg=err_msg,
  )
