"""Checks of `kind='vqvae'` reference files: the tokenizer against VAR's PyTorch outputs."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.convert import state_dict as sd
from srdd_jax.convert import var_vqvae
from srdd_jax.convert.reference import vqvae_config_from_meta
from srdd_jax.tokenizer import resample
from srdd_jax.tokenizer.api import Tokenizer
from srdd_jax.tools import reference_common as rc

def _ids_from_reference_f(module, f, ref_ids):
  """Per scale: our nearest codes for the residual left by the *reference* tokens of earlier scales,
  so a near-tie at one scale cannot cascade into the next. Returns our ids and the distances of our
  and of the reference's code."""
  c = module.config
  q = module.quantize
  f_rest = f
  ours, d_ours, d_ref = [], [], []
  for si, pn in enumerate(c.patch_nums):
    z = resample.area_resize(f_rest, pn) if si != c.num_scales - 1 else f_rest
    d = q.distances(z.reshape(-1, c.z_channels))
    idx = jnp.argmin(d, axis=-1)
    ref = ref_ids[si].reshape(-1)
    ours.append(idx.reshape(f.shape[0], pn * pn))
    d_ours.append(jnp.take_along_axis(d, idx[:, None], axis=-1)[:, 0])
    d_ref.append(jnp.take_along_axis(d, ref[:, None], axis=-1)[:, 0])
    f_rest = f_rest - q.scale_residual(ref_ids[si], si)
  return ours, d_ours, d_ref


def _flips(tok, params, f, ref_ids) -> list[tuple]:
  """Every id where our nearest code, for the residual `f` leaves after the reference's ids of the earlier
  scales, is not the reference's: (relative distance gap, scale, flat index, ours, theirs, our distance,
  theirs), the gap (d_theirs - d_ours) / |d_ours| >= 0 (ours is the nearest)."""
  ours, d_ours, d_ref = jax.jit(
      lambda p, f, r: tok.module.apply({'params': p}, f, r, method=_ids_from_reference_f))(params, f, ref_ids)
  out = []
  for k in range(tok.config.num_scales):
    a, b = np.asarray(ours[k]).reshape(-1), np.asarray(ref_ids[k]).reshape(-1)
    do, dr = np.asarray(d_ours[k], np.float64), np.asarray(d_ref[k], np.float64)
    for i in np.flatnonzero(a != b):
      out.append(((dr[i] - do[i]) / max(abs(do[i]), 1e-30), k, int(i), int(a[i]), int(b[i]), do[i], dr[i]))
  return out


def _end_to_end(tok, params, f, ref_ids, rec_ref, result: rc.Result, agree: tuple[int, int]) -> rc.Result:
  """`rec` (image -> image) failed its tolerance: a near-tie or a defect? A code chosen at a near-tie (the
  two nearest codebook distances within TIE_REL) may flip between two correct implementations, and the
  flip changes every later scale's residual, so the images differ far beyond the tolerance (issue 47: 2,239
  of 2,240 ids agreed, rel_err 9.4e-2). The verdict: every id our quantizer picks differently from the
  reference's, scale by scale from our own f after the reference's earlier ids, is a near-tie, and with
  the reference's ids our image -> image agrees; then a PASS that names the flip, else a FAIL."""
  flips = _flips(tok, params, f, ref_ids)
  same, total = agree
  if not flips:
    return rc.Result(result.name, rc.FAIL, f'{result.detail}; every id agrees with the reference\'s, so no '
                                            'near-tie explains it')
  gap, k, i, ours, theirs, d_ours, d_theirs = flips[0]  # The first flip, in scale order: the cause.
  pn = tok.config.patch_nums[k]
  image, (row, col) = i // (pn * pn), divmod(i % (pn * pn), pn)
  where = (f'scale {k} ({pn}x{pn}) image {image} row {row} col {col}: ours {ours} at distance {d_ours:.9g}, the '
           f'reference\'s {theirs} at {d_theirs:.9g}, {gap:.1e} relative')
  worst = max(flips)
  if worst[0] >= rc.TIE_REL:
    return rc.Result(result.name, rc.FAIL, f'{result.detail}; {len(flips)} id(s) differ from our nearest code '
                                            f'and not all are near-ties: the largest distance gap {worst[0]:.1e} '
                                            f'relative (a tie needs < {rc.TIE_REL:.0e}) at scale {worst[1]}; the '
                                            f'first flip: {where}')
  with_ref = rc.rel_err(jax.jit(tok.idx_to_img)(params, ref_ids), rec_ref)
  tie = (f'{same}/{total} ids agree end to end; {len(flips)} near-tie flip(s) (< {rc.TIE_REL:.0e} relative), the '
         f'first at {where}, which changes every later scale\'s residual')
  if with_ref > rc.REL_TOL:
    return rc.Result(result.name, rc.FAIL, f'{result.detail}; {tie}; but with the reference\'s ids image -> '
                                            f'image still differs: rel_err {with_ref:.2e} (tol {rc.REL_TOL:.0e})')
  return rc.Result(result.name, rc.PASS, f'{result.detail.replace(" (image -> image)", "")} end to end, a '
                                         f'near-tie: {tie}; with the reference\'s ids image -> image agrees: '
                                         f'rel_err {with_ref:.2e} (tol {rc.REL_TOL:.0e})')


