"""srdd_jax side by side with the official PyTorch VAR, and the one-call GPU suite.

  python -m srdd_jax.bench --vs-var DIR --out OUT.json [bench's flags, e.g. --quick]
  python -m srdd_jax.bench --suite gpu --vs-var DIR --out OUT.json [--budget_s 480]
  python -m srdd_jax.bench --suite gpu --tiny --vs-var DIR --out OUT.json     # its CPU dry run

DIR is a checkout of https://github.com/FoundationVision/VAR (models/, dist.py); torch is needed only
for it. Before anything is timed, a missing torch or a DIR that is not such a checkout exits 2 with one
`error:` line. Each implementation runs in processes of its own, one after the other, so neither holds
the accelerator's memory while the other runs: the PyTorch side is `srdd_jax/bench/var_pytorch.py` (no jax;
its docstring says exactly what it times and how the markov mask is applied to VAR's code), and the
JAX side is `srdd_jax.bench`'s train-step and sampler timing.

`--vs-var` (any of bench's timed-run flags): our side runs first (`python -m srdd_jax.bench`, same
flags), then VAR-PyTorch on the shapes, masks and batches our records hold.

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

The JSON (schema 'srdd_jax.bench_vs_var/1'): argv, args, mode, started, commit (+ its source), budget_s,
wall_s, finished; nominal_peak_flops_per_s (989e12 for H100/H200 bfloat16 dense; None on a CPU);
ours: env, matmul_peak (measured in the run, bench's), resolved, compiles, records (bench's schema,
'impl': 'srdd_jax'); var_pytorch: env (torch, device, which fused kernels import), records ('impl':
'var_pytorch', bench's fields where they apply, plus attention_ops: the attention operators PyTorch's
profiler saw, batch_how: how the batch was found, memory_bytes: max_memory_allocated); every train
record of either side: analytic_flops (ours' count for this model: the same for both sides), mfu
(analytic FLOP/s over the nominal peak), mfu_useful (FLOPs the mask keeps), utilisation_measured
(over the matmul peak measured in the run); batches: what each step chose and why; ratios: per (kind,
mask, depth, batch) VAR-PyTorch seconds / ours (> 1: ours faster), tokens-only too for sampling, and
markov-ours against causal-VAR at the same depth and batch; skipped: what the budget left out.
The Markdown table goes to OUT with the suffix .md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp

from srdd_jax import files
from srdd_jax.bench import timing as bench
from srdd_jax.bench.timing import fail
from srdd_jax.bench import var_pytorch as bench_var
from srdd_jax.diffusion.sampler import Sampler, batch_rng
from srdd_jax.parallel import compile as pc
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer
from srdd_jax.transformer.attention import resolve_impl
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.model import VAR

SCHEMA = 'srdd_jax.bench_vs_var/1'
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCH_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'var_pytorch.py')
TRAIN_LADDER = (1024, 768, 512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 8, 4, 2, 1)
SAMPLE_LADDER = (512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 8, 4, 2, 1)
FIT_FRACTION = 0.95  # Of the JAX pool (bytes_limit): XLA's analysis leaves out the runtime's own buffers.
# Where ours finds its own largest batch: the batch whose compiled memory is extrapolated (linear in the
# batch) to the ladder, instead of compiling at the ladder's top first.
PROBE_BATCH = {'train': 32, 'sample': 16}
JAX_MEM_FRACTION = '0.90'  # The JAX worker is alone on the device (the PyTorch one has exited).
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
_T0 = time.perf_counter()


def log(msg: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")} +{time.perf_counter() - _T0:6.1f}s suite] {msg}', file=sys.stderr,
        flush=True)


def commit_of(explicit: str | None) -> tuple[str | None, str]:
  if explicit:
    return explicit, '--commit'
  try:
    out = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10)
    if out.returncode == 0 and out.stdout.strip():
      return out.stdout.strip(), 'git rev-parse HEAD'
  except (OSError, subprocess.SubprocessError):
    pass
  for var in ('SRDD_COMMIT', 'GIT_COMMIT'):
    if os.environ.get(var):
      return os.environ[var], f'${var}'
  return None, 'unknown (no git checkout, no $SRDD_COMMIT)'


def child_env(jax_worker: bool = False, fast_compile: bool = False) -> dict:
  """Our environment, the repository importable; for the JAX worker the memory fraction (and for the
  tiny dry run XLA's cheap code generation: it checks the path, not the speed)."""
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  env.setdefault('PYTHONUNBUFFERED', '1')
  if jax_worker:
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', JAX_MEM_FRACTION)
    if fast_compile and 'xla_backend_optimization_level' not in env.get('XLA_FLAGS', ''):
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0 '
                          '--xla_llvm_disable_expensive_passes=true').strip()
  return env


