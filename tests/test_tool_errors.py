"""The tools' command lines refuse bad input as the main entry point does (issue 47 line 3): exit 2, one
`error:` line naming the flag or the file, no traceback, nothing started or written. Each case runs the
tool's main() in this process (an exception it lets out fails the test), and one case of each tool runs
as the real command in its own process; none of them gets as far as reading weights or training."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from srdd_jax.evaluation import inception_weights
from tests.conftest import REPO, reference_file, require_libtpu, xla_flags


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp('tool_inputs')
  (root / 'garbage.pth').write_bytes(b'not the weights')
  (root / 'a_file').write_text('a file where a folder belongs')
  (root / 'exists.npz').write_bytes(b'earlier output')
  (root / 'folder.npz').mkdir()
  (root / 'images').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / 'images' / '0.png')
  (root / 'broken_images').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / 'broken_images' / '0.png')
  (root / 'broken_images' / '1.png').write_bytes(b'not a png')
  (root / 'garbage_images.npz').write_bytes(b'not an npz')
  return root


STATS = ['--weights', '{root}/garbage.pth', '--images', '{root}/images']
PROXY = ['--data=digits', '--image_size=8', '--out={root}/proxy']
POD = ['--topology=v5p:2x2x2', '--workdir={root}/pod']
CASES = [
    # (name, tool, arguments, text the error line must contain)
    ('convert: pth missing', 'convert_inception', ['--pth', '{root}/none.pth', '--out', '{root}/w.npz'],
     "--pth='{root}/none.pth': no such file"),
    ('convert: pth a folder', 'convert_inception', ['--pth', '{root}/images', '--out', '{root}/w.npz'],
     "--pth='{root}/images': a folder"),
    ('convert: pth not the weights', 'convert_inception', ['--pth', '{root}/garbage.pth', '--out', '{root}/w.npz'],
     "{root}/garbage.pth is not pytorch-fid's"),
    ('convert: out in a missing folder', 'convert_inception',
     ['--pth', '{root}/garbage.pth', '--out', '{root}/none/w.npz'], "the folder '{root}/none' does not exist"),
    ('convert: out under a file', 'convert_inception', ['--pth', '{root}/garbage.pth', '--out', '{root}/a_file/w.npz'],
     "'{root}/a_file' is not a folder"),
    ('convert: out a folder', 'convert_inception',
     ['--pth', '{root}/garbage.pth', '--out', '{root}/folder.npz', '--overwrite'], "--out='{root}/folder.npz' is a folder"),
    ('convert: out not .npz', 'convert_inception', ['--pth', '{root}/garbage.pth', '--out', '{root}/w.txt'],
     "--out='{root}/w.txt': the output is an .npz"),
    ('convert: out exists', 'convert_inception', ['--pth', '{root}/garbage.pth', '--out', '{root}/exists.npz'],
     "--out='{root}/exists.npz' exists; pass --overwrite"),
    ('stats: weights missing', 'inception_stats', ['--weights', '{root}/none.npz', '--images', '{root}/images',
                                                   '--out', '{root}/s.npz'], "--weights='{root}/none.npz': no such file"),
    ('stats: weights a folder', 'inception_stats', ['--weights', '{root}/images', '--images', '{root}/images',
                                                    '--out', '{root}/s.npz'], "--weights='{root}/images': a folder"),
    ('stats: weights empty', 'inception_stats', ['--weights', '', '--images', '{root}/images', '--out', '{root}/s.npz'],
     "--weights='': no such file"),
    ('stats: images missing', 'inception_stats', ['--weights', '{root}/garbage.pth', '--images', '{root}/none',
                                                  '--out', '{root}/s.npz'], "--images='{root}/none': no such file"),
    ('stats: out not .npz', 'inception_stats', STATS + ['--out', '{root}/s.txt'], "--out='{root}/s.txt'"),
    ('stats: out in a missing folder', 'inception_stats', STATS + ['--out', '{root}/none/s.npz'],
     "the folder '{root}/none' does not exist"),
    ('stats: out exists', 'inception_stats', STATS + ['--out', '{root}/exists.npz'], "--out='{root}/exists.npz' exists"),
    ('stats: batch 0', 'inception_stats', STATS + ['--out', '{root}/s.npz', '--batch_size', '0'],
     '--batch_size=0: must be >= 1'),
    ('stats: batch negative', 'inception_stats', STATS + ['--out', '{root}/s.npz', '--batch_size', '-5'],
     '--batch_size=-5: must be >= 1'),
    ('stats: weights not the published', 'inception_stats', STATS + ['--out', '{root}/s.npz'],
     "{root}/garbage.pth is not pytorch-fid's"),
    ('proxy: image_size 0', 'train_proxy_classifier', ['--data=digits', '--image_size=0', '--out={root}/proxy'],
     '--image_size=0: must be >= 1'),
    ('proxy: epochs negative', 'train_proxy_classifier', PROXY + ['--epochs=-1'], '--epochs=-1: must be >= 1'),
    ('proxy: batch 0', 'train_proxy_classifier', PROXY + ['--batch_size=0'], '--batch_size=0: must be >= 1'),
    ('proxy: max_train_examples 0', 'train_proxy_classifier', PROXY + ['--max_train_examples=0'],
     '--max_train_examples=0: must be >= 1'),
    ('proxy: seed negative', 'train_proxy_classifier', PROXY + ['--seed=-1'], '--seed=-1: must be >= 0'),
    ('proxy: resize_ratio below 1', 'train_proxy_classifier', PROXY + ['--resize_ratio=0.5'],
     '--resize_ratio=0.5: must be >= 1'),
    ('proxy: resize_ratio nan', 'train_proxy_classifier', PROXY + ['--resize_ratio=nan'], '--resize_ratio=nan'),
    ('proxy: unknown source', 'train_proxy_classifier', ['--data=bogus', '--image_size=8', '--out={root}/proxy'],
     "config.data.source='bogus' must be one of"),
    ('proxy: set without =', 'train_proxy_classifier', PROXY + ['--set', 'flip'], "--set expects KEY=VALUE, got 'flip'"),
    ('proxy: set unknown key', 'train_proxy_classifier', PROXY + ['--set', 'flipp=false'],
     'config.data.flipp is not a key of config.data'),
    ('proxy: set a list', 'train_proxy_classifier', PROXY + ['--set', 'resize_ratio=[1]'],
     '--set resize_ratio=[1]: a value of the wrong type'),
    # The classifier reads its own splits: a split given was dropped without a word (issue 47 line 4).
    ('proxy: set split', 'train_proxy_classifier', PROXY + ['--set', 'split=validation'],
     "--set split='validation': the proxy classifier reads its own splits"),
    ('proxy: set random_crop', 'train_proxy_classifier', PROXY + ['--set', 'random_crop=true'],
     '--set random_crop=True: the proxy classifier reads centre crops'),
    ('proxy: missing folder', 'train_proxy_classifier',
     ['--data=folder', '--image_size=8', '--set', 'path={root}/none', '--out={root}/proxy'],
     "config.data.path='{root}/none' does not exist"),
    ('proxy: out a file', 'train_proxy_classifier', ['--data=digits', '--image_size=8', '--out={root}/a_file'],
     "--out='{root}/a_file': '{root}/a_file' is a file, not a folder"),
    ('proxy: out under a file', 'train_proxy_classifier', ['--data=digits', '--image_size=8',
                                                          '--out={root}/a_file/cache'], "'{root}/a_file' is a file"),
    ('pod: slices 0', 'rehearse_pod', POD + ['--slices=0'], '--slices=0: must be >= 1'),
    ('pod: steps 0', 'rehearse_pod', POD + ['--steps=0'], '--steps=0: must be >= 1'),
    ('pod: global_batch negative', 'rehearse_pod', POD + ['--global_batch=-2'], '--global_batch=-2: must be >= 0'),
    ('pod: mesh not integers', 'rehearse_pod', POD + ['--mesh=a,b,c'], "--mesh='a,b,c': expected three integers"),
    ('pod: mesh of two', 'rehearse_pod', POD + ['--mesh=1,2'], "--mesh='1,2': expected three integers"),
    ('pod: workdir under a file', 'rehearse_pod', ['--topology=v5p:2x2x2', '--workdir={root}/a_file/pod'],
     "--workdir='{root}/a_file/pod': '{root}/a_file' is a file"),
    ('pod: out in a missing folder', 'rehearse_pod', POD + ['--out={root}/none/r.json'],
     "the folder '{root}/none' does not exist"),
    ('pod: out a folder', 'rehearse_pod', POD + ['--out={root}/images'], "--out='{root}/images' is a folder"),
    # A process per host of every slice: more slices than processes can never be rehearsed (issue 47 line 3).
    ('pod: slices 1e6', 'rehearse_pod', POD + ['--slices=1000000'], '--slices=1000000: at most 64'),
]
# Cases that describe the TPU slice first (libtpu), then refuse the mesh, the batch or its count of hosts.
LIBTPU_CASES = [
    ('pod: mesh the slice does not divide', 'rehearse_pod', POD + ['--mesh=3,-1,1'],
     "--mesh='3,-1,1': mesh shape (3, -1, 1): 8 devices are not divisible by 3"),
    ('pod: batch the mesh does not divide', 'rehearse_pod', POD + ['--global_batch=3'],
     "--global_batch=3: must be a multiple of the mesh's data x fsdp = 8"),
    ('pod: slices x hosts above the bound', 'rehearse_pod', POD + ['--slices=33'],
     '--slices=33: 66 hosts (33 slice(s) of v5p:2x2x2); the rehearsal starts a process for each'),
    ('pod: a slice of more hosts than the bound', 'rehearse_pod', ['--topology=v5p:8x8x8', '--workdir={root}/pod'],
     '--topology=v5p:8x8x8: 128 hosts (1 slice(s) of v5p:8x8x8)'),
]


def _run(tool: str, argv, root):
  """(status, stderr) of `python -m srdd_jax.tools.<tool> argv`."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags())
  r = subprocess.run([sys.executable, '-m', f'srdd_jax.tools.{tool}', *[a.format(root=root) for a in argv]],
                     cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  return r.returncode, r.stderr


def _check(name, rc, err, expected):
  errors = [line for line in err.splitlines() if line.startswith('error: ')]
  assert rc == 2 and 'Traceback' not in err and len(errors) == 1 and expected in errors[0], \
      f'{name}: rc {rc}\n{err[-1500:]}'


def _run_here(tool: str, argv, root, capsys):
  """(status, stderr) of the tool's main(argv) in this process: an exception it lets out fails the test
  (what a traceback would be in its own process), and argparse's exit is its status."""
  module = importlib.import_module(f'srdd_jax.tools.{tool}')
  capsys.readouterr()
  try:
    rc = module.main([a.format(root=root) for a in argv])
  except SystemExit as e:
    rc = e.code
  return rc, capsys.readouterr().err


@pytest.mark.parametrize('name, tool, argv, expected', CASES, ids=[c[0] for c in CASES])
def test_a_bad_command_line_exits_2_naming_the_flag(inputs, name, tool, argv, expected, capsys):
  """In this process (a second each instead of a Python and JAX start); the test below runs one case of
  each tool as the real command."""
  before = sorted(os.listdir(inputs))
  rc, err = _run_here(tool, argv, inputs, capsys)
  _check(name, rc, err, expected.format(root=inputs))
  assert sorted(os.listdir(inputs)) == before, f'{name}: wrote {set(os.listdir(inputs)) - set(before)}'


def test_each_tool_refuses_as_its_own_command(inputs):
  """The first case of each tool as `python -m srdd_jax.tools.<tool>`: exit 2, one error line, no traceback."""
  firsts = {}
  for case in CASES:
    firsts.setdefault(case[1], case)
  for name, tool, argv, expected in firsts.values():
    rc, err = _run(tool, argv, inputs)
    _check(name, rc, err, expected.format(root=inputs))


@pytest.mark.parametrize('name, tool, argv, expected', LIBTPU_CASES, ids=[c[0] for c in LIBTPU_CASES])
def test_a_rehearsal_the_slice_cannot_run_exits_2_before_starting(inputs, name, tool, argv, expected, capsys):
  require_libtpu()
  rc, err = _run_here(tool, argv, inputs, capsys)
  _check(name, rc, err, expected.format(root=inputs))
  assert not (inputs / 'pod').exists()


def test_the_tools_that_write_a_folder_hold_it(tmp_path, capsys):
  """Issue 47 line 1: train_proxy_classifier's --out and rehearse_pod's --workdir took no lock, so two
  commands on one folder both trained (or both rehearsed over each other's files). Held by another run,
  each is exit 2 naming the holder, and nothing is written there."""
  from srdd_jax.parallel.workdir import WorkdirLock  # pylint: disable=import-outside-toplevel
  held = [('train_proxy_classifier', ['--data=digits', '--image_size=8', '--out={root}/held'])]
  try:
    require_libtpu()
    held.append(('rehearse_pod', ['--topology=v5p:2x2x2', '--workdir={root}/held']))
  except pytest.skip.Exception:
    pass  # Without libtpu the rehearsal cannot describe its slice: the classifier's case alone.
  (tmp_path / 'held').mkdir(exist_ok=True)
  with WorkdirLock(str(tmp_path / 'held')):
    for tool, argv in held:
      rc, err = _run_here(tool, argv, tmp_path, capsys)
      _check(tool, rc, err, f"workdir '{tmp_path}/held' is in use by process {os.getpid()}")
      assert os.listdir(tmp_path / 'held') == ['.srdd.lock'], tool
  # A refused --out the command created is not left behind, empty.
  rc, err = _run_here('train_proxy_classifier', ['--data=folder', '--image_size=8', '--set', 'path={root}/none',
                                                 '--out={root}/made_here'], tmp_path, capsys)
  assert rc == 2 and not (tmp_path / 'made_here').exists(), err


# Images that go wrong only once verified weights are loaded: a converted stand-in file whose hash plays
# the published one (as tests/test_evaluation.py does).


@pytest.mark.parametrize('images, expected', [
    ('{root}/broken_images', '{root}/broken_images/1.png: unreadable image (UnidentifiedImageError: cannot '
                             'identify image file); remove or replace it'),
    ('{root}/garbage_images.npz', "--images='{root}/garbage_images.npz' is neither a folder of images nor a "
                                  'readable .npz'),
], ids=['an unreadable image in the folder', 'an .npz that is not one'])
def test_inception_stats_names_the_image_input_it_cannot_read(inputs, images, expected, capsys, monkeypatch):
  """PIL's UnidentifiedImageError (an OSError) escaped as a traceback; numpy's error for bytes that are not
  an .npz did not name the file."""
  weights = inputs / 'stand_in_weights.npz'
  if not weights.exists():
    with np.load(reference_file('fid_inception.npz')) as z:
      state = {k[len('inception/'):]: z[k] for k in z.files if k.startswith('inception/')}
    inception_weights.save_npz(weights, state, source_sha256='0' * 64)
  monkeypatch.setattr(inception_weights, 'FID_WEIGHTS_SHA256', '0' * 64)
  rc, err = _run_here('inception_stats', ['--weights', str(weights), '--images', images, '--out', '{root}/s.npz'],
                      inputs, capsys)
  _check(images, rc, err, expected.format(root=inputs))
  assert not (inputs / 's.npz').exists()


def test_a_rehearsal_whose_runs_fail_says_so_in_one_line(tmp_path, capsys, monkeypatch):
  """rehearse_pod's runs failing printed a SystemExit of many lines (both runs' output and the process
  logs): now one error: line naming the file that holds them, exit 1 (the runs failed; the command line
  was fine)."""
  require_libtpu()
  from srdd_jax.tools import rehearse_pod  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(rehearse_pod, 'SMOKE', [*rehearse_pod.SMOKE, '--config.train.bogus_key=1'])
  rc, err = _run_here('rehearse_pod', ['--topology=v5p:2x2x2', '--workdir={root}/pod'], tmp_path, capsys)
  errors = [line for line in err.splitlines() if line.startswith('error: ')]
  assert rc == 1 and len(errors) == 1 and 'Traceback' not in err, err[-2000:]
  assert f"their output: {tmp_path}/pod/failure.log" in errors[0], errors
  assert 'bogus_key' in (tmp_path / 'pod' / 'failure.log').read_text()