def check_vqvae(z, meta: dict, path: str) -> list[rc.Result]:
  config = vqvae_config_from_meta(meta, path)
  tok = Tokenizer(config)
  results: list[rc.Result] = []
  used = {'meta'}

  weight_keys = [k for k in z.files if k.startswith('vae/')]
  used.update(weight_keys)
  try:
    params = var_vqvae.convert_vqvae({k[4:]: z[k] for k in weight_keys}, config)
  except sd.StateDictMismatch as e:
    return [rc.Result('vae/* weights', rc.FAIL, str(e))]
  results.append(rc.Result('vae/* weights', rc.PASS, f'{len(weight_keys)} keys converted'))

  S = config.num_scales
  idx_keys = [f'idx_{k}' for k in range(S)]
  have_ids = all(k in z.files for k in idx_keys)
  ref_ids = [jnp.asarray(z[k].astype(np.int32)) for k in idx_keys] if have_ids else None

  if 'img' in z.files:
    used.add('img')
    img = jnp.asarray(rc.nchw_to_nhwc(z['img']).astype(np.float32))
    f_ours = jax.jit(tok.encode)(params, img)
    if 'f' in z.files:
      results.append(rc.rel_result('f', f_ours, rc.nchw_to_nhwc(z['f']), how=' (image -> encoder)'))
    if have_ids:
      ids_e2e = jax.jit(tok.img_to_idx)(params, img)
      same = sum(int(np.sum(np.asarray(a) == np.asarray(b))) for a, b in zip(ids_e2e, ref_ids))
      total = sum(int(np.size(b)) for b in ref_ids)
    if 'rec' in z.files:
      used.add('rec')
      rec_ref = rc.nchw_to_nhwc(z['rec'])
      rec = jax.jit(tok.reconstruct)(params, img)
      result = rc.rel_result('rec', rec, rec_ref, how=' (image -> image)')
      if result.status == rc.FAIL and have_ids and np.shape(rec) == np.shape(rec_ref):
        result = _end_to_end(tok, params, f_ours, ref_ids, rec_ref, result, (same, total))
      results.append(result)
    if have_ids:
      results.append(rc.Result('idx (image -> tokens)', rc.INFO,
                               f'{same}/{total} ids identical end to end (informative; the per-scale '
                               'idx_k checks below are the ones from the same f)'))

  if 'f' in z.files:
    used.add('f')
    f_ref = jnp.asarray(rc.nchw_to_nhwc(z['f']).astype(np.float32))
    if have_ids:
      used.update(idx_keys)
      ours, d_ours, d_ref = jax.jit(
          lambda p, f, r: tok.module.apply({'params': p}, f, r, method=_ids_from_reference_f)
      )(params, f_ref, ref_ids)
      for k in range(S):
        a, b = np.asarray(ours[k]).reshape(-1), np.asarray(ref_ids[k]).reshape(-1)
        diff = np.flatnonzero(a != b)
        if not diff.size:
          results.append(rc.Result(f'idx_{k}', rc.PASS, f'0/{b.size} ids differ (from the reference f)'))
          continue
        do, dr = np.asarray(d_ours[k], np.float64)[diff], np.asarray(d_ref[k], np.float64)[diff]
        gap = (dr - do) / np.maximum(np.abs(do), 1e-30)
        worst = float(gap.max())
        if worst < rc.TIE_REL:
          results.append(rc.Result(
              f'idx_{k}', rc.PASS, f'{diff.size}/{b.size} ids differ, all near-ties: the two nearest '
              f'codebook distances differ by at most {worst:.1e} relative (< {rc.TIE_REL:.0e})'))
        else:
          results.append(rc.Result(
              f'idx_{k}', rc.FAIL, f'{diff.size}/{b.size} ids differ; largest distance gap '
              f'{worst:.1e} relative (a tie needs < {rc.TIE_REL:.0e})'))

  if have_ids:
    used.update(idx_keys)
    fhat_keys = [f'fhat_{k}' for k in range(S) if f'fhat_{k}' in z.files]
    if fhat_keys:
      fhats = jax.jit(tok.idx_to_fhat)(params, ref_ids)
      for key in fhat_keys:
        used.add(key)
        k = int(key.split('_')[1])
        results.append(rc.rel_result(key, fhats[k], rc.nchw_to_nhwc(z[key]), how=' (from reference ids)'))
    if 'var_input' in z.files:
      used.add('var_input')
      vi = jax.jit(tok.idx_to_var_input)(params, ref_ids)
      results.append(rc.rel_result('var_input', vi, z['var_input'], how=' (from reference ids)'))
    if 'dec_from_idx' in z.files:
      used.add('dec_from_idx')
      dec = jax.jit(tok.idx_to_img)(params, ref_ids)
      results.append(rc.rel_result('dec_from_idx', dec, rc.nchw_to_nhwc(z['dec_from_idx']),
                                   how=' (from reference ids)'))

  # Resampling operators: the target size is read from the arrays, not from the key names.
  if 'area_in' in z.files:
    used.add('area_in')
    x = jnp.asarray(rc.nchw_to_nhwc(z['area_in']).astype(np.float32))
    for key in sorted((k for k in z.files if re.fullmatch(r'area_out_\d+', k)), key=_num):
      used.add(key)
      out = z[key]
      ours = resample.area_resize(x, (out.shape[2], out.shape[3]))
      results.append(rc.abs_result(key, ours, rc.nchw_to_nhwc(out)))
  for key in sorted((k for k in z.files if re.fullmatch(r'bicubic_out_\d+', k)), key=_num):
    src = key.replace('_out_', '_in_')
    if src not in z.files:
      continue
    used.update((key, src))
    out = z[key]
    x = jnp.asarray(rc.nchw_to_nhwc(z[src]).astype(np.float32))
    ours = resample.bicubic_resize(x, (out.shape[2], out.shape[3]))
    results.append(rc.abs_result(key, ours, rc.nchw_to_nhwc(out)))

  for key in z.files:
    if key not in used and not re.fullmatch(r'bicubic_in_\d+', key):
      results.append(rc.Result(key, rc.NOT_CHECKED, 'no check for this entry'))
  return results


def _num(key):
  return int(key.rsplit('_', 1)[1])
