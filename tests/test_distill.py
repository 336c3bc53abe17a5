"""Scale distillation (SPEC §6): the student's schedule, its exact initialisation from the teacher, its
tokens, the KL term, and --mode=distill end to end with resume."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srdd_jax import main
from srdd_jax.config import PATCH_NUMS_256, PATCH_NUMS_512, ConfigError
from srdd_jax.convert import params_io
from srdd_jax.parallel import mesh as pm
from srdd_jax.modes import distill as distill_mode
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig, phi_index_map
from srdd_jax.train import distill
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.model import VAR
from tests.conftest import smoke_config

TEACHER_PN, STUDENT_PN = (1, 2, 3, 4), (1, 2, 4)


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _random(abstract, seed, std=0.05):
  """Random numpy values of an abstract parameter tree: compiling a real init costs far more here."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda a: (std * rng.standard_normal(a.shape)).astype(np.float32), unbox(abstract))


def _init(c, seed):
  return _random(jax.eval_shape(lambda: VAR(c).init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32),
                                                    jnp.zeros((1, c.seq_len - 1, c.z_channels)))['params']), seed)


def _vae(vq, seed=1):
  return _random(Tokenizer(vq).abstract_params(), seed, 0.1)


def _teacher(mask='markov', vocab=32, z=8):
  """A tiny float32 teacher with a head scaled up, so its distributions are far from uniform."""
  c = VARConfig(depth=1, width=32, num_heads=1, num_classes=4, vocab_size=vocab, z_channels=z,
                patch_nums=TEACHER_PN, mask=mask, drop_path_rate=0.0)
  params = _init(c, 3)
  params['head']['kernel'] = params['head']['kernel'] * 10.0
  return c, params


@pytest.fixture(scope='module')
def teacher():
  return _teacher()


def test_the_default_schedule_is_every_other_scale_plus_the_last():
  assert distill.default_student_patch_nums(PATCH_NUMS_256) == (1, 3, 5, 8, 13, 16)
  assert distill.default_student_patch_nums(PATCH_NUMS_512) == (1, 3, 6, 13, 24, 32)
  assert distill.default_student_patch_nums((1, 2, 3, 4, 6, 8)) == (1, 3, 6, 8)
  assert distill.default_student_patch_nums(TEACHER_PN) == (1, 3, 4)
  assert distill.student_patch_nums('', PATCH_NUMS_256) == (1, 3, 5, 8, 13, 16)
  assert distill.student_patch_nums('1,2,4', TEACHER_PN) == (1, 2, 4)
  assert distill.student_patch_nums((1, 4), TEACHER_PN) == (1, 4)


@pytest.mark.parametrize('value,match', [
    ('1,3,2,4', r'config\.distill\.patch_nums=\(1, 3, 2, 4\): the sides must be strictly increasing'),
    ('1,2,5,4', r'config\.distill\.patch_nums=\(1, 2, 5, 4\).*increasing'),
    ('1,2,5', r'config\.distill\.patch_nums=\(1, 2, 5\): 5 is not a scale of the teacher \(1, 2, 3, 4\)'),
    ('1,2,3', r'config\.distill\.patch_nums=\(1, 2, 3\) must keep the teacher\'s last scale 4'),
    ('2,3,4', r'config\.distill\.patch_nums=\(2, 3, 4\) must keep the teacher\'s first scale 1'),
    ('1,x', r"config\.distill\.patch_nums='1,x': expected comma-separated integers"),
])
def test_schedule_errors_name_the_key_and_the_value(value, match):
  with pytest.raises(ConfigError, match=match):
    distill.student_patch_nums(value, TEACHER_PN)


def test_init_student_copies_the_kept_scales_exactly(teacher):
  tc, tp = teacher
  sc = distill.student_config(tc, STUDENT_PN)
  sp = distill.init_student(tp, tc, sc)
  want = jax.eval_shape(lambda: unbox(VAR(sc).init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32),
                                                   jnp.zeros((1, sc.seq_len - 1, 8)))['params']))
  assert jax.tree_util.tree_structure(sp) == jax.tree_util.tree_structure(want)
  assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(sp), jax.tree_util.tree_leaves(want)))
  pos = tp['pos_1LC']  # Teacher rows: scale 0 at [0, 1), 1 at [1, 5), 2 at [5, 14), 3 at [14, 30).
  np.testing.assert_array_equal(sp['pos_1LC'], np.concatenate([pos[:, 0:1], pos[:, 1:5], pos[:, 14:30]], 1))
  np.testing.assert_array_equal(sp['lvl_embed']['embedding'], tp['lvl_embed']['embedding'][[0, 1, 3]])
  a, b = _flat(sp), _flat(tp)
  shared = [k for k in a if not k.startswith(('pos_1LC', 'lvl_embed'))]
  assert len(shared) == len(a) - 2 and all(np.array_equal(a[k], b[k]) for k in shared)
  # The teacher's own schedule gives the teacher back.
  same = distill.init_student(tp, tc, tc)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(tp)))


