"""A config's train step under two versions of the code, timed in alternating processes in one sitting.

  python -m benchmarks.step_ab --ref REV [--new REV] [--config configs/fashion_mnist.py] [--masks markov,causal]
      [--rounds 12] [--steps 5] [--out FILE.json]
  python -m benchmarks.step_ab --ref REV --model bench_d6 ...   # srdd_jax.bench --quick's train step

Each version (`--ref`, `--new`: a commit, or `worktree` for the files as they are) is exported with
`git archive` into a temporary directory and runs in a process of its own with that directory first on
PYTHONPATH. Every worker builds the config's train step the way training does (config.model, .train,
.optim; one device; random token ids and labels, random tokenizer weights: the step's work does not depend
on their values), or with `--model bench_d6` the train step that `python -m srdd_jax.bench --quick` times
(and `--vs-var` sets beside VAR-PyTorch's: depth 6, width 384, 6 heads, 680 tokens, vocabulary 4096,
float32, batch 8, no EMA), compiles it, and reports the loss and gradient norm of one step from PRNGKey(0)'s
initialisation, so two versions of the same function report the same numbers. Then the parent lets one
worker at a time run `--steps` steps, the versions in ABBA order round after round, so that a machine
whose load drifts (a shared one) weighs on both alike; medians over all timed steps. The float32 matmul
peak is measured in the parent before and after the rounds (n x n, n 1024 and 2048, median of 5 calls),
and the 1-minute load average after every turn.

Output: one JSON (`srdd_jax.step_ab/1`: versions, commits, machine, peak, per-mask seconds of every step,
medians, the ratio ref / new) and a Markdown line per mask on stdout.
Record: docs/PERFORMANCE.md (issue 45 line 1).
"""
import argparse
import ast
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.config import load_file
from srdd_jax.parallel.mesh import make_mesh
from srdd_jax.tokenizer.api import Tokenizer, tokenizer_config, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train import transformer_setup
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer
from srdd_jax.transformer.config import VARConfig, var_config

SCHEMA = 'srdd_jax.step_ab/1'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_EXAMPLES = 60000  # Fashion-MNIST's training split: sets the schedule's length only.


# --- the worker: one version of the code, one mask ------------------------------------------------

def build_step(model: str, config_path: str, mask: str, overrides=()):
  """(compiled step, state, frozen, batch, transformer config) of `model`'s training at `mask`, the
  config's keys `overrides` ('section.key=value', the value as Python) set first."""
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  if model == 'bench_d6':  # srdd_jax.bench's model_config / tokenizer_config / bench_train, spelled out.
    c = VARConfig(depth=6, width=384, num_heads=6, mask=mask, dtype='float32')
    vq = VQVAEConfig(vocab_size=c.vocab_size, z_channels=c.z_channels, ch=32, patch_nums=c.patch_nums)
    trainer = Trainer(c, vq, OptimConfig(peak_lr=1e-4, total_steps=1000), mesh)
    b = 8
  else:
    config = load_file(config_path)
    config.model.mask = mask
    for item in overrides:
      key, value = item.split('=', 1)
      section, name = key.split('.')
      try:
        config[section][name] = ast.literal_eval(value)
      except (ValueError, SyntaxError):  # A bare word: a string.
        config[section][name] = value
    vq = tokenizer_config(config)
    c = var_config(config, vq.vocab_size, vq.z_channels)
    _, optim, progressive = transformer_setup.schedule(config, TRAIN_EXAMPLES, c.num_scales)
    trainer = transformer_setup.trainer(Trainer, config, c, vq, optim, mesh, progressive)
    b = int(config.train.global_batch)
  rng = np.random.default_rng(0)
  abstract = unbox(Tokenizer(vq).abstract_params())
  vae = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(a.dtype) * 0.05, abstract)
  batch = trainer.shard_batch({'labels': rng.integers(0, c.num_classes, (b,), dtype=np.int32),
                               'ids': rng.integers(0, c.vocab_size, (b, c.seq_len), dtype=np.int32)})
  state = trainer.init(jax.random.PRNGKey(0))
  frozen = trainer.place_frozen(vae)
  step = trainer.make_step().lower(state, frozen, batch).compile()
  return step, state, frozen, batch, c


