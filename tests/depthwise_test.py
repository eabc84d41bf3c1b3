"""Depthwise convolution: every implementation is the same function with the same parameter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdflax.models import create_model
from kdflax.models.depthwise import (
  DepthwiseConv,
  depthwise_conv,
  depthwise_shifted,
  reference_form,
  resolve_impl,
)
from kdflax.models.depthwise_cpu import available, depthwise_cpu


def numpy_depthwise(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
  """Loop re-derivation: zero pad k // 2; out[b,y,x,c] = sum_ij in[b,sy+i,sx+j,c] w[i,j,c]."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(np.float64)
  ho = (x.shape[1] + 2 * pad - k) // stride + 1
  wo = (x.shape[2] + 2 * pad - k) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
  for y in range(ho):
    for xx in range(wo):
      window = xp[:, y * stride:y * stride + k, xx * stride:xx * stride + k, :]
      out[:, y, xx, :] = np.einsum('bijc,ijc->bc', window, kernel[:, :, 0, :])
  return out


@pytest.mark.parametrize('kernel_size,stride,size', [(3, 1, 9), (3, 2, 9), (5, 2, 10), (5, 1, 6)])
def test_both_forms_equal_a_numpy_rederivation(kernel_size, stride, size):
  rng = np.random.default_rng(kernel_size * 10 + stride)
  x = rng.normal(size=(2, size, size + 1, 6)).astype(np.float32)
  w = rng.normal(size=(kernel_size, kernel_size, 1, 6)).astype(np.float32)
  want = numpy_depthwise(x, w, stride)
  for fn in (depthwise_conv, depthwise_shifted, depthwise_cpu):
    np.testing.assert_allclose(fn(jnp.asarray(x), jnp.asarray(w), stride), want, atol=1e-5)


def test_gradients_agree_between_forms():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, 5, 1, 4)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32)

  def grads(fn):
    return jax.grad(lambda x, w: jnp.sum(fn(x, w, 2) * cot), (0, 1))(x, w)

  for fn in (depthwise_shifted, depthwise_cpu):
    for got, want in zip(grads(fn), grads(depthwise_conv), strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_module_has_nn_conv_parameters_and_init():
  x = jnp.ones((1, 8, 8, 6))
  ours = DepthwiseConv(3, 2, impl='shifted').init(jax.random.key(3), x)
  flax_conv = nn.Conv(6, (3, 3), feature_group_count=6, use_bias=False).init(jax.random.key(3), x)
  assert jax.tree.structure(ours) == jax.tree.structure(flax_conv)
  np.testing.assert_array_equal(ours['params']['kernel'], flax_conv['params']['kernel'])


def test_auto_picks_by_backend_and_bad_names_are_errors():
  on_cpu = jax.default_backend() == 'cpu'
  assert resolve_impl('auto') == (('cpu_kernel' if available() else 'shifted') if on_cpu
                                  else 'conv')
  assert resolve_impl('conv') == 'conv'
  with pytest.raises(ValueError, match="one of .*'shifted'.*got 'fast'"):
    resolve_impl('fast')
  with pytest.raises(ValueError, match="got 'fast'"):
    create_model('mobilenetv3_small_050', num_classes=3, depthwise='fast')


def test_mobilenetv3_forms_give_the_same_logits_and_reference_form_is_grouped():
  module, _ = create_model('mobilenetv3_small_050', num_classes=4, depthwise='shifted')
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  variables = module.init(jax.random.key(1), x)
  ref = reference_form(module)
  assert ref.depthwise == 'conv' and module.depthwise == 'shifted'
  np.testing.assert_allclose(module.apply(variables, x), ref.apply(variables, x), atol=1e-5)

  def group_counts(m):
    jaxpr = jax.make_jaxpr(lambda v: m.apply(v, x))(variables).jaxpr
    return [e.params['feature_group_count'] for e in jaxpr.eqns
            if e.primitive.name == 'conv_general_dilated']

  assert max(group_counts(ref)) > 1           # depthwise layers are grouped convolutions
  assert set(group_counts(module)) == {1}     # only the dense convolutions remain
