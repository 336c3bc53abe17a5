"""--mode=ablation: every variant (a)-(g) on a tiny run (digits at their own 8 px, a given untrained
tokenizer, 4-step transformers), its outputs, and a second run that redoes nothing; the selection rule and
the paired comparisons exactly. (Training the tokenizer is --mode=train_tokenizer's, tested in
test_tokenizer_train; here it would double the file's time.)"""
import json
import os

import ml_collections
import pytest

from srdd_jax import main
from srdd_jax.config import ConfigError
from srdd_jax.modes import ablation


def _tiny_config(tokenizer=''):
  from configs import tokenizer_smoke
  c = tokenizer_smoke.get_config()
  c.tokenizer.checkpoint = tokenizer
  c.tokenizer_train.update(steps=4, warmup_steps=1, log_every=2, eval_every=0, checkpoint_every=4,
                           gan_weight=0.0, dead_code_restart_every=0, prefetch=False)
  c.model.update(depth=1, width=32, heads=1, num_classes=10, mask='markov', drop_path_rate=0.0, scan=False)
  c.train.update(global_batch=16, steps=4, log_every=2, checkpoint_every=4, keep_checkpoints=1)
  # A high rate (peak 0.03): four steps take each model far enough from its initialisation that the
  # variants' samples differ (near-initial models all draw the same tokens from the same keys).
  c.optim.update(base_lr=0.5, warmup_steps=1)
  c.tokenize.update(batch_size=64)
  c.sampler.update(top_k=0, top_p=0.0)
  c.eval.update(batch_size=16, proxy_epochs=1, proxy_examples=100)
  # Guidance 1.5 linear is also VAR's protocol: (a), (b) and the selection share compiled samplers.
  c.ablation = ml_collections.ConfigDict(dict(
      train_seeds='0,1', sample_seeds='0,1', cfg_grid='1.5,3', schedules='linear', val_per_class=1,
      test_per_class=1, refine_steps=0, distill_steps=0, timing_repeats=1, heldout_points=2,
      heldout_examples=64, mr_thresholds='0.01,0.05', mr_iterations='2', truncations='top_p=0.9,min_p=0.1',
      quick=True))
  return c


@pytest.mark.parametrize('arg', ['', 'gpu', 'quick', 'gpu,quick'])
def test_every_preset_plans_the_same_study(arg):
  """Every preset of configs/ablation.py runs the 15 variants' 23 models and passes the runner's checks;
  only sizes differ. The gpu preset trains each model 10 epochs (the CPU default: 0.53)."""
  from configs import ablation as presets
  c = presets.get_config(arg)
  p = ablation.plan(c)
  assert p['models'] == 23 and p['test_runs'] == (13 * 3 + 2 + 2) * 3
  if arg == 'gpu':
    assert p['examples_per_step'] * c.train.steps / 60000 > 10 and c.model.dtype == 'bfloat16'
    assert p['validation_runs'] == 11 * 11 * 9 + 3 and p['validation_images'] == p['validation_runs'] * 200
  with pytest.raises(ValueError, match="config argument 'tpu'"):
    presets.get_config('gpu,tpu')


def test_progress_gives_an_eta_from_the_rates_so_far():
  p = {'training_steps': 1000, 'validation_image_passes': 3000, 'test_image_passes_at_most': 1000}
  progress = ablation.Progress(p)
  assert progress.eta() is None and 'ETA once' in progress.line()
  progress('models/causal_seed0', {'steps': 100}, 50.0, True)  # 0.5 s a step.
  assert progress.eta() is None  # No sampling rate yet.
  progress('tokens/train', {'count': 10}, 30.0, True)  # Not in the ETA.
  progress('selection/e/linear_cfg1.5_refine_t0.01_x9', {'num_samples': 20, 'sampler': {
      'mr_mode': 'refine', 'mr_iterations': 9}}, 20.0, True)  # 200 image-passes: 0.1 s each.
  progress('selection/d/linear_cfg1.5_redraw_t0.01_x9', {'num_samples': 200, 'sampler': {
      'mr_mode': 'redraw', 'mr_iterations': 9}}, 20.0, False)  # Kept: counted at its recorded time.
  assert progress.done == {'training': 100, 'sampling': 400}
  assert progress.eta() == pytest.approx(900 * 0.5 + 3600 * 0.1)
  assert 'ETA at most 14 min' in progress.line() and '100/1,000 steps (0.500 s each)' in progress.line()