def worker(model: str, config_path: str, mask: str, overrides=()) -> None:
  """Compiles, reports the first step's numbers, then runs `run N` commands from stdin until `quit`."""
  t = time.perf_counter()
  step, state, frozen, batch, c = build_step(model, config_path, mask, overrides)
  compile_s = time.perf_counter() - t
  state, m = step(state, frozen, batch)
  first = {k: float(m[k]) for k in ('loss', 'grad_norm')}
  for _ in range(3):  # Warm-up.
    state, m = step(state, frozen, batch)
  jax.block_until_ready(m)
  print(json.dumps({'ready': True, 'compile_s': compile_s, 'first_step': first, 'seq_len': c.seq_len,
                    'depth': c.depth, 'width': c.width, 'heads': c.num_heads, 'dtype': c.dtype}), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == 'quit':
      break
    wall, cpu = [], []
    for _ in range(int(cmd[1])):
      t, p = time.perf_counter(), time.process_time()
      state, m = step(state, frozen, batch)
      jax.block_until_ready(m)
      wall.append(time.perf_counter() - t)
      cpu.append(time.process_time() - p)
    print(json.dumps({'wall_s': wall, 'cpu_s': cpu, 'loss': float(m['loss'])}), flush=True)


# --- the parent -----------------------------------------------------------------------------------

def export(rev: str, into: str) -> str:
  """The package and configs of `rev` (a commit, or 'worktree') in a directory under `into`; its commit."""
  dest = os.path.join(into, rev.replace('/', '_'))
  os.makedirs(dest)
  if rev == 'worktree':
    subprocess.run(['cp', '-r', os.path.join(REPO, 'srdd_jax'), os.path.join(REPO, 'configs'), dest], check=True)
    head = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True)
    return dest, head.stdout.strip() + '+worktree'
  commit = subprocess.run(['git', '-C', REPO, 'rev-parse', rev], capture_output=True, text=True)
  if commit.returncode:
    raise SystemExit(f'error: --ref/--new {rev!r} is not a commit of {REPO}')
  archive = subprocess.Popen(['git', '-C', REPO, 'archive', rev, 'srdd_jax', 'configs'], stdout=subprocess.PIPE)
  subprocess.run(['tar', '-x', '-C', dest], stdin=archive.stdout, check=True)
  archive.wait()
  return dest, commit.stdout.strip()


def matmul_peak() -> dict:
  """The best float32 matmul rate (FLOP/s): n x n at n 1024 and 2048, the median of 5 blocked calls."""
  rates = {}
  for n in (1024, 2048):
    a = jax.random.normal(jax.random.PRNGKey(n), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    for _ in range(2):
      f(a).block_until_ready()
    times = []
    for _ in range(5):
      t = time.perf_counter()
      f(a).block_until_ready()
      times.append(time.perf_counter() - t)
    rates[str(n)] = 2.0 * n ** 3 / statistics.median(times)
  return {'flops_per_s': max(rates.values()), 'by_size': rates}


class Worker:
  def __init__(self, tree: str, model: str, config_path: str, mask: str, overrides=()):
    env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--worker', '--model', model,
                                  '--config', os.path.join(tree, config_path), '--masks', mask] +
                                 [f'--set_new={o}' for o in overrides],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
    self.info = self.read()

  def read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith('{'):
        return json.loads(line)
    raise SystemExit(f'error: a worker exited with status {self.proc.wait()} before answering')

  def run(self, steps: int) -> dict:
    self.proc.stdin.write(f'run {steps}\n')
    self.proc.stdin.flush()
    return self.read()

  def close(self):
    self.proc.stdin.write('quit\n')
    self.proc.stdin.close()
    self.proc.wait()


