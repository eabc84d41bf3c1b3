"""tools/profile_step.py: a traced step's XLA ops land in the model part and pass they belong to."""

import os
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tools'))
import profile_step  # noqa: E402

from kdflax.models.depthwise import DepthwiseConv  # noqa: E402


@pytest.mark.parametrize('op_name, expected', [
    ('jit(step_fn)/jvp(MobileNetV3)/blocks_1_0/conv_dw/slice', ('depthwise conv', 'forward')),
    ('jit(step_fn)/transpose(jvp(MobileNetV3))/blocks_2_1/conv_dw/reduce_sum',
     ('depthwise conv', 'backward')),
    ('jit(step_fn)/transpose(jvp(MobileNetV3))/blocks_0_0/bn1/mul', ('batch norm', 'backward')),
    ('jit(step_fn)/jvp(MobileNetV3)/blocks_3_0/se/conv_reduce/conv_general_dilated',
     ('squeeze-excite', 'forward')),
    ('jit(step_fn)/jvp(MobileNetV3)/conv_stem/conv_general_dilated', ('dense conv', 'forward')),
    ('jit(step_fn)/jvp(MobileNetV3)/jit(hard_silu)/jit(hard_sigmoid)/jit(relu6)/min',
     ('activations', 'forward')),
    ('jit(step_fn)/SwinTransformer/layers_0/blocks_0/attn/dot_general', ('teacher', 'forward')),
    ('jit(step_fn)/sqrt', ('optimizer + metrics', 'update')),
])
def test_classify(op_name, expected):
  assert profile_step.classify(op_name) == expected


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = DepthwiseConv(3, impl='shifted', name='conv_dw')(x)
    x = nn.BatchNorm(use_running_average=False, name='bn1')(x)
    return nn.Conv(8, (1, 1), name='conv_pw')(jax.nn.relu(x))


def test_a_traced_step_is_attributed_to_its_parts():
  module = _Block()
  x = jnp.ones((4, 16, 16, 8))
  variables = module.init(jax.random.key(0), x)

  @jax.jit
  def step_fn(params, x):
    def loss(p):
      y, _ = module.apply({**variables, 'params': p}, x, mutable=['batch_stats'])
      return jnp.mean(y ** 2)
    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  params = variables['params']
  names = profile_step.op_names(step_fn.lower(params, x).compile().as_text())
  assert any('conv_dw' in n for n in names.values())
  jax.block_until_ready(step_fn(params, x))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(2):
        params = step_fn(params, x)
      jax.block_until_ready(params)
    result = profile_step.attribute(trace_dir, names, steps=2)
  parts = result['parts']
  assert result['threads'] >= 1 and result['ops']
  assert parts.get('depthwise conv|forward', 0) + parts.get('depthwise conv|backward', 0) > 0
  assert parts.get('batch norm|forward', 0) + parts.get('batch norm|backward', 0) > 0
  text = profile_step.table({'row': 'toy', 'size': 16, 'batch': 4, 'wall_ms': 1.0, **result},
                            top=3)
  assert '| depthwise conv |' in text and 'slowest 3 ops' in text
