"""Throughput and memory of the train step and the sampler, both masks, over depths and batch sizes.

  python -m srdd_jax.bench --out /tmp/bench.json [--quick]
  python -m srdd_jax.bench --out /tmp/bench.json --depths 16,20 --batches 32,64 --masks markov,causal
  python -m srdd_jax.bench --aot v5p:4x4x4 --preset d30 --batch 1024 --out /tmp/aot.json
  python -m srdd_jax.bench --vs-var DIR --out /tmp/vs.json [--quick]     # and the official PyTorch VAR
  python -m srdd_jax.bench --suite gpu --vs-var DIR --out /tmp/gpu.json  # d16 + d24, one H100/H200 run
  python -m srdd_jax.bench --suite gpu --tiny --vs-var DIR --out /tmp/t.json   # its CPU dry run

The command line of the package (its flags: flags.py). Timed runs (timing.py) measure the train step
and the sampler on the devices of this process, on random weights; `--aot TOPOLOGY` (aot.py) compiles
them for a TPU topology instead, with no TPU.

Side by side (`--vs-var DIR`, DIR a checkout of github.com/FoundationVision/VAR; torch needed for this
flag only, and without it or without such a DIR the command exits 2 before timing anything): the same
shapes, masks and batches timed with VAR's own PyTorch code in a process of its own
(`srdd_jax/bench/var_pytorch.py`: VAR's train step with bfloat16 autocast on a GPU and fused AdamW, and
`autoregressive_infer_cfg` with decoding; the markov mask applied to VAR's code as its docstring
says), both record sets and their ratios in one JSON (OUT) and one Markdown table (OUT, suffix .md).
`--suite gpu` is the whole GPU comparison in one call inside `--budget_s` (default 480 s): d16 and
d24, 256 px, bfloat16, both masks, train and sampling, both implementations at the largest batch that
fits both; MFU against the nominal 989 TFLOP/s of an H100/H200. `srdd_jax/bench/vs_var.py` and
`srdd_jax/bench/suite.py` have the details and the JSON's fields.

The JSON (rewritten after every record, so a killed run keeps what it measured):
  schema 'srdd_jax.bench/1'; env: backend, device_kind, device_count, jax, jaxlib, flax, optax, numpy,
  python, cpu_count, XLA_FLAGS, device_memory; args; weights; started; wall_s;
  matmul_peak (timed runs): dtype, sizes {n: times, TFLOP/s}, peak_flops_per_s;
  aot (--aot runs): topology, preset, dtype, mesh_request, rules, hbm_bytes_table, fit_fraction;
  records: one per (kind, mask, depth, batch), in run order:
    every kind: mode (the mask), kind, depth, width, batch, dtype, compile_s, memory_bytes (XLA's
      arguments + outputs + temporaries - aliased, per device), or error + traceback on failure;
    train: heads, seq_len, seconds (median s/step), all_s, tokens_per_s, images_per_s, params,
      analytic_flops(_useful), analytic_flops_per_s, xla_flops, xla_flops_per_s, xla_bytes_accessed,
      utilisation (analytic FLOP/s over the measured matmul peak), utilisation_xla, memory, loss;
    sample: seconds (median s/batch, tokens + decode), images_per_s, tokens_per_s,
      seconds_tokens_only, images_per_s_tokens_only, seconds_decode, memory_bytes (tokens program),
      decode_memory_bytes, decode_compile_s, xla_flops, decode_xla_flops, sampler, tokenizer (ch,
      full_size: whether it is VAR's ch-160 tokenizer), sanity;
    aot_train / aot_sample: topology, chips, device_kind, mesh, rules, per_chip_bytes, memory
      (argument/output/temp/alias/generated_code _size_in_bytes), generated_code_bytes, xla_flops and
      xla_bytes_accessed (per chip), hbm_bytes, fits (per_chip_bytes <= 80% of HBM),
      analytic_flops_per_chip (train).
A Markdown table of the records is printed at the end. A configuration that fails records its error
and the run goes on.
"""
from __future__ import annotations

import json
import sys
import time

import jax

