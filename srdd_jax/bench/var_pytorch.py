"""The PyTorch side of `python -m srdd_jax.bench --vs-var DIR`: the official VAR code, timed on the shapes
the JAX side runs. A script run in its own process (`python srdd_jax/bench/var_pytorch.py ...`); it
imports torch and the checkout's `models` package, never jax nor anything of srdd_jax, so the two
frameworks never share a process or the accelerator's memory.

  python srdd_jax/bench/var_pytorch.py --var_dir DIR --check             # torch and DIR's models import?
  python srdd_jax/bench/var_pytorch.py --var_dir DIR --spec SPEC.json    # time the jobs of SPEC

Protocol: one JSON object per line on standard output ({"type": "info" | "record" | "skipped" |
"batch", ...}); VAR's own prints go to standard error. A missing torch or a checkout without VAR's
models exits 2 with one `error:` line on standard error.

What is timed, on random weights (VAR's `init_weights`, as `build_vae_var` builds it: VQVAE with
`share_quant_resi=4`, VAR with `attn_l2_norm=True`, `shared_aln=False`, `cond_drop_rate=0.1`, drop path
0.1 * depth / 24, `flash_if_available` and `fused_if_available` on, so VAR picks flash-attn, xformers or
PyTorch's SDPA, whichever imports):
- train: VAR's `VARTrainer.train_step` without the image encoder (the JAX side also starts from token
  ids): `idxBl_to_var_input`, the forward under bfloat16 autocast (off for float32), VAR's loss
  (cross-entropy over all L tokens, mean over tokens then batch, label smoothing 0), backward,
  `clip_grad_norm_(2.0)`, AdamW (betas 0.9/0.95, weight decay 0.05 off biases, 1-D tensors and VAR's
  no-decay names; `fused=True` on CUDA as VAR's `--afuse`), `zero_grad(set_to_none=True)`.
  Mask 'causal': VAR's `attn_bias_for_masking`. Mask 'markov': that buffer replaced by the
  block-diagonal bias (0 within a scale, -inf elsewhere), so each scale attends only to itself; VAR's
  attention still receives a dense (L, L) bias, as it does for causal.
- sample: `autoregressive_infer_cfg(B, labels, cfg=1.5, top_k=900, top_p=0.96)` under
  `torch.inference_mode()` and the same autocast, including `fhat_to_img` (decoding to images), with
  VAR's KV cache. Mask 'markov': each attention module's KV cache is emptied before each of its calls;
  every call of a block's attention is one scale, so each scale attends only to its own tokens (and
  the cache never holds more than one scale). The decoder call is wrapped to note the time it starts
  (after a synchronisation), which splits tokens from decoding.
Each timed call ends with `torch.cuda.synchronize()`; `--warmup` untimed calls first; the median of
`--repeats`. Batches: a job gives one batch, or a ladder: on CUDA, two probe calls at small batches
give the peak memory per sample (`max_memory_allocated`), the largest ladder batch under 92% of the
device's memory is tried, and an out-of-memory error steps down the ladder; on a CPU the ladder is
tried from its top. Every mask of a job uses the batch found for its first mask.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import types

# Files VAR's model code needs: `models/var.py` imports `dist` from the checkout's root.
VAR_FILES = ('models/__init__.py', 'models/var.py', 'models/basic_var.py', 'models/vqvae.py', 'dist.py')
NOWD_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
             'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')
MEMORY_FRACTION = 0.92  # Of the device's memory, for the batch estimate: the allocator fragments.
_PROTO = None  # The real standard output: the protocol channel.


def missing_var_files(var_dir: str) -> list[str]:
  """The files of VAR_FILES that `var_dir` lacks (all of them when it is not a directory)."""
  if not os.path.isdir(var_dir):
    return list(VAR_FILES)
  return [f for f in VAR_FILES if not os.path.isfile(os.path.join(var_dir, f))]


def emit(obj: dict) -> None:
  _PROTO.write(json.dumps(obj, default=str) + '\n')
  _PROTO.flush()


def log(msg: str) -> None:
  print(f'[var-pytorch {time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def fail(msg: str) -> None:
  print(f'error: {msg}', file=sys.stderr, flush=True)
  sys.exit(2)


def import_var(var_dir: str):
  """(torch, models module, notes) with `var_dir` first on sys.path; exits 2 naming what is missing."""
  missing = missing_var_files(var_dir)
  if missing:
    fail(f'--vs-var {var_dir!r} is not a checkout of the official VAR code: missing '
         f'{", ".join(missing)}')
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    fail(f'--vs-var needs PyTorch, which {sys.executable} cannot import ({e})')
  notes = []
  # models/var.py imports huggingface_hub's PyTorchModelHubMixin only for VARHF (loading weights from
  # the Hub), which nothing here uses: where that import would fail, a stub stands in.
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    has_mixin = hasattr(huggingface_hub, 'PyTorchModelHubMixin')
  except Exception:  # pylint: disable=broad-except
    huggingface_hub, has_mixin = None, False
  if not has_mixin:
    if huggingface_hub is None:
      huggingface_hub = sys.modules['huggingface_hub'] = types.ModuleType('huggingface_hub')
    huggingface_hub.PyTorchModelHubMixin = type('PyTorchModelHubMixin', (), {})
    notes.append('huggingface_hub.PyTorchModelHubMixin is missing here: a stub stands in (VARHF is unused)')
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != here]
  sys.path.insert(0, os.path.abspath(var_dir))
  try:
    import models  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-except
    fail(f'--vs-var {var_dir!r}: importing its models package failed: {type(e).__name__}: {e}')
  for name in ('VAR', 'VQVAE'):
    if not hasattr(models, name):
      fail(f'--vs-var {var_dir!r}: models has no {name} (not the official VAR code?)')
  return torch, models, notes


def kernels_available() -> dict:
  """What VAR's basic_var.py would pick up (it tries these imports itself)."""
  return {name: importlib.util.find_spec(name) is not None for name in ('flash_attn', 'xformers')}


