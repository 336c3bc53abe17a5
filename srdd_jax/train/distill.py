"""Scale distillation (SPEC §6): a student on a subset of the teacher's scales.

The student has the teacher's architecture and a shorter schedule, e.g. (1,3,5,8,13,16) instead of VAR's
(1,2,3,4,5,6,8,10,13,16) (23% fewer tokens). It starts as a copy of the teacher (`init_student`) and is
trained on the ground-truth tokens re-quantized at its own schedule: the tokenizer quantizes at whatever
scales it is given, and VAR's phi map (the nearest of K ticks to k/(S-1)) is evaluated for the student's S.

The optional KL term (`kl_to_teacher`): at every student scale s, the teacher's scale t with the same side
(pn_t = pn_s) is run on the student's own input of that scale (the cumulative f_hat of the student's
coarser scales, area-downsampled to pn_s), with the same (label-dropped) class and the teacher's own
position and level embeddings of scale t. A markov teacher's logits of a scale are a function of exactly
those inputs (a scale attends only to itself), so teacher and student condition on identical inputs: no
approximation, no skipped-scale context missing. Loss = CE + kl_weight * tau^2 * mean over the student's
tokens of KL(softmax(teacher / tau) || softmax(student / tau)) (tau^2 keeps the gradient's size independent
of tau, as in Hinton et al.). Since `init_student` copies the kept scales' embeddings, the student at step 0
*is* this teacher function on its inputs (the KL is 0 there), so the term holds the student near the
teacher while the CE moves it to the re-quantized targets; past the first skipped scale the student's
inputs are coarser than any the teacher saw at that scale, which is why it is a regulariser with a weight,
not the target. A causal teacher's logits depend on the keys and values of every coarser teacher scale,
skipped ones included, so no student input reproduces them: kl_weight > 0 with a causal teacher is refused.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.config import ConfigError, ints
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import Tokenizer
from srdd_jax.train.step import Trainer, TrainState
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.loss import cross_entropy_metrics, token_nll
from srdd_jax.transformer.model import VAR

KEY = 'config.distill.patch_nums'


# --- the student's schedule --------------------------------------------------------------------

def default_student_patch_nums(teacher_pn) -> tuple[int, ...]:
  """Every other scale of the teacher (indices 0, 2, 4, ...) plus its last: (1,3,5,8,13,16) from VAR's
  (1,2,3,4,5,6,8,10,13,16), (1,3,6,13,24,32) from its 512 px schedule, (1,3,6,8) from (1,2,3,4,6,8)."""
  teacher_pn = tuple(int(p) for p in teacher_pn)
  kept = teacher_pn[::2]
  return kept if kept[-1] == teacher_pn[-1] else kept + teacher_pn[-1:]


def student_patch_nums(value, teacher_pn, key: str = KEY) -> tuple[int, ...]:
  """config.distill.patch_nums ('' = the default rule) checked against the teacher's schedule."""
  teacher_pn = tuple(int(p) for p in teacher_pn)
  pn = ints(value, key)
  if not pn:
    return default_student_patch_nums(teacher_pn)
  where = f'{key}={pn}'
  if any(b <= a for a, b in zip(pn, pn[1:])):
    raise ConfigError(f'{where}: the sides must be strictly increasing')
  extra = [p for p in pn if p not in teacher_pn]
  if extra:
    raise ConfigError(f'{where}: {extra[0]} is not a scale of the teacher {teacher_pn}; the student keeps a '
                      'subset of its scales')
  if pn[-1] != teacher_pn[-1]:
    raise ConfigError(f'{where} must keep the teacher\'s last scale {teacher_pn[-1]} (the latent side)')
  # pos_start has pn_0^2 rows and scale 0 is the class-only prediction: the start token is not skippable.
  if pn[0] != teacher_pn[0]:
    raise ConfigError(f'{where} must keep the teacher\'s first scale {teacher_pn[0]} (the start token)')
  return pn


def kept_scales(teacher_pn, student_pn) -> tuple[int, ...]:
  """The teacher's index of each student scale."""
  teacher_pn = tuple(int(p) for p in teacher_pn)
  return tuple(teacher_pn.index(int(p)) for p in student_pn)


def student_config(teacher: VARConfig, patch_nums, **run) -> VARConfig:
  """The teacher's architecture at the student's scales; `run` sets run-time fields (dtype, scan...)."""
  return dataclasses.replace(teacher, patch_nums=tuple(int(p) for p in patch_nums), **run)


# --- initialisation ----------------------------------------------------------------------------