def _mtimes(root):
  return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
          for d, _, files in os.walk(root) for f in files if not f.startswith('ablation.')}


def test_the_whole_ablation_runs_and_resumes_without_redoing(tmp_path, small_tokenizer):
  assert main.MODES['ablation'] is ablation.run
  wd = str(tmp_path / 'run')
  vae = small_tokenizer
  first = ablation.run(_tiny_config(vae), wd)
  out = json.load(open(os.path.join(wd, 'ablation.json')))
  assert sorted(out['variants']) == list('abcdefghijklmno')
  fields = {'fd', 'class_consistency', 'heldout_token_loss', 'train_step_seconds', 'images_per_s',
            'compiled_sampling_memory_bytes', 'forward_passes_per_image', 'training_steps', 'sampler'}
  for v, r in out['variants'].items():
    assert fields <= set(r), (v, fields - set(r))
    n_models = 1 if v in 'fo' else 2
    assert r['fd']['n'] == n_models * 2 and len(r['runs']) == n_models * 2  # Train seeds x sample seeds.
    assert {x['real_split'] for x in r['runs']} == {'test'} and r['fd']['mean'] > 0
    assert len(r['heldout_token_loss']['per_scale_mean']) == len(r['heldout_token_loss']['patch_nums'])
    assert r['images_per_s'] > 0 and r['train_step_seconds'] > 0
  v = out['variants']
  fds = lambda k: [x['fd'] for x in v[k]['runs']]
  # Each variant samples its own model: VAR's and SDD's models differ, and so do the seeds' models.
  assert fds('a') != fds('b') and fds('b') != fds('e') and fds('a')[:2] != fds('a')[2:]
  assert v['c']['runs'][0]['model'] == v['b']['runs'][0]['model'] != v['a']['runs'][0]['model']
  # The protocols: VAR's for (a), (b); MR added to the selected guidance; refine costs passes, redraw none.
  assert (v['a']['sampler']['cfg'], v['a']['sampler']['cfg_schedule']) == (1.5, 'linear') == \
         (v['b']['sampler']['cfg'], v['b']['sampler']['cfg_schedule'])
  # Joint selection: MR variants search thresholds x iterations, the others truncations, as many runs each.
  for k in 'dgk':
    assert v[k]['sampler']['mr_iterations'] == 2 and v[k]['sampler']['mr_threshold'] in (0.01, 0.05), k
    assert v[k]['sampler']['mr_mode'] == 'redraw'
  for k in 'cfjlno':
    assert v[k]['sampler']['mr_iterations'] == 0, k
    assert (v[k]['sampler']['top_p'], v[k]['sampler']['min_p']) in ((0.9, 0.0), (0.0, 0.1)), k
  assert v['e']['sampler']['mr_mode'] == v['m']['sampler']['mr_mode'] == 'refine'
  assert {out['selection'][k]['validation_runs'] for k in 'cdefgjklmno'} == {4}  # 2 strengths x 2 settings.
  assert v['a']['forward_passes_per_image'] == v['d']['forward_passes_per_image'] == 4
  assert v['e']['forward_passes_per_image'] == 4 + 4 * 2
  assert v['f']['forward_passes_per_image'] == 3  # The student: every other scale plus the last, (1, 3, 4).
  assert v['f']['heldout_token_loss']['patch_nums'] == [1, 3, 4]
  assert v['f']['training_steps'] == v['o']['training_steps'] == 8 and v['a']['training_steps'] == 4  # Teacher + student.
  # The paper's recipe: each fine-tune starts from the from-scratch model of its own seed and counts its steps.
  models = {m['kind'] + str(m['seed']): m for m in (json.load(open(os.path.join(wd, 'models', d, 'result.json')))
                                                    for d in os.listdir(os.path.join(wd, 'models')))}
  for kind, start in (('causal_continued', 'causal'), ('markov_from_var', 'causal'), ('markov_continued', 'markov'),
                      ('refine_finetuned', 'markov')):
    for seed in (0, 1):
      assert models[f'{kind}{seed}']['start']['export'] == models[f'{start}{seed}']['export'], (kind, seed)
  assert all(v[k]['training_steps'] == 8 for k in 'hijklm')
  # The plan counted before the run is what the run did.
  plan, ran = out['plan'], first['units_run']
  assert plan['models'] == len(models) == 16
  assert plan['training_steps'] == sum(m['steps'] for m in models.values()) == 6 * 4 + 8 * 4 + 2 * 4
  assert plan['validation_runs'] == sum(u.startswith('selection/') for u in ran) == 11 * 4 + 2
  assert plan['test_runs'] == sum(u.startswith('evaluation/') for u in ran) == (13 * 2 + 2 + 2) * 2
  assert plan['test_images'] == plan['test_runs'] * 10 and plan['validation_images'] == plan['validation_runs'] * 10
  # Refine's extra passes are counted: each selection run's images x (1 + its refine iterations).
  def image_passes(unit):
    r = json.load(open(os.path.join(wd, unit, 'result.json')))
    refine = r['sampler']['mr_mode'] == 'refine' and r['sampler']['mr_iterations']
    return r['num_samples'] * (1 + (r['sampler']['mr_iterations'] if refine else 0))
  assert plan['validation_image_passes'] == sum(image_passes(u) for u in ran if u.startswith('selection/')) == (
      9 * 4 + 2 * 4 * 3 + 2) * 10
  assert plan['test_image_passes_at_most'] == (52 + 8 * 3) * 10 >= sum(
      image_passes(u) for u in ran if u.startswith('evaluation/'))
  # The progress (ETA) counted the same work: every step, and the image-passes the run sampled.
  rates = out['rates']
  assert rates['done']['training'] == rates['total']['training'] == plan['training_steps']
  assert rates['done']['sampling'] == sum(image_passes(u) for u in ran if u.split('/')[0] in ('selection', 'evaluation'))
  assert rates['seconds_per_training_step'] > 0 and rates['seconds_per_image_pass'] > 0
  seed = out['teacher']['seed']
  assert (models[f'distilled{seed}']['kl_weight'], models[f'distilled_kl{seed}']['kl_weight']) == (0.0, 1.0)
  assert models[f'distilled_kl{seed}']['teacher'] == models[f'distilled{seed}']['teacher'] and fds('o') != fds('f')
  assert v['l']['runs'][0]['model'] == v['m']['runs'][0]['model'] != v['j']['runs'][0]['model']
  assert v['m']['forward_passes_per_image'] == 4 + 4 * 2 and v['l']['forward_passes_per_image'] == 4
  assert v['i']['sampler']['cfg'] == v['h']['sampler']['cfg'] == 1.5  # VAR's protocol on both recipe arms.
  # Held-out loss over training: 2 points over 4 steps, and the plateau verdict beside it.
  for k in 'abhij':
    curves = v[k]['heldout_curves']
    assert sorted(curves) == ['0', '1'] and all([p[0] for p in c] == [2, 4] for c in curves.values()), k
    assert isinstance(v[k]['plateau']['reached'], bool) and len(v[k]['plateau']['relative_gain_last_fifth']) == 2
  # Selection on validation samples against training-split reals, never a test seed.
  for key in 'cdefgjklmno':
    s = out['selection'][key]
    assert s['real_split'] == 'train' and s['validation_seed'] not in (0, 1)
    assert s['cfg'] in (1.5, 3.0) and len(s['scores']) == 4
    best = min(s['scores'], key=lambda x: x['fd'])
    assert s['cfg'] == best['cfg'] and s['setting'] == best['setting'], key
  assert out['teacher']['seed'] in (0, 1) and out['protocol']['tokenizer'] == vae
  # Paired comparisons: every headline and each student against its own teacher, on shared seeds.
  comps = {c['question']: c for c in out['comparisons']}
  assert len(comps) == len(ablation.HEADLINES) + 2
  sdd = comps['SDD vs VAR (same protocol)']
  assert (sdd['x'], sdd['ref'], sdd['fd']['n']) == ('b', 'a', 2) and sorted(map(tuple, sdd['fd']['keys'])) == [
      (0, 0), (0, 1), (1, 0), (1, 1)]
  by_key = lambda k: {(r['train_seed'], r['sampling_seed']): r['fd'] for r in v[k]['runs']}
  want = [(by_key('b')[(t, 0)] + by_key('b')[(t, 1)] - by_key('a')[(t, 0)] - by_key('a')[(t, 1)]) / 2 for t in (0, 1)]
  assert sdd['fd']['per_seed'] == pytest.approx(want)  # Averaged per training seed, then compared.
  assert sdd['resolution'] == pytest.approx(0.05 * v['a']['fd']['mean'])
  for c in comps.values():
    assert {'precision', 'recall', 'class_consistency'} <= set(c)
  student = comps['student (f) vs its own teacher, same sampler']
  assert student['fd']['runs'] == 2 and {tuple(k) for k in student['fd']['keys']} == {(out['teacher']['seed'], 0),
                                                                                   (out['teacher']['seed'], 1)}
  assert [r['sampler'] for r in out['teacher_runs']['f']] == [v['f']['sampler']] * 2
  for k, r in v.items():
    assert 0 <= r['precision']['mean'] <= 1 and 0 <= r['recall']['mean'] <= 1, k
  md = open(os.path.join(wd, 'ablation.md')).read()
  assert md.count('\n| (') == 15 and md.count('\n- SDD vs VAR (same protocol): (b) - (a) fd ') == 1
  assert 'seed noise' not in md and ('not decisive' in md or 'decisive:' in md or 'equivalent within' in md)
  from PIL import Image
  assert Image.open(os.path.join(wd, 'ablation.png')).size == (960 + 480, 480)  # fd panel, precision/recall panel.
  assert len(first['units_run']) > 20
  # Run again: every unit is kept, nothing is trained, sampled or written again.
  before = _mtimes(wd)
  second = ablation.run(_tiny_config(vae), wd)
  assert second['units_run'] == [] and second['units_kept'] == first['units_kept'] + len(first['units_run'])
  assert _mtimes(wd) == before
  assert json.load(open(os.path.join(wd, 'ablation.json')))['variants']['c']['fd'] == v['c']['fd']
  # A unit without its result (cut short) is the only one done again, with the same numbers.
  os.remove(os.path.join(wd, 'heldout', 'distilled', 'result.json'))
  third = ablation.run(_tiny_config(vae), wd)
  assert third['units_run'] == ['heldout/distilled']
  again = json.load(open(os.path.join(wd, 'ablation.json')))
  assert again['variants']['f']['heldout_token_loss'] == v['f']['heldout_token_loss']
  assert again['unit_seconds']['total'] > 0 and set(again['unit_seconds']) >= {'models', 'evaluation', 'selection'}
  # A test unit kept from an earlier version (fd only) is refused, naming it, not paired silently.
  path = os.path.join(wd, 'evaluation', 'a', 'train0_sample0', 'result.json')
  r = json.load(open(path))
  del r['precision'], r['recall']
  json.dump(r, open(path, 'w'))
  with pytest.raises(ConfigError, match='train0_sample0/result.json has no precision/recall'):
    ablation.run(_tiny_config(vae), wd)