def check_var(var_dir: str) -> dict:
  """Exits 2 unless torch imports and `var_dir` is a VAR checkout whose models import; its info."""
  missing = bench_var.missing_var_files(var_dir)
  if missing:
    what = 'does not exist' if not files.exists(var_dir) else f'lacks {", ".join(missing)}'
    fail(f'--vs-var {var_dir!r} is not a checkout of the official VAR code: it {what}')
  try:
    has_torch = importlib.util.find_spec('torch') is not None
  except (ImportError, ValueError):
    has_torch = False
  if not has_torch:
    fail(f'--vs-var needs PyTorch (torch), which {sys.executable} cannot import')
  out = subprocess.run([sys.executable, TORCH_WORKER, '--var_dir', var_dir, '--check'], capture_output=True,
                       text=True, env=child_env(), cwd=REPO)
  if out.returncode != 0:
    lines = [l for l in out.stderr.splitlines() if l.startswith('error:')]
    fail(lines[-1][len('error: '):] if lines else
         f'the PyTorch side could not start (exit {out.returncode}): {out.stderr.strip()[-500:]}')
  for line in out.stdout.splitlines():
    try:
      msg = json.loads(line)
    except ValueError:
      continue
    if msg.get('type') == 'info':
      return msg['info']
  return {}


# --- worker processes ------------------------------------------------------------------------------