def init_student(teacher_params, teacher: VARConfig, student: VARConfig):
  """The student's parameters: the teacher's, with `pos_1LC` cut to the rows of the kept scales and
  `lvl_embed` to their rows (teacher scale index -> student index). Everything else (blocks, class
  embedding, word embedding, pos_start, shared AdaLN, head) has the same shape and is copied as is."""
  kept = kept_scales(teacher.patch_nums, student.patch_nums)
  params = dict(teacher_params)
  pos = np.asarray(teacher_params['pos_1LC'])
  params['pos_1LC'] = np.concatenate([pos[:, b:e] for b, e in (teacher.begin_ends[t] for t in kept)], axis=1)
  lvl = np.asarray(teacher_params['lvl_embed']['embedding'])
  params['lvl_embed'] = {**teacher_params['lvl_embed'], 'embedding': lvl[np.asarray(kept)]}
  return params


# --- the KL term -------------------------------------------------------------------------------

def _teacher_scale(module, labels, x_scale, si):
  return module.scale_logits(module.condition(labels), x_scale, si)[0]


def teacher_logits(teacher_model: VAR, teacher_params, labels, x_in, student: VARConfig, kept,
                   num_scales: int | None = None):
  """The teacher's logits (B, L_student, V) at the student's tokens: scale by scale, the teacher's scale
  kept[s] run alone (markov) on the student's input of scale s; only the first `num_scales` scales when
  given (progressive training)."""
  out = []
  first = student.first_l
  for s, (b, e) in enumerate(student.begin_ends[:num_scales]):
    x_scale = None if s == 0 else x_in[:, b - first:e - first]
    out.append(teacher_model.apply({'params': teacher_params}, labels, x_scale, kept[s], method=_teacher_scale))
  return jnp.concatenate(out, axis=1)


def kl_divergence(teacher_logits_, student_logits, temperature: float = 1.0, token_weights=None):
  """tau^2 * mean over tokens of KL(softmax(t / tau) || softmax(s / tau)), in float32; with
  `token_weights` (l,) a weighted mean over the sequence."""
  t = jax.nn.log_softmax(teacher_logits_.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  if token_weights is None:
    return temperature ** 2 * jnp.mean(kl)
  w = jnp.broadcast_to(token_weights[None], kl.shape)
  return temperature ** 2 * jnp.sum(kl * w) / jnp.sum(w)


# --- the trainer -------------------------------------------------------------------------------

def check_kl(kl_weight: float, kl_temperature: float, teacher: VARConfig, teacher_path: str = '') -> None:
  """config.distill.kl_weight and kl_temperature, against the teacher (config.distill.teacher)."""
  if kl_weight < 0:
    raise ConfigError(f'config.distill.kl_weight={kl_weight}: must be >= 0 (0 = no KL term)')
  if not kl_temperature > 0:
    raise ConfigError(f'config.distill.kl_temperature={kl_temperature}: must be > 0')
  if kl_weight > 0 and teacher.mask != 'markov':
    raise ConfigError(f'config.distill.kl_weight={kl_weight} needs a markov teacher; '
                      f'config.distill.teacher={teacher_path!r} is {teacher.mask}: its logits at a scale depend on '
                      'the keys and values of the scales the student skips, so no student input gives them '
                      '(set config.distill.kl_weight=0)')


class DistillTrainer(Trainer):
  """The transformer trainer with a student's init and the KL term. The frozen arguments of the step
  are {'vae': tokenizer params, 'teacher': teacher params or None} (replicated), so the teacher is an
  argument of the compiled step like the tokenizer, never a constant baked into the program.
  `teacher_path` (config.distill.teacher) names the teacher in errors."""

  def __init__(self, var_config: VARConfig, vae_config, optim, mesh, *, teacher: VARConfig,
               teacher_params=None, kl_weight: float = 0.0, kl_temperature: float = 1.0,
               teacher_path: str = '', **kwargs):
    check_kl(kl_weight, kl_temperature, teacher, teacher_path)
    super().__init__(var_config, vae_config, optim, mesh, **kwargs)
    self.teacher, self.kept = teacher, kept_scales(teacher.patch_nums, var_config.patch_nums)
    self.teacher_model = VAR(teacher)
    self.teacher_params = teacher_params
    self.kl_weight, self.kl_temperature = float(kl_weight), float(kl_temperature)
    # Label dropout is drawn here, not inside the model, so that the teacher sees the same labels.
    self.model = VAR(dataclasses.replace(var_config, cond_drop_rate=0.0))

  def init_from(self, params) -> TrainState:
    """A fresh state (step 0, fresh optimiser moments) around the given parameters, in its shardings."""
    shardings = self.state_shardings
    params = jax.tree_util.tree_map(np.asarray, params)  # Host arrays: jit places them as it shards them.

    def build(p):
      return TrainState(step=jnp.zeros([], jnp.int32), params=p, opt_state=self.tx.init(p), ema_params=None)

    state = jax.jit(build, out_shardings=shardings.replace(ema_params=None))(params)
    if self.ema_decay > 0:  # Its own buffers: the step donates the state, a shared buffer cannot be.
      ema = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=shardings.ema_params)(params)
      state = state.replace(ema_params=ema)
    return state

  def frozen(self, vae_params):
    return {'vae': vae_params, 'teacher': self.teacher_params if self.kl_weight > 0 else None}

  def tokenizer_params(self, frozen):
    return frozen['vae']

  def loss(self, params, frozen, labels, ids, rng, stage=None, newest=None):
    c = self.var_config
    drop_rng, rng = jax.random.split(rng)
    if c.cond_drop_rate > 0:
      drop = jax.random.uniform(drop_rng, labels.shape) < c.cond_drop_rate
      labels = jnp.where(drop, c.num_classes, labels)
    logits, x_in = self.logits(params, frozen, labels, ids, rng, stage)
    ce, metrics = cross_entropy_metrics(logits, ids, c, newest)
    if self.kl_weight <= 0:
      return ce, metrics
    num_scales = None if stage is None else stage[0]  # Progressive: the sequence cut after the newest scale.
    with pm.activation_sharding(self.mesh, self.rules):
      target = jax.lax.stop_gradient(teacher_logits(self.teacher_model, frozen['teacher'], labels, x_in,
                                                    c, self.kept, num_scales))
    kl = kl_divergence(target, logits, self.kl_temperature)
    loss = ce + self.kl_weight * kl
    return loss, {**metrics, 'loss': loss, 'ce': ce, 'kl': kl}


