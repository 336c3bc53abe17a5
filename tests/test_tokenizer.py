"""Tokenizer behaviour: phi map, pure functions, input validation, sharding."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig, phi_index_map

# A small tokenizer: 16 px images, x4 downsampling, 4x4 latent; compiles in seconds.
TINY = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), patch_nums=(1, 2, 3, 4),
                   share_quant_resi=4)


@pytest.fixture(scope='module')
def tiny():
  tok = Tokenizer(TINY)
  params = unbox(tok.init(jax.random.PRNGKey(0)))
  img = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 3), minval=-1, maxval=1)
  return tok, params, img


def test_phi_map_for_ten_scales_is_vars():
  assert VQVAEConfig().phi_map() == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
  assert phi_index_map(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
  assert phi_index_map(10, 1) == (0,) * 10
  assert phi_index_map(10, 10) == tuple(range(10))  # Non-shared: one phi per scale.


def test_reference_pipeline_shapes(vqvae_ref):
  data, config, params = vqvae_ref
  tok = Tokenizer(config)
  ids = [jnp.asarray(data[f'idx_{k}'].astype(np.int32)) for k in range(config.num_scales)]
  assert f'idx_{config.num_scales}' not in data  # meta's patch_nums name every scale of the file.
  vi = tok.idx_to_var_input(params, ids)
  assert vi.shape == (2, config.seq_len - 1, config.z_channels) == data['var_input'].shape
  fh = tok.idx_to_fhat(params, ids)
  side = config.patch_nums[-1]
  assert len(fh) == config.num_scales
  assert all(f.shape == (2, side, side, config.z_channels) == np.transpose(data[f'fhat_{k}'], (0, 2, 3, 1)).shape
             for k, f in enumerate(fh))


def test_sampling_update_reproduces_teacher_forcing_and_fhat(vqvae_ref):
  """Running the sampler's update over the reference tokens gives var_input and f_hat exactly."""
  data, config, params = vqvae_ref
  tok = Tokenizer(config)
  ids = [jnp.asarray(data[f'idx_{k}'].astype(np.int32)) for k in range(config.num_scales)]
  f_hat, inputs = tok.zero_fhat(2), []
  for k in range(config.num_scales):
    f_hat, nxt = tok.next_input(params, f_hat, ids[k], k)
    if k < config.num_scales - 1:
      assert nxt.shape == (2, config.patch_nums[k + 1] ** 2, config.z_channels)
      inputs.append(nxt)
    else:
      assert nxt is None
  ref = np.asarray(data['var_input'])
  got = np.concatenate([np.asarray(x) for x in inputs], 1)
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-4
  fref = np.transpose(data[f'fhat_{config.num_scales - 1}'], (0, 2, 3, 1))
  assert np.linalg.norm(np.asarray(f_hat) - fref) / np.linalg.norm(fref) <= 1e-4


def test_functions_are_jittable_and_batch_polymorphic(tiny):
  tok, params, img = tiny
  enc = jax.jit(tok.img_to_idx)
  ids3 = enc(params, img)
  ids1 = enc(params, img[1:2])
  assert [a.shape for a in ids3] == [(3, 1), (3, 4), (3, 9), (3, 16)]
  assert all(a.dtype == jnp.int32 for a in ids3)
  for a, b in zip(ids3, ids1):
    np.testing.assert_array_equal(np.asarray(a)[1:2], np.asarray(b))
  rec = jax.jit(tok.reconstruct)(params, img)
  dec = jax.jit(tok.idx_to_img)(params, ids3)
  assert rec.shape == img.shape
  np.testing.assert_allclose(np.asarray(rec), np.asarray(dec), atol=1e-5)
  assert float(jnp.max(jnp.abs(rec))) <= 1.0
  vi = jax.jit(tok.idx_to_var_input)(params, ids3)
  assert vi.shape == (3, TINY.seq_len - 1, TINY.z_channels)