def info(torch, notes, device) -> dict:
  d = {'torch': torch.__version__, 'python': platform.python_version(), 'device': str(device),
       'cuda': torch.cuda.is_available(), 'cuda_version': torch.version.cuda,
       'cpu_count': os.cpu_count(), 'threads': torch.get_num_threads(), 'importable': kernels_available(),
       'notes': notes}
  if device.type == 'cuda':
    p = torch.cuda.get_device_properties(device)
    d.update(device_kind=p.name, device_memory=int(p.total_memory),
             sdp_backends_enabled={k: getattr(torch.backends.cuda, f'{k}_sdp_enabled')()
                                   for k in ('flash', 'mem_efficient', 'math', 'cudnn')
                                   if hasattr(torch.backends.cuda, f'{k}_sdp_enabled')})
  else:
    d['device_kind'] = platform.processor() or 'cpu'
  return d


class Runner:
  """One VAR model (and its VQVAE) on one device, with its optimiser, timing train steps and sampling."""

  def __init__(self, torch, models, m: dict, spec: dict, device):
    self.torch, self.m, self.spec, self.device = torch, m, spec, device
    nn = torch.nn
    torch.manual_seed(0)
    pn = tuple(m['patch_nums'])
    # PyTorch's default initialisation: VAR's build_vae_var skips it and loads a checkpoint instead,
    # which would leave these weights as uninitialised memory (NaN samples) here.
    self.vae = models.VQVAE(vocab_size=m['vocab_size'], z_channels=m['z_channels'], ch=m['tokenizer_ch'],
                            test_mode=True, share_quant_resi=4, v_patch_nums=pn).to(device)
    # build_vae_var's trick for the transformer: the layers' own initialisers are skipped, since
    # init_weights sets every weight.
    saved = {}
    for clz in (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                nn.ConvTranspose1d, nn.ConvTranspose2d):
      saved[clz] = clz.reset_parameters
      clz.reset_parameters = lambda self: None
    try:
      self.var = models.VAR(
          vae_local=self.vae, num_classes=m['num_classes'], depth=m['depth'], embed_dim=m['width'],
          num_heads=m['heads'], drop_rate=0., attn_drop_rate=0., drop_path_rate=0.1 * m['depth'] / 24,
          norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=pn,
          flash_if_available=True, fused_if_available=True).to(device)
      self.var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    finally:
      for clz, fn in saved.items():
        clz.reset_parameters = fn
    self.patch_nums = pn
    self.L = sum(p * p for p in pn)
    self.causal_bias = self.var.attn_bias_for_masking.clone()
    d = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pn)]).view(1, self.L, 1)
    self.markov_bias = torch.where(d == d.transpose(1, 2), 0., -torch.inf).reshape(1, 1, self.L, self.L).to(
        device=device, dtype=self.causal_bias.dtype)
    self.attn_forwards = [b.attn.forward for b in self.var.blocks]
    self.opt = None
    self.dtype = {'bfloat16': torch.bfloat16, 'float32': None}[m['dtype']]
    self.params = sum(p.numel() for p in self.var.parameters())

  # --- helpers ---------------------------------------------------------------------------------------

  def autocast(self):
    if self.dtype is None:
      return self.torch.autocast(self.device.type, enabled=False)
    return self.torch.autocast(self.device.type, dtype=self.dtype)

  def sync(self):
    if self.device.type == 'cuda':
      self.torch.cuda.synchronize(self.device)

  def set_mask(self, mask: str):
    """Training: the attention bias; sampling: the markov KV-cache reset (see the module docstring)."""
    self.var.attn_bias_for_masking.copy_(self.markov_bias if mask == 'markov' else self.causal_bias)
    for b, orig in zip(self.var.blocks, self.attn_forwards):
      if mask == 'markov':
        def forward(x, attn_bias, attn=b.attn, orig=orig):
          attn.cached_k = attn.cached_v = None  # One call is one scale: it attends to itself only.
          return orig(x, attn_bias)
        b.attn.forward = forward
      else:
        b.attn.forward = orig

  def optimizer(self):
    if self.opt is None:
      torch = self.torch
      decay, no_decay = [], []
      for name, p in self.var.named_parameters():
        if not p.requires_grad:
          continue
        (no_decay if p.ndim == 1 or name.endswith('bias') or any(k in name for k in NOWD_KEYS)
         else decay).append(p)
      groups = [{'params': decay, 'weight_decay': self.spec.get('weight_decay', 0.05)},
                {'params': no_decay, 'weight_decay': 0.0}]
      kw = {'fused': True} if self.device.type == 'cuda' else {}
      self.opt = torch.optim.AdamW(groups, lr=self.spec.get('lr', 1e-4), betas=(0.9, 0.95), **kw)
      self.paras = decay + no_decay
    return self.opt

  def train_inputs(self, batch: int, seed: int = 0):
    torch = self.torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, self.m['vocab_size'], (batch, self.L), generator=g).to(self.device)
    labels = (torch.arange(batch) % self.m['num_classes']).to(self.device)
    bounds = [0]
    for p in self.patch_nums:
      bounds.append(bounds[-1] + p * p)
    return ids, labels, [ids[:, b:e] for b, e in zip(bounds[:-1], bounds[1:])]

  def train_step(self, ids, labels, gt_idx_Bl):
    torch = self.torch
    opt = self.optimizer()
    self.var.train()
    B, V = ids.shape[0], self.m['vocab_size']
    x_in = self.vae.quantize.idxBl_to_var_input(gt_idx_Bl)
    with self.autocast():
      logits = self.var(labels, x_in)
      loss = torch.nn.functional.cross_entropy(logits.view(-1, V), ids.view(-1), reduction='none').view(B, -1)
      loss = loss.mul(1.0 / self.L).sum(dim=-1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.paras, self.spec.get('clip', 2.0))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def sample_call(self, batch: int, seed: int, marks: dict | None = None):
    torch = self.torch
    self.var.eval()
    s = self.spec['sampler']
    labels = (torch.arange(batch) % self.m['num_classes']).to(self.device)
    vae = self.var.vae_proxy[0]
    orig = vae.fhat_to_img
    if marks is not None:
      def fhat_to_img(f_hat):
        self.sync()
        marks['decode_start'] = time.perf_counter()
        return orig(f_hat)
      vae.fhat_to_img = fhat_to_img
    try:
      with torch.inference_mode(), self.autocast():
        img = self.var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=seed, cfg=s['cfg'],
                                                top_k=min(s['top_k'], self.m['vocab_size']), top_p=s['top_p'])
    finally:
      if marks is not None:
        del vae.fhat_to_img  # The instance attribute; the class method shows through again.
    return img

  def cleanup(self):
    """Frees what a failed (out-of-memory) call may have left: gradients, KV caches, cached blocks."""
    if self.opt is not None:
      self.opt.zero_grad(set_to_none=True)
    for b in self.var.blocks:
      b.attn.kv_caching(False)
    gc.collect()
    if self.device.type == 'cuda':
      self.torch.cuda.empty_cache()

  def is_oom(self, e: BaseException) -> bool:
    oom = getattr(self.torch.cuda, 'OutOfMemoryError', ())
    return isinstance(e, oom) or 'out of memory' in str(e).lower() or 'CUBLAS_STATUS_ALLOC_FAILED' in str(e)

  def peak_of(self, fn) -> int | None:
    """Peak bytes allocated while fn() runs (CUDA), or None."""
    if self.device.type != 'cuda':
      fn()
      return None
    self.sync()
    self.torch.cuda.reset_peak_memory_stats(self.device)
    fn()
    self.sync()
    return int(self.torch.cuda.max_memory_allocated(self.device))

  def call(self, kind: str, batch: int, seed: int = 0):
    if kind == 'train':
      ids, labels, gt = self.train_inputs(batch, seed)
      return self.train_step(ids, labels, gt)
    return self.sample_call(batch, seed)

  # --- the batch -------------------------------------------------------------------------------------

  def fit_batch(self, kind: str, mask: str, ladder, cap: int) -> tuple[int, dict]:
    """The largest batch of `ladder` (<= cap) that runs; one successful call at it is made (a warm-up).
    Returns (batch, how)."""
    self.set_mask(mask)
    ladder = sorted({b for b in ladder if b <= cap}, reverse=True)
    if not ladder:
      raise ValueError(f'no batch of the ladder is <= the cap {cap}')
    how = {'rule': 'largest ladder batch that runs', 'ladder': ladder, 'tried': []}
    candidates = ladder
    if self.device.type == 'cuda':
      torch = self.torch
      small = [b for b in sorted(ladder) if b >= 8][:2] or sorted(ladder)[:2]
      peaks = []
      try:
        for b in small:
          self.call(kind, b)  # The first call creates the optimiser state and loads the kernels.
          self.cleanup()
          peaks.append(self.peak_of(lambda b=b: self.call(kind, b)))
          self.cleanup()
      except Exception as e:  # pylint: disable=broad-except
        if not self.is_oom(e):
          raise
        self.cleanup()
        how['probe_error'] = f'{type(e).__name__}: {str(e)[:300]}'
        peaks = []
      if len(peaks) == 2 and small[1] > small[0]:
        per = max((peaks[1] - peaks[0]) / (small[1] - small[0]), 1.0)
        fixed = peaks[0] - per * small[0]
        free, _ = torch.cuda.mem_get_info(self.device)
        avail = free + torch.cuda.memory_reserved(self.device)
        est = int((MEMORY_FRACTION * avail - fixed) / per)
        how.update(probe_batches=small, probe_peaks=peaks, bytes_per_sample=per, fixed_bytes=fixed,
                   available_bytes=avail, estimate=est)
        candidates = [b for b in ladder if b <= est] or ladder[-1:]
    for b in candidates:
      try:
        self.call(kind, b, seed=1)
        self.sync()
      except Exception as e:  # pylint: disable=broad-except
        if not self.is_oom(e):
          raise
        how['tried'].append({'batch': b, 'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'})
        self.cleanup()
        continue
      how['tried'].append({'batch': b, 'ok': True})
      return b, how
    raise MemoryError(f'{kind}: no batch of {candidates} fits: {how["tried"]}')

  # --- records ---------------------------------------------------------------------------------------

  def base_record(self, kind: str, mask: str, batch: int) -> dict:
    m = self.m
    return {'impl': 'var_pytorch', 'mode': mask, 'kind': kind, 'depth': m['depth'], 'width': m['width'],
            'heads': m['heads'], 'seq_len': self.L, 'batch': batch, 'dtype': m['dtype'],
            'autocast': None if self.dtype is None else str(self.dtype).replace('torch.', ''),
            'params': self.params, 'tokenizer_ch': m['tokenizer_ch'], 'compile_s': None}

  def attention_ops(self, kind: str) -> list[str]:
    """The attention operators one call at batch 1 runs (PyTorch's profiler): which kernels VAR used."""
    torch = self.torch
    acts = [torch.profiler.ProfilerActivity.CPU]
    try:
      with torch.profiler.profile(activities=acts) as prof:
        if kind == 'train':
          ids, labels, gt = self.train_inputs(1)
          self.var.train()
          with torch.no_grad(), self.autocast():
            self.var(labels, self.vae.quantize.idxBl_to_var_input(gt))
        else:
          self.sample_call(1, 0)
        self.sync()
    except Exception as e:  # pylint: disable=broad-except
      return [f'profiler failed: {type(e).__name__}: {e}']
    names = {ev.key for ev in prof.key_averages()}
    keep = ('attention', 'sdpa', 'flash', 'fmha', 'xformers', 'memory_efficient', 'cudnn_attention')
    return sorted(n for n in names if any(k in n.lower() for k in keep))

  def time_train(self, mask: str, batch: int, repeats: int, warmup: int, how: dict) -> dict:
    rec = self.base_record('train', mask, batch)
    self.set_mask(mask)
    ids, labels, gt = self.train_inputs(batch)
    for _ in range(warmup):
      self.train_step(ids, labels, gt)
    self.sync()
    if self.device.type == 'cuda':
      self.torch.cuda.reset_peak_memory_stats(self.device)
    times = []
    loss = None
    for _ in range(repeats):
      t = time.perf_counter()
      loss = self.train_step(ids, labels, gt)
      self.sync()
      times.append(time.perf_counter() - t)
    med = statistics.median(times)
    rec.update(seconds=med, all_s=[round(x, 6) for x in times], tokens_per_s=batch * self.L / med,
               images_per_s=batch / med, loss=float(loss.detach().float().cpu()), batch_how=how,
               memory_bytes=(int(self.torch.cuda.max_memory_allocated(self.device))
                             if self.device.type == 'cuda' else None),
               memory_note='torch.cuda.max_memory_allocated over the timed steps')
    rec['attention_ops'] = self.attention_ops('train')
    return rec

  def time_sample(self, mask: str, batch: int, repeats: int, warmup: int, how: dict) -> dict:
    rec = self.base_record('sample', mask, batch)
    self.set_mask(mask)
    for r in range(warmup):
      self.sample_call(batch, 100 + r)
    self.sync()
    if self.device.type == 'cuda':
      self.torch.cuda.reset_peak_memory_stats(self.device)
    full, tok = [], []
    img = None
    for r in range(repeats):
      marks = {}
      t0 = time.perf_counter()
      img = self.sample_call(batch, 200 + r, marks)
      self.sync()
      t2 = time.perf_counter()
      full.append(t2 - t0)
      tok.append(marks.get('decode_start', t2) - t0)
    f, t = statistics.median(full), statistics.median(tok)
    s = self.spec['sampler']
    x = img.float()
    rec.update(seconds=f, all_s=[round(v, 6) for v in full], images_per_s=batch / f,
               tokens_per_s=batch * self.L / f, seconds_tokens_only=t, images_per_s_tokens_only=batch / t,
               tokens_per_s_tokens_only=batch * self.L / t,
               seconds_decode=statistics.median([a - b for a, b in zip(full, tok)]),
               sampler={'cfg': s['cfg'], 'cfg_schedule': 'linear (VAR: cfg * si / (K - 1))',
                        'top_k': min(s['top_k'], self.m['vocab_size']), 'top_p': s['top_p']},
               markov_sampling=('KV cache emptied before every attention call: each scale attends to '
                                'itself only' if mask == 'markov' else None),
               memory_bytes=(int(self.torch.cuda.max_memory_allocated(self.device))
                             if self.device.type == 'cuda' else None),
               sanity={'image_shape': list(x.shape), 'image_finite': bool(self.torch.isfinite(x).all())},
               batch_how=how)
    rec['attention_ops'] = self.attention_ops('sample')
    return rec


