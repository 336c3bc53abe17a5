"""--mode=study (srdd_jax/study/): the headline and tools arms on a tiny run (digits at their own 8 px, a
given untrained tokenizer, 4-step transformers), its outputs, a second run that redoes nothing, a changed
setting that redoes sampling and refuses training; the plan, the choice rule, the options' errors."""
import json
import os

import ml_collections
import pytest

from srdd_jax import main
from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.modes import study as study_mode
from srdd_jax.study import arms, plan, report


def _tiny_config(tokenizer='', groups='headline,tools'):
  from configs import tokenizer_smoke
  c = tokenizer_smoke.get_config()
  c.tokenizer.checkpoint = tokenizer
  c.model.update(depth=1, width=32, heads=1, num_classes=10, mask='markov', drop_path_rate=0.0, scan=False)
  c.train.update(global_batch=16, steps=4, log_every=2, checkpoint_every=4, keep_checkpoints=1)
  # A high rate (peak 0.03): four steps take each model far enough from its initialisation that the
  # arms' samples differ (near-initial models all draw the same tokens from the same keys).
  c.optim.update(base_lr=0.5, warmup_steps=1)
  c.tokenize.update(batch_size=64)
  c.sampler.update(top_k=0, top_p=0.0)
  c.eval.update(batch_size=16, proxy_epochs=1, proxy_examples=100)
  c.ablation = ml_collections.ConfigDict(dict(
      arms=groups, train_seeds='0', sample_seeds='0,1', cfg_grid='1.5,3', schedules='linear,constant',
      val_per_class=1, test_per_class=1, timing_repeats=1, heldout_points=1, heldout_examples=64,
      mr_thresholds='0.05', mr_iterations='2', truncations='top_p=0.9', quick=True))
  return c


def _mtimes(root):
  return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
          for d, _, names in os.walk(root) for f in names if not f.startswith('study.')}


# The headline arms and the tools on (i) (those on (h) are the same rows on another model).
ARMS = 'headline,i_constant,i_paper,i_redraw,i_redraw_grid,i_truncation_grid'


