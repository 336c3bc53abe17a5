"""transformer/cpu_kernels.py: the hand-written backward passes give autodiff's values (the whole model's
loss and every gradient, both masks, with and without VAR's l2-normalised attention, progressive
sequences, float32 and bfloat16), only CPU programs take them, and VARConfig.cpu_matmul='bfloat16' rounds
a float32 model's matmul inputs (within bfloat16's rounding of float32's values) in dots that XLA:CPU
really runs in bfloat16."""
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srdd_jax.transformer import cpu_kernels
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.loss import cross_entropy_metrics
from srdd_jax.transformer.model import VAR

# Seven scales: the default grouping makes a masked chunk of scales 1-5 (66 tokens) and two unmasked
# ones (64, 81), so causal keys overlap between chunks and markov keys tile the sequence.
PN = (1, 2, 3, 4, 6, 8, 9)


def _worst_relative_error(a, b):
  errs = jax.tree_util.tree_map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)), a, b)
  return max(jax.tree_util.tree_leaves(errs))


def _model_value_and_grads(config, num_scales=None):
  rng = np.random.default_rng(0)
  labels = jnp.asarray([0, 3, 1])
  x = jnp.asarray(rng.standard_normal((3, config.seq_len - 1, config.z_channels)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, config.vocab_size, (3, config.seq_len)))
  params = nn.meta.unbox(VAR(config).init(jax.random.PRNGKey(0), labels, x)['params'])
  # Away from the initialisation (zero biases, identical scales), so every term of the backward counts.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  out = {}
  for fused in (True, False):
    c = dataclasses.replace(config, cpu_kernels=fused)

    def loss(p, c=c):
      logits = VAR(c).apply({'params': p}, labels, x, train=True, rngs={'dropout': jax.random.PRNGKey(2)},
                            num_scales=num_scales)
      # sin(): a cotangent that differs per element, on top of the training loss.
      return jnp.sum(jnp.sin(logits)) * 0.1 + cross_entropy_metrics(logits, ids, c)[0]

    out[fused] = jax.jit(jax.value_and_grad(loss))(params)
  return out[True], out[False]


@pytest.mark.parametrize('mask', ['markov', 'causal'])
@pytest.mark.parametrize('l2', [True, False])
def test_the_model_gives_autodiffs_loss_and_gradients(mask, l2):
  c = VARConfig(depth=2, width=64, num_heads=4, vocab_size=32, z_channels=8, patch_nums=PN, mask=mask,
                num_classes=5, drop_path_rate=0.0, cond_drop_rate=0.0, attn_l2_norm=l2, init_adaln_gamma=0.5)
  (v1, g1), (v0, g0) = _model_value_and_grads(c)
  assert abs(float(v1) - float(v0)) < 1e-5 * abs(float(v0))
  assert _worst_relative_error(g1, g0) < 1e-5
  # Progressive training's shorter sequence (scales 1-6: one masked chunk, one unmasked).
  (v1, g1), (v0, g0) = _model_value_and_grads(c, num_scales=6)
  assert abs(float(v1) - float(v0)) < 1e-5 * abs(float(v0))
  assert _worst_relative_error(g1, g0) < 1e-5


def test_bfloat16_stays_within_bfloat16_rounding():
  c = VARConfig(depth=2, width=64, num_heads=4, vocab_size=32, z_channels=8, patch_nums=PN, mask='causal',
                num_classes=5, drop_path_rate=0.0, cond_drop_rate=0.0, init_adaln_gamma=0.5, dtype='bfloat16')
  (v1, g1), (v0, g0) = _model_value_and_grads(c)
  assert abs(float(v1) - float(v0)) < 1e-2 * abs(float(v0))
  assert _worst_relative_error(g1, g0) < 5e-2


@pytest.mark.parametrize('shape', [(16, 48), (48, 16)])  # The narrower side transposed: x, then dy.
def test_matmul_weight_gradient_is_autodiffs(shape):
  i, o = shape
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, i))
  k = jax.random.normal(jax.random.PRNGKey(1), (i, o))
  w = jax.random.normal(jax.random.PRNGKey(2), (2, 7, o))
  grads = [jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(jnp.sin(cpu_kernels.matmul(x, k, jnp.float32, f)) * w),
                            argnums=(0, 1)))(x, k) for f in (True, False)]
  assert _worst_relative_error(grads[0], grads[1]) < 1e-6


def test_only_cpu_programs_take_the_hand_written_backward():
  x, k = jnp.ones((8, 16)), jnp.ones((16, 32))
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(cpu_kernels.matmul(x, k, jnp.float32) ** 2), argnums=1))
  lowered = {p: grad.trace(x, k).lower(lowering_platforms=(p,)).as_text() for p in ('cpu', 'tpu', 'cuda')}
  assert 'optimization_barrier' in lowered['cpu']  # The weight gradient's transposed operand.
  assert 'optimization_barrier' not in lowered['tpu'] and 'optimization_barrier' not in lowered['cuda']


def test_bfloat16_products_of_a_float32_model_stay_within_bfloat16_rounding():
  c = VARConfig(depth=2, width=64, num_heads=4, vocab_size=32, z_channels=8, patch_nums=PN, mask='markov',
                num_classes=5, drop_path_rate=0.0, cond_drop_rate=0.0, init_adaln_gamma=0.5)
  (v_bf, g_bf), _ = _model_value_and_grads(dataclasses.replace(c, cpu_matmul='bfloat16'))
  (v_32, g_32), _ = _model_value_and_grads(c)
  assert 0 < abs(float(v_bf) - float(v_32)) < 1e-2 * abs(float(v_32))  # Rounded, so not equal; but close.
  assert _worst_relative_error(g_bf, g_32) < 5e-2


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
  """The operand dtypes of every dot in an optimized HLO module (fused computations included)."""
  types = dict(re.findall(r'%([\w.\-]+) = (\w+)\[', hlo))
  return [(types[a], types[b]) for a, b in re.findall(r' dot\(%([\w.\-]+), %([\w.\-]+)\)', hlo)]


def test_bfloat16_products_reach_the_cpu_dots():
  # XLA:CPU runs a bfloat16 dot in float32 (converting both operands) when its operand is a plain 2-D
  # transpose; the weight gradient's transposed copy goes through 3-D so that it does not.
  for shape in ((16, 48), (48, 16)):  # x transposed, then dy.
    k = jax.random.normal(jax.random.PRNGKey(1), shape)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 9, shape[0]))
    loss = lambda x, k: jnp.sum(jnp.sin(cpu_kernels.matmul(x, k, jnp.float32, True, jnp.bfloat16)))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, k).compile().as_text()
    dtypes = _dot_operand_dtypes(hlo)
    assert len(dtypes) == 3 and all(d == ('bf16', 'bf16') for d in dtypes), dtypes


def test_cpu_matmul_is_checked_and_resolved():
  with pytest.raises(ValueError, match=r"VARConfig.cpu_matmul='fp8': must be one of"):
    VARConfig(depth=1, cpu_matmul='fp8')
  assert cpu_kernels.cpu_matmul_dtype('float32') == jnp.float32
  assert cpu_kernels.cpu_matmul_dtype('bfloat16') == jnp.bfloat16
  assert cpu_kernels.cpu_matmul_dtype('auto') == (jnp.bfloat16 if cpu_kernels.native_bfloat16() else jnp.float32)
