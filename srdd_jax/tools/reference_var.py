"""Checks of `kind='var'` reference files: transformer logits under both masks against VAR's PyTorch."""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.convert import state_dict as sd
from srdd_jax.convert import var_transformer
from srdd_jax.convert import var_vqvae
from srdd_jax.convert.reference import var_config_from_meta
from srdd_jax.diffusion.filtering import SamplerConfig
from srdd_jax.diffusion.sampler import Sampler
from srdd_jax.tools import reference_common as rc
from srdd_jax.transformer.config import MASKS
from srdd_jax.transformer.model import VAR


def _argmax_result(name, logits, ref_argmax):
  ours = np.asarray(jnp.argmax(logits, -1))
  ref = np.asarray(ref_argmax)
  if ours.shape != ref.shape:
    return rc.Result(name, rc.FAIL, f'shape {ours.shape} but the reference has {ref.shape}')
  diff = np.argwhere(ours != ref)
  if not diff.size:
    return rc.Result(name, rc.PASS, f'0/{ref.size} argmax differ')
  lg = np.asarray(logits, np.float64)
  gaps = [(lg[tuple(i)][ours[tuple(i)]] - lg[tuple(i)][ref[tuple(i)]]) /
          max(abs(lg[tuple(i)][ours[tuple(i)]]), 1e-30) for i in diff]
  worst = float(max(gaps))
  status = rc.PASS if worst < rc.TIE_REL else rc.FAIL
  return rc.Result(name, status, f'{len(diff)}/{ref.size} argmax differ; largest logit gap {worst:.1e} '
                   f'relative ({"near-ties" if status == rc.PASS else "not ties"}, tie < {rc.TIE_REL:.0e})')


def check_var(z, meta: dict, path: str) -> list[rc.Result]:
  weight_keys = [k for k in z.files if k.startswith('var/')]
  state = {k[4:]: z[k] for k in weight_keys}
  config = var_config_from_meta(meta, {k: v.shape for k, v in state.items()}, path)
  used = {'meta', *weight_keys}
  results = []
  try:
    params = var_transformer.convert_var(state, config)
  except sd.StateDictMismatch as e:
    return [rc.Result('var/* weights', rc.FAIL, str(e))]
  results.append(rc.Result('var/* weights', rc.PASS, f'{len(weight_keys)} keys converted'))
  vae_keys = [k for k in z.files if k.startswith('vae/')]
  if vae_keys:
    used.update(vae_keys)
  if 'labels' not in z.files or 'x_in' not in z.files:
    raise rc.ReferenceFormatError(f'{path}: a var file needs `labels` and `x_in`')
  used.update(('labels', 'x_in'))
  labels = jnp.asarray(z['labels'].astype(np.int32))
  x_in = jnp.asarray(z['x_in'].astype(np.float32))
  for mask in MASKS:
    keys = [f'logits_{mask}_{s}' for s in ('slice', 'lse', 'argmax')]
    if not any(k in z.files for k in keys):
      continue
    cfg = dataclasses.replace(config, mask=mask)
    logits = jax.jit(lambda p, l, x, cfg=cfg: VAR(cfg).apply({'params': p}, l, x))(params, labels, x_in)
    if keys[0] in z.files:
      ref = z[keys[0]]
      results.append(rc.rel_result(keys[0], np.asarray(logits)[..., :ref.shape[-1]], ref))
    if keys[1] in z.files:
      results.append(rc.rel_result(keys[1], jax.nn.logsumexp(logits, axis=-1), z[keys[1]]))
    if keys[2] in z.files:
      results.append(_argmax_result(keys[2], logits, z[keys[2]]))
    used.update(k for k in keys if k in z.files)
  if any(re.fullmatch(r'greedy_(causal|markov)_(idx_\d+|img)', k) for k in z.files):
    results += _check_greedy(z, meta, path, config, params, vae_keys, used)
  for key in z.files:
    if key not in used:
      results.append(rc.Result(key, rc.NOT_CHECKED, 'no check for this entry'))
  return results


def _check_greedy(z, meta, path, config, params, vae_keys, used) -> list[rc.Result]:
  """Greedy sampling (top-k 1 with the file's guidance): ids identical at every scale, images close."""
  if not vae_keys:
    return [rc.Result('greedy_*', rc.FAIL, 'greedy entries need the tokenizer weights under vae/*')]
  vae_state = {k[4:]: z[k] for k in vae_keys}
  try:
    vae_config = var_vqvae.infer_vqvae_config({k: v.shape for k, v in vae_state.items()},
                                              patch_nums=config.patch_nums)
    vae_params = var_vqvae.convert_vqvae(vae_state, vae_config)
  except (sd.StateDictMismatch, ValueError) as e:
    return [rc.Result('vae/* weights', rc.FAIL, str(e))]
  g = meta.get('greedy', {})
  schedule = str(g.get('cfg_schedule', 'linear'))
  if not schedule.startswith('linear'):
    raise rc.ReferenceFormatError(f'{path}: greedy cfg_schedule {schedule!r} is not supported')
  if int(g.get('top_k', 1)) != 1:
    raise rc.ReferenceFormatError(f'{path}: greedy entries need top_k=1, meta has {g.get("top_k")}')
  sc = SamplerConfig(cfg=float(g.get('cfg', 1.5)), cfg_schedule='linear', top_k=1, top_p=0.0, greedy=True)
  labels = jnp.asarray(z['labels'].astype(np.int32))
  results = []
  for mask in MASKS:
    keys = [k for k in z.files if re.fullmatch(rf'greedy_{mask}_(idx_\d+|img)', k)]
    if not keys:
      continue
    used.update(keys)
    sampler = Sampler(config, vae_config, sc, mask=mask)
    ids, img = jax.jit(sampler.sample)(params, vae_params, labels, jax.random.PRNGKey(0))
    for k in range(config.num_scales):
      key = f'greedy_{mask}_idx_{k}'
      if key not in z.files:
        continue
      a, b = np.asarray(ids[k]), np.asarray(z[key])
      if a.shape != b.shape:
        results.append(rc.Result(key, rc.FAIL, f'shape {a.shape} but the reference has {b.shape}'))
      else:
        n = int(np.sum(a != b))
        results.append(rc.Result(key, rc.PASS if n == 0 else rc.FAIL, f'{n}/{b.size} ids differ'))
    if f'greedy_{mask}_img' in z.files:
      results.append(rc.rel_result(f'greedy_{mask}_img', img, rc.nchw_to_nhwc(z[f'greedy_{mask}_img'])))
  return results