def compare(trees: dict, model: str, config_path: str, mask: str, rounds: int, steps: int,
            overrides=(), both=()) -> dict:
  workers = {name: Worker(tree, model, config_path, mask, [*both, *(overrides if name == 'new' else ())])
             for name, tree in trees.items()}
  out = {name: {**w.info, 'wall_s': [], 'cpu_s': []} for name, w in workers.items()}
  load = []
  names = list(workers)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):  # ABBA: a drift in load falls on both.
      res = workers[name].run(steps)
      out[name]['wall_s'] += res['wall_s']
      out[name]['cpu_s'] += res['cpu_s']
      out[name]['last_loss'] = res['loss']
      load.append(os.getloadavg()[0])
  for w in workers.values():
    w.close()
  for o in out.values():
    o['median_s'] = statistics.median(o['wall_s'])
    o['median_cpu_s'] = statistics.median(o['cpu_s'])
  ref, new = out['ref'], out['new']
  return {'mask': mask, 'versions': out, 'load_1min': load, 'ratio_ref_over_new': ref['median_s'] / new['median_s'],
          'cpu_ratio_ref_over_new': ref['median_cpu_s'] / new['median_cpu_s'],
          'first_step_loss_difference': abs(ref['first_step']['loss'] - new['first_step']['loss'])}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--ref', default='HEAD', help='the code before: a commit, or worktree')
  ap.add_argument('--new', default='worktree', help='the code after: a commit, or worktree (default)')
  ap.add_argument('--model', default='config', choices=('config', 'bench_d6'),
                  help="config: --config's transformer training; bench_d6: srdd_jax.bench --quick's train step")
  ap.add_argument('--config', default='configs/fashion_mnist.py', help='a config file, relative to the repository')
  ap.add_argument('--masks', default='markov,causal')
  ap.add_argument('--rounds', type=int, default=12)
  ap.add_argument('--steps', type=int, default=5, help='steps per turn of a worker')
  ap.add_argument('--out', default='', help='the JSON record')
  ap.add_argument('--set_new', action='append', default=[], metavar='SECTION.KEY=VALUE',
                  help="a config key set for the new version only (e.g. model.cpu_matmul=auto); repeatable")
  ap.add_argument('--set', action='append', default=[], metavar='SECTION.KEY=VALUE', dest='set_both',
                  help='a config key set for both versions (before --set_new); repeatable')
  ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  masks = a.masks.split(',')
  if any(m not in ('markov', 'causal') for m in masks):
    raise SystemExit(f'error: --masks={a.masks!r}: each must be markov or causal')
  if a.worker:
    return worker(a.model, a.config, masks[0], a.set_new)
  given = a.set_new + a.set_both
  bad = [o for o in given if '=' not in o or o.split('=', 1)[0].count('.') != 1]
  if bad or (given and a.model != 'config'):
    raise SystemExit(f'error: --set/--set_new={(bad or given)[0]!r}: SECTION.KEY=VALUE, with --model config only')
  if a.rounds < 1 or a.steps < 1:
    raise SystemExit(f'error: --rounds={a.rounds} --steps={a.steps}: both must be >= 1')
  with tempfile.TemporaryDirectory() as tmp:
    trees, commits = {}, {}
    for name, rev in (('ref', a.ref), ('new', a.new)):
      trees[name], commits[name] = export(rev, os.path.join(tmp, name))
    peak_before = matmul_peak()
    results = [compare(trees, a.model, a.config, m, a.rounds, a.steps, a.set_new, a.set_both) for m in masks]
    peak_after = matmul_peak()
  cpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
  cpu_model = next((l.split(':', 1)[1].strip() for l in cpu.splitlines() if l.startswith('Model name')), '')
  record = {'schema': SCHEMA, 'model': a.model, 'config': a.config if a.model == 'config' else None,
            'revisions': {'ref': a.ref, 'new': a.new}, 'new_overrides': a.set_new, 'overrides': a.set_both, 'commits': commits,
            'rounds': a.rounds,
            'steps_per_turn': a.steps, 'cpu_model': cpu_model, 'cpu_count': os.cpu_count(),
            'platform': platform.platform(), 'jax': jax.__version__, 'XLA_FLAGS': os.environ.get('XLA_FLAGS'),
            'matmul_peak_f32': {'before': peak_before, 'after': peak_after}, 'results': results,
            'date': time.strftime('%Y-%m-%d %H:%M:%S')}
  peak = max(peak_before['flops_per_s'], peak_after['flops_per_s'])
  for r in results:
    v = r['versions']
    print(f"| {r['mask']} | ref {v['ref']['median_s']:.4f} s | new {v['new']['median_s']:.4f} s | "
          f"{r['ratio_ref_over_new']:.2f}x (CPU s {r['cpu_ratio_ref_over_new']:.2f}x) | load "
          f"{min(r['load_1min']):.1f}-{max(r['load_1min']):.1f} | peak {peak / 1e12:.3f} TFLOP/s | "
          f"first-step loss {v['ref']['first_step']['loss']:.6f} / {v['new']['first_step']['loss']:.6f} |")
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(record, f, indent=1)


if __name__ == '__main__':
  main()
