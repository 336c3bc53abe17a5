"""Training pieces: optimiser groups and schedules, the sharded train step, accumulation, EMA."""
import dataclasses
import math

import jax
import numpy as np
import pytest

from srdd_jax.convert import var_transformer
from srdd_jax.convert.state_dict import flatten_params
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train.optimizer import OptimConfig, decay_mask, lr_schedule, peak_lr_for, wd_schedule
from srdd_jax.train.step import EMA_WARMUP, Trainer, ema_start_weight
from srdd_jax.transformer.config import VARConfig

PN = (1, 2, 3, 4)
VAR_CFG = VARConfig(depth=2, width=64, num_heads=2, num_classes=10, vocab_size=64, z_channels=8,
                    patch_nums=PN, dtype='bfloat16')
VAE_CFG = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), patch_nums=PN)


def test_lr_schedule_is_vars_lin0():
  c = OptimConfig(peak_lr=2.0, warmup_steps=10, total_steps=110, final_fraction=0.1)
  f = lambda s: float(lr_schedule(c)(s))
  assert f(0) == pytest.approx(2.0 * 0.005)
  assert f(5) == pytest.approx(2.0 * (0.005 + 0.995 * 0.5))
  assert f(10) == f(14) == pytest.approx(2.0)  # Constant for 5% of the 99 post-warm-up steps.
  passed = (60 - 10) / 99
  assert f(60) == pytest.approx(2.0 * (0.1 + 0.9 * (1 - passed) / 0.95), rel=1e-6)
  assert f(109) == pytest.approx(0.2)
  assert peak_lr_for(768) == pytest.approx(3e-4)


def test_weight_decay_schedule_and_groups():
  c = OptimConfig(weight_decay=0.05, weight_decay_end=0.08, total_steps=101)
  w = wd_schedule(c)
  assert float(w(0)) == pytest.approx(0.05) and float(w(100)) == pytest.approx(0.08)
  assert float(w(50)) == pytest.approx(0.065)
  assert float(wd_schedule(OptimConfig(weight_decay=0.05))(7)) == pytest.approx(0.05)
  ab = var_transformer.abstract_params(VARConfig(depth=1, width=64, num_heads=1, shared_aln=True))
  m = {'/'.join(k): v for k, v in flatten_params(decay_mask(ab)).items()}
  assert m['class_emb/embedding'] and m['blocks_0/ffn/fc1/kernel'] and m['head/kernel']
  for k in ('pos_start', 'pos_1LC', 'lvl_embed/embedding', 'blocks_0/attn/scale_mul_1H11', 'blocks_0/ada_gss',
            'blocks_0/attn/q_bias', 'head/bias', 'word_embed/bias'):
    assert not m[k], k


@pytest.fixture(scope='module')
def setup():
  vae_params = unbox(Tokenizer(VAE_CFG).init(jax.random.PRNGKey(1)))
  rng = np.random.default_rng(0)
  batches = [{'labels': rng.integers(0, 10, 16).astype(np.int32),
              'ids': rng.integers(0, 64, (16, VAR_CFG.seq_len)).astype(np.int32)} for _ in range(5)]
  return vae_params, batches


def _run(shape, vae_params, batches, var_cfg=VAR_CFG, accum=1, ema=0.0, history=None):
  """Trains on `batches`; `history`, a list, receives the parameters (on the host) at init and after
  every step (the step donates the state, so they are copied before the next one)."""
  mesh = pm.make_mesh(shape, devices=jax.devices()[:math.prod(shape)])
  tr = Trainer(var_cfg, VAE_CFG, OptimConfig(peak_lr=1e-3, warmup_steps=2, total_steps=5), mesh,
               accum_steps=accum, ema_decay=ema)
  state = tr.init(jax.random.PRNGKey(0))
  step, frozen = tr.make_step(), tr.place_frozen(vae_params)
  losses = []
  if history is not None:
    history.append(jax.device_get(state.params))
  for b in batches:
    state, m = step(state, frozen, tr.shard_batch(b))
    losses.append(float(m['loss']))
    if history is not None:
      history.append(jax.device_get(state.params))
  return np.array(losses), state


# Below the warm-up's (1 + t) / (10 + t) from step 2 on (0.2 < 3/12), so the 5 steps meet both sides of
# the min.
EMA_DECAY = 0.2


@pytest.fixture(scope='module')
def one_device(setup):
  """5 steps on 1 device with an EMA (d = 0.2): (losses, final state, parameters at init and after every
  step). The reference of the mesh test and the record of the EMA test, one compiled step for both (the
  EMA is read by neither the loss nor the update: the meshes, without one, must match it)."""
  vae_params, batches = setup
  history = []
  losses, state = _run((1, 1, 1), vae_params, batches, ema=EMA_DECAY, history=history)
  return losses, state, history