def test_plateau_rule_on_hand_made_curves():
  flat = [[10, 2.0], [50, 1.2], [80, 1.005], [90, 1.001], [100, 1.0]]  # 0.5% better over the last fifth (from step 80).
  falling = [[10, 2.0], [50, 1.2], [100, 1.0]]  # 16.7% better since step 50, the last point before the fifth.
  got = ablation.plateau([flat, flat])
  assert got['reached'] is True and got['relative_gain_last_fifth'] == [pytest.approx(0.005 / 1.005)] * 2
  got = ablation.plateau([flat, falling])
  assert got['reached'] is False and got['relative_gain_last_fifth'][1] == pytest.approx(0.2 / 1.2)
  assert ablation.plateau([flat, []])['reached'] is False  # A model without a curve is not shown to plateau.
  assert ablation.plateau([[[90, 1.0], [100, 1.0]]])['relative_gain_last_fifth'] == [None]  # Nothing before 80.


def test_search_spaces_have_the_same_size_and_name_their_settings():
  o = {'mr_thresholds': (0.001, 0.01, 0.05), 'mr_iterations': (5, 10, 25),
       'truncations': ablation.parse_truncations('top_p=0.9, min_p=0.05', 'k') * 4 + ({'top_p': 0.8, 'min_p': 0.0},)}
  mr, trunc = ablation.search_space(o, 'mr', 'refine'), ablation.search_space(o, 'truncation', None)
  assert len(mr) == len(trunc) == 9 and ablation.search_space(o, None, None) == [None]
  assert mr[1] == {'mr_mode': 'refine', 'mr_threshold': 0.001, 'mr_iterations': 10}
  assert trunc[:2] == [{'top_p': 0.9, 'min_p': 0.0}, {'top_p': 0.0, 'min_p': 0.05}]
  assert [ablation.setting_name(x) for x in (mr[1], trunc[0], trunc[1], None)] == [
      'refine_t0.001_x10', 'top_p0.9', 'min_p0.05', 'default']
  values = ablation.sampler_values('linear', 2.0, trunc[1])
  assert (values['min_p'], values['top_p'], values['mr_iterations']) == (0.05, 0.0, 0)


