"""`--mode=train_tokenizer`: the multi-scale VQ-VAE trained on images, sharded, checkpointed, logged.

Sections: settings -> mesh -> data (training and held-out) -> trainer (abstract state, shardings,
jitted init) -> restore -> step -> loop (log, evaluate, checkpoint, SIGTERM) -> export.

Outputs, all under WORKDIR/tokenizer/:
  checkpoints/       Orbax train state (exact resume, also on another mesh).
  metrics.jsonl      One line per logged step (losses, per-scale code usage and perplexity, restarted and
                     dead codes, lr, steps/s, ETA) and one per evaluation (held-out PSNR); process 0.
  reconstructions.png  Held-out images (top row) and their reconstructions (bottom), at each evaluation.
  params/            The finished tokenizer for `params_io.load_vqvae` (and config.tokenizer.checkpoint),
                     written when training reaches config.tokenizer_train.steps. An existing export of
                     another step is never overwritten: it is moved to params.step_<its step> first.
  TensorBoard events (clu).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import numpy as np
from absl import logging

from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.tokenizer import losses
from srdd_jax.tokenizer import train_config as tcfg
from srdd_jax.tokenizer.train_config import TokenizerTrainConfigError
from srdd_jax.tokenizer.trainer import TokenizerTrainer, trainer_for

SUBDIR = 'tokenizer'
EXPORT_DIR = 'params'
EXPORT_MARKER = 'export.json'  # Beside model.json: which run and step the export holds.
# Sources whose held-out images come from another split of the same data set.
_SPLIT_SOURCES = ('digits', 'fashion_mnist', 'tfds')


class NonFiniteLoss(FloatingPointError):
  pass


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _rules(config):
  rules = tuple(tuple(r) for r in (config.get('mesh_rules', ()) or ()))
  for r in rules:
    if len(r) != 2 or not isinstance(r[0], str):
      raise TokenizerTrainConfigError(f'config.mesh_rules: {r!r} is not a (logical axis, mesh axes) pair')
  return rules or pm.DEFAULT_RULES


def _sources(config, s: tcfg.TrainSettings, image_size: int):
  """(training source, held-out source or None); the pipeline's errors name their config key."""
  from srdd_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  if 'data' not in config:
    raise TokenizerTrainConfigError('config.data is missing: say which images to train on '
                                    '(see srdd_jax/data/pipeline.py)')
  d = config.data.to_dict()
  try:
    train = pipeline.build_source(d, image_size, train=True)
    held_out = None
    if s.eval_every > 0 and s.eval_examples > 0:
      e = dict(d, random_crop=False, flip=False)  # Centre crops, no flips: the same images every time.
      src = e.get('source')
      if src in _SPLIT_SOURCES:
        e['split'] = s.eval_split
      elif src == 'folder' and s.eval_path:
        e['path'] = s.eval_path
      else:
        logging.warning('config.data.source=%r has no held-out split%s: the PSNR is measured on training '
                        'images', src, ' (set config.tokenizer_train.eval_path)' if src == 'folder' else '')
      held_out = pipeline.build_source(e, image_size, train=False)
  except pipeline.DataError as e:
    raise TokenizerTrainConfigError(str(e)) from e
  return train, held_out


