"""Masked resampling `refine` (SPEC §5): the zero-initialised second stream, its training loss, the
sampler's iterations and fine-tuning from a checkpoint without the stream."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srdd_jax.config import ConfigError
from srdd_jax.convert import params_io
from srdd_jax.convert.loading import with_refine_params
from srdd_jax.diffusion.filtering import SamplerConfig
from srdd_jax.diffusion.sampler import Sampler
from srdd_jax.modes import train as train_mode
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train.distill import heldout_token_loss
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.refine import RefineTrainer, hidden_cross_entropy
from srdd_jax.train.transformer_task import init_from_checkpoint
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.model import VAR, empty_caches
from tests.conftest import smoke_config

PN = (1, 2, 4)
V = 16
PLAIN = VARConfig(depth=2, width=32, num_heads=2, num_classes=4, vocab_size=V, z_channels=4, patch_nums=PN,
                  drop_path_rate=0.0, cond_drop_rate=0.0, init_adaln_gamma=1.0, init_head=1.0)  # Far from identity.
# The tokenizer only carries tokens to images here: the smallest one of this size (one residual block
# per level, no attention) keeps the sampler's and the step's programs small.
VQ = VQVAEConfig(vocab_size=V, z_channels=4, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, using_sa=False,
                 using_mid_sa=False, patch_nums=PN)


def _cfg(mask, refine=True):
  return dataclasses.replace(PLAIN, mask=mask, refine=refine)


@pytest.fixture(scope='module')
def models():
  """(plain params, the same with the zero-initialised refine stream, the same with the stream made
  non-zero, inputs): one set of weights for both masks."""
  lab = np.array([0, 3], np.int32)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, PLAIN.seq_len - 1, PLAIN.z_channels)).astype(np.float32)
  plain = jax.jit(lambda k: unbox(VAR(PLAIN).init(k, lab, x)['params']))(jax.random.PRNGKey(0))
  refine = with_refine_params(plain, _cfg('markov'), jax.random.PRNGKey(2))
  live = {**refine, 'refine_proj': {'kernel': (0.3 * rng.standard_normal((32, 32))).astype(np.float32),
                                    'bias': (0.1 * rng.standard_normal(32)).astype(np.float32)}}
  return plain, refine, live, lab, x


def _all_masked(b, n):
  return np.full((b, n), V, np.int32)


# The model's passes compiled, one program per architecture and call pattern, shared by the tests (op by
# op, the same checks compiled some hundreds of small programs).
@functools.partial(jax.jit, static_argnums=0)
def _forward(c, params, lab, x, reveal_ids=None):
  return VAR(c).apply({'params': params}, lab, x, reveal_ids=reveal_ids)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _scale_pass(c, params, lab, x, si, caches, reveal):
  """One scale's logits through scale_logits, from the teacher-forcing input `x` of the training forward."""
  m = VAR(c)
  cond = m.apply({'params': params}, lab, method=VAR.condition)
  b, e = c.begin_ends[si]
  xs = None if si == 0 else x[:, b - c.first_l:e - c.first_l]
  kw = {} if reveal is None else {'reveal': reveal}
  return m.apply({'params': params}, cond, xs, si, caches, method=VAR.scale_logits, **kw)


@pytest.mark.parametrize('mask', ['markov', 'causal'])
def test_zero_initialised_stream_gives_bitwise_the_plain_logits(models, mask):
  plain, refine, _, lab, x = models
  c0, c1 = dataclasses.replace(PLAIN, mask=mask), _cfg(mask)
  ref = _forward(c0, plain, lab, x)
  np.testing.assert_array_equal(_forward(c1, refine, lab, x), ref)
  np.testing.assert_array_equal(_forward(c1, refine, lab, x, _all_masked(2, c1.seq_len)), ref)
  caches0 = caches1 = caches2 = empty_caches(c0, 2) if mask == 'causal' else None
  for si, pn in enumerate(PN):
    want, caches0 = _scale_pass(c0, plain, lab, x, si, caches0, None)
    got, caches1 = _scale_pass(c1, refine, lab, x, si, caches1, _all_masked(2, pn * pn))
    none, caches2 = _scale_pass(c1, refine, lab, x, si, caches2, None)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(none, want)
  if mask == 'causal':
    for a, b in zip(jax.tree_util.tree_leaves(caches0), jax.tree_util.tree_leaves(caches1)):
      np.testing.assert_array_equal(a, b)


