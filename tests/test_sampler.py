"""The sampler: filtering semantics, RNG, sharding, masked resampling, editing, the CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from srdd_jax.convert import var_transformer as cvt
from srdd_jax.convert import var_vqvae
from srdd_jax.diffusion import editing, filtering
from srdd_jax.diffusion.filtering import SamplerConfig
from srdd_jax.diffusion.sampler import Sampler, batch_rng
from srdd_jax.parallel import mesh as pm
from srdd_jax.tools import convert_var
from srdd_jax.convert.reference import var_config_from_meta
from tests.conftest import reference_file, xla_flags


def _load_models(name):
  path = reference_file(name)
  with np.load(path) as z:
    data = {k: z[k] for k in z.files}
  st = {k[4:]: v for k, v in data.items() if k.startswith('var/')}
  vc = var_config_from_meta(json.loads(str(data['meta'])), {k: v.shape for k, v in st.items()}, path)
  vst = {k[4:]: v for k, v in data.items() if k.startswith('vae/')}
  vae_config = var_vqvae.infer_vqvae_config({k: v.shape for k, v in vst.items()}, patch_nums=vc.patch_nums)
  return vc, cvt.convert_var(st, vc), vae_config, var_vqvae.convert_vqvae(vst, vae_config)


@pytest.fixture(scope='module')
def compact_models():
  """The compact reference transformer (depth 2, width 64, 5 classes, V=512, 32 px, 6 scales) and its
  tokenizer, converted: part of the repository, so the tests using it run everywhere."""
  return _load_models('compact_var_d2_w64.npz')


def test_guidance_schedules():
  assert SamplerConfig(cfg=1.5).guidance(4) == (0.0, 0.5, 1.0, 1.5)
  assert SamplerConfig(cfg=5.0, cfg_schedule='constant').guidance(3) == (5.0, 5.0, 5.0)
  assert SamplerConfig(cfg_schedule=[0, 1, 2]).guidance(3) == (0.0, 1.0, 2.0)
  with pytest.raises(ValueError, match='3 values for 4 scales'):
    SamplerConfig(cfg_schedule=[0, 1, 2]).guidance(4)
  with pytest.raises(ValueError, match="cfg_schedule='cosine'"):
    SamplerConfig(cfg_schedule='cosine')
  np.testing.assert_allclose(filtering.guide(jnp.array([2.0]), jnp.array([1.0]), 0.5), [2.5])


def test_top_k_and_top_p_semantics():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  k2 = filtering.top_k_filter(logits, 2)
  np.testing.assert_array_equal(np.isfinite(k2), [[False, True, False, True, False]])
  tie = filtering.top_k_filter(jnp.array([[1.0, 3.0, 2.0, 2.0]]), 2)  # Ties with the k-th stay.
  np.testing.assert_array_equal(np.isfinite(tie), [[False, True, True, True]])
  # Mass >= 0.8: 0.4 + 0.3 + 0.15 = 0.85 is the smallest such set.
  p = filtering.top_p_filter(logits, 0.8)
  np.testing.assert_array_equal(np.isfinite(p), [[False, True, False, True, True]])
  # A top token above p alone is kept alone, and always kept.
  p = filtering.top_p_filter(jnp.log(jnp.array([[0.9, 0.05, 0.05]])), 0.5)
  np.testing.assert_array_equal(np.isfinite(p), [[True, False, False]])


def test_min_p_keeps_tokens_at_least_p_times_the_most_likely():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.04, 0.26]]))
  kept = np.isfinite(filtering.min_p_filter(logits, 0.1))  # Threshold 0.05: 0.04 goes.
  np.testing.assert_array_equal(kept, [[True, True, False, True]])
  np.testing.assert_array_equal(np.isfinite(filtering.min_p_filter(logits, 0.5)), [[True, False, False, True]])
  assert filtering.min_p_filter(logits, 0.0) is logits
  with pytest.raises(ValueError, match='min_p=1.0'):
    SamplerConfig(min_p=1.0)


@pytest.mark.parametrize('impl', ['sort', 'bisect'])
def test_compact_candidates_give_the_reference_distribution(impl):
  logits = 3 * jax.random.normal(jax.random.PRNGKey(0), (4, 7, 300))
  # Rounded to a grid of 0.25: many ties, the k-th value's among them (the reference keeps every tie of
  # it, the compact forms exactly k, so there only the kept set of top-k alone is checked).
  tied = jnp.round(4 * logits) / 4
  for x in (logits, tied, logits.at[..., :40].set(-jnp.inf)):
    for sc in (SamplerConfig(top_k=50, top_p=0.9, temperature=0.7), SamplerConfig(top_k=0, top_p=0.8),
               SamplerConfig(top_k=20, top_p=0.0), SamplerConfig(top_k=50, top_p=0.9, min_p=0.1),
               SamplerConfig(top_k=0, top_p=0.0, min_p=0.05), SamplerConfig(top_k=299, top_p=0.5)):
      ref = filtering.final_logits(x, sc)
      vals, ids = filtering.candidates(x, sc, impl)
      if ids is not None:
        assert ids.shape == (4, 7, sc.top_k) and vals.shape == ids.shape
        # Each kept id once, and its value the logit's own.
        assert all(len(set(r)) == sc.top_k for r in np.asarray(ids).reshape(-1, sc.top_k).tolist())
        vals = jnp.full_like(ref, -jnp.inf).at[jnp.arange(4)[:, None, None], jnp.arange(7)[None, :, None],
                                                ids].set(vals)
      if x is tied and sc.top_k:
        if sc.top_p == 0 and sc.min_p == 0:  # The values above the k-th all kept, none below it.
          kth = jax.lax.top_k(x, sc.top_k)[0][..., -1:]
          kept = np.isfinite(np.asarray(vals))
          assert np.all(kept[np.asarray(x > kth)]) and not np.any(kept[np.asarray(x < kth)])
        continue
      np.testing.assert_allclose(jax.nn.softmax(vals, -1), jax.nn.softmax(ref, -1), atol=1e-6)


def test_sort_free_top_k_keeps_the_largest_and_then_the_first_ties():
  """The values above the k-th always stay, whatever their ids; ties of the k-th fill the remaining
  slots from the lowest id (the case a plain prefix-sum compaction gets wrong: a large value at a high
  id behind many ties)."""
  x = jnp.array([[2.0, 2.0, 2.0, 5.0], [1.0, 3.0, 2.0, 2.0], [-1.0, -jnp.inf, -0.5, -3.0]])
  vals, ids = filtering.candidates(x, SamplerConfig(top_k=2, top_p=0.0), 'bisect')
  assert [sorted(r) for r in np.asarray(ids).tolist()] == [[0, 3], [1, 2], [0, 2]]
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(x), np.asarray(ids), -1), vals)
  # Top-p on the compact values: mass 0.4 + 0.3 + 0.15 >= 0.8 (VAR's rule, as in the test above).
  p = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  vals, ids = filtering.candidates(p, SamplerConfig(top_k=4, top_p=0.8), 'bisect')
  assert sorted(np.asarray(ids)[0][np.isfinite(np.asarray(vals)[0])].tolist()) == [1, 3, 4]


def test_the_sampler_filters_without_a_sort_on_the_cpu():
  """'auto' takes the sort-free form on the CPU (XLA:CPU's TopK is the sampler's largest cost outside
  the model there) and `lax.top_k` elsewhere: read from the compiled program, not from timings."""
  sc = SamplerConfig(top_k=50, top_p=0.9)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 300))
  text = {impl: jax.jit(lambda y, impl=impl: filtering.candidates(y, sc, impl)).lower(x).as_text()
          for impl in ('auto', 'sort', 'bisect')}
  assert 'top_k' in text['sort'] and 'top_k' not in text['bisect']
  assert text['auto'] == text['bisect'] if jax.default_backend() == 'cpu' else text['auto'] == text['sort']


def test_masked_redraw_frequency_follows_the_distribution():
  """7 tokens of p = 0.1 and 10 of p = 0.03 (threshold 0.05): after n redraws a low token survives
  only if all n + 1 draws were low, q^(n+1) with q = 0.3; the high ones share the rest equally."""
  probs = np.array([0.1] * 7 + [0.03] * 10)
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (400, 250, 17))
  n = 400 * 250
  for it in (0, 1, 2, 3, 5):
    key = jax.random.PRNGKey(it)
    tok = jax.random.categorical(key, logits)
    tok = filtering.masked_redraw(jax.random.fold_in(key, 99), logits, tok, 0.05, it)
    tok = np.asarray(tok).reshape(-1)
    low = float(np.mean(tok >= 7))
    q = 0.3 ** (it + 1)
    sd = np.sqrt(q * (1 - q) / n)
    assert abs(low - q) <= 5 * sd + 1e-12, (it, low, q)
    counts = np.bincount(tok, minlength=17)[:7] / n
    share = (1 - q) / 7
    assert np.all(np.abs(counts - share) <= 5 * np.sqrt(share * (1 - share) / n)), (it, counts)


def test_draw_with_masked_redraw_returns_vocabulary_ids():
  """`draw` with top-k: sampling and the redraw work on the k candidates, the ids returned are the
  candidates' vocabulary ids. Each of 2000 positions has one token of probability 0.7 (threshold 0.2)
  at a vocabulary id >= 4 that varies with the position, three of 0.1 and 1020 others far below; 40
  redraws leave a low token with probability 0.3^41 = 4e-22, so every id is the high one."""
  rng = np.random.default_rng(0)
  v, n = 1024, 2000
  cand = np.stack([rng.choice(np.arange(4, v), 4, replace=False) for _ in range(n)])  # [high, low x3]
  logits = np.full((1, n, v), -50.0, np.float32)
  np.put_along_axis(logits[0], cand, np.log(np.array([[0.7, 0.1, 0.1, 0.1]], np.float32)), axis=-1)
  logits = jnp.asarray(logits)
  key = jax.random.PRNGKey(3)
  for top_k in (4, 0):  # Compact candidates (ids mapped back) and the full vocabulary (ids direct).
    sc = SamplerConfig(top_k=top_k, top_p=0.0, mr_threshold=0.2, mr_iterations=40)
    plain = np.asarray(filtering.draw(key, logits, sc, mr=False))[0]
    redrawn = np.asarray(filtering.draw(key, logits, sc, mr=True))[0]
    assert plain.shape == redrawn.shape == (n,)
    # Without the redraw: the real ids of the four candidates, the low ones 30% of the time
    # (Binomial(2000, 0.3): 600 +- 20.5, bounds at 5 sd).
    assert np.all(np.any(plain[:, None] == cand, axis=1)), top_k
    low = plain != cand[:, 0]
    assert 497 <= low.sum() <= 703, (top_k, low.sum())
    # With it: exactly the high id of every position.
    np.testing.assert_array_equal(redrawn, cand[:, 0], err_msg=f'top_k={top_k}')


def test_masked_redraw_only_on_switched_on_scales(compact_models):
  """`mr_scales` through the sampler, same key: B redraws at scale 3 only, C at scales 3 and 5. Scales
  0-3 see the same inputs and switches in both, so they are equal; scale 4, switched off in both after
  a redrawn scale, is equal; scale 5 is redrawn in C only, so it differs. (A switch ignored, shifted,
  or extended to the later scales breaks one of these.) The threshold 0.2 is far above the token
  probabilities of this random model (the largest are about 0.02), so nearly every token of a
  switched-on scale is redrawn. (top-k off: the candidates' id mapping is the test above.)"""
  vc, p, vae_c, vae_p = compact_models
  labels = jnp.array([0, 1, 2, 4])
  base = dict(cfg=1.5, top_k=0, top_p=0.0, mr_threshold=0.2, mr_iterations=2)
  runs = []
  for on in ((3,), (3, 5)):
    sc = SamplerConfig(**base, mr_scales=tuple(k in on for k in range(vc.num_scales)))
    assert [sc.mr_on(k, vc.num_scales) for k in range(vc.num_scales)] == [k in on for k in range(6)]
    ids, _ = jax.jit(Sampler(vc, vae_c, sc, mask='markov').tokens)(p, vae_p, labels, batch_rng(4, 0))
    runs.append([np.asarray(x) for x in ids])
  b, c = runs
  assert [bool(np.array_equal(x, y)) for x, y in zip(b, c)] == [True] * 5 + [False]
  # Scale 5 of C: a redraw of (nearly) every token, not a few flips.
  assert np.mean(b[5] != c[5]) > 0.5
  with pytest.raises(ValueError, match='mr_scales has 2 entries for 6 scales'):
    SamplerConfig(**base, mr_scales=(True, False)).mr_on(0, 6)


@pytest.mark.parametrize('mask', ['markov', 'causal'])
def test_guidance_as_an_argument_is_the_configured_guidance(compact_models, mask):
  """One program with the strengths as an (S,) argument gives, for every schedule and strength, the
  tokens of the program with those strengths as constants (same key), and strength 0 the unguided
  tokens; it is traced once for all of them. Strengths are exact in float32 (linear 5 over 6 scales:
  0, 1, ..., 5), so equality is exact; masked redraw is on, so the guided logits feed it too."""
  vc, p, vae_c, vae_p = compact_models
  labels = jnp.array([0, 1, 2, 4])
  base = dict(top_k=0, top_p=0.96, mr_threshold=0.05, mr_iterations=2)
  traces = []

  def traced(p, vae_p, labels, rng, g):
    traces.append(1)
    return Sampler(vc, vae_c, SamplerConfig(**base), mask=mask).tokens(p, vae_p, labels, rng, guidance=g)
  fn = jax.jit(traced)
  differ = 0
  for cfg, schedule in ((0.0, 'linear'), (5.0, 'linear'), (2.0, 'constant')):
    sc = SamplerConfig(cfg=cfg, cfg_schedule=schedule, **base)
    s = Sampler(vc, vae_c, sc, mask=mask)
    want, _ = jax.jit(s.tokens)(p, vae_p, labels, batch_rng(3, 0))
    got, _ = fn(p, vae_p, labels, batch_rng(3, 0), s.guidance_array())
    for k, (x, y) in enumerate(zip(want, got)):
      np.testing.assert_array_equal(x, y, err_msg=f'{mask} cfg {cfg} {schedule}, scale {k}')
    differ += cfg > 0 and any(np.any(np.asarray(x) != np.asarray(y)) for x, y in zip(want, unguided))
    if cfg == 0:
      unguided = want
  assert len(traces) == 1
  assert differ == 2  # Guidance changes the tokens: the argument is not ignored.
  with pytest.raises(ValueError, match=r'one strength per scale, \(6,\)'):
    Sampler(vc, vae_c, SamplerConfig(**base), mask=mask).tokens(p, vae_p, labels, batch_rng(3, 0),
                                                                  guidance=jnp.zeros(5))


def test_rng_seed_and_batch_index(compact_models):
  vc, p, vae_c, vae_p = compact_models
  s = Sampler(vc, vae_c, SamplerConfig(cfg=1.5), mask='markov')
  fn = jax.jit(s.tokens)
  labels = jnp.array([3, 3, 4, 4])
  a, _ = fn(p, vae_p, labels, batch_rng(0, 0))
  b, _ = fn(p, vae_p, labels, batch_rng(0, 0))
  c, _ = fn(p, vae_p, labels, batch_rng(0, 1))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(np.any(np.asarray(x) != np.asarray(y)) for x, y in zip(a, c))
  # Two examples of the same class in one batch draw different noise.
  assert np.any(np.asarray(a[-1])[0] != np.asarray(a[-1])[1])
  with pytest.raises(ValueError, match='class id 11 is out of range'):
    s.tokens(p, vae_p, jnp.array([11]), batch_rng(0, 0))


def test_the_decoder_runs_at_its_own_precision(compact_models):
  """Sampling decodes at config.sampler.decode_precision ('default' unless set) while the tokens, and
  every reference check (a Sampler built without it), keep the tokenizer's float32-exact precision: the
  precision reaches the compiled decoder's dots and convolutions, and nowhere else."""
  from srdd_jax.config import ConfigError, with_defaults
  from srdd_jax.diffusion.generate import decode_precision
  vc, p, vae_c, vae_p = compact_models
  assert vae_c.precision == 'highest'
  exact = Sampler(vc, vae_c, SamplerConfig(cfg=1.5), mask='markov')
  fast = Sampler(vc, vae_c, SamplerConfig(cfg=1.5), mask='markov', decode_precision='default')
  assert exact.decoder is exact.tokenizer and fast.decoder.config.precision == 'default'
  assert fast.tokenizer.config.precision == 'highest'
  f_hat = jnp.zeros((2, vae_c.latent_side, vae_c.latent_side, vae_c.z_channels), jnp.float32)

  def hlo(sampler):
    return jax.jit(sampler.decode).lower(vae_p, f_hat).as_text()
  assert 'HIGHEST' in hlo(exact).upper() and 'HIGHEST' not in hlo(fast).upper()
  # The tokens program (the f_hat path) is the same program under either decoder.
  labels = jnp.array([1, 2])
  tokens = lambda s: jax.jit(s.tokens).lower(p, vae_p, labels, batch_rng(0, 0)).as_text()
  assert tokens(exact) == tokens(fast)
  # On the CPU a float32 dot is float32 at every precision: the images agree to rounding.
  ids, f = jax.jit(exact.tokens)(p, vae_p, labels, batch_rng(0, 0))
  np.testing.assert_allclose(jax.jit(fast.decode)(vae_p, f), jax.jit(exact.decode)(vae_p, f), atol=1e-5)
  c = with_defaults(None)
  assert c.sampler.decode_precision == 'default' and decode_precision(c.sampler) == 'default'
  c.sampler.decode_precision = ''
  assert decode_precision(c.sampler) is None  # The tokenizer's own.
  c.sampler.decode_precision = 'bfloat16'
  with pytest.raises(ConfigError, match=r"config.sampler.decode_precision='bfloat16': must be one of"):
    decode_precision(c.sampler)


def test_sharded_sampling_equals_single_device(compact_models):
  """The batch sharded over the 8 devices of a (data=8) mesh gives, with the same key, the tokens of one
  device exactly, greedy (causal, KV cache) and random (markov; top-k, top-p, masked redraw), and the
  same images."""
  vc, p, vae_c, vae_p = compact_models
  mesh = pm.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})
  labels = jnp.arange(8) % vc.num_classes
  one = jax.devices()[0]
  single_p, single_vae_p = jax.device_put(p, one), jax.device_put(vae_p, one)
  greedy = SamplerConfig(cfg=2.0, greedy=True)
  random = SamplerConfig(cfg=2.0, cfg_schedule='constant', top_k=64, top_p=0.9, mr_threshold=0.01,
                         mr_iterations=3)
  for sc, mask in ((greedy, 'causal'), (random, 'markov')):
    ids, img = jax.jit(Sampler(vc, vae_c, sc, mask=mask, mesh=mesh).sample)(p, vae_p, labels, batch_rng(1, 0))
    assert ids[-1].sharding.spec[0] in (('data', 'fsdp'), 'data')
    assert len(ids[-1].sharding.device_set) == 8
    ref_ids, ref_img = jax.jit(Sampler(vc, vae_c, sc, mask=mask).sample)(single_p, single_vae_p, labels,
                                                                         batch_rng(1, 0))
    assert ref_ids[-1].sharding.device_set == {one}
    for k, (x, y) in enumerate(zip(ids, ref_ids)):
      np.testing.assert_array_equal(x, y, err_msg=f'{mask} greedy={sc.greedy} scale {k}')
    np.testing.assert_allclose(img, ref_img, atol=1e-5)
    if not sc.greedy:
      # A random draw: examples 0 and 5 share class 0 but not their noise.
      assert np.any(np.asarray(ids[-1])[0] != np.asarray(ids[-1])[5])