class _HeldOut:
  """A fixed set of held-out images, reconstructed in global batches split over the mesh.

  The images are decoded again at each evaluation, each process only its rows of each batch: 256 images
  of 256 px would otherwise hold 200 MB of host memory for the whole run.
  """

  def __init__(self, source, s: tcfg.TrainSettings, trainer: TokenizerTrainer, mesh):
    self.source, self.seed = source, s.seed
    self.n = min(s.eval_examples, source.num_examples)
    data_par = mesh.shape['data'] * mesh.shape['fsdp']
    self.batch = -(-min(s.global_batch, self.n) // data_par) * data_par
    self.padded = -(-self.n // self.batch) * self.batch  # The last image repeats; its errors are dropped.
    self.grid = min(s.grid_examples, self.n)
    self.rows = trainer.local_rows(self.batch)
    self.trainer = trainer
    self.fn = trainer.eval_fn
    self.description = source.description

  def images(self, lo: int, hi: int) -> np.ndarray:
    """Positions [lo, hi) of the padded set: the seed's first n examples as centre crops."""
    load = lambda a, b: self.source.batch(self.seed, 0, self.n, slice(a, b))[0]
    real = load(lo, min(hi, self.n)) if lo < self.n else None
    pad = hi - max(lo, self.n)
    if pad <= 0:
      return real
    last = np.repeat(load(self.n - 1, self.n), pad, axis=0)
    return last if real is None else np.concatenate([real, last])

  def evaluate(self, params):
    """(PSNR in dB over the set, first `grid` originals and reconstructions as numpy)."""
    errors, first = [], None
    for i in range(0, self.padded, self.batch):
      local = self.images(i + self.rows.start, i + self.rows.stop)
      batch = self.trainer.assemble_batch({'images': local}, self.batch)['images']
      err, recon = self.fn(params, batch)
      errors.append(np.asarray(jax.device_get(err)))
      if first is None:
        first = multihost.gather(recon)[:self.grid]
    mse = float(np.mean(np.concatenate(errors)[:self.n]))
    return losses.psnr_from_mse(mse), self.images(0, self.grid), first


def _write_grid(path: str, originals, recons) -> np.ndarray:
  """Originals on top, reconstructions below, one column per image."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  u8 = lambda x: np.asarray(np.clip(np.round((np.asarray(x) + 1) * 127.5), 0, 255), np.uint8)
  grid = np.concatenate([np.concatenate(list(u8(originals)), 1), np.concatenate(list(u8(recons)), 1)], 0)
  Image.fromarray(grid).save(path + '.tmp.png')
  os.replace(path + '.tmp.png', path)
  return grid


def _export(out_root: str, params, vq, step: int, workdir: str) -> str | None:
  """Writes the finished tokenizer to out_root/params; an export of another step is moved aside first
  (to params.step_<n>), one of this very step is left as it is. Returns the export's path."""
  from srdd_jax.convert import params_io  # pylint: disable=import-outside-toplevel
  out = os.path.join(out_root, EXPORT_DIR)
  marker = os.path.join(out, EXPORT_MARKER)
  host_params = jax.tree_util.tree_map(multihost.gather, params)  # Collective: every process joins.
  # Every process looks before any of them moves or writes (process 0 creating the directory must not
  # make another believe an old export is there), so all take the same branch below.
  _sync('tokenizer-export-look')
  exists, old_step = os.path.exists(out), None
  if os.path.isfile(marker):
    with open(marker) as f:
      old_step = json.load(f).get('step')
  _sync('tokenizer-export-looked')
  if exists:
    if old_step == step:
      logging.info('the tokenizer of step %d is already exported to %s', step, out)
      return out
    if multihost.is_main_process():
      base = f'{out}.step_{old_step}' if old_step is not None else f'{out}.previous'
      aside, k = base, 1
      while os.path.exists(aside):
        aside, k = f'{base}.{k}', k + 1
      os.replace(out, aside)
      logging.warning('%s held the tokenizer of step %s; moved to %s', out, old_step, aside)
    _sync('tokenizer-export-aside')
  params_io.save_params(out, host_params, kind='vqvae', config=vq, source=f'train_tokenizer {workdir}')
  if multihost.is_main_process():
    with open(marker, 'w') as f:
      json.dump({'step': step, 'workdir': os.path.abspath(workdir)}, f)
  _sync('tokenizer-export-done')
  return out


def run_train_tokenizer(config, workdir: str, stop_after_steps: int | None = None,
                        return_state: bool = False) -> dict:
  """Trains to config.tokenizer_train.steps (or stops after `stop_after_steps` steps of this call,
  saving a checkpoint) and exports the tokenizer when training is complete."""
  t_start = time.time()
  # --- settings, mesh ---
  s = tcfg.train_settings(config)
  vq = tcfg.vqvae_config(config)
  try:
    mesh = pm.make_mesh(dict(config.get('mesh', None) or {'data': -1, 'fsdp': 1, 'tensor': 1}))
  except ValueError as e:
    raise TokenizerTrainConfigError(f'config.mesh: {e}') from e
  tcfg.validate_against(s, vq, mesh)
  root = os.path.join(workdir, SUBDIR)
  main_process = multihost.is_main_process()
  if main_process:
    os.makedirs(root, exist_ok=True)
  # --- data ---
  data, held_out_source = _sources(config, s, vq.image_size)
  # --- trainer, state, restore ---
  trainer = trainer_for(vq, s, mesh, _rules(config))
  if main_process:
    logging.info('tokenizer: %d px, patch_nums %s, V=%d, Cvae=%d, ch=%d; data: %s; %d steps of %d (%.2f '
                 'epochs); GAN %s; mesh %s; %d process(es)', vq.image_size, vq.patch_nums, vq.vocab_size,
                 vq.z_channels, vq.ch, data.description, s.steps, s.global_batch,
                 s.steps * s.global_batch / data.num_examples,
                 f'weight {s.gan_weight} from step {s.gan_start_step}' if s.use_gan else 'off',
                 dict(mesh.shape), jax.process_count())
  from srdd_jax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  ckpt = Checkpointer(os.path.join(root, 'checkpoints'), max_to_keep=s.keep_checkpoints,
                      save_every=s.checkpoint_every)
  abstract, shardings = trainer.abstract_state()
  state, start = ckpt.restore_or_init(abstract, shardings, lambda: trainer.init(jax.random.PRNGKey(s.seed)))
  step_fn = trainer.step_fn
  held_out = _HeldOut(held_out_source, s, trainer, mesh) if held_out_source is not None else None
  gb = s.global_batch
  rows = trainer.local_rows(gb)
  if s.prefetch:
    batches = data.iterator(s.seed, start, gb, rows)
  else:
    batches = (data.batch(s.seed, k, gb, rows) for k in range(start, s.steps))
  # --- logging ---
  metrics_path = os.path.join(root, 'metrics.jsonl')
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(root, just_logging=not main_process)
  grid_path = os.path.join(root, 'reconstructions.png')

  def record(rec):
    if main_process:
      with open(metrics_path, 'a') as f:
        f.write(json.dumps(rec) + '\n')
      writer.write_scalars(rec['step'], {k: v for k, v in rec.items() if k != 'step'})

  def evaluate(step):
    t0 = time.time()
    value, originals, recons = held_out.evaluate(state.params)
    record({'step': step, 'eval_psnr': value, 'eval_examples': held_out.n, 'eval_seconds': time.time() - t0})
    if main_process:
      grid = _write_grid(grid_path, originals, recons)
      writer.write_images(step, {'reconstructions': grid[None]})
      logging.info('step %d: held-out PSNR %.2f dB over %d images (%s)', step, value, held_out.n,
                   held_out.description)
    return value

  psnr_first = psnr_last = None
  if held_out is not None and start == 0:
    psnr_first = psnr_last = evaluate(0)
  stop = {'sigterm': False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
  last, step, t_log, n_log = None, start, time.time(), 0
  try:
    while step < s.steps:
      images, _ = next(batches)
      batch = trainer.assemble_batch({'images': images}, gb)
      state, metrics = step_fn(state, batch)
      step += 1
      n_log += 1
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not (math.isfinite(metrics['loss']) and math.isfinite(metrics['grad_norm'])):
        raise NonFiniteLoss(f'non-finite loss or gradient at step {step} (loss {metrics["loss"]}, grad norm '
                            f'{metrics["grad_norm"]}); the last checkpoint in {ckpt.directory} is kept')
      last = metrics
      if step % s.log_every == 0 or step == s.steps:
        dt = max(time.time() - t_log, 1e-9)
        rate = n_log / dt
        rec = {'step': step, **metrics, 'steps_per_s': rate, 'eta_s': (s.steps - step) / max(rate, 1e-9),
               'examples_seen': step * gb, 'skipped_examples': data.skipped}
        record(rec)
        if main_process:
          usage = ' '.join(f'{metrics[f"usage_s{k}"]:.2f}' for k in range(vq.num_scales))
          logging.info('step %d/%d loss %.4f (l1 %.4f l2 %.4f vq %.4f) usage/scale [%s] dead %d restarted %d '
                       '%.2f steps/s ETA %.0fs', step, s.steps, metrics['loss'], metrics['l1'], metrics['l2'],
                       metrics['vq_loss'], usage, metrics['dead_codes'], metrics['restarted_codes'], rate,
                       rec['eta_s'])
        t_log, n_log = time.time(), 0
      if held_out is not None and (step % s.eval_every == 0 or step == s.steps):
        psnr_last = evaluate(step)
        t_log = time.time()  # Evaluation time is not training time.
      ckpt.save(step, state, {'step': step})
      if stop['sigterm'] or (stop_after_steps is not None and step - start >= stop_after_steps):
        ckpt.save(step, state, {'step': step}, force=True)
        logging.info('stopping at step %d (%s); checkpoint saved', step,
                     'SIGTERM' if stop['sigterm'] else 'requested')
        break
    if step == s.steps:
      ckpt.save(step, state, {'step': step}, force=True)
  finally:
    ckpt.close()
    signal.signal(signal.SIGTERM, previous)
    writer.flush()
  export = None
  if step == s.steps:
    export = _export(root, state.params, vq, step, workdir)
    logging.info('tokenizer exported to %s (config.tokenizer.checkpoint=%s)', export, export)
  summary = {'start_step': start, 'end_step': step, 'last_loss': None if last is None else last['loss'],
             'eval_psnr_start': psnr_first, 'eval_psnr_end': psnr_last, 'export': export,
             'seconds': round(time.time() - t_start, 2), 'workdir': root}
  if return_state:
    summary['state'] = state
  return summary