def test_init_creates_the_stream_and_plain_models_refuse_it(models):
  plain, _, _, lab, x = models
  p = jax.jit(lambda k: unbox(VAR(_cfg('markov')).init(k, lab, x)['params']))(jax.random.PRNGKey(0))
  assert p['refine_embed']['embedding'].shape == (V + 1, 32)
  assert not np.any(p['refine_proj']['kernel']) and not np.any(p['refine_proj']['bias'])
  assert 'refine_embed' not in plain
  with pytest.raises(ValueError, match='refine'):  # Refused while tracing: nothing to compile.
    jax.eval_shape(lambda: VAR(PLAIN).apply({'params': plain}, lab, x, reveal_ids=_all_masked(2, PLAIN.seq_len)))


@pytest.mark.parametrize('mask', ['markov', 'causal'])
def test_revealed_tokens_reach_the_hidden_tokens_logits(models, mask):
  _, _, live, lab, x = models
  c = _cfg(mask)
  b, e = c.begin_ends[2]

  def logits(tok, params=live):
    reveal = _all_masked(2, c.seq_len)
    reveal[:, b] = tok  # The first token of scale 2 revealed.
    return _forward(c, params, lab, x, reveal)

  l5, l7 = np.asarray(logits(5)), np.asarray(logits(7))
  hidden = slice(b + 1, e)
  # Every hidden token of the scale: its logits move with the revealed token's value.
  diff = np.abs(l5[:, hidden] - l7[:, hidden]).max(axis=-1)
  assert np.all(diff > 1e-5), diff  # Measured 4e-4 and up; no path would give exactly 0.
  np.testing.assert_array_equal(l5[:, :b], l7[:, :b])  # Coarser scales never see a finer one.
  # The gradient of the hidden tokens' logits reaches the revealed token's row and the [MASK] row only.
  g = jax.jit(jax.grad(lambda p: jnp.sum(logits(5, p)[:, hidden] ** 2)))(live)['refine_embed']['embedding']
  rows = np.flatnonzero(np.abs(np.asarray(g)).sum(-1))
  assert rows.tolist() == [5, V]
  # scale_logits (the sampler's pass) gives the same as the training forward.
  caches = empty_caches(c, 2) if mask == 'causal' else None
  for si, pn in enumerate(PN):
    reveal = _all_masked(2, pn * pn)
    if si == 2:
      reveal[:, 0] = 5
    out, caches = _scale_pass(c, live, lab, x, si, caches, reveal)
  np.testing.assert_allclose(out, l5[:, b:e], rtol=1e-5, atol=1e-5)


def test_causal_second_pass_rewrites_the_scale_in_the_cache(models):
  """Two passes of scale 1 (different reveals) leave the cache of the second alone: the next scale's
  logits are bitwise those after the second pass only."""
  _, _, live, lab, x = models
  c = _cfg('causal')
  first = np.array([[3, V, 9, V], [V, V, V, 1]], np.int32)
  second = np.array([[3, 4, V, V], [2, V, V, 1]], np.int32)
  _, caches = _scale_pass(c, live, lab, x, 0, empty_caches(c, 2), _all_masked(2, 1))
  _, twice = _scale_pass(c, live, lab, x, 1, caches, first)
  _, twice = _scale_pass(c, live, lab, x, 1, twice, second)
  _, once = _scale_pass(c, live, lab, x, 1, caches, second)
  a, _ = _scale_pass(c, live, lab, x, 2, twice, _all_masked(2, 16))
  b, _ = _scale_pass(c, live, lab, x, 2, once, _all_masked(2, 16))
  np.testing.assert_array_equal(a, b)
  ca, _ = _scale_pass(c, live, lab, x, 2, _scale_pass(c, live, lab, x, 1, caches, first)[1], _all_masked(2, 16))
  assert not np.array_equal(a, ca)


