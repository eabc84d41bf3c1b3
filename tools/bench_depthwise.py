"""One depthwise convolution layer: grouped convolution vs shifted slices vs the CPU kernel.

    .venv/bin/python tools/bench_depthwise.py [--shape 16 56 56 72] [--kernel 3] [--stride 1]

Times, on the default JAX backend, `kdflax.models.depthwise.depthwise_conv` (XLA grouped
convolution), `depthwise_shifted` (sum of k*k strided slices times per-channel weights) and,
on the CPU, `kdflax.models.depthwise_cpu.depthwise_cpu` (the XLA:CPU custom call):
the forward pass, the gradient of sum(y^2) with respect to the input, to the kernel, and to
both; best of 5 after a compile. Also prints the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kdflax.models.depthwise import depthwise_conv, depthwise_shifted
from kdflax.models.depthwise_cpu import available, depthwise_cpu


def best_ms(fn: Callable, *args, repeats: int = 5) -> float:
  """Best wall time of `repeats` calls of a compiled `fn` (after one warm call), in ms."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1000 * min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shape', type=int, nargs=4, default=(16, 56, 56, 72),
                      metavar=('B', 'H', 'W', 'C'))
  parser.add_argument('--kernel', type=int, default=3)
  parser.add_argument('--stride', type=int, default=1)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), tuple(args.shape))
  w = jax.random.normal(jax.random.key(1), (args.kernel, args.kernel, 1, args.shape[-1]))
  print(f'{jax.default_backend()}: x {tuple(args.shape)}, {args.kernel}x{args.kernel} '
        f'stride {args.stride}; best of 5, ms')
  ref = depthwise_conv(x, w, args.stride)
  impls = [('conv', depthwise_conv), ('shifted', depthwise_shifted)]
  if jax.default_backend() == 'cpu' and available():
    impls.append(('cpu_kernel', depthwise_cpu))
  for name, impl in impls:
    def forward(x, w, impl=impl):
      return impl(x, w, args.stride)

    def loss(x, w, forward=forward):
      return jnp.sum(forward(x, w) ** 2)

    diff = float(jnp.max(jnp.abs(jax.jit(forward)(x, w) - ref)))
    cols = {'forward': jax.jit(forward), 'd/dx': jax.jit(jax.grad(loss, 0)),
            'd/dw': jax.jit(jax.grad(loss, 1)), 'both': jax.jit(jax.grad(loss, (0, 1)))}
    timings = '  '.join(f'{k} {best_ms(f, x, w):7.1f}' for k, f in cols.items())
    print(f'{name:8s} {timings}   max |diff| {diff:.1e}', flush=True)


if __name__ == '__main__':
  main()
