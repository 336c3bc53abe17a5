"""A run whose workdir is in a bucket (issue 43 line 4), against a GCS server on this machine: the
pure-Python emulator of PyPI's gcp-storage-emulator, in memory, one per test module (tests/gcs_emulator.py
adds the two GCS behaviours it lacks). The code under
test is the real gs:// code: etils.epath through gcsfs (which follows STORAGE_EMULATOR_HOST) and Orbax
through TensorStore's GCS driver (TENSORSTORE_GCS_HTTP_URL; GOOGLE_AUTH_TOKEN_FOR_TESTING stands for
the credentials the emulator does not check). Every file of a run must land in the bucket and none on
the local disk: each run starts in an empty working directory, which must still be empty at its end.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from srdd_jax import files, main
from tests.conftest import require_libtpu, save_small_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'srdd-test'
SMOKE = [f'--config={REPO}/configs/smoke.py', '--config.model.depth=1']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def emulator_env(port: int) -> dict:
  url = f'http://127.0.0.1:{port}'
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
          'TENSORSTORE_GCS_HTTP_VERSION': '1.1', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'NO_GCE_CHECK': 'true',
          'EPATH_USE_TF': 'false'}


def _forget_clients():
  """gcsfs keeps one client per set of arguments, made with the emulator address of its time."""
  import gcsfs  # pylint: disable=import-outside-toplevel
  gcsfs.GCSFileSystem.clear_instance_cache()


def _restore(saved: dict) -> None:
  """The environment variables `saved` names back as they were (None: unset), and fresh store clients."""
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  _forget_clients()


@pytest.fixture(scope='module')
def bucket(tmp_path_factory):
  """gs://srdd-test on an emulator of this module's own; this process's environment points at it."""
  pytest.importorskip('gcp_storage_emulator', reason='pip install gcp-storage-emulator (the test extra)')
  port = _free_port()
  # Its log in a file: a pipe nobody reads fills, and the single-threaded server blocks writing to it.
  log = open(tmp_path_factory.mktemp('emulator') / 'emulator.log', 'w+b')  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'tests', 'gcs_emulator.py'), str(port), BUCKET],
                          stdout=log, stderr=log)
  deadline = time.time() + 30
  while True:
    with contextlib.suppress(OSError), socket.create_connection(('127.0.0.1', port), timeout=1):
      break
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      log.seek(0)
      pytest.fail(f'the GCS emulator did not start: {log.read().decode()[-2000:]}')
    time.sleep(0.2)
  env = emulator_env(port)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  _forget_clients()
  try:
    yield env
  finally:
    _restore(saved)
    proc.kill()
    proc.wait()
    log.close()


def objects(root: str) -> list[str]:
  """Every object under bucket path `root`, relative to it."""
  return sorted(files.relpath(files.join(d, f), root) for d, _, names in files.walk(root) for f in names)


def _scalar_steps(path: str, tag: str) -> list[int]:
  """The steps of scalar `tag` in a TensorBoard event file, read record by record as TensorBoard does."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
  data, at, steps = files.read_bytes(path), 0, []
  while at < len(data):
    (n,) = np.frombuffer(data[at:at + 8], '<u8')
    event = event_pb2.Event.FromString(data[at + 12:at + 12 + int(n)])
    at += 12 + int(n) + 4
    steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
  """An empty working directory for the test, checked empty at its end: nothing of a run whose paths are
  all in the bucket lands on the local disk (as a folder named gs:, say)."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield cwd
  assert not os.listdir(cwd), os.listdir(cwd)