def run_worker(cmd, env, on_message, deadline: float | None) -> dict:
  """Runs `cmd`, handing each JSON line of its standard output to on_message (other lines go to our
  standard error; its standard error is ours). Killed at `deadline` (time.time()). {'rc', 'killed'}."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=REPO, text=True, bufsize=1)
  lines: queue.Queue = queue.Queue()

  def pump():
    for line in proc.stdout:
      lines.put(line)
    lines.put(None)

  threading.Thread(target=pump, daemon=True).start()
  killed = False
  while True:
    try:
      line = lines.get(timeout=None if deadline is None else max(deadline - time.time(), 0.01))
    except queue.Empty:
      log(f'time budget spent: stopping {" ".join(files.basename(c) for c in cmd[1:3])}')
      proc.kill()
      killed = True
      break
    if line is None:
      break
    try:
      msg = json.loads(line)
    except ValueError:
      print(line, end='', file=sys.stderr)
      continue
    on_message(msg)
  return {'rc': proc.wait(), 'killed': killed}


def write_spec(spec: dict) -> str:
  fd, path = tempfile.mkstemp(prefix='srdd_bench_', suffix='.json')
  os.close(fd)
  files.write_text(path, json.dumps(spec))
  return path


# --- the results -----------------------------------------------------------------------------------

class Results:
  """The JSON being built, rewritten after every change, and its Markdown table."""

  def __init__(self, args, argv, mode: str, budget_s: float | None):
    commit, source = commit_of(args.commit)
    self.out = args.out
    self.md = files.splitext(args.out)[0] + '.md'
    self.data = {
        'schema': SCHEMA, 'argv': argv, 'args': vars(args), 'mode': mode,
        'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'commit': commit, 'commit_source': source,
        'budget_s': budget_s, 'finished': False,
        'weights': 'random on both sides: the cost of a step or a sampling pass does not depend on the values',
        'nominal_peak_flops_per_s': None, 'nominal_peak_note': None,
        'ours': {'env': None, 'matmul_peak': None, 'resolved': None, 'compiles': [], 'records': []},
        'var_pytorch': {'env': None, 'var_dir': getattr(args, 'vs_var', None), 'records': []},
        'batches': [], 'ratios': [], 'skipped': []}
    self.patch_nums = None
    self.dtype = 'bfloat16'
    self.save()

  def save(self):
    self.data['wall_s'] = time.perf_counter() - _T0
    self.data['ratios'] = ratios(self.data['ours']['records'], self.data['var_pytorch']['records'])
    files.write_text(self.out, json.dumps(self.data, indent=1, default=str))

  def write_markdown(self) -> str:
    text = markdown(self.data)
    files.write_text(self.md, text + '\n')
    return text

  def set_peak(self, device_kind: str | None, dtype: str):
    if self.data['nominal_peak_flops_per_s'] is not None or not device_kind:
      return
    peak = pc.nominal_peak_flops(device_kind)
    if peak and dtype == 'bfloat16':
      self.data['nominal_peak_flops_per_s'] = peak
      self.data['nominal_peak_note'] = f'dense bfloat16 datasheet peak of {device_kind}'
    else:
      self.data['nominal_peak_note'] = (f'no nominal peak for {device_kind} in {dtype}: mfu is None; '
                                        'utilisation_measured uses the matmul peak measured in the run')

  def add_record(self, impl: str, rec: dict):
    # The host's load when the record came in: on a shared machine it explains noisy timings.
    rec = {**rec, 'impl': impl, 'host_load_avg_1m': os.getloadavg()[0] if hasattr(os, 'getloadavg') else None}
    if rec.get('kind') == 'train' and rec.get('seconds') and 'error' not in rec:
      fl = bench.train_flops(bench.model_config(rec['depth'], rec['mode'], rec['dtype'], rec['width'],
                                                rec.get('heads') or 0, self.patch_nums), rec['batch'])
      nominal = self.data['nominal_peak_flops_per_s']
      measured = (self.data['ours']['matmul_peak'] or {}).get('peak_flops_per_s')
      rate = fl['train_per_step'] / rec['seconds']
      rec.setdefault('analytic_flops', fl['train_per_step'])
      rec.setdefault('analytic_flops_useful', fl['train_per_step_useful'])
      rec['mfu'] = rate / nominal if nominal else None
      rec['mfu_useful'] = fl['train_per_step_useful'] / rec['seconds'] / nominal if nominal else None
      rec['utilisation_measured'] = rate / measured if measured else None
      if impl == 'var_pytorch':
        rec['flops_note'] = ("ours' analytic count for this model and mask (VAR computes the dense L x L "
                             'attention for either mask, so it does more work than counted)')
    self.data['ours' if impl == 'srdd_jax' else 'var_pytorch']['records'].append(rec)
    self.save()

  def on_message(self, impl: str, depth=None):
    def handle(msg: dict):
      t = msg.get('type')
      side = self.data['ours' if impl == 'srdd_jax' else 'var_pytorch']
      if t == 'info':
        side['env'] = msg['info']
        self.set_peak(msg['info'].get('device_kind'), self.dtype)
      elif t == 'matmul_peak':
        side['matmul_peak'] = msg['matmul_peak']
      elif t == 'compile':
        side['compiles'].append({k: v for k, v in msg.items() if k != 'type'})
      elif t == 'batch':
        self.data['batches'].append({'impl': impl, **{k: v for k, v in msg.items() if k != 'type'}})
      elif t == 'record':
        self.add_record(impl, msg['record'])
        return
      elif t == 'skipped':
        self.data['skipped'].append({'impl': impl, **{k: v for k, v in msg.items() if k != 'type'}})
      self.save()
    return handle

  def skip(self, impl: str, depth: int, kinds, masks, reason: str):
    for kind in kinds:
      for mask in masks:
        self.data['skipped'].append({'impl': impl, 'depth': depth, 'kind': kind, 'mode': mask, 'reason': reason})
    log(f'skipped {impl} depth {depth} {",".join(kinds)}: {reason}')
    self.save()

  def missing(self, impl: str, depth: int, kinds, masks) -> list[tuple[str, str]]:
    side = self.data['ours' if impl == 'srdd_jax' else 'var_pytorch']['records']
    done = {(r.get('kind'), r.get('mode')) for r in side if r.get('depth') == depth}
    skipped = {(s.get('kind'), s.get('mode')) for s in self.data['skipped']
               if s.get('impl') == impl and s.get('depth') == depth}
    return [(k, m) for k in kinds for m in masks if (k, m) not in done | skipped]


def _ok(r) -> bool:
  return 'error' not in r and bool(r.get('seconds'))


def ratios(ours: list[dict], theirs: list[dict]) -> list[dict]:
  """VAR-PyTorch seconds / ours for every (kind, mask, depth, batch) both sides timed; then markov (ours)
  against causal (VAR) at the same (kind, depth, batch)."""
  key = lambda r: (r.get('kind'), r.get('mode'), r.get('depth'), r.get('batch'))
  t_by = {key(r): r for r in theirs if _ok(r)}
  out = []
  for o in (r for r in ours if _ok(r)):
    t = t_by.get(key(o))
    if t is None:
      continue
    e = {'kind': o['kind'], 'mode': o['mode'], 'depth': o['depth'], 'batch': o['batch'],
         'ours_s': o['seconds'], 'var_pytorch_s': t['seconds'], 'speedup': t['seconds'] / o['seconds'],
         'ours_images_per_s': o.get('images_per_s'), 'var_pytorch_images_per_s': t.get('images_per_s')}
    if o['kind'] == 'sample' and o.get('seconds_tokens_only') and t.get('seconds_tokens_only'):
      e['speedup_tokens_only'] = t['seconds_tokens_only'] / o['seconds_tokens_only']
    out.append(e)
  for o in (r for r in ours if _ok(r) and r.get('mode') == 'markov'):
    t = t_by.get((o['kind'], 'causal', o['depth'], o['batch']))
    if t is None:
      continue
    e = {'kind': o['kind'], 'mode': 'markov (ours) vs causal (VAR)', 'depth': o['depth'], 'batch': o['batch'],
         'ours_s': o['seconds'], 'var_pytorch_s': t['seconds'], 'speedup': t['seconds'] / o['seconds'],
         'ours_images_per_s': o.get('images_per_s'), 'var_pytorch_images_per_s': t.get('images_per_s')}
    if o['kind'] == 'sample' and o.get('seconds_tokens_only') and t.get('seconds_tokens_only'):
      e['speedup_tokens_only'] = t['seconds_tokens_only'] / o['seconds_tokens_only']
    out.append(e)
  return out


def _f(x, spec: str) -> str:
  return '-' if x is None else format(x, spec)


def markdown(data: dict) -> str:
  """Both record sets side by side, one row per (depth, kind, mask, batch), then the ratios of markov
  (ours) against causal (VAR), errors and skips."""
  ours, theirs = data['ours']['records'], data['var_pytorch']['records']
  env_o, env_t = data['ours']['env'] or {}, data['var_pytorch']['env'] or {}
  peak = (data['ours']['matmul_peak'] or {}).get('peak_flops_per_s')
  lines = [f'srdd_jax vs VAR-PyTorch ({data["mode"]}), commit {data.get("commit") or "unknown"}, '
           f'{data["started"]}',
           '',
           f'- srdd_jax: {env_o.get("device_kind", "-")}, jax {env_o.get("jax", "-")}; matmul peak measured '
           f'in the run {_f(peak and peak / 1e12, ".1f")} TFLOP/s',
           f'- VAR-PyTorch: {env_t.get("device_kind", "-")}, torch {env_t.get("torch", "-")}; fused kernels '
           f'importable: {env_t.get("importable", "-")}',
           f'- MFU: analytic FLOPs / nominal peak {_f(data["nominal_peak_flops_per_s"] and data["nominal_peak_flops_per_s"] / 1e12, ".0f")} TFLOP/s',
           '',
           '| depth | kind | mask | batch | srdd_jax s | VAR-PyTorch s | speed-up | srdd_jax img/s | VAR img/s '
           '| img/s tokens only (ours / VAR) | MFU (ours / VAR) | memory GiB (ours / VAR) |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  key = lambda r: (r.get('depth') or 0, r.get('kind') != 'train', r.get('kind') or '', r.get('mode') or '',
                   r.get('batch') or 0)
  rows = {}
  for side, recs in (('o', ours), ('t', theirs)):
    for r in recs:
      rows.setdefault(key(r), {})[side] = r
  gb = lambda x: '-' if x is None else f'{x / 2**30:.1f}'
  for k in sorted(rows):
    o, t = rows[k].get('o', {}), rows[k].get('t', {})
    err = '; '.join(f'{n} error: {r["error"].splitlines()[0][:100]}' for n, r in (('ours', o), ('VAR', t))
                    if 'error' in r)
    s_o = o.get('seconds') if _ok(o) else None
    s_t = t.get('seconds') if _ok(t) else None
    lines.append(
        f'| {k[0]} | {k[2]} | {k[3]} | {k[4]} | {_f(s_o, ".4f")} | {_f(s_t, ".4f")} | '
        f'{_f(s_t / s_o if s_o and s_t else None, ".2f")} | {_f(o.get("images_per_s") if s_o else None, ".1f")} | '
        f'{_f(t.get("images_per_s") if s_t else None, ".1f")} | '
        f'{_f(o.get("images_per_s_tokens_only"), ".1f")} / {_f(t.get("images_per_s_tokens_only"), ".1f")} | '
        f'{_f(o.get("mfu"), ".3f")} / {_f(t.get("mfu"), ".3f")} | '
        f'{gb(o.get("memory_bytes"))} / {gb(t.get("memory_bytes"))} |' + (f' {err}' if err else ''))
  cross = [r for r in data['ratios'] if r['mode'].startswith('markov (ours)')]
  if cross:
    lines += ['', '| depth | kind | batch | markov (ours) img/s | causal (VAR) img/s | speed-up | tokens only |',
              '|---|---|---|---|---|---|---|']
    for r in cross:
      lines.append(f'| {r["depth"]} | {r["kind"]} | {r["batch"]} | {_f(r["ours_images_per_s"], ".1f")} | '
                   f'{_f(r["var_pytorch_images_per_s"], ".1f")} | {r["speedup"]:.2f} | '
                   f'{_f(r.get("speedup_tokens_only"), ".2f")} |')
  if data['skipped']:
    lines += ['', 'Skipped:'] + [f'- {s.get("impl")} depth {s.get("depth")} {s.get("kind")} {s.get("mode")}: '
                                 f'{s.get("reason")}' for s in data['skipped']]
  ops = sorted({op for r in theirs for op in r.get('attention_ops') or []})
  att = sorted({str(r.get('attention_impl')) for r in ours if r.get('attention_impl')})
  if ops or att:
    lines += ['', f'Attention: srdd_jax {", ".join(att) or "-"}; VAR-PyTorch operators {", ".join(ops) or "-"}']
  lines += ['', f'Wall time {data["wall_s"]:.0f} s' + (f' of a {data["budget_s"]:.0f} s budget'
                                                      if data.get('budget_s') else '')]
  return '\n'.join(lines)


# --- --vs-var beside bench's own flags -------------------------------------------------------------

BENCH_FLAGS = ('depths', 'width', 'heads', 'batches', 'sample_batches', 'dtype', 'repeats', 'warmup',
               'tokenizer_ch', 'scan', 'remat', 'attention', 'patch_nums')


def child_argv(args) -> list[str]:
  """bench's flags of `args` for our side's own process (everything but --vs-var and --out)."""
  out = ['--quick'] if args.quick else []
  out += ['--masks', ','.join(args.masks), '--kinds', ','.join(args.kinds)]
  defaults = vars(bench.parse_args(['--out', 'x']))
  for k in BENCH_FLAGS:
    v = getattr(args, k)
    if v is not None and v != defaults[k]:
      out += [f'--{k}', str(v)]
  return out


def torch_model(depth: int, width: int, heads: int, patch_nums, dtype: str, tokenizer_ch: int, jobs) -> dict:
  c = bench.model_config(depth, 'causal', dtype, width, heads, patch_nums)
  return {'depth': depth, 'width': c.width, 'heads': c.num_heads, 'patch_nums': list(c.patch_nums),
          'vocab_size': c.vocab_size, 'z_channels': c.z_channels, 'num_classes': c.num_classes,
          'tokenizer_ch': tokenizer_ch, 'dtype': dtype, 'jobs': jobs}


def torch_spec(models, repeats: int, warmup: int, deadline=None, device='auto') -> dict:
  return {'models': models, 'repeats': repeats, 'warmup': warmup, 'deadline': deadline, 'device': device,
          'sampler': {'cfg': bench.SAMPLER.cfg, 'top_k': bench.SAMPLER.top_k, 'top_p': bench.SAMPLER.top_p},
          'lr': 1e-4, 'weight_decay': 0.05, 'clip': 2.0}


def run_vs_var(args, argv) -> int:
  info = check_var(args.vs_var)
  res = Results(args, argv, 'vs-var', None)
  log(f'VAR-PyTorch: torch {info.get("torch")}; our side first')
  ours_out = args.out + '.srdd_jax.json'
  cmd = [sys.executable, '-m', 'srdd_jax.bench', *child_argv(args), '--out', ours_out]
  done = run_worker(cmd, child_env(jax_worker=True), lambda m: None, None)
  if not files.exists(ours_out):
    print(f'error: our side (python -m srdd_jax.bench) wrote no results (exit {done["rc"]})', file=sys.stderr)
    return 2 if done['rc'] == 2 else 1  # A bad flag that only our side reads is still bad input.
  ours = files.read_json(ours_out)
  files.remove(ours_out)
  r = ours['resolved']
  res.dtype = r['dtype']
  res.patch_nums = tuple(r['patch_nums'])
  res.data['ours'].update(env=ours['env'], matmul_peak=ours.get('matmul_peak'), resolved=r)
  res.set_peak(ours['env'].get('device_kind'), r['dtype'])
  for rec in ours['records']:
    res.add_record('srdd_jax', rec)
  models = []
  for depth in r['depths']:
    jobs = [{'kind': k, 'masks': r['masks'], 'batch': b}
            for k in r['kinds'] for b in (r['batches'] if k == 'train' else r['sample_batches'])]
    models.append(torch_model(depth, r['width'], r['heads'], r['patch_nums'], r['dtype'], r['tokenizer_ch'], jobs))
  spec = write_spec(torch_spec(models, r['repeats'], r['warmup']))
  try:
    log('VAR-PyTorch on the same shapes')
    run_worker([sys.executable, TORCH_WORKER, '--var_dir', args.vs_var, '--spec', spec], child_env(),
               res.on_message('var_pytorch'), None)
  finally:
    files.remove(spec)
  return finish(res)


def finish(res: Results) -> int:
  res.data['finished'] = True
  res.save()
  text = res.write_markdown()
  log(f'wrote {res.out} and {res.md}')
  print(text, flush=True)
  return 0


# --- the suite -------------------------------------------------------------------------------------

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
  deadline = time.time() - (time.perf_counter() - _T0) + args.budget_s  # From this process's start.
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
      done = run_worker([sys.executable, '-m', 'srdd_jax.bench.vs_var', '--jax-worker', path],
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


# --- the JAX worker --------------------------------------------------------------------------------

def _sds(tree, sharding):
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def lower_train(c: VARConfig, vae_c, mesh, batch: int):
  """`bench.jit_train_step` lowered on abstract state, tokenizer and batch in the shardings that
  `bench.bench_train` places the real ones in, so its executable takes them."""
  trainer = Trainer(c, vae_c, OptimConfig(peak_lr=1e-4, total_steps=1000), mesh)
  state, shardings = trainer.abstract_state()
  abstract_state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          state, shardings)
  vae = _sds(unbox(Tokenizer(vae_c).abstract_params()), pm.replicated(mesh))
  data = {'labels': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=trainer.batch_sharding),
          'ids': jax.ShapeDtypeStruct((batch, c.seq_len), jnp.int32, sharding=trainer.batch_sharding)}
  return bench.jit_train_step(trainer).lower(abstract_state, vae, data)


def abstract_var_params(c: VARConfig):
  x = jnp.zeros((1, c.seq_len - 1, c.z_channels), jnp.float32)
  return unbox(jax.eval_shape(lambda: VAR(c).init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), x)['params']))


def lower_tokens(c: VARConfig, vae_c, vae_params, mesh, batch: int):
  """The sampler's tokens program as `bench.bench_sample` lowers it (parameters abstract, replicated)."""
  sampler = Sampler(c, vae_c, bench.SAMPLER, mesh=mesh, decode_precision=bench.DECODE_PRECISION)
  params = _sds(abstract_var_params(c), pm.replicated(mesh))
  labels = jnp.arange(batch, dtype=jnp.int32) % c.num_classes
  return pc.jit_inference(sampler.tokens).lower(params, vae_params, labels, batch_rng(0, 0))