def run(spec: dict) -> int:
  torch, models, notes = import_var(spec['var_dir'])
  want = spec.get('device', 'auto')
  # An explicit index: torch.cuda.set_device refuses a bare 'cuda' device (torch 2.11).
  device = (torch.device('cuda', 0) if want in ('auto', 'cuda') and torch.cuda.is_available()
            else torch.device('cpu'))
  if want == 'cuda' and device.type != 'cuda':
    fail('the PyTorch side was asked for CUDA, which torch.cuda.is_available() denies')
  if device.type == 'cuda':
    torch.cuda.set_device(device)
    # VAR's train.py: TF32 on, cuDNN autotuning on.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  if spec.get('threads'):
    torch.set_num_threads(int(spec['threads']))
  emit({'type': 'info', 'info': info(torch, notes, device)})
  deadline = spec.get('deadline')
  repeats, warmup = int(spec['repeats']), int(spec['warmup'])
  for m in spec['models']:
    runner = None
    for job in m['jobs']:
      kind, masks = job['kind'], list(job['masks'])
      est = float(job.get('estimate_s', 0))
      if deadline is not None and time.time() + est > deadline:
        for mask in masks:
          emit({'type': 'skipped', 'impl': 'var_pytorch', 'kind': kind, 'mode': mask, 'depth': m['depth'],
                'reason': f'time budget: {max(deadline - time.time(), 0):.0f} s left, about {est:.0f} s needed'})
        continue
      try:
        if runner is None:
          t = time.perf_counter()
          runner = Runner(torch, models, m, spec, device)
          log(f'depth {m["depth"]}: built in {time.perf_counter() - t:.1f} s ({runner.params / 1e6:.1f} M '
              f'parameters) on {device}')
        if 'batch' in job:
          batch, how = int(job['batch']), {'rule': 'given', 'reason': job.get('reason', '')}
        else:
          probe = 'causal' if 'causal' in masks else masks[0]
          t = time.perf_counter()
          batch, how = runner.fit_batch(kind, probe, job['ladder'], int(job['cap']))
          how['seconds'] = time.perf_counter() - t
          log(f'depth {m["depth"]} {kind}: batch {batch} ({how})')
        emit({'type': 'batch', 'kind': kind, 'depth': m['depth'], 'batch': batch, 'how': how})
      except Exception as e:  # pylint: disable=broad-except
        for mask in masks:
          emit({'type': 'record', 'record': {'impl': 'var_pytorch', 'kind': kind, 'mode': mask,
                                             'depth': m['depth'], 'width': m['width'], 'batch': None,
                                             'error': f'{type(e).__name__}: {e}'[:3000]}})
        log(f'depth {m["depth"]} {kind} failed: {type(e).__name__}: {str(e)[:300]}')
        if runner is not None:
          runner.cleanup()
        continue
      for mask in masks:
        if deadline is not None and time.time() > deadline:
          emit({'type': 'skipped', 'impl': 'var_pytorch', 'kind': kind, 'mode': mask, 'depth': m['depth'],
                'batch': batch, 'reason': 'time budget spent'})
          continue
        try:
          fn = runner.time_train if kind == 'train' else runner.time_sample
          rec = fn(mask, batch, repeats, warmup, how)
          log(f'{kind} {mask} depth {m["depth"]} batch {batch}: {rec["seconds"]:.3f} s')
        except Exception as e:  # pylint: disable=broad-except
          rec = {**runner.base_record(kind, mask, batch), 'error': f'{type(e).__name__}: {e}'[:3000]}
          log(f'{kind} {mask} depth {m["depth"]} batch {batch} failed: {rec["error"][:300]}')
        runner.cleanup()
        emit({'type': 'record', 'record': rec})
    del runner
    gc.collect()
    if device.type == 'cuda':
      torch.cuda.empty_cache()
  return 0


def main(argv=None) -> int:
  global _PROTO
  _PROTO = sys.stdout
  sys.stdout = sys.stderr  # VAR prints as it builds; the protocol owns the real standard output.
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--var_dir', required=True, help='a checkout of the official VAR code')
  ap.add_argument('--check', action='store_true', help='import torch and the models, print info, exit')
  ap.add_argument('--spec', help='JSON file of the jobs (see srdd_jax.bench.vs_var)')
  args = ap.parse_args(argv)
  if args.check:
    torch, _, notes = import_var(args.var_dir)
    emit({'type': 'info', 'info': info(torch, notes, torch.device('cpu'))})
    return 0
  if not args.spec:
    fail('give --check or --spec')
  with open(args.spec) as f:
    spec = json.load(f)
  spec['var_dir'] = args.var_dir
  return run(spec)


if __name__ == '__main__':
  sys.exit(main())
