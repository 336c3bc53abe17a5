"""The users' train step, compiled ahead of time for the pods they run it on: each preset of a config
file, with that config's own mesh, batch, remat and dtypes (what `--mode=train` builds), on each slice.

  python -m benchmarks.pod_aot --out docs/pod/aot.json [--config configs/ffhq.py] [--presets d16,d20,d24,d30]
      [--topologies v5p:2x4x4,v5p:4x4x4,v5p:4x4x8]

libtpu compiles for the TPU topology on this host (no TPU). Each (preset, topology) is one record: the
mesh the run builds, per-chip bytes against HBM, XLA's FLOPs, compile seconds, or the error. The record
file is rewritten after every compile, so a stopped sweep keeps what it finished and a rerun skips it.
Record: docs/pod/aot.json and docs/pod/README.md (issue 43 line 2).
"""
import argparse
import json
import os
import sys
import time

from srdd_jax.config import load_file
from srdd_jax.modes.scaling import compiled_memory

NAMES = {'v5p:2x2x4': 'v5p-32', 'v5p:2x4x4': 'v5p-64', 'v5p:4x4x4': 'v5p-128', 'v5p:4x4x8': 'v5p-256'}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--out', required=True)
  ap.add_argument('--config', default='configs/ffhq.py')
  ap.add_argument('--presets', default='d16,d20,d24,d30')
  ap.add_argument('--topologies', default='v5p:2x4x4,v5p:4x4x4,v5p:4x4x8')
  ap.add_argument('--mesh', default='', help="data,fsdp,tensor instead of the config's mesh")
  a = ap.parse_args(argv)
  records = []
  if os.path.exists(a.out):
    with open(a.out) as f:
      records = json.load(f)['records']
  done = {(r['config'], r['topology']) for r in records if 'error' not in r}
  for topology in a.topologies.split(','):
    for preset in a.presets.split(','):
      spec = f'{a.config}:{preset}'
      if (spec, topology) in done:
        continue
      c = load_file(spec)
      if a.mesh:
        c.mesh.update(dict(zip(('data', 'fsdp', 'tensor'), (int(v) for v in a.mesh.split(',')))))
      print(f'{spec} on {topology} ({NAMES.get(topology, topology)}): compiling, batch '
            f'{c.train.global_batch}, mesh request {dict(c.mesh)}', flush=True)
      t = time.time()
      rec = {'config': spec, 'topology': topology, 'slice': NAMES.get(topology, topology),
             'global_batch': int(c.train.global_batch), 'mesh_request': dict(c.mesh), 'remat': c.model.remat,
             'dtype': c.model.dtype, **compiled_memory(c, topology), 'wall_s': round(time.time() - t, 1)}
      print('  ' + json.dumps(rec), flush=True)
      records = [r for r in records if (r['config'], r['topology']) != (spec, topology)] + [rec]
      with open(a.out + '.tmp', 'w') as f:
        json.dump({'command': ' '.join(['python -m benchmarks.pod_aot', *sys.argv[1:]]), 'records': records}, f,
                  indent=1)
      os.replace(a.out + '.tmp', a.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