def _student_and_teacher_logits(tc, sc):
  """(student params, teacher params) -> both models' logits at the student's tokens, for fixed random
  labels and inputs; one compiled program for every call."""
  rng = np.random.default_rng(0)
  labels = jnp.asarray(rng.integers(0, tc.num_classes + 1, 6), jnp.int32)  # The null class included.
  x_in = jnp.asarray(rng.normal(size=(6, sc.seq_len - 1, tc.z_channels)), jnp.float32)
  kept = distill.kept_scales(tc.patch_nums, sc.patch_nums)
  fn = jax.jit(lambda sp, tp: (VAR(sc).apply({'params': sp}, labels, x_in),
                               distill.teacher_logits(VAR(tc), tp, labels, x_in, sc, kept)))
  return fn


@pytest.mark.parametrize('student_pn', [TEACHER_PN, STUDENT_PN])
def test_the_kl_term_is_zero_for_the_initial_student_and_positive_after_a_change(teacher, student_pn):
  tc, tp = teacher
  sc = distill.student_config(tc, student_pn)
  sp = distill.init_student(tp, tc, sc)
  logits = _student_and_teacher_logits(tc, sc)
  s, t = logits(sp, tp)
  assert s.shape == t.shape == (6, sc.seq_len, tc.vocab_size) and float(jnp.std(t)) > 0.1
  # A markov teacher on the student's inputs is the initial student: same function, same numbers.
  np.testing.assert_allclose(s, t, atol=2e-5)
  assert abs(float(distill.kl_divergence(t, s))) < 1e-6  # float32 rounding of equal logits (1.06e-8 measured in CI)
  sp2 = jax.tree_util.tree_map(lambda x: x, sp)
  noise = np.random.default_rng(1).normal(size=sp['head']['kernel'].shape).astype(np.float32)
  sp2['head']['kernel'] = sp['head']['kernel'] + 0.5 * noise
  s2, _ = logits(sp2, tp)
  kl = float(distill.kl_divergence(t, s2))
  p_t, logp_t, logp_s = jax.nn.softmax(t, -1), jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s2, -1)
  assert kl > 1e-3 and kl == pytest.approx(float(jnp.mean(jnp.sum(p_t * (logp_t - logp_s), -1))), rel=1e-5)
  # Temperature: tau^2 * KL of the softened distributions.
  soft = jnp.mean(jnp.sum(jax.nn.softmax(t / 2, -1) * (jax.nn.log_softmax(t / 2, -1) - jax.nn.log_softmax(s2 / 2, -1)), -1))
  assert float(distill.kl_divergence(t, s2, 2.0)) == pytest.approx(4 * float(soft), rel=1e-5)
  # Progressive growth: the mean over the tokens of the active scales only (here the first two).
  w = jnp.zeros(sc.seq_len).at[:5].set(1.0)
  per_token = jnp.sum(p_t * (logp_t - logp_s), -1)
  assert float(distill.kl_divergence(t, s2, 1.0, w)) == pytest.approx(float(jnp.mean(per_token[:, :5])), rel=1e-5)


def test_the_students_tokens_are_the_tokenizers_at_the_student_schedule():
  vq_t = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 2), patch_nums=TEACHER_PN)
  vq_s = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 2), patch_nums=STUDENT_PN)
  vae = _vae(vq_t)
  tc, tp = _teacher()
  sc = distill.student_config(tc, STUDENT_PN)
  trainer = distill.DistillTrainer(sc, vq_s, _optim(), _mesh(),
                                   teacher=tc, teacher_params=tp)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  got = jax.jit(lambda v, x: trainer.tokens(trainer.frozen(v), {'images': x}))(vae, images)
  want = jnp.concatenate(jax.jit(Tokenizer(vq_s).img_to_idx)(vae, images), axis=1)
  np.testing.assert_array_equal(got, want)
  assert got.shape == (2, 1 + 4 + 16)
  # VAR's phi rule for S=3 scales: the nearest of the 4 ticks (1/12 .. 11/12) to k/2; 1/2 is a tie that
  # float64 resolves to phi 2. The student's scale 1 thus uses another phi than the teacher's pn=2 scale.
  assert vq_s.phi_map() == phi_index_map(3, 4) == (0, 2, 3) and vq_t.phi_map() == (0, 1, 2, 3)
  # Scale 0 quantizes area(f, 1) in both schedules: the same tokens; later scales follow other residuals.
  teacher_ids = jax.jit(Tokenizer(vq_t).img_to_idx)(vae, images)
  np.testing.assert_array_equal(got[:, :1], teacher_ids[0])


