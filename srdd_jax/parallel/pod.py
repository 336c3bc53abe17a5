"""Is this process one host of a multi-host Cloud TPU slice? Asked when no multi-process start was
requested: a host started as a lone process does not train together with the others, so it starts
`jax.distributed` itself, as --multihost would.

The signs are those JAX's own cluster detection (jax._src.clusters.cloud_tpu_cluster) reads: TPU chips
on this machine's PCI bus, then the worker list of GKE's environment or of the TPU VM's metadata
server, or a multislice slice count. Without TPU chips nothing is asked, so no other machine waits on
a metadata server that is not there.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Callable, Mapping

try:  # JAX's own count of the TPU chips on the PCI bus (private: a JAX without it cannot tell either).
  from jax._src import hardware_utils
except ImportError:
  hardware_utils = None

# Worker lists, comma-separated: set on GKE's TPU hosts.
WORKER_LIST_VARIABLES = ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES')
_METADATA_TIMEOUT_S = 5


def tpu_chips() -> int:
  """TPU chips attached to this machine (0 where it cannot be told)."""
  try:
    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except (AttributeError, OSError, ValueError, IndexError, TypeError):
    return 0


def metadata(key: str, environ: Mapping[str, str]) -> str | None:
  """An attribute of this TPU VM from the GCE metadata server, or None where it has none or none answers."""
  host = environ.get('GCE_METADATA_IP', 'metadata.google.internal')
  request = urllib.request.Request(f'http://{host}/computeMetadata/v1/instance/attributes/{key}',
                                   headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=_METADATA_TIMEOUT_S) as r:
      return r.read().decode()
  except (urllib.error.URLError, OSError, ValueError):
    return None


def _count(hosts: str | None) -> int:
  return len([h for h in (hosts or '').split(',') if h.strip()])


def detect(environ: Mapping[str, str] | None = None, chips: int | None = None,
           read_metadata: Callable[[str, Mapping[str, str]], str | None] | None = None) -> str | None:
  """What shows this process to be one of several TPU hosts (for the log and for errors), or None.

  The arguments replace the process's environment, its chip count and the metadata server (tests).
  """
  environ = os.environ if environ is None else environ
  chips = tpu_chips() if chips is None else chips
  if chips <= 0:
    return None
  for name in WORKER_LIST_VARIABLES:
    if _count(environ.get(name)) > 1:
      return f'${name} names {_count(environ.get(name))} TPU hosts'
  slices = environ.get('MEGASCALE_NUM_SLICES', '').strip()
  if slices.isdigit() and int(slices) > 1:
    return f'$MEGASCALE_NUM_SLICES={slices} TPU slices'
  if environ.get('TPU_SKIP_MDS_QUERY') is not None:  # JAX's own switch: not a GCE TPU VM.
    return None
  workers = _count((read_metadata or metadata)('worker-network-endpoints', environ))
  if workers > 1:
    return f'the TPU VM metadata names {workers} TPU hosts'
  return None
