"""The one-call GPU suite: srdd_jax and the official PyTorch VAR side by side at the largest batches
that fit, inside a time budget.

  python -m srdd_jax.bench --suite gpu --vs-var DIR --out OUT.json [--budget_s 480]
  python -m srdd_jax.bench --suite gpu --tiny --vs-var DIR --out OUT.json     # its CPU dry run

`--suite gpu`: d16 and d24 (`--depths`), 256 px, bfloat16, both masks, train step (remat 'dots', the
recipe's) and sampling with decoding (VAR's ch-160 tokenizer), both implementations at one batch per
(depth, kind), the largest that fits both. Per depth, most important first (d16, then d24):
  1. VAR-PyTorch finds its largest batch on a ladder (two small probe calls measure the memory per
     sample, the estimate is tried, an out-of-memory error steps down) and times both masks at it;
  2. our side compiles its programs at that batch, all at once in threads (XLA compiles outside the
     GIL), checks XLA's memory analysis against the device's limit (95% of `bytes_limit`, the JAX pool
     being `XLA_PYTHON_CLIENT_MEM_FRACTION`=0.90 of the card here), steps down the ladder where a
     program would not fit, then times both masks. Without VAR-PyTorch's batch, ours first compiles a
     probe batch (32 train, 16 sampling) and takes the largest ladder batch its memory analysis,
     linear in the batch, says fits: no program is compiled at a batch far over the memory;
  3. where ours had to step down, VAR-PyTorch is timed again at our batch.
Without --vs-var the suite times our side alone, at the largest batch of its own. A time budget
(`--budget_s`, default 480 s) covers all of it: a step that cannot start in time, or a worker still
running at the end, is recorded under `skipped`; the JSON is rewritten after every record.

Our side of each depth runs in `python -m srdd_jax.bench.suite_worker` (srdd_jax/bench/suite_worker.py),
VAR-PyTorch's in srdd_jax/bench/var_pytorch.py; the results, their JSON (srdd_jax/bench/vs_var.py has its
fields) and table are the side by side's.
"""
from __future__ import annotations

import sys
import time

from srdd_jax import files
from srdd_jax.bench.base import T0, fail
from srdd_jax.bench.vs_var import (TORCH_WORKER, Results, check_var, child_env, finish, log, run_worker,
                                   torch_model, torch_spec, write_spec)

TRAIN_LADDER = (1024, 768, 512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 8, 4, 2, 1)
SAMPLE_LADDER = (512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 8, 4, 2, 1)
# The suites. 'tiny' is the same path at sizes a 2-core CPU runs in a minute or two.
SUITES = {
    'gpu': dict(depths=(16, 24), dtype='bfloat16', patch_nums=None, tokenizer_ch=160, repeats=3, warmup=1,
                max_batch=1024, max_sample_batch=128, remat='dots',
                # Seconds a step needs at least (start-up, compiles); below that it is not started.
                need_s={'var_pytorch': 25.0, 'srdd_jax': 75.0}),
    'gpu-tiny': dict(depths=(1, 2), dtype='bfloat16', patch_nums=(1, 2, 4), tokenizer_ch=32, repeats=2,
                     warmup=1, max_batch=8, max_sample_batch=4, remat='dots',
                     need_s={'var_pytorch': 5.0, 'srdd_jax': 10.0}),
}


def ints(flag: str, text: str) -> tuple[int, ...]:
  try:
    vals = tuple(int(x) for x in text.split(',') if x.strip())
  except ValueError:
    fail(f'{flag} {text!r}: expected comma-separated integers')
  if not vals or min(vals) < 1:
    fail(f'{flag} {text!r}: expected positive integers')
  return vals


def suite_config(args) -> dict:
  cfg = dict(SUITES['gpu-tiny' if args.tiny else args.suite])
  if args.depths:
    cfg['depths'] = ints('--depths', args.depths)
  for flag in ('repeats', 'max_batch', 'max_sample_batch', 'remat', 'dtype', 'tokenizer_ch'):
    if getattr(args, flag) is not None:
      cfg[flag] = getattr(args, flag)
  if args.warmup != 1:
    cfg['warmup'] = args.warmup
  if args.patch_nums:
    cfg['patch_nums'] = ints('--patch_nums', args.patch_nums)
  # Given batches replace the ladder: the largest of them that fits is taken.
  cfg['train_ladder'] = tuple(sorted(set(ints('--batches', args.batches)), reverse=True)) if args.batches \
      else TRAIN_LADDER
  cfg['sample_ladder'] = (tuple(sorted(set(ints('--sample_batches', args.sample_batches)), reverse=True))
                          if args.sample_batches else SAMPLE_LADDER)
  if args.batches:
    cfg['max_batch'] = max(cfg['train_ladder']) if args.max_batch is None else cfg['max_batch']
  if args.sample_batches:
    cfg['max_sample_batch'] = (max(cfg['sample_ladder']) if args.max_sample_batch is None
                               else cfg['max_sample_batch'])
  cfg['masks'], cfg['kinds'] = tuple(args.masks), tuple(args.kinds)
  cfg['width'], cfg['heads'] = args.width, args.heads
  cfg['scan'], cfg['attention'] = args.scan, args.attention or 'auto'
  return cfg