def test_a_training_run_in_a_bucket(bucket, empty_cwd, capsys):
  """configs/smoke.py trained in gs://, resumed there from its checkpoint, a second run refused while the
  first holds the lease."""
  del bucket, empty_cwd
  wd = f'gs://{BUCKET}/smoke'
  args = ['srdd_jax.main', *SMOKE, f'--workdir={wd}', '--mode=train', '--config.train.checkpoint_every=2']
  assert main.run(args + ['--config.train.steps=2']) == 0
  assert main.run(args + ['--config.train.steps=3']) == 0
  out = objects(wd)
  assert 'checkpoints/2/commit_success.txt' in out and 'checkpoints/3/commit_success.txt' in out
  assert 'export/step_00000003/model.json' in out and any(o.startswith('export/step_00000003/params/') for o in out)
  events = [o for o in out if o.startswith('events.out.tfevents.')]  # TensorBoard's, through our writer.
  assert len(events) == 2 and sorted(s for e in events for s in _scalar_steps(f'{wd}/{e}', 'loss')) == [1, 2, 3]
  assert '.srdd.lock' not in out  # The lease is given back at the end.
  records = [json.loads(line) for line in files.read_text(f'{wd}/metrics.jsonl').splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3]  # The resumed run logged its one step, once.
  summary = json.loads(capsys.readouterr().out.rsplit('\n{\n', 1)[-1].join(['{\n', '']))
  assert summary['start_step'] == 2 and summary['end_step'] == 3  # Resumed from the bucket's checkpoint.


def test_every_stage_in_a_bucket_and_a_resume(bucket, empty_cwd, capsys):
  """--mode=all with the workdir, the tokenizer it is given and everything it writes in gs://: run to its
  end, then run again with more steps, which resumes training from the bucket's checkpoint, keeps the
  token cache and replaces the samples and the evaluation (committed with a marker: no rename there)."""
  del bucket, empty_cwd
  tokenizer = save_small_tokenizer(f'gs://{BUCKET}/models')
  wd = f'gs://{BUCKET}/all'
  args = ['srdd_jax.main', *SMOKE, f'--workdir={wd}', '--mode=all', f'--config.tokenizer.checkpoint={tokenizer}',
          '--config.data.source=digits', '--config.data.flip=False', '--config.tokenize.max_examples=64',
          '--config.train.checkpoint_every=2', '--config.eval.proxy_epochs=1', '--config.eval.proxy_examples=100']
  assert main.run(args + ['--config.train.steps=2']) == 0
  first = files.read_json(f'{wd}/stages.json')
  eval_1 = files.read_json(f'{wd}/eval/eval.json')
  assert main.run(args + ['--config.train.steps=3']) == 0
  out = objects(wd)
  for name in ('stages.json', 'summary.json', 'tokens/manifest.json', 'checkpoints/3/commit_success.txt',
               'export/step_00000003/model.json', 'samples/samples.npz', 'samples/grid.png',
               'samples/grid_10x10.png', 'samples/commit_success.txt', 'eval/eval.json', 'eval/commit_success.txt',
               'metrics.jsonl'):
    assert name in out, (name, out)
  assert not any('.partial' in o or o.startswith('gs:') for o in out), out  # Swaps finished, nothing stray.
  assert any(o.startswith('proxy_classifier/') for o in out)
  summary = files.read_json(f'{wd}/summary.json')
  assert summary['outputs']['model'] == f'{wd}/export/step_00000003'
  assert files.read_json(f'{wd}/stages.json')['tokenize'] == first['tokenize']  # The cache was kept.
  eval_2 = files.read_json(f'{wd}/eval/eval.json')
  assert eval_2['protocol']['samples_file'] != eval_1['protocol']['samples_file']  # Samples of the new model.
  with files.np_load(f'{wd}/samples/samples.npz') as z:
    assert z['arr_0'].shape == (8, 8, 8, 3)
  assert [json.loads(line)['step'] for line in files.read_text(f'{wd}/metrics.jsonl').splitlines()] == [1, 2, 3]
  capsys.readouterr()