def compile_decoder(c: VARConfig, vae_c, vae_params, mesh, batch: int, f_sharding) -> dict:
  sampler = Sampler(c, vae_c, bench.SAMPLER, mesh=mesh, decode_precision=bench.DECODE_PRECISION)
  f_shape = jax.ShapeDtypeStruct((batch, vae_c.latent_side, vae_c.latent_side, vae_c.z_channels), jnp.float32,
                                 sharding=f_sharding)
  t = time.perf_counter()
  dec = pc.jit_inference(sampler.decode).lower(vae_params, f_shape).compile()
  return {'compiled': dec, 'compile_s': time.perf_counter() - t, 'stats': pc.compiled_stats(dec), 'warm': False}


def is_oom(e: BaseException) -> bool:
  s = str(e)
  return 'RESOURCE_EXHAUSTED' in s or 'Out of memory' in s or 'out of memory' in s


def jax_worker(path: str) -> int:
  proto = sys.stdout
  sys.stdout = sys.stderr

  def emit(obj):
    proto.write(json.dumps(obj, default=str) + '\n')
    proto.flush()

  spec = files.read_json(path)
  env = bench.environment()
  emit({'type': 'info', 'info': env})
  accel = env['backend'] != 'cpu'
  dtype, depth, masks = spec['dtype'], spec['depth'], spec['masks']
  peak = spec.get('peak')
  if spec.get('measure_peak'):
    mp = bench.matmul_peak((4096, 8192) if accel else (512, 1024), 10 if accel else 3, dtype)
    emit({'type': 'matmul_peak', 'matmul_peak': mp})
    peak = mp['peak_flops_per_s']
  model = dict(scan_blocks=bool(accel if spec.get('scan') is None else spec['scan']), remat=spec['remat'],
               attention=spec['attention'])
  cs = {m: bench.model_config(depth, m, dtype, spec['width'], spec['heads'], spec['patch_nums'], **model)
        for m in masks}
  c0 = cs[masks[0]]
  vae_c = bench.tokenizer_config(c0, spec['tokenizer_ch'])
  vae_params = bench.random_vae_params(vae_c)
  mesh = pm.make_mesh()
  limit = spec.get('memory_limit') or (env.get('device_memory') or {}).get('bytes_limit')
  deadline = spec.get('deadline')
  kinds = spec['kinds']
  # Enough threads for every program at once (a decoder's task waits for its tokens program).
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
  pending = []  # Every compile started, used or not.

  def timed_compile(lowered):
    t = time.perf_counter()
    exe = lowered.compile()
    return exe, time.perf_counter() - t

  def compile_kind(kind: str, batch: int) -> dict:
    """Lowers here (tracing holds the GIL) and compiles in threads: {mask: future}, and for sampling
    'decoder': the future of the decoder (it takes f_hat in the sharding the tokens program leaves)."""
    futs = {}
    pending.append(futs)
    for m in masks:
      low = (lower_train(cs[m], vae_c, mesh, batch) if kind == 'train' else
             lower_tokens(cs[m], vae_c, vae_params, mesh, batch))
      futs[m] = pool.submit(timed_compile, low)
    if kind == 'sample':
      first = futs[masks[0]]
      futs['decoder'] = pool.submit(
          lambda: compile_decoder(c0, vae_c, vae_params, mesh, batch, first.result()[0].output_shardings[1]))
    return futs

  def gather(kind: str, batch: int, futs: dict) -> dict:
    """{'programs': {mask: (exe, secs, stats)}, 'decoder' (sampling), 'need': bytes the kind needs at
    once, 'arg': its programs' argument bytes, 'batch'}."""
    got = {m: futs[m].result() for m in masks}
    got = {m: (exe, secs, pc.compiled_stats(exe)) for m, (exe, secs) in got.items()}
    need = max(pc.needed_bytes(st['memory']) or 0 for _, _, st in got.values())
    arg = max((st['memory'] or {}).get('argument_size_in_bytes', 0) for _, _, st in got.values())
    out = {'programs': got, 'need': need, 'arg': arg, 'batch': batch}
    if kind == 'sample':
      out['decoder'] = futs['decoder'].result()
      # The decoder runs while the transformer's parameters (the tokens program's arguments) stay.
      out['need'] = max(need, (pc.needed_bytes(out['decoder']['stats']['memory']) or 0) + arg)
    return out

  def fits(got: dict) -> bool:
    return limit is None or got['need'] <= FIT_FRACTION * limit

  def smaller(kind: str, got: dict) -> int | None:
    """The largest ladder batch below got's that XLA's numbers (linear in the batch) say fits."""
    per = max((got['need'] - got['arg']) / got['batch'], 1.0)
    room = FIT_FRACTION * limit - got['arg']
    fit = [b for b in kinds[kind]['ladder'] if b < got['batch'] and b * per <= room]
    return max(fit) if fit else None

  def reduced(kind: str, new, old: int, why: str):
    emit({'type': 'batch', 'kind': kind, 'depth': depth, 'batch': new, 'reduced_from': old, 'how': why})

  # The batch of each kind: VAR-PyTorch's; else, where the memory limit is known, the largest of the
  # ladder that XLA's memory analysis of a small probe batch (PROBE_BATCH), linear in the batch, says
  # fits; else the ladder's top under the cap. (A program compiled at a batch far over the memory costs
  # minutes of XLA's rematerialisation before it fails: the first GPU run lost its d24 programs so.)
  plan, how = {}, {}  # kind -> batch, and why
  probes, ready = {}, {}
  for kind, k in kinds.items():
    under = [b for b in k['ladder'] if b <= k['cap']]
    top = max(under) if under else min(k['ladder'])
    if k.get('batch'):
      plan[kind], how[kind] = int(k['batch']), 'VAR-PyTorch\'s batch'
      continue
    plan[kind], how[kind] = top, 'the ladder\'s top under the cap'
    small = [b for b in under if b <= PROBE_BATCH[kind]]
    if limit is not None and small and max(small) < top:
      probes[kind] = (max(small), compile_kind(kind, max(small)))
  for kind, (probe, futs) in probes.items():
    try:
      got = gather(kind, probe, futs)
    except Exception as e:  # pylint: disable=broad-except
      how[kind] += f' (the probe at batch {probe} failed: {type(e).__name__})'
      continue
    per = max((got['need'] - got['arg']) / probe, 1.0)
    room = FIT_FRACTION * limit - got['arg']
    fit = [b for b in kinds[kind]['ladder'] if probe <= b <= plan[kind] and b * per <= room]
    plan[kind] = max(fit) if fit else probe
    if plan[kind] == probe:
      ready[kind] = futs  # Compiled already.
    how[kind] = (f"the largest under the cap that fits by XLA's memory analysis at batch {probe} "
                 f'({per / 2**20:,.1f} MiB per example, {got["arg"] / 2**20:,.0f} MiB of arguments)')
  for kind in kinds:
    emit({'type': 'batch', 'kind': kind, 'depth': depth, 'batch': plan[kind], 'reduced_from': None,
          'how': how[kind]})

  # Everything compiles at once, the random weights are drawn on the host meanwhile. Where a memory
  # limit is known each kind is also compiled at a smaller batch (sampling: half; train: the ladder's
  # next): where ours needs more memory than VAR-PyTorch (our causal sampler's KV cache, say) the
  # fallback is then ready, and a compile in parallel costs little wall time.
  t0 = time.perf_counter()
  futures = {kind: ready.get(kind) or compile_kind(kind, plan[kind]) for kind in kinds}
  spare = {}
  if limit is not None:
    for kind in kinds:
      lower = [b for b in kinds[kind]['ladder'] if b <= (plan[kind] // 2 if kind == 'sample' else plan[kind] - 1)]
      if lower:
        spare[kind] = (max(lower), compile_kind(kind, max(lower)))
  host_params = bench.random_var_params(c0)
  compiled = {}
  for kind in kinds:
    try:
      got = gather(kind, plan[kind], futures[kind])
      for _ in range(3):
        if fits(got):
          break
        why = (f"XLA's memory analysis: {got['need'] / 2**20:,.0f} MiB at batch {got['batch']} > "
               f'{FIT_FRACTION:.0%} of the {limit / 2**20:,.0f} MiB limit')
        if kind in spare:
          half, futs = spare.pop(kind)
          alt = gather(kind, half, futs)
          if fits(alt) or smaller(kind, alt) is None:
            reduced(kind, half, got['batch'], why + ' (compiled at both)')
            plan[kind], got = half, alt
            continue
          got = alt
        new = smaller(kind, got)
        reduced(kind, new, plan[kind], why)
        if new is None:
          raise MemoryError(f'no batch of {kinds[kind]["ladder"]} fits in {FIT_FRACTION:.0%} of {limit} bytes '
                            f'({got["need"]} bytes at batch {got["batch"]})')
        plan[kind] = new
        got = gather(kind, new, compile_kind(kind, new))
      compiled[kind] = got
    except Exception as e:  # pylint: disable=broad-except
      compiled[kind] = {'error': e}
  # A spare compile nobody needs may still run: on a GPU it autotunes kernels, which would disturb the
  # timings; it started with the others, so waiting for it costs little.
  concurrent.futures.wait([f for futs in pending for f in futs.values()])
  del spare, futures, pending[:]
  emit({'type': 'compile', 'depth': depth, 'wall_s': time.perf_counter() - t0,
        'programs': {f'{kind} {m} b{got["batch"]}': round(got['programs'][m][1], 2)
                     for kind, got in compiled.items() if 'programs' in got for m in masks} |
                    {f'decode b{got["batch"]}': round(got['decoder']['compile_s'], 2)
                     for got in compiled.values() if 'decoder' in got},
        'needed_bytes': {kind: got.get('need') for kind, got in compiled.items()},
        'memory_limit_bytes': limit})

  decoders = {}
  for kind in kinds:
    got = compiled[kind]
    for attempt in range(2):
      redo = False
      for m in masks:
        c, batch = cs[m], plan[kind]
        base = {**{f: None for f in bench.RECORD_FIELDS}, 'kind': kind, 'mode': m, 'depth': depth,
                'width': c.width, 'heads': c.num_heads, 'seq_len': c.seq_len, 'batch': batch, 'dtype': dtype}
        if 'error' in got:
          emit({'type': 'record', 'record': {**base, **bench.error_info(got['error'])}})
          continue
        if deadline is not None and time.time() > deadline:
          emit({'type': 'skipped', 'kind': kind, 'mode': m, 'depth': depth, 'batch': batch,
                'reason': 'time budget spent'})
          continue
        exe, secs, _ = got['programs'][m]
        bench.log(f'{kind} {m} depth {depth} batch {batch}')
        try:
          if kind == 'train':
            rec = bench.bench_train(c, vae_c, vae_params, host_params, mesh, batch, spec['repeats'],
                                    spec['warmup'], peak, compiled=(exe, secs))
          else:
            key = (batch, exe.output_shardings[1])
            decoders.setdefault(key, got['decoder'])
            rec = bench.bench_sample(c, vae_c, vae_params, host_params, mesh, batch, spec['repeats'],
                                     spec['warmup'], decoders, tokens=(exe, secs))
        except Exception as e:  # pylint: disable=broad-except
          if is_oom(e) and attempt == 0:
            new = max([b for b in kinds[kind]['ladder'] if b < batch], default=None)
            if new is not None:
              emit({'type': 'batch', 'kind': kind, 'depth': depth, 'batch': new, 'reduced_from': batch,
                    'how': f'out of memory at batch {batch} when run: {str(e).splitlines()[0][:200]}'})
              plan[kind] = new
              got = compiled[kind] = gather(kind, new, compile_kind(kind, new))
              redo = True
              break
          rec = {**base, **bench.error_info(e)}
          bench.log(f'  failed: {rec["error"].splitlines()[0][:300]}')
        else:
          bench.log(f'  {rec["seconds"]:.4f} s')
        rec.update(attention_impl=resolve_impl(c.attention, c.dtype), remat=c.remat, scan_blocks=c.scan_blocks,
                   memory_limit_bytes=limit)
        emit({'type': 'record', 'record': rec})
      if not redo:
        break
  pool.shutdown(wait=False, cancel_futures=True)
  sys.stderr.flush()
  proto.flush()
  os._exit(0)  # Without waiting for compiles nobody needs any more (a spare batch's).


def main(args, argv) -> int:
  # This process only coordinates: should anything here touch a JAX backend, it must not be the
  # accelerator's (JAX would take most of its memory from the workers).
  jax.config.update('jax_platforms', 'cpu')
  if args.suite:
    return run_suite(args, argv)
  return run_vs_var(args, argv)


if __name__ == '__main__':
  ap = argparse.ArgumentParser(description='the JAX worker of the suite (started by srdd_jax.bench)')
  ap.add_argument('--jax-worker', dest='jax_worker', required=True, metavar='SPEC.json')
  sys.exit(jax_worker(ap.parse_args().jax_worker))
