"""Tokenizer training (--mode=train_tokenizer): the VQ loss and straight-through estimator by hand, code
restarts, the GAN's hinge losses and warm-up, exact resume, the export, config errors.

One 8-step run with everything on (GAN from step 4, restarts every 4 steps) is shared by the module; the
resumed runs reuse its compiled step (one trainer per settings and mesh in a process)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tokenizer_smoke
from srdd_jax.convert import params_io
from srdd_jax.parallel import mesh as pm
from srdd_jax.config import ConfigError
from srdd_jax.modes import train_tokenizer as train_loop
from srdd_jax.tokenizer.api import Tokenizer, tokenizer_config, unbox
from srdd_jax.train import code_restart
from srdd_jax.train import export
from srdd_jax.train import tokenizer_losses as losses
from srdd_jax.train import tokenizer_settings as tcfg
from srdd_jax.train import tokenizer_step as tr
from srdd_jax.tokenizer.vqvae import VQVAE, VQVAEConfig

STEPS, GAN_START, RESTART_EVERY = 8, 4, 4
_TIMING = ('steps_per_s', 'eta_s', 'eval_seconds', 'host_wait_s')


def _config(**train):
  c = tokenizer_smoke.get_config()
  # Smaller than the smoke model so the step compiles in seconds: one level (no downsampling), 8 px
  # digits (their native size), a one-layer discriminator.
  c.tokenizer.update(ch_mult=(1,), using_mid_sa=False)
  c.model.patch_nums = (1, 2, 4, 8)
  c.tokenizer_train.update(disc_layers=1)
  c.tokenizer_train.update(steps=STEPS, warmup_steps=0, log_every=1, eval_every=4, eval_examples=32,
                           grid_examples=4, checkpoint_every=4, gan_start_step=GAN_START,
                           dead_code_restart_every=RESTART_EVERY)
  c.tokenizer_train.update(train)
  return c


def _records(root):
  with open(os.path.join(root, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in _TIMING} for line in f]


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _trainer(config):
  s, vq = tcfg.train_settings(config), tokenizer_config(config)
  return tr.trainer_for(vq, s, pm.make_mesh(dict(config.mesh)), pm.DEFAULT_RULES)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('straight'))
  summary = train_loop.run(_config(), wd, return_state=True)
  return os.path.join(wd, 'tokenizer'), summary


@pytest.fixture(scope='module')
def resumed(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('resumed'))
  first = train_loop.run(_config(), wd, stop_after_steps=STEPS // 2, return_state=True)
  second = train_loop.run(_config(), wd, return_state=True)
  return os.path.join(wd, 'tokenizer'), first, second


# --- the VQ loss and the straight-through estimator, by hand, on a one-level model ------------------

TINY = VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1,), num_res_blocks=1, using_sa=False,
                   using_mid_sa=False, patch_nums=(1, 2, 4))


@pytest.fixture(scope='module')
def tiny():
  """The one-level tokenizer with random weights (numpy, from the abstract tree: nothing to compile; the
  checks below hold for any weights)."""
  tok = Tokenizer(TINY)
  rng = np.random.default_rng(3)
  return tok, jax.tree_util.tree_map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
                                     unbox(tok.abstract_params()))


def _quantize_train(params, f, beta):
  return VQVAE(TINY).apply({'params': params}, f, beta,
                           method=lambda m, f, b: m.quantize.quantize_train(f, b))


@jax.jit
def _vq_and_grads(params, f):
  beta = 0.25
  f_hat_st, loss, hits, _ = _quantize_train(params, f, beta)
  g_f = jax.grad(lambda f: _quantize_train(params, f, beta)[1])(f)
  g_e = [jax.grad(lambda p, b=b: _quantize_train(p, f, b)[1])(params)['quantize']['embedding']['embedding']
         for b in (beta, 0.0)]
  return f_hat_st, loss, hits, g_f, g_e


def test_vq_loss_equals_hand_computation(tiny):
  tok, params = tiny
  f = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 4)) * 0.1, jnp.float32)
  beta = 0.25
  f_hat_st, loss, hits, g_f, g_e = _vq_and_grads(params, f)
  ids, fhats = jax.jit(lambda p, f: tok.f_to_idx(p, f, return_fhat=True))(params, f)
  f64 = np.asarray(f, np.float64)
  per_scale = [beta * np.mean((np.asarray(h, np.float64) - f64) ** 2) + np.mean((np.asarray(h, np.float64) - f64) ** 2)
               for h in fhats]
  np.testing.assert_allclose(float(loss), np.mean(per_scale), rtol=1e-5)
  np.testing.assert_allclose(f_hat_st, fhats[-1], atol=1e-6)  # Forward value: f_hat itself.
  for k, idx in enumerate(ids):
    np.testing.assert_array_equal(hits[k], np.bincount(np.asarray(idx).ravel(), minlength=TINY.vocab_size))

  # The encoder side gets beta * d||sg(f_hat_k) - f||^2, averaged over scales; nothing from the codebook term.
  want = np.mean([beta * 2 * (f64 - np.asarray(h, np.float64)) / f64.size for h in fhats], axis=0)
  np.testing.assert_allclose(g_f, want, rtol=1e-4, atol=1e-9)
  # The codebook side does not depend on beta (it is the ||f_hat_k - sg(f)||^2 term alone) and is non-zero.
  np.testing.assert_array_equal(g_e[0], g_e[1])
  assert np.abs(np.asarray(g_e[0])).sum() > 0


def test_straight_through_gradient_reaches_the_encoder_not_the_codebook(tiny):
  _, params = tiny
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)

  def recon_loss(p):
    recon, _ = VQVAE(TINY).apply({'params': p}, x, 0.25, method=VQVAE.train_forward)
    return jnp.mean(jnp.square(recon - x))

  g = jax.jit(jax.grad(recon_loss))(params)
  norms = {k: float(sum(jnp.sum(jnp.square(v)) for v in jax.tree_util.tree_leaves(g[k]))) for k in g}
  # Through f_hat_st = f + sg(f_hat - f) the decoder's gradient flows to quant_conv and the encoder...
  assert norms['encoder'] > 0 and norms['quant_conv'] > 0 and norms['decoder'] > 0, norms
  # ... and none to the codebook or phi, which only the VQ loss trains.
  assert norms['quantize'] == 0, norms


# --- losses, statistics, restarts: hand examples ---------------------------------------------------

def test_hinge_losses_on_a_hand_example():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1; half their sum.
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), 0.5 * (5 / 6 + 1), rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_g_loss(fake), 1 / 3, rtol=1e-6)


def test_usage_statistics_and_dead_codes_by_hand():
  hits = jnp.array([[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
  st = losses.usage_statistics(hits)
  np.testing.assert_allclose([st['usage_s0'], st['usage_s1']], [0.5, 1.0])
  np.testing.assert_allclose([st['perplexity_s0'], st['perplexity_s1']], [2.0, 4.0], rtol=1e-6)
  # The first update sets the EMA to the frequencies; later ones blend.
  ema = code_restart.update_usage_ema(jnp.zeros((2, 4)), hits, 0, 0.9)
  np.testing.assert_allclose(ema, [[0.5, 0.5, 0, 0], [0.25] * 4])
  np.testing.assert_allclose(code_restart.update_usage_ema(ema, hits * 0 + jnp.array([[0, 0, 0, 4.0]] * 2), 1, 0.9),
                             0.9 * np.asarray(ema) + 0.1 * np.array([[0, 0, 0, 1.0]] * 2), rtol=1e-6)
  # patch_nums (1, 2): scale weights 1/5 and 4/5. Shares: [.3, .3, .2, .2]; threshold .9/4 = .225.
  np.testing.assert_allclose(code_restart.overall_share(ema, (1, 2)), [0.3, 0.3, 0.2, 0.2], rtol=1e-6)
  np.testing.assert_array_equal(code_restart.dead_codes(ema, (1, 2), 0.9), [False, False, True, True])


def test_held_out_code_usage_by_hand():
  from srdd_jax.train.tokenizer_eval import code_usage
  hits = np.array([[4, 0, 0, 0], [1, 1, 2, 0]])  # 2 scales, 4 codes; code 3 never chosen.
  u = code_usage(hits)
  assert (u['eval_usage_s0'], u['eval_usage_s1'], u['eval_dead_codes']) == (0.25, 0.75, 1)
  np.testing.assert_allclose([u['eval_perplexity_s0'], u['eval_perplexity_s1']], [1.0, 2 ** 1.5], rtol=1e-12)


def test_restart_moves_exactly_the_dead_codes_onto_distinct_features():
  codebook = jnp.arange(12.0).reshape(6, 2)
  dead = jnp.array([False, True, False, True, True, False])
  features = 100 + jnp.arange(20.0).reshape(10, 2)
  new = np.asarray(code_restart.restart(codebook, dead, features, jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(new[~np.asarray(dead)], np.asarray(codebook)[~np.asarray(dead)])
  rows = [int(np.nonzero((np.asarray(features) == r).all(1))[0][0]) for r in new[np.asarray(dead)]]
  assert len(set(rows)) == 3  # Each dead code on its own feature vector.
  again = code_restart.restart(codebook, dead, features, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(new, again)  # A function of the key.


# --- the trained run ----------------------------------------------------------------------------------

def test_training_lowers_the_losses_and_raises_held_out_psnr(straight):
  root, summary = straight
  recs = [r for r in _records(root) if 'loss' in r]
  assert [r['step'] for r in recs] == list(range(1, STEPS + 1))
  assert recs[-1]['l1'] < recs[0]['l1'] and recs[-1]['l2'] < recs[0]['l2']
  evals = [(r['step'], r['eval_psnr']) for r in _records(root) if 'eval_psnr' in r]
  assert [s for s, _ in evals] == [0, 4, 8]
  assert (summary['eval_psnr_start'], summary['eval_psnr_end']) == (evals[0][1], evals[-1][1])
  assert evals[-1][1] > evals[0][1] + 1.0  # dB.
  last = [r for r in _records(root) if 'eval_psnr' in r][-1]  # Codebook use over the held-out set.
  assert all(0 < last[f'eval_usage_s{k}'] <= 1 for k in range(4)) and 0 <= last['eval_dead_codes'] < 64
  assert summary['eval_dead_codes_end'] == last['eval_dead_codes']
  for k in range(4):  # Per-scale statistics are logged every step.
    assert 0 < recs[-1][f'usage_s{k}'] <= 1 and 1 <= recs[-1][f'perplexity_s{k}'] <= 64
  assert 'usage_s4' not in recs[-1]


def test_gan_term_is_zero_before_its_start_and_the_discriminator_waits(straight, resumed):
  root, _ = straight
  recs = [r for r in _records(root) if 'loss' in r]
  for r in recs:
    if r['step'] <= GAN_START:  # Steps taken from state.step 0..GAN_START-1.
      assert r['gan_loss'] == 0 and r['d_loss'] == 0, r
      np.testing.assert_allclose(r['loss'], r['l1'] + r['l2'] + r['vq_loss'], rtol=1e-6)
    else:
      assert r['gan_loss'] != 0 and r['d_loss'] > 0, r
  _, first, _ = resumed  # Stopped at step GAN_START: the discriminator is still its initial self.
  init = _trainer(_config()).init(jax.random.PRNGKey(0))
  a, b = _flat(first['state'].disc_params), _flat(init.disc_params)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_restarts_happen_every_k_steps(straight):
  root, _ = straight
  recs = [r for r in _records(root) if 'loss' in r]
  assert all(r['restarted_codes'] == 0 for r in recs if r['step'] % RESTART_EVERY)
  # The untrained 64-code book leaves many codes unused: the first restart moves them all.
  first = next(r for r in recs if r['step'] == RESTART_EVERY)
  before = next(r for r in recs if r['step'] == RESTART_EVERY - 1)
  assert first['restarted_codes'] > 0 and first['dead_codes'] == 0 and before['dead_codes'] > 0


def test_step_restarts_exactly_the_unused_codes(straight):
  del straight  # Only for its compiled step.
  c = _config()
  trainer = _trainer(c)
  s, vq = trainer.s, trainer.vq
  state = trainer.init(jax.random.PRNGKey(7))
  from srdd_jax.data import pipeline
  images, _ = pipeline.build_source(c.data.to_dict(), vq.image_size, train=True).batch(0, 0, s.global_batch)
  # Codes 0, 5, 6, ... are moved out of reach (no vector can choose them) and given a zero EMA; the others
  # an EMA that keeps them alive whatever this batch chooses. So exactly the far codes are dead.
  dead = np.zeros(vq.vocab_size, bool)
  dead[[0, 5, 6, 17, 40, 63]] = True
  params = jax.device_get(state.params)
  cb = np.asarray(params['quantize']['embedding']['embedding']).copy()
  cb[dead] = 1e3
  params['quantize']['embedding']['embedding'] = cb
  ema = np.where(dead, 0.0, 1.0 / (~dead).sum()).astype(np.float32)[None].repeat(vq.num_scales, 0)
  state = state.replace(step=jnp.asarray(RESTART_EVERY - 1, jnp.int32), params=params,
                        usage_ema=jnp.asarray(ema))
  state = jax.device_put(state, trainer.abstract_state()[1])  # As the loop holds it: no recompilation.
  f = jax.jit(Tokenizer(vq).encode)(params, jnp.asarray(images))
  # The vectors the scales quantize: every scale's area-pooled residual, one row per token.
  _, _, _, quantized = jax.jit(lambda p, f: VQVAE(vq).apply(
      {'params': p}, f, 0.25, method=lambda m, f, b: m.quantize.quantize_train(f, b)))(params, f)
  assert quantized.shape == (s.global_batch * vq.seq_len, vq.z_channels)
  np.testing.assert_allclose(quantized[:s.global_batch], np.asarray(f).mean(axis=(1, 2)), atol=1e-6)
  new, metrics = trainer.step_fn(state, trainer.assemble_batch({'images': images}, s.global_batch))
  assert int(metrics['restarted_codes']) == dead.sum()
  new_cb = np.asarray(jax.device_get(new.params['quantize']['embedding']['embedding']))
  nearest = lambda rows: ((new_cb[:, None, :] - np.asarray(rows)[None]) ** 2).sum(-1).min(1)
  dist = nearest(quantized)
  assert (dist[dead] < 1e-8).all()  # Every dead code now sits on a vector a scale quantized ...
  assert (dist[~dead] > 1e-6).all()  # ... and no other code does ...
  assert (nearest(np.asarray(f).reshape(-1, vq.z_channels))[dead] > 1e-6).all()  # ... nor on raw features.
  assert len({tuple(r) for r in new_cb[dead]}) == dead.sum()  # Each on its own feature.
  np.testing.assert_allclose(np.asarray(new.usage_ema)[:, dead], 1.0 / vq.vocab_size)
  adam = jax.device_get(new.opt_state[0])  # ScaleByAdamState: moments of restarted rows start at 0.
  for m in (adam.mu, adam.nu):
    assert not np.asarray(m['quantize']['embedding']['embedding'])[dead].any()


def test_exact_resume_is_bitwise(straight, resumed):
  root, full = straight
  part, first, second = resumed
  assert first['end_step'] == STEPS // 2 and second['start_step'] == STEPS // 2
  assert second['end_step'] == STEPS
  assert _records(part) == _records(root)  # Losses, usage, restarts, PSNR: equal floats.
  a, b = _flat(full['state']), _flat(second['state'])
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_export_loads_and_reconstructs_like_the_trained_state(straight):
  root, summary = straight
  assert summary['export'] == os.path.join(root, 'params')
  vq, params = params_io.load_vqvae(summary['export'])
  trainer = _trainer(_config())
  assert vq == trainer.vq
  a, b = _flat(params), _flat(summary['state'].params)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # The grid shows held-out images (top) and the trained state's reconstructions (bottom).
  from PIL import Image

  from srdd_jax.data import pipeline
  c = _config()
  held = pipeline.build_source(dict(c.data.to_dict(), split='test'), vq.image_size, train=False)
  images, _ = held.batch(0, 0, 32)
  params = jax.device_put(params, trainer.abstract_state()[1].params)  # As the loop holds them.
  _, recon, _ = trainer.eval_fn(params, trainer.assemble_batch({'images': images}, 32)['images'])
  grid = np.asarray(Image.open(os.path.join(root, 'reconstructions.png')))
  u8 = lambda x: np.clip(np.round((np.asarray(x) + 1) * 127.5), 0, 255).astype(np.uint8)
  n = vq.image_size
  assert grid.shape == (2 * n, 4 * n, 3)
  np.testing.assert_array_equal(grid[:n], np.concatenate(list(u8(images[:4])), 1))
  np.testing.assert_array_equal(grid[n:], np.concatenate(list(u8(np.asarray(recon)[:4])), 1))


def test_export_of_another_step_is_moved_aside_never_overwritten(straight, tmp_path):
  _, summary = straight
  params = summary['state'].params
  vq = _trainer(_config()).vq
  root = str(tmp_path)
  out = export.export_tokenizer(root, params, vq, 5, 'wd')
  assert export.export_tokenizer(root, params, vq, 5, 'wd') == out  # Same step: left as it is.
  export.export_tokenizer(root, params, vq, 9, 'wd')
  assert sorted(os.listdir(root)) == ['params', 'params.step_5']
  with open(os.path.join(root, 'params', 'export.json')) as f:
    assert json.load(f)['step'] == 9
  params_io.load_vqvae(os.path.join(root, 'params.step_5'))


@pytest.mark.parametrize('section, key, value, message', [
    ('tokenizer_train', 'global_batch', 12, 'config.tokenizer_train.global_batch=12 is not divisible'),
    ('tokenizer_train', 'gan_wieght', 1.0, 'config.tokenizer_train.gan_wieght is not a key of config.tokenizer_train'),
    ('tokenizer_train', 'disc_layers', 3, 'config.tokenizer_train.disc_layers=3 is too deep'),
    ('tokenizer_train', 'b2', 1.0, 'config.tokenizer_train.b2=1.0'),
    ('tokenizer', 'image_size', 32, 'config.tokenizer.image_size=32'),
    ('tokenizer', 'ch', 24, 'config.tokenizer.ch=24'),
    ('model', 'patch_nums', (1, 2, 4, 3), 'config.model.patch_nums'),
])
def test_config_errors_name_the_key(tmp_path, section, key, value, message):
  c = _config()
  c[section][key] = value
  with pytest.raises(ConfigError, match=message.replace('[', r'\[').replace(']', r'\]')):
    train_loop.run(c, str(tmp_path))
  assert not os.listdir(tmp_path)  # Nothing written before the config is known to work.
