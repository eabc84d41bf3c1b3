"""The XLA:CPU depthwise kernel: XLA's grouped convolution's values and gradients, its build."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdflax.models import create_model, depthwise_cpu
from kdflax.models.depthwise import depthwise_conv, resolve_impl

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU-only kernel')


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
  """A new cache folder and an empty build cache; the real build is restored afterwards."""
  depthwise_cpu.library()  # the session's build is registered before the test changes things
  monkeypatch.setenv('KDFLAX_CACHE_DIR', str(tmp_path / 'cache'))
  depthwise_cpu._registered.cache_clear()
  depthwise_cpu._log_once.cache_clear()
  yield tmp_path / 'cache' / 'kernels'
  monkeypatch.undo()
  depthwise_cpu._registered.cache_clear()
  depthwise_cpu.library()  # the same build again: XLA keeps the first registration


# (batch, H, W, C, k, stride): odd and even sizes, C not a multiple of the vector width,
# images smaller than the kernel, and a batch larger than the kernel-gradient chunk count.
SHAPES = [(2, 9, 10, 5, 3, 1), (2, 9, 10, 5, 3, 2), (1, 8, 8, 17, 5, 2), (3, 7, 6, 33, 5, 1),
          (1, 3, 2, 4, 5, 2), (40, 4, 4, 3, 3, 2)]


@pytest.mark.parametrize('b,h,w,c,k,stride', SHAPES)
def test_values_and_both_gradients_equal_the_grouped_convolution(b, h, w, c, k, stride):
  rng = np.random.default_rng(h * 100 + c)
  x = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 1, c)), jnp.float32)
  want = depthwise_conv(x, kernel, stride)
  got = jax.jit(depthwise_cpu.depthwise_cpu, static_argnums=2)(x, kernel, stride)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.normal(size=want.shape), jnp.float32)

  def grads(fn):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w, stride) * cot), (0, 1)))(x, kernel)

  for got_grad, want_grad in zip(grads(depthwise_cpu.depthwise_cpu), grads(depthwise_conv),
                                 strict=True):
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4)


def test_results_are_deterministic_and_dtypes_follow_the_input():
  x = jax.random.normal(jax.random.key(0), (32, 14, 14, 24))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 24))
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(depthwise_cpu.depthwise_cpu(x, w, 1) ** 2), 1))
  first = np.asarray(grad(x, kernel))
  for _ in range(3):  # the kernel gradient sums its per-chunk partials in a fixed order
    np.testing.assert_array_equal(grad(x, kernel), first)
  half = depthwise_cpu.depthwise_cpu(x.astype(jnp.bfloat16), kernel, 2)
  assert half.dtype == jnp.float32  # promoted like the other forms
  half = depthwise_cpu.depthwise_cpu(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), 2)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(jnp.float32), depthwise_conv(x, kernel, 2), atol=0.3)


def test_vmap_and_bad_shapes():
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 4))
  got = jax.vmap(lambda v: depthwise_cpu.depthwise_cpu(v, kernel, 2))(x)
  np.testing.assert_allclose(got, jax.vmap(lambda v: depthwise_conv(v, kernel, 2))(x),
                             rtol=1e-5, atol=1e-5)
  expected = r'kernel \(k,k,1,C\), got \(2, 6, 6, 4\) and \(3, 3, 1, 5\)'
  with pytest.raises(ValueError, match=expected):
    depthwise_cpu.depthwise_cpu(x[0], jnp.ones((3, 3, 1, 5)), 1)


def test_mobilenetv3_with_the_kernel_trains_like_the_grouped_convolution():
  module, _ = create_model('mobilenetv3_small_050', num_classes=3, depthwise='cpu_kernel',
                           drop_rate=0.0)
  ref, _ = create_model('mobilenetv3_small_050', num_classes=3, depthwise='conv', drop_rate=0.0)
  x = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))
  variables = module.init(jax.random.key(1), x)

  def loss(params, m):
    logits, _ = m.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  got, want = grad(variables['params'], module), grad(variables['params'], ref)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_a_build_is_cached_under_a_name_that_changes_with_its_inputs(fresh_build):
  assert depthwise_cpu.build_library() == str(fresh_build / depthwise_cpu._library_name(
      depthwise_cpu.compiler()))
  built = sorted(os.listdir(fresh_build))
  assert len(built) == 1 and built[0].startswith('depthwise_cpu-') and built[0].endswith('.so')
  name = depthwise_cpu._library_name(depthwise_cpu.compiler())
  assert built == [name]
  assert name != depthwise_cpu._library_name('/other/c++')  # another compiler, another build


def test_a_damaged_cached_build_is_rebuilt(fresh_build):
  name = depthwise_cpu._library_name(depthwise_cpu.compiler())
  os.makedirs(fresh_build)
  (fresh_build / name).write_bytes(b'\x7fELF half a library')
  assert depthwise_cpu.build_library() == str(fresh_build / name)
  assert (fresh_build / name).stat().st_size > 10_000
  assert os.listdir(fresh_build) == [name]  # no temporary files left


def test_no_compiler_falls_back_to_shifted_with_one_warning(fresh_build, monkeypatch, caplog):
  monkeypatch.setenv('CXX', '/nonexistent/c++')
  with caplog.at_level(logging.WARNING):
    assert resolve_impl('auto') == 'shifted'
    assert resolve_impl('auto') == 'shifted'
  warnings = [r.getMessage() for r in caplog.records if 'depthwise CPU kernel' in r.getMessage()]
  assert warnings == ['depthwise CPU kernel unavailable, using the shifted-slices form: '
                      'no C++ compiler found (set CXX, or install g++ or clang++)']
  with pytest.raises(depthwise_cpu.KernelBuildError, match='^no C[+][+] compiler found'):
    depthwise_cpu.depthwise_cpu(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)), 1)
  assert not fresh_build.exists()


def test_a_failing_compile_is_one_line_and_leaves_nothing(fresh_build, monkeypatch, tmp_path):
  fake = tmp_path / 'fake-c++'
  fake.write_text('#!/bin/sh\necho "depthwise_cpu.cc:1: error: something" >&2\nexit 1\n')
  fake.chmod(0o755)
  monkeypatch.setenv('CXX', str(fake))
  with pytest.raises(depthwise_cpu.KernelBuildError) as raised:
    depthwise_cpu.build_library()
  assert str(raised.value) == (f'compiling {depthwise_cpu.SOURCE} with {fake} failed: '
                               'depthwise_cpu.cc:1: error: something')
  assert os.listdir(fresh_build) == []  # the temporary output is removed