def run_suite(args, argv) -> int:
  cfg = suite_config(args)
  info = check_var(args.vs_var) if args.vs_var is not None else None
  deadline = time.time() - (time.perf_counter() - T0) + args.budget_s  # From this process's start.
  res = Results(args, argv, f'suite {args.suite}' + (' tiny' if args.tiny else ''), args.budget_s)
  res.dtype = cfg['dtype']
  res.patch_nums = cfg['patch_nums']
  res.data['ours']['resolved'] = {k: v for k, v in cfg.items() if k != 'need_s'}
  if info:
    log(f'VAR-PyTorch: torch {info.get("torch")} ({args.vs_var})')
  measured_peak = None
  for depth in cfg['depths']:
    caps = {'train': cfg['max_batch'], 'sample': cfg['max_sample_batch']}
    ladders = {'train': cfg['train_ladder'], 'sample': cfg['sample_ladder']}
    batches = {}
    # 1. VAR-PyTorch: its largest batch, both masks.
    if args.vs_var is not None:
      batches = torch_step(res, cfg, args.vs_var, depth, [
          {'kind': k, 'masks': list(cfg['masks']), 'ladder': list(ladders[k]), 'cap': caps[k]}
          for k in cfg['kinds']], deadline)
    # 2. Ours, at those batches (or its own largest), compiled at once.
    left = deadline - time.time()
    if left < cfg['need_s']['srdd_jax']:
      res.skip('srdd_jax', depth, cfg['kinds'], cfg['masks'], f'time budget: {left:.0f} s left')
      continue
    spec = {'depth': depth, 'width': cfg['width'], 'heads': cfg['heads'], 'patch_nums': cfg['patch_nums'],
            'dtype': cfg['dtype'], 'tokenizer_ch': cfg['tokenizer_ch'], 'masks': list(cfg['masks']),
            'kinds': {k: {'batch': batches.get(k), 'ladder': list(ladders[k]), 'cap': caps[k]}
                      for k in cfg['kinds']},
            'repeats': cfg['repeats'], 'warmup': cfg['warmup'], 'remat': cfg['remat'], 'scan': cfg['scan'],
            'attention': cfg['attention'], 'measure_peak': measured_peak is None, 'peak': measured_peak,
            'deadline': deadline,
            'memory_limit': int(args.memory_limit_gib * 2**30) if args.memory_limit_gib else None}
    path = write_spec(spec)
    handler = res.on_message('srdd_jax')
    reduced = {}

    def on_ours(msg, handler=handler, reduced=reduced):
      if msg.get('type') == 'batch' and msg.get('reduced_from') is not None:
        reduced[msg['kind']] = msg['batch']
      handler(msg)
    try:
      log(f'srdd_jax depth {depth}: batches {batches or "its own largest"}')
      done = run_worker([sys.executable, '-m', 'srdd_jax.bench.suite_worker', '--jax-worker', path],
                        child_env(jax_worker=True, fast_compile=args.tiny), on_ours, deadline)
    finally:
      files.remove(path)
    if done['killed'] or done['rc'] != 0:
      why = 'killed at the end of the time budget' if done['killed'] else f'worker exited {done["rc"]}'
      miss = res.missing('srdd_jax', depth, cfg['kinds'], cfg['masks'])
      for k, m in miss:
        res.skip('srdd_jax', depth, (k,), (m,), why)
    measured_peak = (res.data['ours']['matmul_peak'] or {}).get('peak_flops_per_s') or measured_peak
    # 3. VAR-PyTorch again where ours had to take a smaller batch.
    if args.vs_var is not None and reduced:
      torch_step(res, cfg, args.vs_var, depth, [
          {'kind': k, 'masks': list(cfg['masks']), 'batch': b,
           'reason': f'srdd_jax does not fit batch {batches.get(k)}'} for k, b in reduced.items()], deadline)
  return finish(res)


def torch_step(res: Results, cfg: dict, var_dir: str, depth: int, jobs: list[dict], deadline: float) -> dict:
  """VAR-PyTorch at `depth`; the batch it used per kind."""
  kinds = [j['kind'] for j in jobs]
  left = deadline - time.time()
  if left < cfg['need_s']['var_pytorch']:
    res.skip('var_pytorch', depth, kinds, cfg['masks'], f'time budget: {left:.0f} s left')
    return {}
  model = torch_model(depth, cfg['width'], cfg['heads'], cfg['patch_nums'], cfg['dtype'], cfg['tokenizer_ch'], jobs)
  path = write_spec(torch_spec([model], cfg['repeats'], cfg['warmup'], deadline))
  found = {}
  handler = res.on_message('var_pytorch')

  def on_msg(msg):
    if msg.get('type') == 'batch':
      found[msg['kind']] = msg['batch']
    handler(msg)
  try:
    log(f'VAR-PyTorch depth {depth}: {", ".join(kinds)}')
    done = run_worker([sys.executable, TORCH_WORKER, '--var_dir', var_dir, '--spec', path], child_env(),
                      on_msg, deadline)
  finally:
    files.remove(path)
  if done['killed'] or done['rc'] != 0:
    why = 'killed at the end of the time budget' if done['killed'] else f'worker exited {done["rc"]}'
    before = {(r.get('kind'), r.get('mode'), r.get('batch')) for r in res.data['var_pytorch']['records']}
    for j in jobs:
      for m in cfg['masks']:
        b = found.get(j['kind'], j.get('batch'))
        if (j['kind'], m, b) not in before:
          res.skip('var_pytorch', depth, (j['kind'],), (m,), why)
  return found
