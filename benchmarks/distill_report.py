"""Teacher vs distilled students (SPEC §6): held-out token loss per scale, sampling speed, proxy quality.

  python -m benchmarks.distill_report --config=configs/fashion_mnist.py \\
      --tokenizer=WORKDIR/tokenizer/params \\
      --model=teacher:WORKDIR/export/step_00001500:TEACHER_TEST_TOKENS \\
      --model=student_ce:DIR_A/export/step_<n>:STUDENT_TEST_TOKENS \\
      --init_student=STUDENT_TEST_TOKENS --out=OUT [--workdir=DIR_WITH_proxy_classifier]

Each --model is name:transformer directory:test-split token cache at that model's schedule (written by
--mode=tokenize --config.tokenize.split=test --config.model.patch_nums=...). For each model:
- held-out cross-entropy and accuracy per scale under teacher forcing (no label dropout) on its cache;
- sampling images/s: the jitted sampler of config.sampler (tokens + decode), one warm-up call, then the
  median of --repeats calls on a batch of --batch labels, the same batch and sampler for every model,
  timed in rounds (each model once per round) so that load on a shared machine hits all alike;
- the tokenizer's round-trip PSNR at each schedule (the re-quantization's cost, a sanity number);
- the proxy metrics of --mode=eval (fd_cnn_<data>, class consistency) on --per_class samples per class,
  drawn with generate() (batch i uses fold_in(PRNGKey(seed), i)), the classifier cached in --workdir.
--init_student=CACHE also reports the student as init_student makes it (the teacher run scale by scale
on the student's inputs) on the first student's schedule: the held-out loss the distillation starts at.
Writes OUT/distill_report.json and OUT/distill_report.md.
Record: docs/DISTILLATION.md, the teacher-vs-students table, measured at commit 4239be2 (branch
distill-pre-rebase; on main as ed5aaec).
"""
import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.config import load_file, with_defaults
from srdd_jax.convert import params_io
from srdd_jax.data import pipeline
from srdd_jax.data.token_cache import TokenCache
from srdd_jax.diffusion.generate import generate, sampler_config
from srdd_jax.diffusion.sampler import Sampler, batch_rng
from srdd_jax.evaluation import protocol
from srdd_jax.modes import eval as evaluation
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel.compile import jit_inference
from srdd_jax.tokenizer.api import Tokenizer
from srdd_jax.train import distill
from srdd_jax.transformer.model import blocks_layout


def _model(path, dtype):
  cfg, params = params_io.load_var(path)
  cfg = dataclasses.replace(cfg, dtype=dtype, scan_blocks=False)
  return cfg, blocks_layout(params, cfg)


def requantization(config, vq0, vae_params, schedules, n):
  """PSNR (dB, images in [-1, 1] as [0, 1]) of the tokenizer's round trip at each schedule against the
  held-out images, and between the schedules' reconstructions: how much the re-quantized tokens lose."""
  d = {k: v for k, v in config.data.to_dict().items() if k != 'token_cache'}
  d['split'] = 'test'
  src = pipeline.build_source(d, vq0.image_size, train=False)
  images, _ = src.batch(0, 0, n)
  images = jnp.asarray(images, jnp.float32)
  psnr = lambda a, b: float(10 * np.log10(4.0 / np.mean((np.asarray(a) - np.asarray(b)) ** 2)))
  recon = {}
  for pn in schedules:
    tok = Tokenizer(dataclasses.replace(vq0, patch_nums=tuple(pn)))
    recon[tuple(pn)] = jax.jit(tok.reconstruct)(vae_params, images)
  out = {f'psnr_vs_images {pn}': psnr(r, images) for pn, r in recon.items()}
  keys = list(recon)
  for a, b in zip(keys, keys[1:]):
    out[f'psnr {a} vs {b}'] = psnr(recon[a], recon[b])
  out['images'] = n
  return out


