"""launch/launch.py tpu and launch/tpu_host.sh, offline: the paths checked before a launch, the Python a
stock TPU VM image gets, and a run detached from SSH with its log in the workdir, ended by a relaunch."""
import os
import subprocess
import sys
import time

from tests.conftest import REPO

HOST = os.path.join(REPO, 'launch', 'tpu_host.sh')
FFHQ = ['--', '--config=configs/ffhq.py', '--workdir=gs://bucket/ffhq', '--mode=train']


def _launch(*args):
  r = subprocess.run([sys.executable, os.path.join(REPO, 'launch', 'launch.py'), *args], capture_output=True,
                     text=True, check=False, cwd=REPO)
  return r.returncode, r.stdout, r.stderr


def test_every_path_is_synced_or_checked():
  tpu = ['tpu', '--name=pod', '--zone=z', '--sync', '--dry-run']
  rc, out, err = _launch(*tpu, *FFHQ)
  # configs/ffhq.py's tokenizer is relative and not committed: no worker would have it.
  assert rc == 2 and not out and err.count('\n') == 1
  assert "config.tokenizer.checkpoint='checkpoints/vae_ch160v4096z32'" in err
  rc, out, err = _launch(*tpu, *FFHQ, '--config.tokenizer.checkpoint=gs://b/vae', '--config.data.path=/mnt/ffhq')
  assert rc == 0, err
  assert "tpu_host.sh check gs://bucket gs://b/vae /mnt/ffhq" in out  # On every host, before the stop and the start.
  assert out.index('tpu_host.sh check') < out.index('tpu_host.sh stop') < out.index('tpu_host.sh start')
  # Committed: in the archive. Here but not committed: copied beside it.
  rc, out, err = _launch(*tpu, *FFHQ, '--config.tokenizer.checkpoint=assets/fashion_mnist_tokenizer',
                         '--config.data.path=.pytest_cache')
  assert rc == 0, err
  assert 'check gs://bucket\'' in out and ' -czf /tmp/srdd_jax_pod_inputs.tar.gz .pytest_cache' in out
  assert 'tar xzf srdd_jax_inputs.tar.gz' in out
  rc, _, err = _launch(*tpu, '--', '--config=configs/nope.py', '--workdir=/w')
  assert rc == 2 and "--config=configs/nope.py: no config file 'configs/nope.py'" in err
  # Without --sync the repository on the workers is what there is: relative paths are checked there.
  rc, out, err = _launch('tpu', '--name=pod', '--zone=z', '--dry-run', *FFHQ)
  assert rc == 0, err
  assert 'check configs/ffhq.py gs://bucket checkpoints/vae_ch160v4096z32 data/ffhq' in out
  assert 'LIBTPU_INIT_ARGS=' in out and '--xla_tpu_enable_async_collective_fusion=true' in out
  assert 'start gs://bucket/ffhq/logs' in out


def test_stock_image_python_3_10_gets_a_3_11(tmp_path):
  """A PATH like a stock TPU VM image's: python3 is 3.10 (a stand-in: there is no 3.10 to be had here),
  and a python3.11 beside it (Ubuntu's, once apt installed it): setup makes the venv with that one."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'python3').write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.10.12" && exit 0\nexit 1\n')
  (bin_dir / 'python3').chmod(0o755)
  for tool in ('dirname', 'basename', 'id', 'sudo', 'cat'):
    path = subprocess.run(['bash', '-c', f'command -v {tool}'], capture_output=True, text=True).stdout.strip()
    if path:
      (bin_dir / tool).symlink_to(path)
  (bin_dir / 'python3.11').symlink_to(os.path.realpath(sys.executable))  # This suite's own 3.11.
  r = subprocess.run(['/bin/bash', HOST, 'python'], capture_output=True, text=True, check=False,
                     env={'PATH': str(bin_dir), 'HOME': str(tmp_path)})
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == str(bin_dir / 'python3.11')


def _wait_for(predicate, seconds=20):
  end = time.time() + seconds
  while time.time() < end:
    if predicate():
      return True
    time.sleep(0.2)
  return False


def test_detached_run_logs_to_the_workdir_and_a_relaunch_ends_it(tmp_path):
  env = dict(os.environ, SRDD_PIDFILE=str(tmp_path / 'pid'), SRDD_HOST_ID='3', SRDD_STOP_GRACE='20',
             SRDD_TPU_DEVICES=str(tmp_path / 'accel0'), SRDD_LIBTPU_LOCKFILE=str(tmp_path / 'libtpu_lockfile'))
  host = lambda *a: subprocess.run(['bash', HOST, *a], capture_output=True, text=True, env=env, check=False,
                                   timeout=120)
  logs = tmp_path / 'workdir' / 'logs'
  # The run traps SIGTERM as training does (save, then exit): the stop waits for it.
  r = host('start', str(logs), 'trap "echo saved; exit 75" TERM; echo started; while true; do sleep 0.1; done')
  assert r.returncode == 0, r.stderr
  pgid = int((tmp_path / 'pid').read_text())
  log = logs / 'host_3.log'
  assert _wait_for(lambda: log.exists() and 'started' in log.read_text())
  assert os.getsid(pgid) == pgid != os.getsid(0)  # A session of its own: no SSH hang-up reaches it.
  # Something else holding the TPU (a stand-in device file) and the lockfile a killed libtpu leaves.
  (tmp_path / 'accel0').write_text('')
  (tmp_path / 'libtpu_lockfile').write_text('')
  with open(tmp_path / 'accel0') as device:
    holder = subprocess.Popen(['sleep', '300'], stdin=device, start_new_session=True)
  r = host('stop')
  assert r.returncode == 0, r.stderr
  assert 'stopping the previous run' in r.stdout and f'ending what holds the TPU: {holder.pid}' in r.stdout
  assert holder.wait(timeout=30) != 0 and not os.path.exists(tmp_path / 'libtpu_lockfile')
  assert _wait_for(lambda: 'saved' in log.read_text())
  r = host('start', str(logs), 'echo second; exit 3')
  assert _wait_for(lambda: 'exit status 3' in log.read_text())
  assert log.read_text().count('\nstarted\n') == 1 and '\nsecond\n' in log.read_text()
  assert not (tmp_path / 'pid').exists()


def test_host_check_names_what_is_missing(tmp_path):
  """`tpu_host.sh check` on a worker: a bucket (empty is fine), a gs:// prefix with something under it, a
  local path; exit 2 with one line for each that is missing. gcloud is a stand-in that knows gs://ok."""
  gcloud = tmp_path / 'gcloud'
  gcloud.write_text('#!/bin/bash\ncase "$*" in "storage buckets describe gs://ok") exit 0;;\n'
                    '"storage ls gs://ok/x") printf "a\\nb\\n";; *) exit 1;; esac\n')
  gcloud.chmod(0o755)
  env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}')
  check = lambda *p: subprocess.run(['bash', HOST, 'check', *p], capture_output=True, text=True, env=env, check=False)
  r = check('gs://ok', 'gs://ok/x', str(tmp_path))
  assert r.returncode == 0, r.stderr
  r = check('gs://ok/', 'gs://no/y', str(tmp_path / 'nope'))
  assert r.returncode == 2 and r.stderr.count('error: ') == 2
  assert 'error: gs://no/y does not exist' in r.stderr and f'error: {tmp_path}/nope does not exist' in r.stderr