from srdd_jax import files
from srdd_jax.bench import suite, vs_var
from srdd_jax.bench.aot import FIT_FRACTION, HBM_BYTES, run_aot
from srdd_jax.bench.base import T0, fail, gb, log
from srdd_jax.bench.flags import parse_args
from srdd_jax.bench.timing import environment, matmul_peak, run_timed
from srdd_jax.config import ConfigError, ints
from srdd_jax.parallel.mesh import check_topology_name
from srdd_jax.transformer.config import VARConfig, preset

SCHEMA = 'srdd_jax.bench/1'


# --- the report ------------------------------------------------------------------------------------

def _f(x, spec):
  return '-' if x is None else format(x, spec)


def markdown_table(records) -> str:
  """The timed records, then the AOT records, as Markdown tables."""
  timed = [r for r in records if r.get('kind') in ('train', 'sample')]
  aot = [r for r in records if str(r.get('kind', '')).startswith('aot_')]
  lines = []
  if timed:
    lines += ['| mode | kind | depth | width | batch | s (median) | tokens/s | images/s | images/s tokens only '
              '| TFLOP/s analytic | TFLOP/s XLA | utilisation | memory GiB |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in timed:
      if 'error' in r:
        lines.append(f'| {r["mode"]} | {r["kind"]} | {r["depth"]} | {r["width"]} | {r["batch"]} | error: '
                     f'{r["error"].splitlines()[0][:120]} | | | | | | | |')
        continue
      tf = lambda k: _f(r.get(k) and r[k] / 1e12, '.4g')
      lines.append(
          f'| {r["mode"]} | {r["kind"]} | {r["depth"]} | {r["width"]} | {r["batch"]} | {r["seconds"]:.3f} | '
          f'{_f(r.get("tokens_per_s"), ",.0f")} | {_f(r.get("images_per_s"), ".2f")} | '
          f'{_f(r.get("images_per_s_tokens_only"), ".2f")} | {tf("analytic_flops_per_s")} | '
          f'{tf("xla_flops_per_s")} | {_f(r.get("utilisation"), ".3f")} | {gb(r.get("memory_bytes"))} |')
  if aot:
    if lines:
      lines.append('')
    lines += ['| mode | kind | topology | chips | mesh | depth | batch | GiB per chip | of HBM GiB | fits 80% '
              '| TFLOP per chip | GB accessed per chip | code MiB | compile s |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in aot:
      if 'error' in r:
        lines.append(f'| {r["mode"]} | {r["kind"]} | {r["topology"]} | {r["chips"]} | | {r["depth"]} | '
                     f'{r["batch"]} | error: {r["error"].splitlines()[0][:120]} | | | | | | |')
        continue
      mesh = 'x'.join(str(v) for v in r['mesh'].values())
      lines.append(
          f'| {r["mode"]} | {r["kind"]} | {r["topology"]} | {r["chips"]} | {mesh} | {r["depth"]} | '
          f'{r["batch"]} | {gb(r["per_chip_bytes"])} | {gb(r["hbm_bytes"])} | {r["fits"]} | '
          f'{_f(r.get("xla_flops") and r["xla_flops"] / 1e12, ".4g")} | '
          f'{_f(r.get("xla_bytes_accessed") and r["xla_bytes_accessed"] / 1e9, ".4g")} | '
          f'{_f(r.get("generated_code_bytes") and r["generated_code_bytes"] / 2**20, ".2f")} | '
          f'{r["compile_s"]:.1f} |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  try:  # The comma-separated flags, read before anything runs ('' or absent: the default).
    mesh_shape, depths, batches, sample_batches = (
        ints(v or '', f) for v, f in ((args.mesh, '--mesh'), (args.depths, '--depths'),
                                      (args.batches, '--batches'), (args.sample_batches, '--sample_batches')))
    patch_nums = ints(args.patch_nums, '--patch_nums') if args.patch_nums else None
  except ConfigError as e:
    fail(str(e))
  for flag, values in (('--depths', depths), ('--batches', batches), ('--sample_batches', sample_batches),
                       ('--patch_nums', patch_nums or ())):
    if any(v < 1 for v in values):
      fail(f'{flag} {",".join(map(str, values))}: every value must be >= 1')
  if patch_nums and any(b <= a for a, b in zip(patch_nums, patch_nums[1:])):
    fail(f'--patch_nums {args.patch_nums}: the sides must increase strictly')
  folder = files.dirname(files.absolute(args.out))
  if not files.isdir(folder):  # Found now, not when the first record is written, minutes in.
    fail(f'--out {args.out}: the folder {folder} does not exist')
  if args.aot:
    try:
      check_topology_name(args.aot, '--aot')
    except ConfigError as e:
      fail(str(e))
  if args.vs_var is not None or args.suite:
    # This process only coordinates: should anything here touch a JAX backend, it must not be the
    # accelerator's (JAX would take most of its memory from the workers).
    jax.config.update('jax_platforms', 'cpu')
    run = suite.run_suite if args.suite else vs_var.run_vs_var
    return run(args, sys.argv if argv is None else list(argv))
  results = {'schema': SCHEMA, 'argv': sys.argv if argv is None else list(argv), 'args': vars(args),
             'weights': 'random: the cost of a step or a sampling pass does not depend on the values',
             'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'env': environment(), 'records': []}

  def save(_=None):
    results['wall_s'] = time.perf_counter() - T0
    files.write_text(args.out, json.dumps(results, indent=1, default=str))

  def on_record(rec):
    results['records'].append(rec)
    save()

  env = results['env']
  log(f'bench: {env["device_kind"]} ({env["backend"]}, {env["device_count"]} devices), jax {env["jax"]}')
  if args.aot:
    dtype = args.dtype or 'bfloat16'
    try:
      base = preset(args.preset or 'd16', dtype=dtype, scan_blocks=args.scan != 0, remat=args.remat or 'none',
                    attention=args.attention or 'splash')
    except ValueError as e:
      fail(f'--preset: {e}')
    batch = args.batch or 256
    if not mesh_shape:
      fail(f'--mesh {args.mesh!r}: expected the sizes data,fsdp,tensor')
    results['aot'] = {'topology': args.aot, 'preset': args.preset or 'd16', 'dtype': dtype,
                      'mesh_request': list(mesh_shape), 'rules': args.rules, 'hbm_bytes_table': HBM_BYTES,
                      'fit_fraction': FIT_FRACTION}
    try:
      run_aot(args.aot, base, args.masks, batch, args.sample_batch or batch, mesh_shape, args.rules,
              args.kinds, args.tokenizer_ch or 160, on_record)
    except (ValueError, RuntimeError) as e:
      fail(str(e))
  else:
    accel = env['backend'] != 'cpu'
    # --quick is the issue's reference configuration, float32 everywhere.
    dtype = args.dtype or ('bfloat16' if accel and not args.quick else 'float32')
    depths = depths or ((6,) if args.quick or not accel else (16, 20, 24, 30))
    batches = batches or ((64,) if accel and not args.quick else (8,))
    sample_batches = sample_batches or (32,)
    repeats = args.repeats or (2 if args.quick else 5)
    ch = args.tokenizer_ch or (32 if args.quick and not accel else 160)
    sizes = (1024, 2048) if not accel else (4096, 8192)
    model = dict(scan_blocks=bool(accel if args.scan is None else args.scan), remat=args.remat or 'none',
                 attention=args.attention or 'auto', cpu_matmul=args.cpu_matmul or 'float32')
    # What the flags resolved to here, so a second implementation can run the same shapes (--vs-var).
    results['resolved'] = {'depths': list(depths), 'batches': list(batches), 'sample_batches': list(sample_batches),
                           'masks': list(args.masks), 'kinds': list(args.kinds), 'dtype': dtype,
                           'repeats': repeats, 'warmup': args.warmup, 'tokenizer_ch': ch,
                           'patch_nums': list(patch_nums or VARConfig().patch_nums), 'width': args.width,
                           'heads': args.heads, **model}
    results['matmul_peak'] = matmul_peak(sizes, 3 if not accel else 10, dtype)
    save()
    run_timed(depths, batches, sample_batches, args.masks, dtype, repeats, args.warmup, ch,
              results['matmul_peak']['peak_flops_per_s'], args.width, args.heads, patch_nums=patch_nums,
              kinds=args.kinds, on_record=on_record, model=model)
  save()
  log(f'wrote {args.out}')
  print(markdown_table(results['records']), flush=True)
  print(f'\nWall time: {results["wall_s"]:.1f} s', flush=True)