def sampling_speed(samplers: dict, vae_params, labels, repeats):
  """images/s of each {name: (sampler, params)}: one warm-up call each, then `repeats` rounds that time
  every model once in turn, so that a change of load on a shared machine hits them all alike."""
  fns = {name: jit_inference(s.sample) for name, (s, _) in samplers.items()}
  for name, (_, params) in samplers.items():
    jax.block_until_ready(fns[name](params, vae_params, labels, batch_rng(0, 0)))
  times = {name: [] for name in samplers}
  for i in range(repeats):
    for name, (_, params) in samplers.items():
      t = time.perf_counter()
      jax.block_until_ready(fns[name](params, vae_params, labels, batch_rng(0, i + 1)))
      times[name].append(time.perf_counter() - t)
  return {name: {'images_per_s': len(labels) / float(np.median(ts)), 'batch': len(labels), 'seconds': ts}
          for name, ts in times.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--config', required=True)
  ap.add_argument('--tokenizer', required=True)
  ap.add_argument('--model', action='append', required=True, help='name:transformer dir:test token cache')
  ap.add_argument('--init_student', default='', help='test token cache at the first student\'s schedule')
  ap.add_argument('--out', required=True)
  ap.add_argument('--workdir', default='', help='where proxy_classifier/ is cached (default --out)')
  ap.add_argument('--batch', type=int, default=100)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--per_class', type=int, default=100)
  ap.add_argument('--skip_quality', action='store_true')
  ap.add_argument('--heldout_examples', type=int, default=0, help='0 = the whole test cache')
  ap.add_argument('--recon_images', type=int, default=500, help='held-out images for the re-quantization PSNR')
  args = ap.parse_args(argv)
  config = with_defaults(load_file(args.config))
  config.tokenizer.checkpoint = args.tokenizer
  os.makedirs(args.out, exist_ok=True)
  workdir = args.workdir or args.out
  vq0, vae_params = params_io.load_vqvae(args.tokenizer)
  mesh = pm.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  o = evaluation.options(config)
  report = {'config': args.config, 'tokenizer': args.tokenizer,
            'device': str(jax.devices()[0]), 'models': {}}
  specs = [m.split(':') for m in args.model]
  schedules = list(dict.fromkeys(tuple(params_io.load_var(p)[0].patch_nums) for _, p, _ in specs))
  report['requantization'] = requantization(config, vq0, vae_params, schedules, args.recon_images)
  print(json.dumps(report['requantization']), flush=True)
  teacher, samplers = None, {}
  for name, path, cache in specs:
    cfg, params = _model(path, config.model.dtype)
    vq = dataclasses.replace(vq0, patch_nums=cfg.patch_nums)
    entry = {'path': path, 'patch_nums': list(cfg.patch_nums), 'tokens': cfg.seq_len}
    tc = TokenCache(cache, patch_nums=cfg.patch_nums, key='--model')
    t0 = time.time()
    n = args.heldout_examples or len(tc.ids)
    entry['heldout'] = distill.heldout_token_loss(cfg, params, vq, vae_params, tc.ids[:n, 0], tc.labels[:n])
    entry['heldout']['cache'] = cache
    if teacher is None:
      teacher = (cfg, params)
    elif args.init_student and 'init_student' not in report['models']:
      tcfg, tparams = teacher
      init = distill.init_student(tparams, tcfg, cfg)
      ti = TokenCache(args.init_student, patch_nums=cfg.patch_nums, key='--init_student')
      report['models']['init_student'] = {
          'path': f'init_student({teacher[0].patch_nums} -> {cfg.patch_nums})', 'patch_nums': list(cfg.patch_nums),
          'tokens': cfg.seq_len,
          'heldout': distill.heldout_token_loss(cfg, init, vq, vae_params, ti.ids[:n, 0], ti.labels[:n])}
    sc = sampler_config(config.sampler, cfg.mask)  # The same for every model of one mask.
    entry['sampler'] = dataclasses.asdict(sc)
    sampler = Sampler(cfg, vq, sc, mesh=mesh)
    samplers[name] = (sampler, params)
    nc = cfg.num_classes
    if not args.skip_quality:
      all_labels = np.repeat(np.arange(nc, dtype=np.int32), args.per_class)
      images = generate(sampler, params, vae_params, all_labels, args.batch, int(config.seed))
      entry['quality'] = protocol.proxy_metrics(config, o, images, all_labels, workdir)
    entry['seconds'] = round(time.time() - t0, 1)
    report['models'][name] = entry
    print(json.dumps({name: {k: v for k, v in entry.items() if k != 'heldout'}}, default=str), flush=True)
  labels = np.arange(args.batch, dtype=np.int32) % teacher[0].num_classes
  for name, speed in sampling_speed(samplers, vae_params, labels, args.repeats).items():
    report['models'][name]['sampling'] = speed
    print(name, json.dumps(speed), flush=True)
  with open(os.path.join(args.out, 'distill_report.json'), 'w') as f:
    json.dump(report, f, indent=1, default=str)
  with open(os.path.join(args.out, 'distill_report.md'), 'w') as f:
    f.write(markdown(report))
  print(markdown(report))


def markdown(report) -> str:
  models = report['models']
  scales = sorted({p for m in models.values() for p in m['patch_nums']})
  lines = ['| model | scales | tokens | ' + ' | '.join(f'loss pn={p}' for p in scales) +
           ' | mean loss | images/s | fd_cnn | class consistency |',
           '|' + '---|' * (7 + len(scales))]
  for name, m in models.items():
    per = dict(zip(m['patch_nums'], m['heldout']['loss']))
    q = m.get('quality', {})
    fd = next((v for k, v in q.items() if k.startswith('fd_')), None)
    cells = [name, ','.join(map(str, m['patch_nums'])), str(m['tokens'])]
    cells += [f'{per[p]:.3f}' if p in per else '' for p in scales]
    cells += [f'{m["heldout"]["mean_loss"]:.3f}',
              f'{m["sampling"]["images_per_s"]:.0f}' if 'sampling' in m else '',
              f'{fd:.2f}' if fd is not None else '',
              f'{q["class_consistency"]:.3f}' if 'class_consistency' in q else '']
    lines.append('| ' + ' | '.join(cells) + ' |')
  rq = report.get('requantization', {})
  lines += ['', 'Tokenizer round trip on held-out images (PSNR, dB): ' +
            '; '.join(f'{k}: {v:.2f}' for k, v in rq.items() if k != 'images') + f' ({rq.get("images")} images)']
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main()