def test_two_processes_train_in_a_bucket(bucket, tmp_path):
  """The multi-process run of issue 43's line 1 (tests/test_pod.py) with its workdir and tokenizer in gs://:
  2 processes playing the 2 hosts of v5p-16 (4 devices each, ordered as JAX orders its chips, so each
  holds scattered rows), configs/smoke.py at depth 1. Process 0 alone writes the shared files, both write
  the checkpoint, and neither leaves a file in its working directory or its temporary directory."""
  require_libtpu()
  from srdd_jax.parallel import mesh as pm  # pylint: disable=import-outside-toplevel
  layout = tmp_path / 'layout.json'
  layout.write_text(json.dumps(pm.describe(pm.topology_devices('v5p:2x2x2'))))
  from srdd_jax.tokenizer.api import Tokenizer, tokenizer_config, unbox  # pylint: disable=import-outside-toplevel
  from srdd_jax.convert import params_io  # pylint: disable=import-outside-toplevel
  from tests.conftest import smoke_config  # pylint: disable=import-outside-toplevel
  vq = tokenizer_config(smoke_config())
  params = jax.device_get(jax.jit(lambda k: unbox(Tokenizer(vq).init(k)))(jax.random.PRNGKey(1)))
  vae = params_io.save_params(f'gs://{BUCKET}/two_vae', params, kind='vqvae', config=vq)
  wd = f'gs://{BUCKET}/two'
  cwd, tmp = tmp_path / 'cwd', tmp_path / 'tmp'
  cwd.mkdir()
  tmp.mkdir()
  env = dict(os.environ, **bucket, PYTHON=sys.executable, JAX_PLATFORMS='cpu', TMPDIR=str(tmp),
             **{pm.ENV_REHEARSE: 'v5p:2x2x2', pm.ENV_REHEARSE_LAYOUT: str(layout)})
  env.pop('XLA_FLAGS', None)
  two = subprocess.run(['bash', os.path.join(REPO, 'launch', 'local.sh'), '2', '4', str(tmp_path / 'logs'), '--',
                        *SMOKE, f'--workdir={wd}', '--mode=train', '--config.train.steps=3',
                        '--config.train.checkpoint_every=3', f'--config.tokenizer.checkpoint={vae}'],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  logs = [(tmp_path / 'logs' / f'process_{i}.log').read_text() for i in range(2)]
  assert two.returncode == 0, two.stderr + logs[0][-3000:] + logs[1][-3000:]
  assert 'process 1 of 2, 4 local / 8 global devices' in logs[1]
  assert 'devices ordered as JAX orders the chips of v5p:2x2x2' in logs[0]
  out = objects(wd)
  assert 'checkpoints/3/commit_success.txt' in out and 'export/step_00000003/model.json' in out
  assert [json.loads(line)['step'] for line in files.read_text(f'{wd}/metrics.jsonl').splitlines()] == [1, 2, 3]
  assert not os.listdir(cwd) and not os.listdir(tmp), (os.listdir(cwd), os.listdir(tmp))


def test_the_lease_of_a_bucket_workdir(bucket, monkeypatch):
  """The lock of a workdir in a bucket is a lease object: a second run is refused while it is renewed,
  and a lease its run stopped renewing (killed) is taken over once it has expired."""
  del bucket
  from srdd_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  from srdd_jax.parallel import workdir  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(workdir, 'LEASE_SECONDS', 2.0)  # Renewed every 0.5 s, held 2 s unrenewed.
  wd = f'gs://{BUCKET}/leased'
  lease = f'{wd}/{workdir.LOCK_NAME}'
  with workdir.WorkdirLock(wd):
    held = files.read_json(lease)
    assert held['pid'] == os.getpid() and held['expires'] > time.time()
    time.sleep(3)  # Past one lease term: renewed meanwhile.
    assert files.read_json(lease)['token'] == held['token'] and files.read_json(lease)['expires'] > time.time()
    with pytest.raises(ConfigError, match=f'is in use by process {os.getpid()}'):
      workdir.WorkdirLock(wd).acquire()
  assert not files.exists(lease)  # Given back.
  # A run killed while holding it: its lease stays until it expires, then the next run takes it.
  files.write_json(lease, {**held, 'pid': 1, 'expires': time.time() + 1})
  with pytest.raises(ConfigError, match='is in use by process 1'):
    workdir.WorkdirLock(wd).acquire()
  time.sleep(1.5)
  with workdir.WorkdirLock(wd):
    assert files.read_json(lease)['pid'] == os.getpid()


def test_a_bucket_that_cannot_be_reached_is_one_line(tmp_path, capsys):
  """gs:// without credentials: one `error:` line, exit 2, before any work (nothing written anywhere);
  without an answer from the store: the same, after the probe's timeout."""
  home = tmp_path / 'home'
  home.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in emulator_env(0) and k != 'GOOGLE_APPLICATION_CREDENTIALS'}
  env.update(HOME=str(home), CLOUDSDK_CONFIG=str(home / 'gcloud'), NO_GCE_CHECK='true', JAX_PLATFORMS='cpu',
             GCE_METADATA_HOST='127.0.0.1:9', GCE_METADATA_IP='127.0.0.1:9')
  r = subprocess.run([sys.executable, '-m', 'srdd_jax.main', f'--config={REPO}/configs/smoke.py',
                      '--workdir=gs://no-such-bucket/run', '--mode=train'], cwd=home, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: --workdir=gs://no-such-bucket/run: no Google Cloud '
                                                 'credentials'), r.stderr[-2000:]
  assert 'Traceback' not in r.stderr and not os.listdir(home)
  # Credentials, but nothing answers (no network): the probe gives up after its timeout.
  port = _free_port()
  monkey_env = emulator_env(port)
  saved = {k: os.environ.get(k) for k in monkey_env}
  os.environ.update(monkey_env)
  _forget_clients()
  os.environ['SRDD_STORE_PROBE_SECONDS'] = '3'
  try:
    t0 = time.time()
    assert main.run(['srdd_jax.main', *SMOKE, '--workdir=gs://no-such-bucket/run', '--mode=train']) == 2
    assert time.time() - t0 < 10
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: --workdir=gs://no-such-bucket/run: '), err
  finally:
    os.environ.pop('SRDD_STORE_PROBE_SECONDS')
    _restore(saved)


