"""Blocks under nn.scan with rematerialisation: the same function as the per-block model, stacked
parameters converted both ways, the KV cache of the causal sampler, and FSDP that shards parameters
but never replicates activations."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from srdd_jax.config import ConfigError
from srdd_jax.convert import var_transformer as cvt
from srdd_jax.convert.loading import load_models
from srdd_jax.diffusion.filtering import SamplerConfig
from srdd_jax.diffusion.sampler import Sampler
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.model import VAR, blocks_layout, stack_blocks, unstack_blocks
from tests.conftest import smoke_config

PN = (1, 2, 3)
CFG = VARConfig(depth=3, width=64, num_heads=2, patch_nums=PN, vocab_size=32, z_channels=8, num_classes=5,
                drop_path_rate=0.0, cond_drop_rate=0.0)
LABELS = jnp.array([1, 5])
X = jax.random.normal(jax.random.PRNGKey(1), (2, CFG.seq_len - 1, 8))


@pytest.fixture(scope='module')
def params():
  return jax.jit(lambda k: nn.meta.unbox(VAR(CFG).init(k, LABELS, X)['params']))(jax.random.PRNGKey(0))


def _forward_and_grads(config, params, mask):
  config = dataclasses.replace(config, mask=mask)
  f = lambda p: VAR(config).apply({'params': p}, LABELS, X, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
  weights = jnp.cos(jnp.arange(config.vocab_size))
  logits, grads = jax.jit(jax.value_and_grad(lambda p: (jnp.sum(f(p) * weights), f(p)), has_aux=True))(params)
  return logits[1], grads


_REFERENCE = {}


@pytest.mark.parametrize('remat,mask', [('none', 'causal'), ('none', 'markov'), ('dots', 'markov'),
                                        ('full', 'causal')])
def test_scanned_blocks_compute_the_per_block_function(params, remat, mask):
  scanned = dataclasses.replace(CFG, scan_blocks=True, remat=remat)
  stacked = stack_blocks(params, CFG.depth)
  assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(cvt.abstract_params(scanned))
  assert 'blocks' in stacked and 'blocks_0' not in stacked
  if mask not in _REFERENCE:
    _REFERENCE[mask] = _forward_and_grads(CFG, params, mask)
  a, ga = _REFERENCE[mask]
  b, gb = _forward_and_grads(scanned, stacked, mask)
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  for u, v in zip(jax.tree_util.tree_leaves(stack_blocks(ga, CFG.depth)), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


def test_stacking_round_trip_and_errors(params):
  back = unstack_blocks(stack_blocks(params, 3), 3)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for u, v in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(u, v)
  # Any tree level converts the same way (an optimiser state holds the parameter tree inside).
  nested = {'mu': params, 'count': jnp.zeros([])}
  assert 'blocks' in stack_blocks(nested, 3)['mu']
  assert blocks_layout(params, CFG) is not None and 'blocks_2' in blocks_layout(stack_blocks(params, 3), CFG)
  partial = {k: v for k, v in params.items() if k != 'blocks_1'}
  with pytest.raises(ValueError, match='not all 3 blocks'):
    stack_blocks(partial, 3)
  with pytest.raises(ValueError, match='not the depth 4'):
    unstack_blocks(stack_blocks(params, 3), 4)


def test_converted_var_checkpoint_in_either_layout():
  from tests.test_transformer import random_torch_state  # pylint: disable=import-outside-toplevel
  st = random_torch_state(2, 64, 4, 5, 48, 8, (1, 2, 3, 4), True, False, seed=3)
  config = cvt.infer_var_config({k: v.shape for k, v in st.items()}, patch_nums=(1, 2, 3, 4), num_heads=4)
  flat = cvt.convert_var(st, config)
  stacked = cvt.convert_var(st, dataclasses.replace(config, scan_blocks=True))
  assert 'blocks_1' in flat and 'blocks' in stacked
  for u, v in zip(jax.tree_util.tree_leaves(stack_blocks(flat, 2)), jax.tree_util.tree_leaves(stacked)):
    np.testing.assert_array_equal(u, v)


def test_saved_model_loads_in_either_layout(tiny_models):
  var_dir, vae_dir = tiny_models  # Saved per block (scan_blocks False).
  c = smoke_config()
  c.model.checkpoint, c.tokenizer.checkpoint = var_dir, vae_dir
  for scan in (True, False):
    c.model.scan = scan
    vc, p, _, _ = load_models(c)
    assert vc.scan_blocks == scan and (('blocks' in p) == scan) and (('blocks_0' in p) == (not scan))


def test_scanned_causal_sampler_cache_matches_per_block(params):
  vq = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=PN)
  rng = np.random.default_rng(2)  # Tokenizer weights: any values (numpy: nothing to compile).
  vae = jax.tree_util.tree_map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
                               unbox(Tokenizer(vq).abstract_params()))
  sc = SamplerConfig(cfg=1.5, greedy=True)
  for mask in ('causal', 'markov'):
    out = []
    for scan in (False, True):
      c = dataclasses.replace(CFG, mask=mask, scan_blocks=scan)
      ids, _ = jax.jit(Sampler(c, vq, sc).tokens)(blocks_layout(params, c), vae, jnp.array([0, 3, 4]),
                                                  jax.random.PRNGKey(0))
      out.append(np.concatenate([np.asarray(i) for i in ids], axis=1))
    np.testing.assert_array_equal(out[0], out[1], err_msg=mask)


def _step_temporaries(mesh_shape):
  pn = (1, 2, 3, 4, 6, 8)
  c = VARConfig(depth=2, width=256, num_heads=4, patch_nums=pn, vocab_size=512, z_channels=8, num_classes=10,
                scan_blocks=True)
  v = VQVAEConfig(vocab_size=512, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=pn)
  mesh = pm.make_mesh(mesh_shape)
  t = Trainer(c, v, OptimConfig(total_steps=10), mesh)
  abstract, shardings = t.abstract_state()
  state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  vae = jax.eval_shape(lambda: unbox(Tokenizer(v).init(jax.random.PRNGKey(0))))
  batch = {'labels': jax.ShapeDtypeStruct((32,), jnp.int32), 'ids': jax.ShapeDtypeStruct((32, c.seq_len), jnp.int32)}
  step = jax.jit(t.step_fn(), in_shardings=(shardings, pm.replicated(mesh), t.batch_sharding))
  memory = step.lower(state, vae, batch).compile().memory_analysis()
  param_bytes = sum(a.size * 4 for a in jax.tree_util.tree_leaves(abstract.params))
  return memory.temp_size_in_bytes, param_bytes


def test_fsdp_shards_parameters_not_activations():
  """The same per-device batch (4 of 32) with the fsdp axis at 2 and at 8: temporaries may grow by the
  gathered parameters and their gradients (2 x the parameter bytes), not by activations replicated
  over fsdp (before the activation rules they grew 3.4x here, by 6x the parameter bytes)."""
  t2, param_bytes = _step_temporaries((4, 2, 1))
  t8, _ = _step_temporaries((1, 8, 1))
  assert t8 - t2 <= 2 * param_bytes, (t2, t8, param_bytes)


def test_remat_key_is_checked():
  with pytest.raises(ValueError, match='remat'):
    VARConfig(depth=1, width=64, num_heads=1, remat='some')
  c = smoke_config()
  c.model.remat = 'most'
  from srdd_jax.transformer.config import var_config  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match='config.model.remat='):
    var_config(c, 64, 8)