def test_selection_takes_the_lowest_then_the_smaller_cfg_then_the_earlier_schedule():
  scores = {('linear', 0.0): 5.0, ('linear', 2.0): 3.0, ('constant', 1.0): 3.0, ('constant', 2.0): 4.0}
  assert ablation.select_guidance(scores, ('linear', 'constant')) == ('constant', 1.0)  # Tie: smaller cfg.
  tie = {('linear', 0.0): 2.0, ('constant', 0.0): 2.0, ('linear', 1.0): 2.5}
  assert ablation.select_guidance(tie, ('constant', 'linear')) == ('constant', 0.0)  # Then the schedule order.
  assert ablation.select_guidance(tie, ('linear', 'constant')) == ('linear', 0.0)
  joint = {('linear', 1.0, 1): 2.0, ('linear', 1.0, 0): 2.0, ('linear', 2.0, 0): 1.0, ('constant', 2.0, 0): 1.0}
  assert ablation.select_guidance(joint, ('linear', 'constant')) == ('linear', 2.0, 0)
  del joint[('linear', 2.0, 0)], joint[('constant', 2.0, 0)]
  assert ablation.select_guidance(joint, ('linear',)) == ('linear', 1.0, 0)  # Then the earlier setting.
  with pytest.raises(ValueError):
    ablation.select_guidance({}, ('linear',))