def test_the_study_runs_resumes_adds_arms_and_never_pairs_stale_with_new(tmp_path, small_tokenizer):
  assert main.MODES['study'] is main.MODES['ablation'] is study_mode.run
  wd = str(tmp_path / 'run')
  first = study_mode.run(_tiny_config(small_tokenizer, ARMS), wd)
  out = json.load(open(os.path.join(wd, 'study.json')))
  t = out['arms']
  assert list(t) == [a.key for a in arms.select(ARMS.split(','))] and len(t) == 15
  for k, r in t.items():
    assert r['fd']['n'] == 1 and len(r['runs']) == 2 and r['num_samples'] == [10], k  # 1 x 2 sampling seeds.
    assert {x['real_split'] for x in r['runs']} == {'test'} and r['fd']['mean'] > 0, k
    assert 0 <= r['precision']['mean'] <= 1 and 0 <= r['recall']['mean'] <= 1, k
    assert r['cost']['images_per_s'] > 0, k
  models = {(m['model'], m['seed']): m for m in out['models']}
  assert sorted(models) == [(m, 0) for m in ('sdd', 'sdd_from_var', 'var', 'var_continued')]
  for m in ('var_continued', 'sdd_from_var'):  # The paper's recipe: both start from the seed's VAR, equal totals.
    assert models[(m, 0)]['start']['export'] == models[('var', 0)]['export'] and models[(m, 0)]['total_steps'] == 8
  var = models[('var', 0)]
  assert var['half_export'].endswith('step_00000002') and var['half_steps'] == 2 and var['export'].endswith('04')
  assert var['heldout_curve'][-1][0] == 4 and var['heldout_loss_per_scale']
  assert t['a_half']['training_steps'] == [2] and t['a']['training_steps'] == [4] and t['h']['training_steps'] == [8]
  assert {r['model'] for r in t['a_half']['runs']} == {var['half_export']}
  assert t['a_half']['fd']['values'] != t['a']['fd']['values']  # S/2 is another model of the same run.
  # Samplers: VAR's protocol; the paper's strength; SRDD's redraw; the grids, chosen per training seed.
  assert {(s['cfg'], s['cfg_schedule'], s['mr_iterations']) for s in t['a']['samplers']} == {(1.5, 'linear', 0)}
  assert {s['cfg'] for s in t['i_paper']['samplers']} == {5.0}
  assert {(s['mr_threshold'], s['mr_iterations']) for s in t['i_redraw']['samplers']} == {(0.01, 10)}
  assert {s['cfg_schedule'] for s in t['i_constant']['samplers']} == {'constant'}
  assert {(s['mr_threshold'], s['mr_iterations']) for s in t['i_redraw_grid']['samplers']} == {(0.05, 2)}
  assert {s['top_p'] for s in t['i_truncation_grid']['samplers']} == {0.9}
  r = json.load(open(os.path.join(wd, 'arms', 'i_cfg', 'seed0', 'summary', 'result.json')))
  scores = r['selection']['scores']
  assert [x['sampler']['cfg'] for x in scores] == [1.5, 3.0] and r['selection']['real_split'] == 'train'
  assert r['sampler'] == min(scores, key=lambda x: x['fd'])['sampler']  # The seed's own choice.
  assert r['selection']['validation_seed'] not in (0, 1) and t['i_cfg']['samplers'] == [r['sampler']]
  # Comparisons by training seed: a seed's difference is the mean over its sampling seeds (the interval
  # over training seeds: tests/test_paired.py); with one training seed there is none.
  comps = {(c['x'], c['ref']): c for c in out['comparisons']}
  assert len(comps) == 5 + 4 + 4  # Headline, own guidance vs the protocol, tools on (i).
  ba = comps[('b', 'a')]['fd']
  fd = lambda k: {r['sampling_seed']: r['fd'] for r in t[k]['runs']}
  assert ba['per_seed'] == pytest.approx([(fd('b')[0] - fd('a')[0] + fd('b')[1] - fd('a')[1]) / 2])
  assert (ba['n'], ba['runs'], ba['ci']) == (1, 2, None) and ba['verdict']['verdict'] == 'not decisive'
  assert comps[('b', 'a')]['margin'] == pytest.approx(0.05 * t['a']['fd']['mean'])
  assert comps[('i_redraw', 'i_cfg')]['margin'] == pytest.approx(0.05 * t['h_cfg']['fd']['mean'])
  assert [c['question'] for c in out['model_comparisons']] == [q for q, _, _ in arms.MODEL_COMPARISONS]
  md = open(os.path.join(wd, 'study.md')).read()
  assert md.count('\n| (') == 15 and "- SDD vs VAR from scratch, VAR's protocol: (b) - (a) fd " in md
  from PIL import Image
  assert Image.open(os.path.join(wd, 'study.png')).size == (1040 + 480, 560)
  # The plan counted before the run is what the run did; the progress counted the same work.
  p, ran = out['plan'], first['units_run']
  assert p['models'] == len(models) and p['training_steps'] == sum(m['steps'] for m in models.values()) == 16
  assert p['validation_runs'] == sum('/validation/' in u for u in ran) == 4 * 2 + 2 + 2 + 2 + 2
  assert p['test_runs'] == sum('/test/' in u for u in ran) == 30
  sampled = p['validation_image_passes'] + p['test_image_passes_at_most']
  assert out['rates']['done'] == {'training': 16, 'sampling': sampled}
  # The report is a function of the result files alone.
  assert report.build(wd, arms=set(t), train_seeds={0})['comparisons'] == out['comparisons']
  # Run again: every unit is kept, nothing is trained, sampled or written again.
  before = _mtimes(wd)
  second = study_mode.run(_tiny_config(small_tokenizer, ARMS), wd)
  assert second['units_run'] == [] and second['units_kept'] == first['units_kept'] + len(
      [u for u in first['units_run'] if not u.endswith('/checkpoints')])
  assert _mtimes(wd) == before
  # More test samples: the test runs and summaries are made again, with the new count, and nothing else.
  more = _tiny_config(small_tokenizer, 'a,b_cfg')
  more.ablation.test_per_class = 2
  third = study_mode.run(more, wd)
  assert sorted(third['units_run']) == [f'arms/{k}/seed0/{u}' for k in ('a', 'b_cfg')
                                        for u in ('summary', 'test/sample0', 'test/sample1')]
  again = json.load(open(os.path.join(wd, 'study.json')))['arms']
  assert {k: r['num_samples'] for k, r in again.items()} == {'a': [20], 'b_cfg': [20]}
  assert again['b_cfg']['samplers'] == t['b_cfg']['samplers']  # The choice is kept: validation did not change.
  # Later arms add files beside the others' and train nothing: the tools on (h), on its kept model.
  arm_files = lambda: {k: v for k, v in _mtimes(wd).items() if f'{os.sep}arms{os.sep}' in k}
  before = arm_files()
  fourth = study_mode.run(_tiny_config(small_tokenizer, 'h_constant,h_paper'), wd)
  assert sorted(fourth['units_run']) == sorted(
      [f'arms/{k}/seed0/{u}' for k in ('h_constant', 'h_paper') for u in ('summary', 'test/sample0', 'test/sample1')]
      + ['arms/h_constant/seed0/validation/constant_cfg1.5', 'arms/h_constant/seed0/validation/constant_cfg3',
         'cost/h_constant', 'cost/h_paper'])
  after = arm_files()
  assert {k: after[k] for k in before} == before and len(after) > len(before)
  assert list(json.load(open(os.path.join(wd, 'study.json')))['arms']) == ['h_constant', 'h_paper']
  # Other training steps: the models hold training work, so the run is refused, naming the change.
  longer = _tiny_config(small_tokenizer, ARMS)
  longer.train.steps = 6
  with pytest.raises(ConfigError, match=r'models/var_seed0.*made from other inputs.*steps: 4 -> 6'):
    study_mode.run(longer, wd)


