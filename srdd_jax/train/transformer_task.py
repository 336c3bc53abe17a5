"""The transformer's tasks for the shared driver (train/driver.py): `TransformerTask` (--mode=train) and
`DistillTask` (--mode=distill: a TransformerTask with a student's trainer, started from the teacher).

A task is built from pieces the runner made of the config (train/transformer_setup.py): the trainer,
the tokenizer weights, the data, and optionally sample grids and a held-out set.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from absl import logging

from srdd_jax.convert.loading import init_params_from
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.parallel.compile import compiled_stats, measured_matmul_peak, needed_bytes, nominal_peak_flops
from srdd_jax.train import driver
from srdd_jax.train.distill import DistillTrainer, heldout_token_loss, init_student
from srdd_jax.train.export import data_stream, export_transformer, run_record
from srdd_jax.train.step import Trainer
from srdd_jax.transformer.flops import train_step_flops


def init_from_checkpoint(trainer: Trainer, directory: str, seed: int):
  """The state `trainer.init` gives, its weights replaced by those of the transformer directory
  `directory` (config.train.init_from; the refine stream added at its initial values if missing) and its
  optimiser fresh: a fine-tune starts at step 0."""
  state = trainer.init(jax.random.PRNGKey(seed))
  abstract, shardings = trainer.abstract_state()
  params = init_params_from(directory, trainer.var_config, abstract.params, jax.random.PRNGKey(seed + 1))
  if multihost.is_main_process():
    logging.info('initialised from %s', directory)
  # Copies made on the devices, one per use: the step donates the state, and a buffer shared by the
  # weights and their EMA (or with the host arrays just loaded) cannot be donated.
  host = jax.device_get(params)
  place = lambda s: jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=s)(
      jax.device_put(host, s))
  ema = None if state.ema_params is None else place(shardings.ema_params)
  return state.replace(params=place(shardings.params), ema_params=ema)


class TransformerTask(driver.Task):
  """The transformer's state, step, evaluations and export.

  `trainer` trains on `data` (a token cache or an image source; `data.yields` says which) with the
  tokenizer weights `vae_params` frozen; `grids` (an object with write(step, params, vae_params,
  writer) -> path or None) draws sample grids every `sample_every` steps; `heldout` = (ids, labels,
  every) measures the held-out token loss every `every` steps; `init_from` is a transformer directory
  to start from (a fine-tune) when the run has no checkpoint of its own; `tokenizer` the identity of the
  tokenizer (convert.loading.tokenizer_identity), recorded in the export.
  """

  name = 'train'

  def __init__(self, trainer: Trainer, vae_params, data, workdir: str, *, total_steps: int, global_batch: int,
               seed: int, log_every: int, checkpoint_every: int, keep_checkpoints: int, sample_every: int = 0,
               init_from: str = '', grids=None, heldout=None, tokenizer: dict | None = None):
    self.trainer, self.data = trainer, data
    self.vq, self.var_config = trainer.vae_config, trainer.var_config
    self.vae_params = vae_params
    self.total_steps, self.global_batch, self.seed = total_steps, global_batch, seed
    self.log_every, self.checkpoint_every, self.keep_checkpoints = log_every, checkpoint_every, keep_checkpoints
    self.grids, self.sample_every = grids, sample_every
    self.heldout = heldout
    # The driver's one evaluation hook serves both: every step either of them is due (and the last).
    self.eval_every = math.gcd(self.sample_every, self.heldout[2] if self.heldout else 0)
    self.root = self.workdir = workdir
    self.init_from = init_from
    self.tokenizer = tokenizer
    # A fine-tune continues its start model's data stream (export.data_stream), resumed or not.
    self.stream = data_stream(init_from, data.num_examples, global_batch, seed)

  def abstract_state(self):
    return self.trainer.abstract_state()

  def init(self):
    """A fresh state, or with config.train.init_from its weights (the driver calls this only when the
    run has no checkpoint of its own, so an interrupted fine-tune resumes instead of restarting)."""
    if self.init_from:
      return init_from_checkpoint(self.trainer, self.init_from, self.seed)
    return self.trainer.init(jax.random.PRNGKey(self.seed))

  def begin(self, start_step):
    # One program per progressive stage (the sequence length differs), compiled when first needed.
    self.compiled, self.flops_of = {}, {}
    self.host_step = start_step
    self.vae_replicated = jax.device_put(self.vae_params, pm.replicated(self.trainer.mesh))
    self.frozen = self.trainer.place_frozen(self.vae_replicated)  # Once: every stage's program reads it.
    # Images as the source decoded them (uint8): a quarter of float32's bytes to the devices, which
    # normalise them in the step.
    kwargs = {'raw': True} if self.data.yields == 'images' else {}
    host = self.data.iterator(self.stream['seed'], self.stream['first_step'] + start_step, self.global_batch,
                              self.trainer.local_rows(self.global_batch), **kwargs)
    place = lambda b: self.trainer.assemble_batch({'labels': b[1], self.data.yields: b[0]}, self.global_batch)
    self.batches = multihost.prefetch_to_devices(host, place)

  def step(self, state):
    batch = next(self.batches)
    stage = self.trainer.stage(self.host_step)
    if stage not in self.compiled:
      self.compiled[stage] = self._compile(state, batch, stage)
    self.step_flops = self.flops_of[stage]
    self.host_step += 1
    return self.compiled[stage](state, self.frozen, batch)

  def _compile(self, state, batch, stage):
    """Compiles the step of `stage` ahead of its first call and logs what it costs: per-device memory
    from XLA, the step's useful FLOPs and the peak that MFU is measured against."""
    t = time.perf_counter()
    compiled = self.trainer.make_step(stage).lower(state, self.frozen, batch).compile()
    stats = compiled_stats(compiled)
    c = self.var_config
    if stage is not None:  # The scales this stage computes.
      c = dataclasses.replace(c, patch_nums=c.patch_nums[:stage[0]])
      logging.info('progressive stage: %d of %d scales (%d tokens)%s', stage[0], self.var_config.num_scales,
                   c.seq_len, f', newest scale weight ramped over {stage[2]} steps' if stage[2] else '')
    self.flops_of[stage] = train_step_flops(c, self.global_batch)
    self.step_flops = self.flops_of[stage]
    peak = nominal_peak_flops(jax.devices()[0])
    source = 'datasheet'
    if peak is None:  # CPUs and unknown chips: what XLA's matmul reaches on this device.
      peak, source = measured_matmul_peak(self.var_config.dtype), 'measured matmul'
    self.peak_flops = peak * jax.device_count()
    if multihost.is_main_process():
      mem = stats['memory'] or {}
      gib = lambda k: mem.get(k, 0) / 2 ** 30
      logging.info('train step compiled in %.1f s: %.3g useful FLOPs per step (XLA counts %s per device); '
                   'per device: %.2f GiB needed (arguments %.2f, temporaries %.2f, outputs %.2f, donated '
                   '%.2f); MFU against %.3g FLOP/s per device (%s)', time.perf_counter() - t,
                   self.step_flops, 'n/a' if stats['xla_flops'] is None else f'{stats["xla_flops"]:.3g}',
                   (needed_bytes(mem) or 0) / 2 ** 30, gib('argument_size_in_bytes'),
                   gib('temp_size_in_bytes'), gib('output_size_in_bytes'), gib('alias_size_in_bytes'),
                   peak, source)
    return compiled

  def record(self, metrics, steps, seconds):
    return {'tokens_per_s': steps * self.global_batch * self.var_config.seq_len / seconds,
            'mfu': steps * self.step_flops / seconds / self.peak_flops}

  def progress(self, m):
    return f'loss {m["loss"]:.4f} acc {m["accuracy"]:.3f} lr {m["lr"]:.2e}'

  @property
  def skipped_examples(self):
    return self.data.skipped

  def evaluate(self, step, state, writer):
    params = state.ema_params if state.ema_params is not None else state.params
    last = step == self.total_steps
    if self.grids is not None and (step % self.sample_every == 0 or last):
      path = self.grids.write(step, params, self.vae_replicated, writer)
      if path:
        logging.info('sample grid: %s', path)
    if self.heldout is None or not (step % self.heldout[2] == 0 or last):
      return None
    ids, labels, _ = self.heldout
    c = self.var_config
    r = heldout_token_loss(c, params, self.vq, self.vae_replicated, ids, labels,
                           batch_size=min(len(ids), 4 * self.global_batch))
    if multihost.is_main_process():
      logging.info('held-out token loss at step %d: %.4f over %d examples (per scale %s)', step, r['mean_loss'],
                   r['examples'], ' '.join(f'{x:.3f}' for x in r['loss']))
    return {'heldout_loss': r['mean_loss'], 'heldout_loss_per_scale': r['loss'],
            'heldout_accuracy_per_scale': r['accuracy'], 'heldout_examples': r['examples']}

  def export(self, step, state):
    record = run_record(step, stream=self.stream, global_batch=self.global_batch,
                        num_examples=self.data.num_examples, description=self.data.description,
                        ema_decay=self.trainer.ema_decay if state.ema_params is not None else 0.0,
                        tokenizer=self.tokenizer)
    return export_transformer(self.workdir, step, state, self.var_config, record)

  def summary(self):
    return {'init_from': self.stream['init_from'],
            'data_stream': {k: self.stream[k] for k in ('seed', 'first_step', 'skipped_examples')}}