def test_same_losses_on_one_device_and_two_meshes(setup, one_device):
  """bfloat16 compute, label dropout on: 5 steps on 1 device, (data=8) and (data=2, fsdp=2, tensor=2)."""
  vae_params, batches = setup
  one = one_device[0]
  for shape in ((8, 1, 1), (2, 2, 2)):
    other, state = _run(shape, vae_params, batches)
    np.testing.assert_allclose(other, one, rtol=1e-4)
  assert state.params['head']['kernel'].sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert np.all(np.isfinite(one)) and one[-1] != one[0]


def test_gradient_accumulation_equals_the_full_batch(setup):
  vae_params, batches = setup
  cfg = dataclasses.replace(VAR_CFG, cond_drop_rate=0.0, drop_path_rate=0.0, dtype='float32')
  full, s1 = _run((1, 1, 1), vae_params, batches[:2], cfg)
  acc, s2 = _run((1, 1, 1), vae_params, batches[:2], cfg, accum=4)
  np.testing.assert_allclose(acc, full, rtol=1e-5)
  np.testing.assert_allclose(s2.params['head']['kernel'], s1.params['head']['kernel'], atol=1e-6)


def test_ema_tracks_the_parameters(one_device):
  """e_0 = p_0, then e_t = d_t e_{t-1} + (1 - d_t) p_t after every step, for every parameter, with the
  warm-up d_t = min(d, (1 + t) / (10 + t)) at the step t before the update (d = 0.2: 0.1, 0.18, then 0.2;
  swapping d and 1 - d, a decay without the warm-up, or averaging the parameters before the update, is
  caught)."""
  _, s, history = one_device
  assert len(history) == 6
  flat = [flatten_params(h) for h in history]
  ema = flatten_params(jax.device_get(s.ema_params))
  assert set(ema) == set(flat[0])
  decays = [min(EMA_DECAY, (1 + t) / (10 + t)) for t in range(5)]
  assert decays[0] < decays[1] < decays[2] == decays[4] == EMA_DECAY
  moved = 0
  for path, got in ema.items():
    e = np.asarray(flat[0][path], np.float64)
    for d, h in zip(decays, flat[1:]):
      e = d * e + (1 - d) * np.asarray(h[path], np.float64)
    assert got.dtype == np.float32, path
    np.testing.assert_allclose(got, e, rtol=1e-6, atol=1e-7, err_msg='/'.join(path))
    moved += not np.allclose(flat[-1][path], flat[0][path])
  # The parameters moved, so the recursion is not satisfied by a constant.
  assert moved > 0.5 * len(ema)
  assert not np.allclose(ema[('head', 'kernel')], flat[-1][('head', 'kernel')])


def test_the_ema_keeps_under_a_percent_of_its_start_after_three_steps():
  """The weight the EMA's starting point (random initialisation, or a fine-tune's start model) keeps,
  the product of the decays, against the closed form 1 / C(T + 9, 9) while the warm-up's decay is below
  d, and against d^T without the warm-up: the demo's 2,800 steps kept 0.999^2800 = 6% before."""
  assert EMA_WARMUP == 10
  for steps in (1, 2, 3, 4, 10, 20, 1000, 2800):
    assert ema_start_weight(0.999, steps) == pytest.approx(1 / math.comb(steps + 9, 9), rel=1e-9)
  assert ema_start_weight(0.999, 1) == pytest.approx(0.1) and ema_start_weight(0.999, 2) == pytest.approx(0.2 / 11)
  assert ema_start_weight(0.999, 3) < 0.01  # 0.0045: every run of 3 steps or more.
  assert 0.999 ** 2800 > 0.06 and ema_start_weight(0.999, 2800) < 1e-20
  # Past the warm-up (from t = 8,990 for 0.999) the decay is d's: the product goes on as d^(T - T0).
  assert (1 + 8989) / (10 + 8989) < 0.999 < (1 + 8991) / (10 + 8991)
  assert ema_start_weight(0.999, 10000) == pytest.approx(ema_start_weight(0.999, 9000) * 0.999 ** 1000, rel=1e-9)
  assert ema_start_weight(0.0, 2800) is None  # No EMA: the export is the trained weights.


