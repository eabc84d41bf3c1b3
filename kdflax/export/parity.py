"""Does a converted `.tflite` compute what the JAX model computes? Pure comparisons.

Criteria, on the same uint8 images fed to both:

| precision | passes when |
|---|---|
| fp32 | max abs logit difference <= 1e-4 x max(1, max abs JAX logit) |
| fp16 | max abs logit difference <= 2e-2 x max(1, max abs JAX logit) |
| int8 | top-1 class agrees with JAX on >= 98% of the images |

The float tolerances are absolute for logits up to 1 and relative to the logit scale beyond,
so a model with large logits is held to the same number of significant digits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# fp16: 2e-2, not 1e-2: three numerically equivalent trainings of the same small student (the
# export tests' over-fit MobileNetV3-Small, grouped / shifted / CPU-kernel depthwise) gave fp16
# files 0.017, 0.0056 and 0.0148 from JAX in probability, all with 100% top-1 agreement.
FLOAT_TOLERANCE = {'fp32': 1e-4, 'fp16': 2e-2}
MIN_INT8_AGREEMENT = 0.98


@dataclasses.dataclass(frozen=True)
class ParityResult:
  """Outcome of one parity check."""

  precision: str
  num_images: int
  max_abs_diff: float
  tolerance: float          # allowed max abs diff (float precisions), NaN for int8
  top1_agreement: float     # fraction of images whose arg-max matches JAX
  passed: bool

  def summary(self) -> str:
    """One line: what was compared and how it came out."""
    verdict = 'ok' if self.passed else 'FAILED'
    if self.precision == 'int8':
      return (f'int8 parity {verdict}: top-1 agrees with JAX on {self.top1_agreement:.1%} of '
              f'{self.num_images} images (need >= {MIN_INT8_AGREEMENT:.0%}); '
              f'max |logit diff| {self.max_abs_diff:.3g}')
    return (f'{self.precision} parity {verdict}: max |logit diff| {self.max_abs_diff:.3g} vs '
            f'tolerance {self.tolerance:.3g} on {self.num_images} images '
            f'(top-1 agreement {self.top1_agreement:.1%})')

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def compare_logits(precision: str, tflite_logits: np.ndarray,
                   jax_logits: np.ndarray) -> ParityResult:
  """Checks `(N, K)` TFLite logits against `(N, K)` JAX logits for `precision`."""
  a = np.asarray(tflite_logits, np.float64)
  b = np.asarray(jax_logits, np.float64)
  if a.shape != b.shape or a.ndim != 2 or not len(a):
    raise ValueError(f'parity: logits shapes differ or are empty: TFLite {a.shape}, JAX {b.shape}')
  diff = float(np.max(np.abs(a - b))) if np.all(np.isfinite(a)) else float('inf')
  agreement = float(np.mean(a.argmax(-1) == b.argmax(-1)))
  if precision == 'int8':
    tol, passed = float('nan'), agreement >= MIN_INT8_AGREEMENT
  elif precision in FLOAT_TOLERANCE:
    tol = FLOAT_TOLERANCE[precision] * max(1.0, float(np.max(np.abs(b))))
    passed = diff <= tol
  else:
    raise ValueError(f'unknown precision {precision!r}; expected fp32, fp16 or int8')
  return ParityResult(precision, len(a), diff, tol, agreement, bool(passed))