def test_loss_is_the_hidden_tokens_cross_entropy():
  c = _cfg('markov')
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, c.seq_len, V)).astype(np.float32)
  targets = rng.integers(0, V, (2, c.seq_len)).astype(np.int32)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logits - lse, targets[..., None], -1)[..., 0]
  loss_fn = jax.jit(hidden_cross_entropy, static_argnums=3)  # One program for the three calls.
  revealed = np.ones((2, c.seq_len), bool)
  revealed[1, 7] = False  # Everything revealed but token 7 of example 1.
  loss, m = loss_fn(logits, targets, jnp.asarray(revealed), c)
  np.testing.assert_allclose(loss, nll[1, 7], rtol=1e-6)
  assert m['loss'] == loss and m['last_scale_loss'] == loss  # Token 7 is in the last scale (5..20).
  assert float(m['accuracy']) == float(np.argmax(logits[1, 7]) == targets[1, 7])
  revealed[0, 0] = False
  loss, m = loss_fn(logits, targets, jnp.asarray(revealed), c)
  np.testing.assert_allclose(loss, (nll[1, 7] + nll[0, 0]) / 2, rtol=1e-6)
  np.testing.assert_allclose(m['last_scale_loss'], nll[1, 7], rtol=1e-6)
  # Nothing revealed: VAR's mean cross-entropy.
  loss, _ = loss_fn(logits, targets, jnp.zeros((2, c.seq_len), bool), c)
  np.testing.assert_allclose(loss, nll.mean(), rtol=1e-6)


@pytest.fixture(scope='module')
def vae_params():
  """Random tokenizer weights (numpy, from the abstract tree): what they are does not matter here, and a
  compiled initialiser costs more than every use of them."""
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
                                unbox(Tokenizer(VQ).abstract_params()))


def test_trainer_loss_reveals_ground_truth_and_scores_the_hidden_token(models, vae_params):
  _, _, live, lab, _ = models
  c = _cfg('markov')
  mesh = pm.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tr = RefineTrainer(c, VQ, OptimConfig(total_steps=10), mesh)
  ids = np.random.default_rng(4).integers(0, V, (2, c.seq_len)).astype(np.int32)
  revealed = np.ones((2, c.seq_len), bool)
  revealed[0, 9] = False
  tr.reveal = lambda rng, batch: jnp.asarray(revealed)
  loss, _ = jax.jit(tr.loss)(live, vae_params, lab, ids, jax.random.PRNGKey(0))
  x_in = jax.jit(lambda vp, ids: tr.tokenizer.idx_to_var_input(vp, [ids[:, b:e] for b, e in c.begin_ends]))(
      vae_params, ids)
  logits = np.asarray(_forward(c, live, lab, x_in, np.where(revealed, ids, V)), np.float64)
  lse = np.log(np.exp(logits[0, 9]).sum())
  np.testing.assert_allclose(loss, lse - logits[0, 9, ids[0, 9]], rtol=1e-5)
  # The reveal ratio: 0 for a zero_prob share of examples, else uniform; tokens independently.
  tr = RefineTrainer(c, VQ, OptimConfig(total_steps=10), mesh, zero_prob=0.25, max_ratio=0.5)
  frac = np.asarray(jax.jit(tr.reveal, static_argnums=1)(jax.random.PRNGKey(0), 4000)).mean(axis=1)
  # Nothing revealed: r = 0, or by chance all 21 tokens hidden (E[(1 - r)^21] = 2 (1 - 0.5^22) / 22).
  assert abs((frac == 0).mean() - (0.25 + 0.75 * 2 * (1 - 0.5 ** 22) / 22)) < 0.03
  assert abs(frac.mean() - 0.75 * 0.25) < 0.01


def _fake_model(calls):
  """A constructed transformer: a first pass (every token masked) gives tokens 0..7 probability 0.1
  and 8..15 0.025; any later pass puts all the mass on token 3. Every pass is recorded."""
  base = jnp.log(jnp.asarray([0.1] * 8 + [0.025] * 8))
  later = jnp.where(jnp.arange(V) == 3, 0.0, -30.0)

  def scale_logits(var_params, cond, x_in, si, caches, reveal):
    jax.debug.callback(lambda r, si=si: calls.append((si, np.asarray(r))), reveal)
    first = jnp.all(reveal == V, axis=1)[:, None, None]
    return jnp.broadcast_to(jnp.where(first, base, later), reveal.shape + (V,)), caches

  return scale_logits