def test_every_preset_plans_the_study():
  from configs import ablation as presets
  for arg, n_arms in (('', 20), ('gpu', 24), ('quick', 17), ('gpu,quick', 17)):
    c = presets.get_config(arg)
    p = plan.plan(c)
    assert p['arms'] == n_arms and p['test_runs'] == n_arms * len(c.ablation.train_seeds.split(',')), arg
  c = presets.get_config('')
  p = plan.plan(c)
  # 6 training seeds x 4 models of S (the demo's steps); 5,000 test samples per (arm, seed).
  assert p['models'] == 24 and p['training_steps'] == 24 * c.train.steps and p['test_images'] == 120 * 5000
  # A guidance grid of 5 for 8 arms, x a grid of 3 for the 4 grid arms: (8 x 5 + 4 x 15) x 6 seeds.
  assert p['validation_runs'] == (8 * 5 + 4 * 15) * 6
  with pytest.raises(ValueError, match="config argument 'tpu'"):
    presets.get_config('gpu,tpu')


def test_progress_gives_an_eta_from_the_rates_so_far():
  progress = plan.Progress({'training_steps': 1000, 'validation_image_passes': 3000, 'test_image_passes_at_most': 1000})
  assert progress.eta() is None and 'ETA once' in progress.line()
  progress('models/var_seed0', {'steps': 100}, 50.0, True)  # 0.5 s a step.
  assert progress.eta() is None  # No sampling rate yet.
  progress('tokens/train', {'count': 10}, 30.0, True)  # Not in the ETA.
  progress('arms/l/seed0/validation/x', {'num_samples': 20, 'sampler': {'mr_mode': 'refine', 'mr_iterations': 9}},
           20.0, True)  # 200 image-passes: 0.1 s each.
  progress('arms/i_redraw/seed0/test/sample0', {'num_samples': 200, 'sampler': {
      'mr_mode': 'redraw', 'mr_iterations': 9}}, 20.0, False)  # Kept: counted at its recorded time.
  assert progress.done == {'training': 100, 'sampling': 400}
  assert progress.eta() == pytest.approx(900 * 0.5 + 3600 * 0.1)
  assert 'ETA at most 14 min' in progress.line() and '100/1,000 steps (0.500 s each)' in progress.line()


def test_arms_choose_on_their_grid_and_ties_go_to_the_smaller_strength():
  o = plan.options(with_defaults(_tiny_config()))
  grid = plan.candidates(arms.ARMS['i_redraw_grid'], o)
  assert [(v['cfg'], v['mr_threshold']) for v in grid] == [(1.5, 0.05), (3.0, 0.05)]
  assert plan.candidates(arms.ARMS['a'], o) == [plan.sampler_values('linear', 1.5)]
  assert len(plan.candidates(arms.ARMS['i_truncation_grid'], o)) == len(grid)  # Partners: as many runs.
  v = [plan.sampler_values('linear', c) for c in (1.0, 2.0, 3.0)]
  assert plan.choose([(v[0], 5.0), (v[1], 3.0), (v[2], 3.0)]) == v[1]
  assert plan.choose([(v[0], 3.0), (v[1], 3.0 + 1e-12)]) == v[0]
  assert plan.setting_name(grid[1]) == 'linear_cfg3_redraw_t0.05_x2'
  assert plan.setting_name({**v[0], 'top_p': 0.9}) == 'linear_cfg1_top_p0.9'
  with pytest.raises(ValueError):
    plan.choose([])
  need = [m.name for m in arms.models_for(arms.select(['i_redraw', 'f']))]
  assert need == ['var', 'sdd_from_var', 'sdd', 'student']  # Starts and teachers first.


@pytest.mark.parametrize('key, value, match', [
    ('sample_seeds', '0,1000', 'sample_seeds: 1000 is the validation seed'), ('schedules', 'cosine', 'schedules'),
    ('schedules', 'constant', 'schedules'), ('truncations', 'top_p=0.9,min_p=0.1', 'truncations has 2 settings'),
    ('truncations', 'top_k=5', "truncations: 'top_k=5'"), ('mr_iterations', '5,10', 'mr_thresholds'),
    ('cfg_grid', '1,2,3,4,5,6', 'cfg_grid'), ('cfg_grid', '1,-1', 'cfg_grid'),
    ('arms', 'headline,x', "arms='headline,x'"),
    ('distill_kl_weight', 0.0, 'distill_kl_weight=0.0'), ('train_seeds', '', 'train_seeds is empty')])
def test_config_errors_name_the_key(tmp_path, key, value, match):
  c = _tiny_config()
  c.ablation[key] = value
  with pytest.raises(ConfigError, match=f'config.ablation.{match}'):
    study_mode.run(c, str(tmp_path))
  assert not os.listdir(tmp_path)  # Refused before anything was written.
  rc = main.run(['srdd_jax.main', '--config=configs/ablation.py', f'--workdir={tmp_path}', '--mode=ablation',
                 f'--config.ablation.{key}={value}', '--dry_run'])
  assert rc == 2