def _optim():
  return OptimConfig(peak_lr=1e-3, weight_decay=0.0, weight_decay_end=-1.0, warmup_steps=1, total_steps=4,
                     final_fraction=0.1, clip_norm=0.0)


def _mesh():
  return pm.make_mesh((-1, 1, 1))


# --- --mode=distill end to end ------------------------------------------------------------------

def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss'], r['kl']) for r in map(json.loads, f)]


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A tokenizer like the smoke config's (64 codes of 8 channels, scales 1..4) and a teacher for it (10
  classes) saved as a training export would be; per-block layout (the smoke run scans its blocks:
  converted on load). The teacher is smaller than the smoke model (depth 1, width 32: a smaller step to
  compile), so the student's architecture shows it comes from the teacher."""
  root = tmp_path_factory.mktemp('teacher')
  vq = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), patch_nums=TEACHER_PN)
  params_io.save_params(str(root / 'vae'), _vae(vq), kind='vqvae', config=vq)
  c = VARConfig(depth=1, width=32, num_heads=1, num_classes=10, vocab_size=64, z_channels=8,
                patch_nums=TEACHER_PN, drop_path_rate=0.0)
  p = _init(c, 7)
  params_io.save_params(str(root / 'markov'), p, kind='var', config=c)
  causal = VARConfig(**{**c.__dict__, 'mask': 'causal'})
  params_io.save_params(str(root / 'causal'), p, kind='var', config=causal)
  return str(root)


def _distill_config(teacher_dir, **d):
  c = smoke_config(steps=4, checkpoint_every=2, accum_steps=2)  # Accumulation sums 'ce' and 'kl' too.
  c.tokenizer.checkpoint = os.path.join(teacher_dir, 'vae')
  c.distill.update({'teacher': os.path.join(teacher_dir, 'markov'), 'patch_nums': '1,2,4', 'kl_weight': 0.5, **d})
  return c


def test_distill_mode_runs_resumes_and_exports(teacher_dir, tmp_path):
  assert main.MODES['distill'] is distill_mode.run
  straight = str(tmp_path / 'straight')
  full = distill_mode.run(_distill_config(teacher_dir), straight)
  assert full['end_step'] == 4 and full['student'] == STUDENT_PN and full['teacher'] == TEACHER_PN
  recs = [json.loads(line) for line in open(os.path.join(straight, 'metrics.jsonl'))]
  assert all({'ce', 'kl'} <= r.keys() and r['loss'] == pytest.approx(r['ce'] + 0.5 * r['kl'], rel=1e-5)
             for r in recs)
  # Step 1 is computed on the initial student: the copied teacher, so no divergence from it (bfloat16).
  assert recs[0]['kl'] < 1e-3 and recs[-1]['kl'] > recs[0]['kl']
  cfg, _ = params_io.load_var(full['export'])
  assert cfg.patch_nums == STUDENT_PN and (cfg.depth, cfg.width, cfg.num_classes) == (1, 32, 10)
  # A run stopped at step 2 (its checkpoint, its metrics) resumes from there, not from the teacher.
  part = tmp_path / 'part'
  shutil.copytree(os.path.join(straight, 'checkpoints', '2'), part / 'checkpoints' / '2')
  (part / 'metrics.jsonl').write_text(''.join(open(os.path.join(straight, 'metrics.jsonl')).readlines()[:2]))
  second = distill_mode.run(_distill_config(teacher_dir), str(part))
  assert (second['start_step'], second['end_step']) == (2, 4)
  assert _losses(str(part)) == _losses(straight)  # Bitwise: data order, label dropout and RNG included.


def test_distill_errors_name_the_key(teacher_dir, tmp_path):
  with pytest.raises(ConfigError, match=r'config\.distill\.kl_weight=0\.5 needs a markov teacher'):
    distill_mode.run(_distill_config(teacher_dir, teacher=os.path.join(teacher_dir, 'causal')), str(tmp_path / 'a'))
  cache = tmp_path / 'cache'
  cache.mkdir()
  (cache / 'manifest.json').write_text(json.dumps({'patch_nums': list(TEACHER_PN)}))
  with pytest.raises(ConfigError, match=r'config\.distill\.token_cache=.* holds tokens for patch_nums '
                                        r'\(1, 2, 3, 4\), the student uses \(1, 2, 4\)'):
    distill_mode.run(_distill_config(teacher_dir, token_cache=str(cache)), str(tmp_path / 'b'))
  with pytest.raises(ConfigError, match=r'config\.distill\.teacher is empty'):
    distill_mode.run(_distill_config(teacher_dir, teacher=''), str(tmp_path / 'c'))
  with pytest.raises(ConfigError, match=r'config\.distill\.patch_nums=\(1, 3\) must keep the teacher\'s last'):
    distill_mode.run(_distill_config(teacher_dir, patch_nums='1,3'), str(tmp_path / 'd'))