@pytest.mark.parametrize('mask', ['markov', 'causal'])
def test_refine_iterations_remask_only_low_probability_tokens(models, vae_params, mask):
  _, refine, _, _, _ = models
  labels = jnp.arange(8, dtype=jnp.int32) % 4

  def run(iterations, keep=None):
    sc = SamplerConfig(cfg=0.0, top_k=0, top_p=0.0, mr_mode='refine', mr_threshold=0.05,
                       mr_iterations=iterations, mr_scales=(False, True, True))
    s = Sampler(_cfg(mask), VQ, sc)
    calls = []
    s._scale_logits = _fake_model(calls)
    kw = {} if keep is None else dict(keep_ids=keep[0], keep_masks=keep[1])
    ids, _ = s.tokens(refine, vae_params, labels, jax.random.PRNGKey(7), **kw)
    jax.effects_barrier()
    assert len(calls) == s.forward_passes() == len(PN) + 2 * iterations
    return [np.asarray(t) for t in ids], calls

  tok0, calls = run(0)
  assert [si for si, _ in calls] == [0, 1, 2]
  low = [t >= 8 for t in tok0]
  assert all(l.any() and (~l).any() for l in low[1:])
  assert all((~l).any(axis=1).all() for l in low[1:])  # Each example keeps one token per scale.
  tok1, calls = run(1)
  np.testing.assert_array_equal(tok1[0], tok0[0])  # MR off at scale 0.
  for si in (1, 2):
    np.testing.assert_array_equal(tok1[si], np.where(low[si], 3, tok0[si]))
    passes = [r for s, r in calls if s == si]
    assert len(passes) == 2
    np.testing.assert_array_equal(passes[0], V)
    np.testing.assert_array_equal(passes[1], np.where(low[si], V, tok0[si]))
  # The constructed model's later passes (tokens revealed) put all the mass on 3, so read at a revealed
  # position every kept token but 3 would look improbable. Confidence is the probability under the pass
  # that drew the token, where it was masked: kept tokens keep their first-pass 0.1 >= 0.05, redrawn
  # ones got 1.0, so the second iteration re-masks nothing and changes nothing.
  tok2, calls = run(2)
  for si in (1, 2):
    np.testing.assert_array_equal(tok2[si], tok1[si])
    assert (tok2[si] != 3).any()  # Confident first-pass tokens survive the second iteration.
    passes = [r for s, r in calls if s == si]
    np.testing.assert_array_equal(passes[2], tok1[si])  # Nothing re-masked: every token revealed.
  # Editing: kept tokens are revealed and never redrawn, however improbable.
  keep_ids = [np.zeros((8, p * p), np.int32) for p in PN]
  keep_masks = [np.zeros((8, p * p), bool) for p in PN]
  keep_ids[2][:, :3], keep_masks[2][:, :3] = 9, True
  tok, calls = run(2, (keep_ids, keep_masks))
  np.testing.assert_array_equal(tok[2][:, :3], 9)
  np.testing.assert_array_equal(tok[2][:, 3:], tok1[2][:, 3:])
  later = [r for s, r in calls if s == 2][1:]
  assert len(later) == 2 and all(np.all(r[:, :3] == 9) for r in later)


@pytest.mark.parametrize('mask', ['markov', 'causal'])
def test_refine_sampling_runs_on_a_real_model_with_guidance(models, vae_params, mask):
  _, _, live, _, _ = models
  sc = SamplerConfig(cfg=2.0, top_k=8, top_p=0.9, mr_mode='refine', mr_threshold=0.2, mr_iterations=2)
  s = Sampler(_cfg(mask), VQ, sc)
  assert s.forward_passes() == 3 + 3 * 2
  ids, img = jax.jit(s.sample)(live, vae_params, jnp.array([0, 1], jnp.int32), jax.random.PRNGKey(0))
  assert [t.shape for t in ids] == [(2, p * p) for p in PN] and img.shape == (2, 16, 16, 3)
  assert all(int(t.min()) >= 0 and int(t.max()) < V for t in ids)
  redraw = Sampler(_cfg(mask), VQ, dataclasses.replace(sc, mr_mode='redraw'))
  assert redraw.forward_passes() == 3
  with pytest.raises(ValueError, match='config.sampler.mr_mode'):
    Sampler(dataclasses.replace(PLAIN, mask=mask), VQ, sc)
  with pytest.raises(ValueError, match="mr_mode='resample'"):
    SamplerConfig(mr_mode='resample')


