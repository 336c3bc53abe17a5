"""The smallest v5p slice where each VAR size trains at its recipe batch, both masks (TPU AOT compile).

  python -m benchmarks.aot_sweep --out docs/aot [--presets d16,d20,d24,d30]

For every preset, slices are tried from small to large with `python -m srdd_jax.bench --aot`; the first
where the train step of both masks fits in 80% of HBM also compiles the sampler (batch 256) and is
recorded. One JSON per (preset, topology) tried under --out, and a Markdown summary printed.
A thin caller of srdd_jax.bench. Record: docs/PERFORMANCE.md, "The smallest v5p slice for each VAR size", and
docs/aot/, measured at commit 6360e98.
"""
import argparse
import json
import os
import subprocess
import sys

RECIPE_BATCH = {'d16': 768, 'd20': 768, 'd24': 768, 'd30': 1024}
SLICES = ('v5p:2x2x1', 'v5p:2x2x2', 'v5p:2x2x4', 'v5p:2x4x4', 'v5p:4x4x4', 'v5p:4x4x8')


def bench(out, topology, preset, kinds, extra=()):
  cmd = [sys.executable, '-m', 'srdd_jax.bench', '--aot', topology, '--preset', preset, '--batch',
         str(RECIPE_BATCH[preset]), '--sample_batch', '256', '--kinds', kinds, '--out', out, *extra]
  print('+', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=False)
  with open(out) as f:
    return json.load(f)['records']


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--out', required=True)
  ap.add_argument('--presets', default='d16,d20,d24,d30')
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for preset in args.presets.split(','):
    for topo in SLICES:
      name = os.path.join(args.out, f'{preset}_{topo.replace(":", "_")}')
      recs = bench(name + '_train.json', topo, preset, 'train')
      if all(r.get('fits') for r in recs) and len(recs) == 2:
        recs += bench(name + '_sample.json', topo, preset, 'sample')
        rows += recs
        break
      rows += recs
  print('| preset | topology | mask | kind | batch | GiB per chip | fits 80% | compile s |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    gib = r['per_chip_bytes'] / 2 ** 30 if r.get('per_chip_bytes') else float('nan')
    print(f'| d{r["depth"]} | {r["topology"]} | {r["mode"]} | {r["kind"]} | {r["batch"]} | {gib:.2f} | '
          f'{r.get("fits")} | {r.get("compile_s", 0):.0f} |')


if __name__ == '__main__':
  main()
