"""`python -m srdd_jax.bench --vs-var DIR` on a CPU against a tiny fake of the official VAR package (the
API surface srdd_jax/bench/var_pytorch.py uses), its exit-2 cases, and the PyTorch side's markov mask and
batch fitting."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from srdd_jax.bench import vs_var

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'srdd_jax', 'bench', 'var_pytorch.py')

# The two tests that time the PyTorch side need torch, which the test extra leaves out (PyPI's Linux
# torch is a CUDA build of several GB); the exit-2 cases, the ratios and the import isolation run
# everywhere, CI included.
needs_torch = pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='torch is not installed')

# A stand-in for VAR's models package: the constructors, buffers, KV cache, forward, sampler and decoder
# var_pytorch.py calls, at toy cost. Its attention keeps VAR's cache semantics (keys concatenated per call)
# and notes how many keys each call saw; its forward raises CUDA's out-of-memory error above OOM_ABOVE
# images, as a device would.
FAKE_VAR = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

OOM_ABOVE = 1 << 30
SEEN = []  # Keys per attention call while sampling.


class Attn(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable):
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x, attn_bias):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.caching:
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=1)
                v = torch.cat((self.cached_v, v), dim=1)
            self.cached_k, self.cached_v = k, v
            SEEN.append(k.shape[1])
        a = q @ k.transpose(1, 2)
        if attn_bias is not None:
            a = a + attn_bias[0]
        return a.softmax(-1) @ v


class Block(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.attn = Attn(C)
        self.fc = nn.Linear(C, C)

    def forward(self, x, attn_bias):
        x = x + self.attn(x, attn_bias=attn_bias)
        return x + self.fc(x)


class VAR(nn.Module):
    def __init__(self, vae_local, num_classes, depth, embed_dim, num_heads, drop_rate, attn_drop_rate,
                 drop_path_rate, norm_eps, shared_aln, cond_drop_rate, attn_l2_norm, patch_nums,
                 flash_if_available, fused_if_available):
        super().__init__()
        self.vae_proxy = (vae_local,)
        self.patch_nums, self.V, self.C = patch_nums, vae_local.vocab_size, embed_dim
        self.L = sum(p * p for p in patch_nums)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)
        self.word_embed = nn.Linear(vae_local.Cvae, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim) for _ in range(depth)])
        self.head = nn.Linear(embed_dim, self.V)
        d = torch.cat([torch.full((p * p,), i) for i, p in enumerate(patch_nums)]).view(1, self.L, 1)
        self.register_buffer('attn_bias_for_masking',
                             torch.where(d >= d.transpose(1, 2), 0., -torch.inf).reshape(1, 1, self.L, self.L))

    def init_weights(self, init_adaln, init_adaln_gamma, init_head, init_std):
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)

    def forward(self, label_B, x_BLCv_wo_first_l):
        if label_B.shape[0] > OOM_ABOVE:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory (fake)')
        sos = self.class_emb(label_B).unsqueeze(1)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l)), dim=1)
        for b in self.blocks:
            x = b(x, attn_bias=self.attn_bias_for_masking)
        return self.head(x).float()

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0):
        vae = self.vae_proxy[0]
        x = self.class_emb(torch.cat((label_B, torch.full_like(label_B, 0)))).unsqueeze(1)
        for b in self.blocks:
            b.attn.kv_caching(True)
        f_hat = x.new_zeros(B, vae.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        for si, pn in enumerate(self.patch_nums):
            for b in self.blocks:
                x = b(x, attn_bias=None)
            logits = self.head(x)
            logits = (1 + cfg) * logits[:B] - cfg * logits[B:]
            idx = logits.topk(top_k, dim=-1)[1][..., 0]
            h = vae.quantize.embedding(idx).transpose(1, 2).reshape(B, vae.Cvae, pn, pn)
            f_hat = f_hat + F.interpolate(h, size=f_hat.shape[-2:])
            if si + 1 < len(self.patch_nums):
                nxt = F.interpolate(f_hat, size=(self.patch_nums[si + 1],) * 2).flatten(2).transpose(1, 2)
                x = self.word_embed(nxt).repeat(2, 1, 1)
        for b in self.blocks:
            b.attn.kv_caching(False)
        return vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
'''

FAKE_VQVAE = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Quant(nn.Module):
    def __init__(self, V, Cvae, patch_nums):
        super().__init__()
        self.embedding = nn.Embedding(V, Cvae)
        self.patch_nums = patch_nums

    def idxBl_to_var_input(self, gt_ms_idx_Bl):
        B, outs = gt_ms_idx_Bl[0].shape[0], []
        for idx, pn in zip(gt_ms_idx_Bl[:-1], self.patch_nums[1:]):
            h = self.embedding(idx).mean(1, keepdim=True)
            outs.append(h.expand(B, pn * pn, h.shape[-1]))
        return torch.cat(outs, dim=1)


class VQVAE(nn.Module):
    def __init__(self, vocab_size, z_channels, ch, test_mode, share_quant_resi, v_patch_nums):
        super().__init__()
        self.vocab_size, self.Cvae = vocab_size, z_channels
        self.quantize = Quant(vocab_size, z_channels, v_patch_nums)
        self.conv = nn.Conv2d(z_channels, 3, 3, padding=1)

    def fhat_to_img(self, f_hat):
        return self.conv(F.interpolate(f_hat, scale_factor=4)).clamp_(-1, 1)
'''


@pytest.fixture
def fake_var(tmp_path):
  root = tmp_path / 'var'
  (root / 'models').mkdir(parents=True)
  (root / 'dist.py').write_text('')
  (root / 'models' / '__init__.py').write_text('from .var import VAR\nfrom .vqvae import VQVAE\n')
  (root / 'models' / 'basic_var.py').write_text('')
  (root / 'models' / 'var.py').write_text(FAKE_VAR)
  (root / 'models' / 'vqvae.py').write_text(FAKE_VQVAE)
  return str(root)


def env():
  e = dict(os.environ)
  e['PYTHONPATH'] = REPO + (os.pathsep + e['PYTHONPATH'] if e.get('PYTHONPATH') else '')
  return e


@needs_torch
def test_vs_var_writes_both_sides_their_ratios_and_a_table(fake_var, tmp_path):
  out = tmp_path / 'out' / 'vs.json'
  # Batch 8: the tests' 8 CPU devices split it (conftest's XLA_FLAGS reach the subprocesses).
  cmd = [sys.executable, '-m', 'srdd_jax.bench', '--vs-var', fake_var, '--out', str(out), '--depths', '1',
         '--width', '32', '--heads', '1', '--patch_nums', '1,2', '--batches', '8', '--sample_batches', '8',
         '--repeats', '1', '--warmup', '0', '--tokenizer_ch', '32']
  p = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data['schema'] == vs_var.SCHEMA and data['finished'] is True
  want = {(k, m) for k in ('train', 'sample') for m in ('markov', 'causal')}
  for side in ('ours', 'var_pytorch'):
    recs = data[side]['records']
    assert {(r['kind'], r['mode']) for r in recs} == want, side
    for r in recs:
      assert 'error' not in r, r.get('error')
      assert (r['depth'], r['width'], r['heads'], r['batch'], r['seq_len']) == (1, 32, 1, 8, 5)
      assert r['seconds'] > 0 and r['images_per_s'] == pytest.approx(8 / r['seconds'])
  theirs = {(r['kind'], r['mode']): r for r in data['var_pytorch']['records']}
  assert theirs[('train', 'causal')]['loss'] > 0 and theirs[('sample', 'markov')]['sanity']['image_finite']
  assert theirs[('sample', 'markov')]['seconds_tokens_only'] <= theirs[('sample', 'markov')]['seconds']
  assert data['var_pytorch']['env']['torch'] and data['ours']['env']['backend'] == 'cpu'
  ratios = {(r['kind'], r['mode']): r for r in data['ratios']}
  assert set(ratios) == want | {('train', 'markov (ours) vs causal (VAR)'),
                                ('sample', 'markov (ours) vs causal (VAR)')}
  ours = {(r['kind'], r['mode']): r for r in data['ours']['records']}
  for (k, m), r in ratios.items():
    mine = ours[(k, 'markov' if m.startswith('markov (ours)') else m)]
    other = theirs[(k, 'causal' if m.startswith('markov (ours)') else m)]
    assert r['speedup'] == pytest.approx(other['seconds'] / mine['seconds'])
  md = (tmp_path / 'out' / 'vs.md').read_text()
  assert '| depth | kind | mask | batch | srdd_jax s | VAR-PyTorch s | speed-up |' in md
  assert sum(l.startswith('| 1 | ') for l in md.splitlines()) == 4 + 2  # 4 rows + 2 markov-vs-causal rows.
  assert 'srdd_jax s' in p.stdout  # The table is printed too.


@needs_torch
def test_var_side_markov_mask_and_batch_fitting(fake_var, tmp_path):
  # In a subprocess: var_pytorch puts DIR's `models` on sys.path.
  script = textwrap.dedent(f'''
      import json, sys
      sys.path.insert(0, {os.path.dirname(WORKER)!r})
      import var_pytorch
      torch, models, _ = var_pytorch.import_var({fake_var!r})
      from models import var as fake
      m = dict(depth=2, width=16, heads=1, patch_nums=[1, 2, 3], vocab_size=32, z_channels=4, num_classes=10,
               tokenizer_ch=32, dtype='float32')
      spec = dict(sampler=dict(cfg=1.5, top_k=900, top_p=0.96))
      r = var_pytorch.Runner(torch, models, m, spec, torch.device('cpu'))
      out = {{}}
      r.set_mask('markov')
      out['markov_bias'] = (r.var.attn_bias_for_masking[0, 0] == 0).int().tolist()
      fake.SEEN.clear(); r.sample_call(2, 0); out['markov_keys'] = list(fake.SEEN)
      r.set_mask('causal')
      out['causal_bias'] = (r.var.attn_bias_for_masking[0, 0] == 0).int().tolist()
      fake.SEEN.clear(); r.sample_call(2, 0); out['causal_keys'] = list(fake.SEEN)
      fake.OOM_ABOVE = 4
      out['fit'] = r.fit_batch('train', 'causal', [16, 8, 4, 2], cap=8)
      out['jax_imported'] = 'jax' in sys.modules
      print(json.dumps(out))
  ''')
  p = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env(), timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  scale = [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]  # Scale of each of the 1 + 4 + 9 tokens.
  assert out['markov_bias'] == [[int(a == b) for b in scale] for a in scale]  # Each scale sees itself only.
  assert out['causal_bias'] == [[int(b <= a) for b in scale] for a in scale]
  # Sampling, 2 blocks per scale: markov attends to the scale's own tokens, causal to all so far.
  assert out['markov_keys'] == [1, 1, 4, 4, 9, 9]
  assert out['causal_keys'] == [1, 1, 5, 5, 14, 14]
  assert out['jax_imported'] is False  # The PyTorch side never loads JAX (nor its hold on the device).
  batch, how = out['fit']
  assert batch == 4  # 16 is over the cap; 8 runs out of memory; 4 runs.
  assert [t['batch'] for t in how['tried']] == [8, 4] and 'OutOfMemoryError' in how['tried'][0]['error']


def run_bench(args, pre=''):
  code = f'{pre}import sys\nfrom srdd_jax.bench import cli\nsys.exit(cli.main({args!r}))'
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env(), cwd=REPO,
                        timeout=300)


def check_exit_2(p, *words):
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:'), p.stderr
  assert 'Traceback' not in p.stderr
  for w in words:
    assert w in lines[0], (w, lines[0])


def test_vs_var_without_torch_exits_2(fake_var, tmp_path):
  out = tmp_path / 'x.json'
  p = run_bench(['--vs-var', fake_var, '--out', str(out), '--quick'], pre="import sys; sys.modules['torch'] = None\n")
  check_exit_2(p, 'PyTorch', 'torch')
  assert not out.exists()  # Nothing ran, nothing was written.


def test_vs_var_without_a_var_checkout_exits_2(fake_var, tmp_path):
  missing = str(tmp_path / 'nowhere')
  p = run_bench(['--vs-var', missing, '--suite', 'gpu', '--out', str(tmp_path / 'x.json')])
  check_exit_2(p, missing, 'does not exist')
  os.remove(os.path.join(fake_var, 'models', 'var.py'))
  p = run_bench(['--vs-var', fake_var, '--out', str(tmp_path / 'y.json')])
  check_exit_2(p, fake_var, 'models/var.py')
  assert not (tmp_path / 'x.json').exists() and not (tmp_path / 'y.json').exists()


def test_bad_patch_nums_exits_2_alone_and_through_vs_var(fake_var, tmp_path):
  out = tmp_path / 'x.json'
  cmd = [sys.executable, '-m', 'srdd_jax.bench', '--quick', '--patch_nums', '1,x', '--out', str(out)]
  p = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)
  check_exit_2(p, '--patch_nums', "'1,x'")
  if importlib.util.find_spec('torch') is not None:  # --vs-var checks for torch before anything else.
    cmd[3:3] = ['--vs-var', fake_var]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)
    assert p.returncode == 2 and '--patch_nums' in p.stderr and 'Traceback' not in p.stderr, p.stderr[-2000:]
  assert not out.exists()


def test_the_suite_sizes_its_own_batch_from_a_probe_not_the_ladder_top(tmp_path):
  """Without VAR-PyTorch's batch our side compiles a probe batch (32 train, 16 sampling), extrapolates
  XLA's memory analysis along the ladder and compiles the largest batch that fits: never the ladder's
  top when that is over the memory (the first GPU run spent its budget compiling those). No torch
  needed: the suite times our side alone."""
  out = tmp_path / 'suite.json'
  cmd = [sys.executable, '-m', 'srdd_jax.bench', '--suite', 'gpu', '--tiny', '--depths', '1', '--max_batch', '128',
         '--max_sample_batch', '32', '--memory_limit_gib', str(17 / 1024), '--masks', 'markov', '--out', str(out)]
  p = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  data = json.loads(out.read_text())
  first = {b['kind']: b for b in data['batches'] if b['reduced_from'] is None}
  assert "XLA's memory analysis at batch 32" in first['train']['how'], first
  assert "XLA's memory analysis at batch 16" in first['sample']['how'], first
  # 17 MiB a device (the tests' 8 CPU devices split each batch): the train step's ~5 MiB of arguments
  # and ~0.16 MiB per example at the probe fit 64 of the ladder, not 128; sampling's decoder (~15 MiB at
  # 16) fits 16, not 32. Nothing was compiled at the top, every batch is one the 8 devices divide, and
  # what ran fits the limit.
  assert 32 <= first['train']['batch'] < 128 and first['sample']['batch'] < 32, first
  assert all(b['batch'] % 8 == 0 for b in data['batches']), data['batches']
  recs = {r['kind']: r for r in data['ours']['records']}
  assert all('error' not in r for r in recs.values()) and recs['train']['batch'] == first['train']['batch']
  compiles = data['ours']['compiles'][0]
  assert not any(k.endswith('b128') for k in compiles['programs']), compiles
  assert max(compiles['needed_bytes'].values()) <= 0.95 * 17 * 2**20


def test_ratios_pair_equal_shapes_only():
  ours = [{'kind': 'train', 'mode': 'markov', 'depth': 16, 'batch': 64, 'seconds': 0.2, 'images_per_s': 320},
          {'kind': 'train', 'mode': 'causal', 'depth': 16, 'batch': 64, 'seconds': 0.25, 'images_per_s': 256},
          {'kind': 'train', 'mode': 'causal', 'depth': 16, 'batch': 32, 'error': 'x'},
          {'kind': 'sample', 'mode': 'markov', 'depth': 16, 'batch': 32, 'seconds': 0.5, 'images_per_s': 64,
           'seconds_tokens_only': 0.1}]
  theirs = [{'kind': 'train', 'mode': 'causal', 'depth': 16, 'batch': 64, 'seconds': 0.5, 'images_per_s': 128},
            {'kind': 'train', 'mode': 'markov', 'depth': 16, 'batch': 48, 'seconds': 0.4},
            {'kind': 'train', 'mode': 'causal', 'depth': 16, 'batch': 32, 'seconds': 0.3},
            {'kind': 'sample', 'mode': 'causal', 'depth': 16, 'batch': 32, 'seconds': 1.5,
             'seconds_tokens_only': 0.6}]
  r = vs_var.ratios(ours, theirs)
  assert [(x['kind'], x['mode'], x['batch'], round(x['speedup'], 6)) for x in r] == [
      ('train', 'causal', 64, 2.0),
      ('train', 'markov (ours) vs causal (VAR)', 64, 2.5),
      ('sample', 'markov (ours) vs causal (VAR)', 32, 3.0)]
  assert r[2]['speedup_tokens_only'] == pytest.approx(6.0)


def test_bench_and_the_suite_import_without_ml_collections_clu_or_tensorflow(tmp_path):
  # The GPU machines the suite runs on have none of these; every module a suite process imports
  # (the orchestrator, the JAX worker, var_pytorch) must load without them.
  (tmp_path / 'sitecustomize.py').write_text(
      "import sys\nfor n in ('ml_collections', 'clu', 'tensorflow', 'tensorflow_datasets'):\n"
      "  sys.modules[n] = None\n")
  e = env()
  e['PYTHONPATH'] = str(tmp_path) + os.pathsep + e['PYTHONPATH']
  code = ('import sys\nimport srdd_jax.bench.cli, srdd_jax.bench.suite_worker\n'
          f'sys.path.insert(0, {os.path.dirname(WORKER)!r})\nimport var_pytorch\n'
          "assert sys.modules['ml_collections'] is None and sys.modules['tensorflow'] is None\nprint('ok')")
  p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=e, cwd=REPO, timeout=300)
  assert p.returncode == 0 and p.stdout.strip() == 'ok', p.stderr[-2000:]
