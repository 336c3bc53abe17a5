"""The tables of docs/pod/README.md from the records beside it (rehearsal_*.json, aot.json).

  python -m benchmarks.pod_report [--dir docs/pod]   # prints Markdown
"""
import argparse
import glob
import json
import os


def rehearsal_table(directory: str) -> list[str]:
  lines = ['| record | slice | processes x devices | mesh | a host\'s rows (host 0) | loss, max rel. diff | '
           'grad norm, max rel. diff | parameters: max abs. diff (worst leaf, rel. to its scale) | leaves bit-identical | s |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for path in sorted(glob.glob(os.path.join(directory, 'rehearsal_*.json'))):
    with open(path) as f:
      r = json.load(f)
    name = r['topology'] + (f' x{r["slices"]} slices' if r['slices'] > 1 else '')
    rows = ', '.join(f'{a}-{b - 1}' for a, b in r['rows']['0'])
    lines.append(f'| {os.path.basename(path)} | {name} | {r["processes"]} x {r["chips_per_host"]} | '
                 f'{r["mesh"]["data"]}x{r["mesh"]["fsdp"]}x{r["mesh"]["tensor"]} | {rows} of {r["global_batch"]} | '
                 f'{r["loss_max_rel_diff"]:.1e} | {r["grad_norm_max_rel_diff"]:.1e} | {r["param_max_abs_diff"]:.1e} '
                 f'({r["param_worst_leaf"]}, {r["param_worst_rel_diff"]:.1e}) | '
                 f'{r["param_leaves_bit_identical"]}/{r["param_leaves"]} | {r["seconds"]:.0f} |')
  return lines


def aot_table(directory: str) -> list[str]:
  path = os.path.join(directory, 'aot.json')
  if not os.path.exists(path):
    return ['(no aot.json)']
  with open(path) as f:
    records = json.load(f)['records']
  # XLA's FLOP count is left out: it does not follow the chips (v5p-64 to -128 per chip 0.51 -> 0.85 TFLOP
  # for d16, with fsdp 64 or 8 alike), so it is no measure of the step's work here; aot.json keeps it.
  lines = ['| config | slice | batch | mesh | per chip GiB | HBM GiB | fits (80%) | compile s (loaded CPU) |',
           '|---|---|---|---|---|---|---|---|']
  for r in records:
    if 'error' in r:
      lines.append(f'| {r["config"]} | {r["slice"]} | {r["global_batch"]} | error: {r["error"][:150]} | | | | |')
      continue
    m = r['mesh']
    lines.append(f'| {r["config"]} | {r["slice"]} | {r["global_batch"]} | {m["data"]}x{m["fsdp"]}x{m["tensor"]} | '
                 f'{r["per_chip_bytes"] / 2**30:.1f} | {r["hbm_bytes"] / 2**30:.0f} | {r["fits"]} | '
                 f'{r["compile_s"]:.0f} |')
  return lines


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--dir', default='docs/pod')
  a = ap.parse_args(argv)
  print('\n'.join(rehearsal_table(a.dir) + [''] + aot_table(a.dir)))


if __name__ == '__main__':
  main()
