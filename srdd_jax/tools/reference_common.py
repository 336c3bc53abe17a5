"""Shared pieces of the reference-vector checks: results, tolerances, error measures."""
from __future__ import annotations

import dataclasses

import numpy as np

from srdd_jax.convert.reference import ReferenceFormatError, meta_get, read_meta  # pylint: disable=unused-import

# From ../shared/reference/README.md (float32 on CPU, matmul precision 'highest').
RESAMPLE_MAX_ABS = 1e-5
REL_TOL = 1e-4
TIE_REL = 1e-5

PASS, FAIL, NOT_CHECKED = 'PASS', 'FAIL', 'NOT CHECKED'
INFO = 'INFO'  # Printed, never counted: context for the checks, not a check.


@dataclasses.dataclass
class Result:
  name: str
  status: str
  detail: str = ''


def rel_err(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    return float('inf')
  denom = np.linalg.norm(b)
  return float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a - b))


def max_abs(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    return float('inf')
  return float(np.max(np.abs(a - b))) if a.size else 0.0


def rel_result(name, ours, ref, tol=REL_TOL, how='') -> Result:
  ours = np.asarray(ours)
  if ours.shape != np.shape(ref):
    return Result(name, FAIL, f'shape {ours.shape} but the reference has {np.shape(ref)}')
  e = rel_err(ours, ref)
  return Result(name, PASS if e <= tol else FAIL, f'rel_err {e:.2e} (tol {tol:.0e}){how}')


def abs_result(name, ours, ref, tol=RESAMPLE_MAX_ABS, how='') -> Result:
  ours = np.asarray(ours)
  if ours.shape != np.shape(ref):
    return Result(name, FAIL, f'shape {ours.shape} but the reference has {np.shape(ref)}')
  e = max_abs(ours, ref)
  return Result(name, PASS if e <= tol else FAIL, f'max_abs_err {e:.2e} (tol {tol:.0e}){how}')


def nchw_to_nhwc(a):
  return np.transpose(np.asarray(a), (0, 2, 3, 1))
