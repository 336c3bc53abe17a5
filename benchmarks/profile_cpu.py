"""Where a CPU train step spends its time: jax.profiler over 3 steps, XLA ops grouped by kind.

  JAX_PLATFORMS=cpu python -m benchmarks.profile_cpu [--mask causal] [--scan 0] [--trace_dir /tmp/prof]
      [--model demo] [--steps 8] [--cpu_kernels 0|1] [--cpu_matmul float32|bfloat16|auto]

The issue's CPU configuration (depth 6, width 384, 6 heads, 256-px scales, L = 680, vocabulary 4096,
float32, batch 8). Each executed op of the Perfetto trace is put in a group by its optimized HLO
(matmul: a dot or convolution inside; softmax: an exponential; gelu: a tanh; copy/transpose;
broadcast-named fusions; reductions; slices; the rest), and the ten longest copies and broadcasts are
listed with the JAX operation they come from. Each op's time is its median over the traced steps (a
shared machine preempts single ops; the median drops those), summed per group. `--cpu_kernels 0` profiles
autodiff's program (the step before transformer/cpu_kernels.py), `--cpu_matmul` VARConfig's choice.
Record: docs/PERFORMANCE.md, the CPU profile of the train step by op group, measured at commit 6360e98.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.parallel.mesh import make_mesh
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer
from srdd_jax.transformer.config import VARConfig



def _computations(hlo: str) -> dict:
  comps, cur = {}, None
  for line in hlo.splitlines():
    m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$', line)
    if m and not line.startswith(' '):
      cur = m.group(1)
      comps[cur] = []
    elif cur:
      comps[cur].append(line)
  return comps


def categories(hlo: str) -> dict:
  """HLO instruction name -> (group, the JAX op_name it comes from)."""
  comps, out = _computations(hlo), {}
  for line in hlo.splitlines():
    m = re.match(r'^\s+%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(', line)
    if not m:
      continue
    name, _, op = m.groups()
    called = re.search(r'calls=%?([\w.\-]+)', line)
    body = '\n'.join(comps.get(called.group(1), [])) if called else ''
    meta = re.search(r'op_name="([^"]*)"', line)
    if op in ('dot', 'convolution') or ' dot(' in body or 'convolution(' in body:
      group = 'matmul'
    elif op == 'exponential' or 'exponential(' in body:
      group = 'softmax / exp'
    elif 'tanh(' in body:
      group = 'gelu'
    elif op in ('copy', 'transpose') or 'copy' in name or 'transpose' in name:
      group = 'copy / transpose'
    elif 'broadcast' in name:
      group = 'broadcast fusions'
    elif op == 'reduce' or 'reduce(' in body:
      group = 'reductions (norms, sums)'
    elif any(s in name for s in ('slice', 'pad', 'concatenate')):
      group = 'slice / pad / concat'
    else:
      group = 'other elementwise'
    out[name] = (group, meta.group(1) if meta else '')
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--mask', default='causal', choices=('causal', 'markov'))
  ap.add_argument('--scan', type=int, default=0, choices=(0, 1))
  ap.add_argument('--trace_dir', default='/tmp/srdd_profile')
  ap.add_argument('--top', type=int, default=10, help='ops listed per group (copies, broadcast fusions)')
  ap.add_argument('--hlo', default='', help='a file to write the optimized HLO of the step to')
  ap.add_argument('--model', default='bench', choices=('bench', 'demo'),
                  help='bench: the issue\'s configuration above; demo: configs/fashion_mnist.py\'s transformer '
                  '(depth 4, width 128, 4 heads, 130 tokens, vocabulary 512, batch 32, EMA)')
  ap.add_argument('--steps', type=int, default=0, help='traced steps or sampling calls, after 2 untraced '
                  '(default 8 steps, 3 calls)')
  ap.add_argument('--cpu_kernels', type=int, default=1, choices=(0, 1), help='VARConfig.cpu_kernels')
  ap.add_argument('--cpu_matmul', default='float32', choices=('float32', 'bfloat16', 'auto'),
                  help='VARConfig.cpu_matmul')
  ap.add_argument('--what', default='train', choices=('train', 'sample'),
                  help='sample: the token program of srdd_jax.bench\'s sampling (batch 32, cfg 1.5 linear, top-k '
                  '900, top-p 0.96), ops grouped by the JAX operation they come from')
  args = ap.parse_args()
  if args.steps < 0:
    raise SystemExit(f'error: --steps={args.steps}: must be >= 1 (0 = the default)')
  args.steps = args.steps or (8 if args.what == 'train' else 3)
  cpu = {'cpu_kernels': bool(args.cpu_kernels), 'cpu_matmul': args.cpu_matmul}
  if args.model == 'demo':
    pn = (1, 2, 3, 4, 6, 8)
    c = VARConfig(depth=4, width=128, num_heads=4, vocab_size=512, z_channels=16, patch_nums=pn, mask=args.mask,
                  scan_blocks=bool(args.scan), num_classes=10, drop_path_rate=0.0, **cpu)
    vq = VQVAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, using_sa=False,
                     using_mid_sa=True, share_quant_resi=4, patch_nums=pn)
    batch_size, ema = 32, 0.999
  else:
    c = VARConfig(depth=6, width=384, num_heads=6, vocab_size=4096, z_channels=32, mask=args.mask,
                  scan_blocks=bool(args.scan), num_classes=1000, **cpu)
    vq = VQVAEConfig(vocab_size=4096, z_channels=32, ch=32)
    batch_size, ema = 8, 0.0
  vae = unbox(Tokenizer(vq).init(jax.random.PRNGKey(0)))
  if args.what == 'sample':
    return profile_sampling(c, vq, vae, args)
  trainer = Trainer(c, vq, OptimConfig(total_steps=100), make_mesh((1, 1, 1), jax.devices()[:1]), ema_decay=ema)
  state = trainer.init(jax.random.PRNGKey(0))
  batch = trainer.shard_batch({'labels': jnp.zeros((batch_size,), jnp.int32), 'ids': jnp.asarray(
      np.random.randint(0, c.vocab_size, (batch_size, c.seq_len)), jnp.int32)})
  frozen = trainer.place_frozen(vae)
  step = trainer.make_step().lower(state, frozen, batch).compile()
  cats = categories(step.as_text())
  for _ in range(2):
    state, m = step(state, frozen, batch)
  jax.block_until_ready(m)
  with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      state, m = step(state, frozen, batch)
      jax.block_until_ready(m)
  path = sorted(glob.glob(args.trace_dir + '/**/perfetto_trace.json.gz', recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  durations = collections.defaultdict(list)  # Op -> its duration in each traced step.
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in cats:
      durations[e['name']].append(e['dur'])
  per_op = {name: float(np.median(d)) for name, d in durations.items()}
  walls = [e['dur'] for e in events if e.get('ph') == 'X' and e.get('name') == 'ThunkExecutor::Execute']
  groups, counts = collections.Counter(), collections.Counter()
  for name, v in per_op.items():
    groups[cats[name][0]] += v
    counts[cats[name][0]] += 1
  total = sum(groups.values())
  print(f'{args.mask}, scan {args.scan}, cpu_kernels {args.cpu_kernels}, cpu_matmul {args.cpu_matmul}: executor '
        f'wall {np.median(walls) / 1e3:.0f} ms per step (median of {len(walls)}), ops {total / 1e3:.0f} ms per step '
        f'(each op\'s median, both threads summed; 1-minute load {os.getloadavg()[0]:.1f})')
  print('| group | ops | ms per step | share |\n|---|---|---|---|')
  for g, v in groups.most_common():
    print(f'| {g} | {counts[g]} | {v / 1e3:.0f} | {v / total:.1%} |')
  for group in ('matmul', 'copy / transpose', 'broadcast fusions'):
    top = collections.Counter({name: v for name, v in per_op.items() if cats[name][0] == group})
    print(f'\nlongest {group} ({len(top)} ops):')
    for name, v in top.most_common(args.top):
      print(f'  {v / 1e3:6.1f} ms  {name}  <- {cats[name][1][-100:]}')
  if args.hlo:
    with open(args.hlo, 'w') as f:
      f.write(step.as_text())


def _trace_ops(fn, args_):
  """(executed ops of a Perfetto trace of --steps calls, executor wall per call in us)."""
  with jax.profiler.trace(args_.trace_dir, create_perfetto_trace=True):
    for _ in range(args_.steps):
      jax.block_until_ready(fn())
  path = sorted(glob.glob(args_.trace_dir + '/**/perfetto_trace.json.gz', recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  wall = sum(e['dur'] for e in events if e.get('ph') == 'X' and e.get('name') == 'ThunkExecutor::Execute')
  return [e for e in events if e.get('ph') == 'X'], wall / args_.steps


def profile_sampling(c, vq, vae, args):
  """The bench's sampling token program (our side of `--vs-var`'s sample records), ops summed by the
  JAX operation they come from (the op_name's last two parts: `top_k`, `sort`, `dot_general` ...)."""
  from srdd_jax.bench.base import SAMPLER  # pylint: disable=import-outside-toplevel
  from srdd_jax.bench.timing import random_var_params  # pylint: disable=import-outside-toplevel
  from srdd_jax.diffusion.sampler import Sampler, batch_rng  # pylint: disable=import-outside-toplevel
  from srdd_jax.parallel.compile import jit_inference  # pylint: disable=import-outside-toplevel
  batch = 32
  params = jax.tree_util.tree_map(jnp.asarray, random_var_params(c))  # The bench's random weights.
  sampler = Sampler(c, vq, SAMPLER)
  labels = jnp.arange(batch, dtype=jnp.int32) % c.num_classes
  prog = jit_inference(sampler.tokens).lower(params, vae, labels, batch_rng(0, 0)).compile()
  cats = categories(prog.as_text())
  for i in range(2):
    jax.block_until_ready(prog(params, vae, labels, batch_rng(0, i)))
  ops, wall = _trace_ops(lambda: prog(params, vae, labels, batch_rng(0, 9)), args)
  by_op, by_group = collections.Counter(), collections.Counter()
  for e in ops:
    if e['name'] in cats:
      group, op_name = cats[e['name']]
      by_op['/'.join(op_name.split('/')[-2:]) or e['name']] += e['dur']
      by_group[group] += e['dur']
  total = sum(by_group.values())
  print(f'sampling, {args.mask}, batch {batch}: executor wall {wall / 1e3:.0f} ms per call, ops '
        f'{total / args.steps / 1e3:.0f} ms per call (ops of both threads summed)')
  print('| group | ms per call | share |\n|---|---|---|')
  for g, v in by_group.most_common():
    print(f'| {g} | {v / args.steps / 1e3:.0f} | {v / total:.1%} |')
  print('\nlongest JAX operations:')
  for name, v in by_op.most_common(max(args.top, 15)):
    print(f'  {v / args.steps / 1e3:7.1f} ms  {v / total:5.1%}  {name[-110:]}')


if __name__ == '__main__':
  main()