def test_quantizer_picks_the_nearest_code_and_residual_shrinks(tiny):
  tok, params, img = tiny
  f = jax.jit(tok.encode)(params, img)
  ids, fhats = jax.jit(lambda p, f: tok.f_to_idx(p, f, return_fhat=True))(params, f)
  codes = np.asarray(params['quantize']['embedding']['embedding'])
  mean = np.asarray(f).mean(axis=(1, 2))  # The 1x1 scale sees the mean of f.
  d = ((mean[:, None, :] - codes[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(ids[0])[:, 0], d.argmin(-1))
  errs = [float(jnp.linalg.norm(f - fh)) for fh in fhats]
  assert errs[-1] < errs[0]


def test_bad_inputs_raise_clear_errors(tiny):
  tok, params, img = tiny
  with pytest.raises(ValueError, match=r'image side 32 gives a 8x8 latent, but patch_nums .* ends at 4'):
    tok.img_to_idx(params, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='not divisible by the downsampling factor 4'):
    tok.reconstruct(params, jnp.zeros((1, 18, 18, 3)))
  with pytest.raises(ValueError, match=r'1 channels .* expects 3'):
    tok.encode(params, jnp.zeros((1, 16, 16, 1)))
  with pytest.raises(ValueError, match='NCHW'):
    tok.encode(params, jnp.zeros((1, 3, 16, 16)))
  ids = [np.asarray(a) for a in jax.jit(tok.img_to_idx)(params, img)]
  bad = [a.copy() for a in ids]
  bad[2][0, 3] = TINY.vocab_size
  with pytest.raises(ValueError, match=r'token id 64 at scale 2 is out of range \[0, 64\)'):
    tok.idx_to_img(params, bad)
  bad[2][0, 3] = -1
  with pytest.raises(ValueError, match='token id -1 at scale 2'):
    tok.idx_to_var_input(params, bad)
  with pytest.raises(ValueError, match='4 scales'):
    tok.idx_to_fhat(params, ids[:3])
  with pytest.raises(ValueError, match=r'scale 1 \(pn=2\) must have shape \(3, 4\)'):
    tok.idx_to_fhat(params, [ids[0], ids[2], ids[2], ids[3]])
  with pytest.raises(ValueError, match='patch_nums'):
    VQVAEConfig(patch_nums=(1, 2, 16, 8))
  with pytest.raises(ValueError, match='GroupNorm'):
    VQVAEConfig(ch=40)


def test_share_modes_compute_the_same_function_when_weights_agree(tiny):
  """Mode 0 (one phi per scale) and mode 1 (one phi) reduce to mode K=4 when the weights coincide."""
  tok, params, img = tiny
  ids = jax.jit(tok.img_to_idx)(params, img)
  fhat = lambda cfg, p: jax.jit(Tokenizer(cfg).idx_to_fhat)(p, ids)[-1]  # One program per share mode.
  ref = fhat(TINY, params)
  phis = params['quantize']['quant_resi']
  # Mode 0: copy phi[map[k]] into scale k's own phi.
  cfg0 = dataclasses.replace(TINY, share_quant_resi=0)
  p0 = dict(params, quantize={'embedding': params['quantize']['embedding'],
                              **{f'quant_resi_{k}': phis[f'qresi_ls_{m}']
                                 for k, m in enumerate(TINY.phi_map())}})
  jax.tree_util.tree_map(lambda a, b: None, p0, unbox(Tokenizer(cfg0).abstract_params()))  # same tree
  np.testing.assert_allclose(fhat(cfg0, p0), ref, atol=1e-6)
  # Mode 1 with every phi of mode 4 set to phi 0.
  cfg1 = dataclasses.replace(TINY, share_quant_resi=1)
  p1 = dict(params, quantize={'embedding': params['quantize']['embedding'],
                              'quant_resi': {'qresi': phis['qresi_ls_0']}})
  p4 = dict(params, quantize={'embedding': params['quantize']['embedding'],
                              'quant_resi': {f'qresi_ls_{i}': phis['qresi_ls_0'] for i in range(4)}})
  np.testing.assert_allclose(fhat(cfg1, p1), fhat(TINY, p4), atol=1e-6)


def test_every_parameter_has_logical_axes_and_shards_on_the_mesh(tiny):
  tok, params, img = tiny
  abstract = tok.abstract_params()
  leaves = jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
  mesh = pm.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  shardings = pm.param_shardings(abstract, mesh)
  assert jax.tree_util.tree_structure(shardings) == jax.tree_util.tree_structure(params)
  # The fixture's weights placed in those shardings (a compiled init into them costs more than the rest
  # of this file; the trainers' inits into their shardings are tested with them).
  params = jax.device_put(params, shardings)
  kernel = params['decoder']['mid']['block_1']['conv1']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, 'fsdp', 'tensor')
  # The sharded function equals the single-device one.
  single = jax.device_put(params, jax.devices()[0])
  batch = jax.device_put(jnp.concatenate([img, img[:1]]),
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp'))))
  a = jax.jit(tok.reconstruct)(params, batch)
  b = jax.jit(tok.reconstruct)(single, np.asarray(batch))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