# --- evaluation --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _heldout_sums(var_config: VARConfig, vae_config):
  """The jitted per-scale sums of one architecture pair, built once: models of one architecture (the
  seeds of a study, a run's evaluations) share its compiled program."""
  model, tok = VAR(var_config), Tokenizer(vae_config)
  seg = np.repeat(np.arange(var_config.num_scales), [p * p for p in var_config.patch_nums])
  onehot = jnp.asarray(seg[:, None] == np.arange(var_config.num_scales)[None], jnp.float32)  # (L, S)

  @jax.jit
  def sums(p, vp, batch_ids, batch_labels, weight):
    x_in = tok.idx_to_var_input(vp, [batch_ids[:, b:e] for b, e in var_config.begin_ends])
    # A refine model is scored as its first sampling pass sees each scale: every token masked (the
    # stream never saw a missing reveal in training).
    reveal = (jnp.full(batch_ids.shape, var_config.vocab_size, jnp.int32) if var_config.refine
              else None)
    logits = model.apply({'params': p}, batch_labels, x_in, reveal_ids=reveal).astype(jnp.float32)
    nll = token_nll(logits, batch_ids)
    correct = (jnp.argmax(logits, axis=-1) == batch_ids).astype(jnp.float32)
    return (weight[:, None] * nll) @ onehot, (weight[:, None] * correct) @ onehot
  return sums


def heldout_token_loss(var_config: VARConfig, params, vae_config, vae_params, ids, labels,
                       batch_size: int = 250) -> dict:
  """Held-out cross-entropy and accuracy per scale (teacher forcing, no label dropout, eval mode) of
  `ids` (N, L) at var_config's schedule: {'patch_nums', 'loss' [S], 'accuracy' [S], 'mean_loss'}."""
  sums = _heldout_sums(dataclasses.replace(var_config, cond_drop_rate=0.0), vae_config)
  ids, labels = np.asarray(ids, np.int32), np.asarray(labels, np.int32)
  n = len(ids)
  tot_nll = np.zeros(var_config.num_scales)
  tot_acc = np.zeros(var_config.num_scales)
  for start in range(0, n, batch_size):
    bi, bl = ids[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(bi)
    w = np.concatenate([np.ones(len(bi)), np.zeros(pad)]).astype(np.float32)
    bi = np.concatenate([bi, np.repeat(bi[-1:], pad, 0)])
    bl = np.concatenate([bl, np.repeat(bl[-1:], pad, 0)])
    s_nll, s_acc = jax.device_get(sums(params, vae_params, bi, bl, w))
    tot_nll += s_nll.sum(0)
    tot_acc += s_acc.sum(0)
  per_scale = np.asarray([p * p for p in var_config.patch_nums], np.float64) * n
  loss, acc = tot_nll / per_scale, tot_acc / per_scale
  return {'patch_nums': list(var_config.patch_nums), 'loss': loss.tolist(), 'accuracy': acc.tolist(),
          'mean_loss': float(tot_nll.sum() / per_scale.sum()), 'examples': n}