class DistillTask(driver.Task):
  """--mode=distill: the TransformerTask `task` of a DistillTrainer, its student started from the
  trainer's teacher instead of a fresh initialisation."""

  name = 'distill'

  def __init__(self, task: TransformerTask):
    if not isinstance(task.trainer, DistillTrainer):
      raise TypeError(f'DistillTask needs a task of a DistillTrainer, not {type(task.trainer).__name__}')
    self.task, self.trainer = task, task.trainer
    for key in ('root', 'total_steps', 'global_batch', 'log_every', 'checkpoint_every', 'keep_checkpoints',
                'eval_every', 'eval_at_start'):
      setattr(self, key, getattr(task, key))

  def abstract_state(self):
    return self.task.abstract_state()

  def init(self):
    """The student copied from the teacher (a run's own checkpoint, when there is one, wins: the driver
    calls this only without one)."""
    t = self.trainer
    logging.info('distill: the student starts from the teacher %s', t.teacher.patch_nums)
    return t.init_from(init_student(t.teacher_params, t.teacher, t.var_config))

  def begin(self, start_step):
    self.task.begin(start_step)

  def step(self, state):
    return self.task.step(state)

  def record(self, metrics, steps, seconds):
    return self.task.record(metrics, steps, seconds)

  def progress(self, m):
    kl = f' (ce {m["ce"]:.4f} kl {m["kl"]:.4f})' if 'kl' in m else ''
    return self.task.progress(m) + kl

  @property
  def skipped_examples(self):
    return self.task.skipped_examples

  def evaluate(self, step, state, writer):
    return self.task.evaluate(step, state, writer)

  def export(self, step, state):
    return self.task.export(step, state)

  def summary(self):
    t = self.trainer
    return {'teacher': t.teacher.patch_nums, 'student': t.var_config.patch_nums, 'kl_weight': t.kl_weight}