def test_the_trained_ema_keeps_exactly_that_weight_of_its_start(setup):
  """Run-level: the same 4 steps from a state whose EMA starts 1.0 above the weights, and from the plain
  one. The EMA never feeds the loss or the update, so the EMAs differ by exactly the weight the start
  keeps: ema_start_weight(d, t) after t steps, 0.1, 0.018, 0.0045, 0.0014 (was 0.999^t)."""
  vae_params, batches = setup
  mesh = pm.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tr = Trainer(VAR_CFG, VAE_CFG, OptimConfig(peak_lr=1e-3, warmup_steps=2, total_steps=5), mesh, ema_decay=0.999)
  plain, shifted = tr.init(jax.random.PRNGKey(0)), tr.init(jax.random.PRNGKey(0))
  shifted = shifted.replace(ema_params=jax.tree_util.tree_map(lambda e: e + 1.0, shifted.ema_params))
  step, frozen = tr.make_step(), tr.place_frozen(vae_params)
  for t, b in enumerate(batches[:4], start=1):
    plain, _ = step(plain, frozen, tr.shard_batch(b))
    shifted, _ = step(shifted, frozen, tr.shard_batch(b))
    a, c = flatten_params(jax.device_get(plain.ema_params)), flatten_params(jax.device_get(shifted.ema_params))
    np.testing.assert_array_equal(jax.device_get(plain.params['head']['kernel']),
                                  jax.device_get(shifted.params['head']['kernel']))
    kept = np.concatenate([(np.asarray(c[k], np.float64) - a[k]).ravel() for k in a])
    np.testing.assert_allclose(kept, ema_start_weight(0.999, t), rtol=2e-3, atol=2e-6, err_msg=f'step {t}')
  assert kept.max() < 0.01


def test_progressive_training_is_vars():
  """Stage, loss weights and newest-scale warm-up against a NumPy transcription of VAR's train.py and
  trainer.py, iteration by iteration: start with 1 scale during a 3-step LR warm-up, every scale from
  step 12 (pg 0.6 of 20), a 4-step ramp."""
  from srdd_jax.train.progressive import Progressive, newest_weight
  from srdd_jax.transformer.loss import cross_entropy_metrics
  from tests.var_numpy import VarProgressiveTrainer
  var = VarProgressiveTrainer(PN, pg=0.6, pg0=0, wp_it=3, max_it=20, pgwp_it=4)
  prog = Progressive(start_scales=1, full_step=12, warmup_steps=3, ramp_steps=4, num_scales=len(PN))
  rng = np.random.default_rng(3)
  L, V = VAR_CFG.seq_len, 64
  seen = []
  for step in range(20):
    logits = rng.standard_normal((3, L, V)).astype(np.float32)
    ids = rng.integers(0, V, (3, L))
    logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[..., None], -1)[..., 0]
    want, n_tok, _ = var.loss(step, nll)
    stage = prog.stage(step)
    n = sum(p * p for p in PN[:stage[0]])
    assert n == n_tok, step
    w = newest_weight(stage, np.int32(step))
    loss, m = cross_entropy_metrics(logits[:, :n], ids, VAR_CFG, w)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, err_msg=f'step {step}')
    np.testing.assert_allclose(m['accuracy'], (logits.argmax(-1) == ids)[:, :n].mean(), rtol=1e-6)
    assert float(m['last_scale_loss']) == (-1.0 if n < L else pytest.approx(nll[:, 14:].mean(), rel=1e-5))
    seen.append((stage[0], round(float(w), 4)))
  # The run goes through every stage, and the middle stages' newest scale ramps up from 0.25 (1/4).
  assert [a for a, _ in seen] == [1] * 5 + [2] * 3 + [3] * 3 + [4] * 9
  assert seen[:5] == [(1, 1.0)] * 5 and seen[11:] == [(4, 1.0)] * 9  # First and last stage: no ramp.
  assert seen[5:11] == [(2, 0.25), (2, 0.5), (2, 0.75), (3, 0.25), (3, 0.5), (3, 0.75)]
  with pytest.raises(ValueError, match='full_step=3 must come after'):
    Progressive(start_scales=1, full_step=3, warmup_steps=3, ramp_steps=4, num_scales=4)


@pytest.mark.parametrize('mask', ['causal', 'markov'])
def test_progressive_stage_computes_only_its_scales(mask):
  """The cut sequence gives exactly the first logits of the whole one (finer scales never reach
  coarser ones), so a stage's program is the shorter model's."""
  from srdd_jax.transformer.model import VAR
  c = dataclasses.replace(VAR_CFG, mask=mask, dtype='float32')
  rng = np.random.default_rng(0)
  labels = np.asarray([1, 2], np.int32)
  x_in = rng.standard_normal((2, c.seq_len - 1, c.z_channels)).astype(np.float32)
  model = VAR(c)
  params = model.init(jax.random.PRNGKey(0), labels, x_in)['params']
  full = model.apply({'params': params}, labels, x_in)
  for n, tokens in ((1, 1), (2, 5), (3, 14)):
    part = model.apply({'params': params}, labels, x_in, num_scales=n)
    assert part.shape == (2, tokens, c.vocab_size)
    np.testing.assert_allclose(part, full[:, :tokens], rtol=1e-5, atol=1e-5)
