"""The attention paths against the dense masked reference, both masks, forward and gradients; no L x L
array in the training program; the config switch."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srdd_jax.config import PATCH_NUMS_256, ConfigError
from srdd_jax.transformer import attention
from srdd_jax.transformer.config import VARConfig, var_config
from srdd_jax.transformer.model import VAR

PN = (1, 2, 3, 4, 6)  # L = 66: splash pads it to 128; group_min 16 gives chunks of 30 and 36.
L = sum(p * p for p in PN)
SCALE = 0.3
REF_MASK = {'causal': attention.causal_mask, 'markov': attention.markov_mask}


def _qkv(b=2, lq=L, lk=L, h=2, d=16, seed=0):
  r = np.random.RandomState(seed)
  return tuple(jnp.asarray(r.randn(b, n, h, d).astype(np.float32)) for n in (lq, lk, lk))


def _reference(mask):
  return lambda q, k, v: attention.dot_product_attention(q, k, v, SCALE, REF_MASK[mask](PN))


def _value_and_grads(f, q, k, v):
  # sin() so that the cotangent differs per element (a plain sum would hide errors in the backward).
  return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))(q, k, v)


def _assert_same(got, want, atol):
  (gv, gg), (wv, wg) = got, want
  np.testing.assert_allclose(gv, wv, atol=atol * L, rtol=0)
  for a, b in zip(gg, wg):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def test_chunks_cover_the_sequence_and_group_small_scales():
  for mask in attention.MASKS:
    for group_min in (0, 16, attention.GROUP_MIN):
      cs = attention.chunks(PATCH_NUMS_256, mask, group_min)
      assert [c[0] for c in cs[1:]] == [c[1] for c in cs[:-1]] and cs[0][0] == 0 and cs[-1][1] == 680
  # Default grouping at 256 px: scales 1..6 together (91 tokens), then 8, 10, 13, 16 alone, unmasked.
  cs = attention.chunks(PATCH_NUMS_256, 'causal')
  assert [(c[0], c[1], c[2], c[3]) for c in cs] == [(0, 91, 0, 91), (91, 155, 0, 155), (155, 255, 0, 255),
                                                   (255, 424, 0, 424), (424, 680, 0, 680)]
  assert cs[0][4] is not None and all(c[4] is None for c in cs[1:])
  cs = attention.chunks(PATCH_NUMS_256, 'markov')
  assert [(c[2], c[3]) for c in cs] == [(0, 91), (91, 155), (155, 255), (255, 424), (424, 680)]


@pytest.mark.parametrize('mask', attention.MASKS)
def test_xla_matches_dense_reference(mask):
  q, k, v = _qkv()
  want = _value_and_grads(_reference(mask), q, k, v)
  for group_min in (0, 16):  # One chunk per scale; and grouped scales under an in-chunk mask.
    f = lambda q, k, v, g=group_min: attention.sequence_attention(
        q, k, v, scale=SCALE, patch_nums=PN, mask=mask, impl='xla', group_min=g)
    _assert_same(_value_and_grads(jax.jit(f), q, k, v), want, 1e-5)


@pytest.mark.parametrize('mask', attention.MASKS)
def test_splash_interpret_matches_dense_reference(mask):
  q, k, v = _qkv()  # L = 66 is padded to one 128 block.
  f = lambda q, k, v: attention.sequence_attention(q, k, v, scale=SCALE, patch_nums=PN, mask=mask,
                                                   impl='splash', interpret=True)
  _assert_same(_value_and_grads(f, q, k, v), _value_and_grads(_reference(mask), q, k, v), 1e-5)


def test_attend_over_a_prefix_matches_reference():
  q, k, v = _qkv(lq=9, lk=30)  # A scale's queries over a KV-cache prefix.
  want = attention.dot_product_attention(q, k, v, SCALE)
  np.testing.assert_allclose(attention.attend(q, k, v, scale=SCALE, impl='xla'), want, atol=1e-6)
  splash = jax.jit(lambda q, k, v: attention.attend(q, k, v, scale=SCALE, impl='splash', interpret=True))
  np.testing.assert_allclose(splash(q, k, v), want, atol=1e-5)
  # A second trace of the same mask (a new batch size) reuses only host-side state, no stale tracer.
  np.testing.assert_allclose(splash(q[:1], k[:1], v[:1]), want[:1], atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs an NVIDIA GPU')
@pytest.mark.parametrize('mask', attention.MASKS)
def test_cudnn_matches_dense_reference(mask):
  q, k, v = _qkv(d=64)
  # One chunk per scale: all of them unmasked, so all on cuDNN, odd lengths (1, 9, prefixes) included.
  f = lambda q, k, v: attention.sequence_attention(q, k, v, scale=SCALE, patch_nums=PN, mask=mask,
                                                   dtype=jnp.bfloat16, impl='cudnn', group_min=0)
  out = jax.jit(f)(q, k, v)
  want = _reference(mask)(q, k, v)
  assert float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want)) < 1e-2
  grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * want), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(grad(jax.jit(f)), grad(_reference(mask))):
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2
  got = attention.attend(q[:, :9], k, v, scale=SCALE, dtype=jnp.bfloat16, impl='cudnn')
  want = attention.dot_product_attention(q[:, :9], k, v, SCALE)
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2


def test_resolve_impl():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert attention.resolve_impl('auto', bf16, 'gpu') == 'cudnn'
  assert attention.resolve_impl('auto', f32, 'gpu') == 'xla'  # cuDNN has no float32 kernel.
  assert attention.resolve_impl('cudnn', f32, 'gpu') == 'xla'
  assert attention.resolve_impl('auto', f32, 'tpu') == 'splash'
  assert attention.resolve_impl('auto', bf16, 'cpu') == 'xla'
  assert attention.resolve_impl('splash', f32, 'cpu') == 'splash'
  with pytest.raises(ValueError, match='flash'):
    attention.resolve_impl('flash', f32)


@pytest.mark.parametrize('mask', attention.MASKS)
def test_no_l_by_l_array_in_the_training_program(mask):
  # The whole VAR training forward and backward at 256 px (L = 680), traced but never compiled.
  c = VARConfig(depth=1, width=64, num_heads=1, num_classes=2, vocab_size=8, z_channels=4, mask=mask,
                attention='xla')
  model = VAR(c)
  labels, x_in = jnp.zeros((1,), jnp.int32), jnp.zeros((1, c.seq_len - 1, 4))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), labels, x_in)
  loss = lambda p: jnp.sum(model.apply(p, labels, x_in))
  text = str(jax.make_jaxpr(jax.grad(loss))(params))
  assert re.search(r'\b256,680\b' if mask == 'causal' else r'\b256,256\b', text)  # The last scale's block.
  assert not re.search(r'\b680,680\b', text)
  # The reference does build it, so the search above can fail.
  dense = lambda q, k, v: attention.dot_product_attention(q, k, v, 1.0, REF_MASK[mask](PATCH_NUMS_256))
  assert re.search(r'\b680,680\b', str(jax.make_jaxpr(dense)(*_qkv(b=1, lq=680, lk=680, h=1, d=8))))


def test_attention_config_key_is_validated():
  assert VARConfig(depth=1).attention == 'auto'
  with pytest.raises(ValueError, match=r"VARConfig.attention='flash': must be one of"):
    VARConfig(depth=1, attention='flash')
  c = {'model': {'depth': 1, 'attention': 'splash'}}
  assert var_config(c, 16, 4).attention == 'splash'
  with pytest.raises(ConfigError, match=r"config.model.attention='flash': must be one of"):
    var_config({'model': {'depth': 1, 'attention': 'flash'}}, 16, 4)


def test_splash_runs_per_device_on_a_sharded_mesh():
  """XLA cannot partition a Mosaic kernel: under activation sharding splash runs in a shard_map over the
  batch (data x fsdp) and head (tensor) shards, and gives the reference result."""
  from srdd_jax.parallel import mesh as pm  # pylint: disable=import-outside-toplevel
  pn = (1, 2, 3, 4)
  n = sum(p * p for p in pn)
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (8, n, 4, 16)) for i in range(3))
  mesh = pm.make_mesh((2, 2, 2))
  for mask in ('causal', 'markov'):
    ref = attention.sequence_attention(q, k, v, scale=0.3, patch_nums=pn, mask=mask)

    def sharded(q, k, v, mask=mask):
      with pm.activation_sharding(mesh):
        return attention.sequence_attention(q, k, v, scale=0.3, patch_nums=pn, mask=mask, impl='splash',
                                            interpret=True)
    np.testing.assert_allclose(jax.jit(sharded)(q, k, v), ref, atol=1e-5, err_msg=mask)