# --- fine-tuning from a checkpoint without the stream ------------------------------------------------

def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


@pytest.fixture(scope='module')
def plain_export(models, tmp_path_factory):
  """The test's transformer without the refine stream, saved as a training export."""
  out = str(tmp_path_factory.mktemp('plain') / 'export')
  params_io.save_params(out, models[0], kind='var', config=PLAIN)
  return out, _flat(models[0])


def test_fine_tune_with_refine_from_a_plain_checkpoint(plain_export, vae_params):
  path, plain = plain_export
  mesh = pm.make_mesh((4, 2, 1))
  tr = RefineTrainer(_cfg('markov'), VQ, OptimConfig(peak_lr=1e-2, warmup_steps=1, total_steps=3), mesh,
                     ema_decay=0.9)
  state = init_from_checkpoint(tr, path, seed=0)
  start = _flat(state.params)
  assert set(start) - set(plain) == {'refine_embed/embedding', 'refine_proj/bias', 'refine_proj/kernel'}
  assert all(np.array_equal(start[k], plain[k]) for k in plain)
  assert not start['refine_proj/kernel'].any() and start['refine_embed/embedding'].std() > 0
  assert _flat(state.ema_params).keys() == start.keys()
  step, frozen = tr.make_step(), tr.place_frozen(vae_params)
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = {'labels': rng.integers(0, 4, 8).astype(np.int32),
             'ids': rng.integers(0, V, (8, PLAIN.seq_len)).astype(np.int32)}
    state, m = step(state, frozen, tr.shard_batch(batch))
    assert math.isfinite(float(m['loss']))
  assert int(state.step) == 2 and _flat(state.params)['refine_proj/kernel'].any()  # The stream learns.


def test_init_from_with_another_architecture_names_the_parameter(plain_export, tmp_path):
  path, _ = plain_export
  mesh = pm.make_mesh((8, 1, 1))
  tr = RefineTrainer(dataclasses.replace(_cfg('markov'), width=64), VQ, OptimConfig(total_steps=3), mesh)
  with pytest.raises(ConfigError, match=r'config.train.init_from=.*parameter blocks_0/ada_lin_1/bias has '
                                        r'shape \(192,\) there but \(384,\)'):
    init_from_checkpoint(tr, path, seed=0)
  with pytest.raises(ConfigError, match='config.train.init_from=.*does not exist'):
    train_mode.task(smoke_config(init_from=str(tmp_path / 'missing')), str(tmp_path / 'y'))
  with pytest.raises(ConfigError, match='config.train.refine_zero_prob=1.5'):
    train_mode.task(smoke_config(refine_zero_prob=1.5), str(tmp_path / 'z'))


def test_heldout_loss_of_a_refine_model_sees_every_token_masked(models, vae_params):
  """The held-out loss scores a refine model as its first sampling pass sees a scale (all masked),
  not with the stream left out, an input the model never saw in training."""
  _, _, live, lab, _ = models
  c = _cfg('markov')
  ids = jax.random.randint(jax.random.PRNGKey(5), (2, c.seq_len), 0, V)
  got = heldout_token_loss(c, live, VQ, vae_params, ids, lab, batch_size=2)
  x_in = Tokenizer(VQ).idx_to_var_input(vae_params, [ids[:, b:e] for b, e in c.begin_ends])

  def mean_nll(reveal):
    logits = VAR(c).apply({'params': live}, lab, x_in, reveal_ids=reveal)
    return float(-jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1).mean())

  masked = mean_nll(_all_masked(2, c.seq_len))
  assert abs(got['mean_loss'] - masked) < 1e-5
  assert abs(mean_nll(None) - masked) > 1e-4  # The live stream moves the logits: the two differ.