def test_comparisons_label_wide_intervals_not_decisive():
  shared = {'num_samples': 10, 'real_split': 'test', 'real_examples': 100, 'proxy_classifier': 'c'}
  runs = lambda fds: [{'train_seed': s, 'sampling_seed': 0, 'fd': f, 'class_consistency': 0.5, 'precision': 0.5,
                       'recall': 0.5, **shared} for s, f in enumerate(fds)]
  variants = {'a': {'fd': {'mean': 10.0}, 'runs': runs([10, 10, 10])},
              'b': {'fd': {'mean': 11.0}, 'runs': runs([11, 11.02, 10.98])},  # Tight: decisive, worse.
              'c': {'fd': {'mean': 11.0}, 'runs': runs([9, 13, 11])}}  # Wide against b: not decisive.
  comps = {c['question']: c for c in ablation.comparisons(variants)}
  assert comps['SDD vs VAR (same protocol)']['fd']['verdict']['direction'] == 'worse'
  wide = comps['best guidance and truncation on SDD']
  assert wide['resolution'] == pytest.approx(0.5) and wide['fd']['verdict']['verdict'] == 'not decisive'
  lines = ablation.comparison_lines([wide])
  assert '**not decisive' in lines[0] and 'no difference' not in lines[0]
  assert ablation.mean_std([1.0, 3.0]) == {'mean': 2.0, 'std': pytest.approx(2 ** 0.5), 'n': 2, 'values': [1.0, 3.0]}


@pytest.mark.parametrize('key, value, match', [
    ('sample_seeds', '0,1000', 'sample_seeds: 1000 is the validation seed'), ('schedules', 'cosine', 'schedules'),
    ('truncations', 'top_p=0.9', 'truncations has 1 settings and masked resampling 2'),
    ('truncations', 'top_k=5,min_p=0.1', "truncations: 'top_k=5'"), ('mr_iterations', '0', 'mr_thresholds'),
    ('distill_kl_weight', 0.0, 'distill_kl_weight=0.0'),
    ('cfg_grid', '1,-1', 'cfg_grid'), ('train_seeds', '', 'train_seeds is empty')])
def test_config_errors_name_the_key(tmp_path, key, value, match):
  c = _tiny_config()
  c.ablation[key] = value
  with pytest.raises(ConfigError, match=f'config.ablation.{match}'):
    ablation.run(c, str(tmp_path))
  assert not os.listdir(tmp_path)  # Refused before anything was written.


def test_the_configs_quick_variant_keeps_every_seed():
  import importlib.util
  spec = importlib.util.spec_from_file_location('abl', os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                                    'ablation.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  full, quick = module.get_config(), module.get_config('quick')
  assert quick.ablation.quick and not full.ablation.quick
  assert quick.ablation.train_seeds == full.ablation.train_seeds == '0,1,2'
  assert quick.ablation.sample_seeds == full.ablation.sample_seeds == '0,1,2'
  assert quick.train.steps < full.train.steps and full.data.source == 'fashion_mnist'