def test_data_given_as_bucket_paths(bucket):
  """A folder of images in a bucket is a data set like a local one (config.data.source='folder')."""
  del bucket
  from srdd_jax.data.folder import FolderSource  # pylint: disable=import-outside-toplevel
  root = f'gs://{BUCKET}/images'
  rng = np.random.default_rng(0)
  for c in ('cats', 'dogs'):
    for i in range(2):
      files.save_image(f'{root}/{c}/{i}.png', rng.integers(0, 255, (12, 10, 3), np.uint8))
  src = FolderSource(root, 'subfolder', image_size=8)
  assert (src.num_examples, src.num_classes, src.classes) == (4, 2, ['cats', 'dogs'])
  assert src.name(3) == f'{root}/dogs/1.png'
  image, label = src.load(3)
  assert label == 1 and np.asarray(image).shape[-1] == 3


def test_a_missing_bucket_is_one_line(bucket, capsys):
  del bucket
  assert main.run(['srdd_jax.main', *SMOKE, '--workdir=gs://no-such-bucket/run', '--mode=train']) == 2
  assert capsys.readouterr().err == "error: --workdir=gs://no-such-bucket/run: bucket 'no-such-bucket' does not exist\n"


def test_outputs_in_a_bucket_are_committed_with_a_marker(bucket):
  """Without rename, new outputs are written beside the old ones, committed by a marker written last, then
  copied over them (the marker last again): a run stopped before the commit leaves the old ones (its
  partial folder removed by the next run), one stopped after it has its swap finished by the next run."""
  del bucket
  from srdd_jax.parallel.workdir import Outputs  # pylint: disable=import-outside-toplevel
  final = f'gs://{BUCKET}/outputs/eval'

  def write(text):
    out = Outputs(final, 'evaluation', overwrite=True)
    out.claim()
    files.write_text(files.join(out.begin(), 'eval.json'), text)
    return out

  write('1').commit()
  assert objects(final) == ['commit_success.txt', 'eval.json'] and files.read_text(f'{final}/eval.json') == '1'
  write('2')  # Stopped before its commit: the old outputs stand, the next run removes the partial folder.
  assert files.committed(final) and not Outputs(final, 'evaluation').pending()
  write('3').commit()
  assert files.read_text(f'{final}/eval.json') == '3' and not files.exists(f'{final}.partial/eval.json')
  # Stopped in the middle of the swap (committed, the old outputs half removed): finished by the next run.
  files.write_text(f'{final}.partial/eval.json', '4')
  files.commit(f'{final}.partial')
  files.remove(f'{final}/commit_success.txt')
  assert Outputs(final, 'evaluation').pending()
  Outputs(final, 'evaluation', overwrite=True).claim()
  assert files.read_text(f'{final}/eval.json') == '4' and files.committed(final)
  assert not files.exists(f'{final}.partial/eval.json')
