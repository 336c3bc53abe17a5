"""srdd_jax side by side with the official PyTorch VAR (`--vs-var`), and what the GPU suite
(srdd_jax/bench/suite.py) shares with it: the worker processes, the results and their table.

  python -m srdd_jax.bench --vs-var DIR --out OUT.json [bench's flags, e.g. --quick]

DIR is a checkout of https://github.com/FoundationVision/VAR (models/, dist.py); torch is needed only
for it. Before anything is timed, a missing torch or a DIR that is not such a checkout exits 2 with one
`error:` line. Each implementation runs in processes of its own, one after the other, so neither holds
the accelerator's memory while the other runs: the PyTorch side is `srdd_jax/bench/var_pytorch.py` (no
jax; its docstring says exactly what it times and how the markov mask is applied to VAR's code), and the
JAX side is the bench's train-step and sampler timing (srdd_jax/bench/timing.py).

`--vs-var` (any of bench's timed-run flags): our side runs first (`python -m srdd_jax.bench`, same
flags), then VAR-PyTorch on the shapes, masks and batches our records hold.

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

import importlib.util
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

from srdd_jax import files
from srdd_jax.bench import base, var_pytorch
from srdd_jax.bench.base import T0, fail
from srdd_jax.bench.flags import parse_args
from srdd_jax.parallel import compile as pc

SCHEMA = 'srdd_jax.bench_vs_var/1'
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCH_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'var_pytorch.py')
JAX_MEM_FRACTION = '0.90'  # The JAX worker is alone on the device (the PyTorch one has exited).


def log(msg: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")} +{time.perf_counter() - T0:6.1f}s suite] {msg}', file=sys.stderr,
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
  missing = var_pytorch.missing_var_files(var_dir)
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
    self.data['wall_s'] = time.perf_counter() - T0
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
      fl = base.train_flops(base.model_config(rec['depth'], rec['mode'], rec['dtype'], rec['width'],
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
               'tokenizer_ch', 'scan', 'remat', 'attention', 'cpu_matmul', 'patch_nums')


def child_argv(args) -> list[str]:
  """bench's flags of `args` for our side's own process (everything but --vs-var and --out)."""
  out = ['--quick'] if args.quick else []
  out += ['--masks', ','.join(args.masks), '--kinds', ','.join(args.kinds)]
  defaults = vars(parse_args(['--out', 'x']))
  for k in BENCH_FLAGS:
    v = getattr(args, k)
    if v is not None and v != defaults[k]:
      out += [f'--{k}', str(v)]
  return out


def torch_model(depth: int, width: int, heads: int, patch_nums, dtype: str, tokenizer_ch: int, jobs) -> dict:
  c = base.model_config(depth, 'causal', dtype, width, heads, patch_nums)
  return {'depth': depth, 'width': c.width, 'heads': c.num_heads, 'patch_nums': list(c.patch_nums),
          'vocab_size': c.vocab_size, 'z_channels': c.z_channels, 'num_classes': c.num_classes,
          'tokenizer_ch': tokenizer_ch, 'dtype': dtype, 'jobs': jobs}


def torch_spec(models, repeats: int, warmup: int, deadline=None, device='auto') -> dict:
  return {'models': models, 'repeats': repeats, 'warmup': warmup, 'deadline': deadline, 'device': device,
          'sampler': {'cfg': base.SAMPLER.cfg, 'top_k': base.SAMPLER.top_k, 'top_p': base.SAMPLER.top_p},
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