# Editing on the compact models (32 px, an 8x8 latent, 6 scales): the same checks as at 256 px, everywhere.
SIZE, DOWN = 32, 4


@pytest.fixture(scope='module')
def image():
  with np.load(reference_file('compact_vqvae_32.npz')) as z:
    return np.transpose(z['img'], (0, 2, 3, 1)).astype(np.float32)


def _check_edit(ids, gt, keep, out):
  kept = total_gen = differ = 0
  for k, (a, g, m) in enumerate(zip(ids, gt, keep)):
    a, g, m = np.asarray(a), np.asarray(g), np.asarray(m)
    np.testing.assert_array_equal(a[m], g[m], err_msg=f'scale {k}')
    kept += m.sum()
    total_gen += (~m).sum()
    differ += (a[~m] != g[~m]).sum()
  assert kept > 0 and total_gen > 0
  assert differ > 0.5 * total_gen  # The generated region is not a copy of the image's tokens.
  assert out.shape == (2, SIZE, SIZE, 3) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0


@pytest.mark.parametrize('task', ['inpaint', 'outpaint', 'class_edit'])
def test_editing_keeps_the_kept_region(compact_models, image, task):
  vc, p, vae_c, vae_p = compact_models
  editor = editing.Editor(Sampler(vc, vae_c, SamplerConfig(cfg=1.5), mask='markov'))
  box = (8, 8, 24, 24) if task != 'class_edit' else (0, 0, SIZE, SIZE // 2)
  pixel = editing.box_keep_mask(SIZE, box, keep_inside=task != 'inpaint')
  latent = editing.latent_keep_mask(np.stack([pixel] * 2), DOWN)
  labels = jnp.array([vc.num_classes] * 2) if task != 'class_edit' else jnp.array([4, 4])
  ids, out, gt, keep = jax.jit(editor.edit)(p, vae_p, image, latent, labels, batch_rng(0, 0))
  _check_edit(ids, gt, keep, out)
  assert bool(np.all(np.asarray(keep[0])))  # The 1x1 scale is always kept.
  if task == 'inpaint':  # Scale 8x8: exactly the latent cells outside the box are kept.
    np.testing.assert_array_equal(np.asarray(keep[-1])[0].reshape(8, 8), latent[0] > 0.5)


def test_super_resolution_keeps_the_coarse_scales(compact_models, image):
  vc, p, vae_c, vae_p = compact_models
  editor = editing.Editor(Sampler(vc, vae_c, SamplerConfig(cfg=1.5), mask='causal'))
  low = np.asarray(jax.image.resize(image, (2, 16, 16, 3), 'lanczos3'))
  keep_scales = editing.default_sr_keep_scales(16, SIZE, vc.patch_nums)
  assert keep_scales == 4  # pn <= 8 * 16 / 32 = 4: scales 1, 2, 3, 4.
  ids, out, gt, keep = jax.jit(editor.super_resolve, static_argnums=3)(
      p, vae_p, low, keep_scales, jnp.array([vc.num_classes] * 2), batch_rng(0, 0))
  assert [bool(np.all(np.asarray(m))) for m in keep] == [True] * 4 + [False] * 2
  _check_edit(ids, gt, keep, out)


def test_editing_masks():
  m = editing.latent_keep_mask(editing.box_keep_mask(64, (16, 16, 40, 40), keep_inside=False), 16)
  assert m.shape == (4, 4) and m[1, 1] == 0 and m[2, 2] == 0 and m[0, 0] == 1
  assert m[1, 2] == 0  # Pixels 32..47 of row 1 include 32..39 of the box: not kept.
  with pytest.raises(ValueError, match='box'):
    editing.box_keep_mask(64, (10, 10, 80, 20), keep_inside=True)


def _run_main(argv):
  """Runs the real entry point in a subprocess (absl flags are process-global) on 1 CPU device."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS='cpu')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, '-m', 'srdd_jax.main'] + argv, cwd=repo, env=env,
                     capture_output=True, text=True, timeout=600)
  return r.returncode, r.stdout + r.stderr


def test_cli_sample_and_edit(tmp_path):
  """The entry point on the compact reference models (32 px, 5 classes): sample, edit, and the exit
  status of bad input."""
  ck = tmp_path / 'ck'
  for part in ('var', 'vae'):
    assert convert_var.main([f'--{part}', reference_file('compact_var_d2_w64.npz'), '--prefix', f'{part}/',
                             '--patch_nums', '1,2,3,4,6,8', '--out', str(ck / part)]) == 0
  base = ['--config=configs/sample.py', f'--workdir={tmp_path / "w"}',
          f'--config.model.checkpoint={ck / "var"}', f'--config.tokenizer.checkpoint={ck / "vae"}',
          '--config.sample.batch_size=4']
  rc, out = _run_main(base + ['--mode=sample', '--config.sample.classes=1,4',
                              '--config.sample.num_per_class=3'])
  assert rc == 0, out
  with np.load(tmp_path / 'w' / 'samples' / 'samples.npz') as z:
    assert z['arr_0'].shape == (6, SIZE, SIZE, 3) and z['arr_0'].dtype == np.uint8
    np.testing.assert_array_equal(z['arr_1'], [1, 1, 1, 4, 4, 4])
    from PIL import Image
    Image.fromarray(z['arr_0'][0]).save(tmp_path / 'in.png')
  assert len(os.listdir(tmp_path / 'w' / 'samples' / 'images')) == 6
  assert (tmp_path / 'w' / 'samples' / 'grid.png').exists()
  rc, out = _run_main(base + ['--mode=edit', f'--config.edit.image={tmp_path / "in.png"}',
                              '--config.edit.box=8,8,24,24', '--config.edit.num_samples=2'])
  assert rc == 0, out
  with np.load(tmp_path / 'w' / 'edit' / 'inpaint' / 'edits.npz') as z:
    assert z['arr_0'].shape == (2, SIZE, SIZE, 3)
  rc, out = _run_main(base + ['--mode=sample', '--config.sample.classes=5'])
  assert rc == 2 and 'class id 5 is out of range' in out
  missing = [a if not a.startswith('--config.model.checkpoint') else '--config.model.checkpoint=/nope'
             for a in base]
  rc, out = _run_main(missing + ['--mode=sample'])
  assert rc == 2 and "config.model.checkpoint='/nope' does not exist" in out


def test_edit_image_of_16_bit_grey_is_scaled_not_clipped(tmp_path):
  from PIL import Image
  from srdd_jax.modes import edit
  grey = np.array([[0, 16384, 32768, 65535]], np.uint16)  # Quarter steps of the 16-bit range.
  Image.fromarray(grey).save(tmp_path / 'grey16.png')
  assert Image.open(tmp_path / 'grey16.png').mode.startswith('I')
  rgb = np.asarray(edit.open_image(str(tmp_path / 'grey16.png'), 'config.edit.image'))
  assert rgb.shape == (1, 4, 3) and (rgb[..., 0] == rgb[..., 2]).all()
  np.testing.assert_allclose(rgb[0, :, 0], [0, 64, 128, 255], atol=1)  # convert('RGB') gave 0, 255, 255, 255.
