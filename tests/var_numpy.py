"""An independent float64 NumPy transcription of VAR's PyTorch forward (dense masks), for tests.

It reads the *PyTorch-layout* state dict, so it shares no code with the Flax port or its converter.
"""
import math

import numpy as np


def _ln(x, eps):
  m = x.mean(-1, keepdims=True)
  v = ((x - m) ** 2).mean(-1, keepdims=True)
  return (x - m) / np.sqrt(v + eps)


def _silu(x):
  return x / (1 + np.exp(-x))


def _linear(x, sd, name, bias=True):
  y = x @ sd[name + '.weight'].astype(np.float64).T
  return y + sd[name + '.bias'] if bias else y


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def var_forward(sd, labels, x_in, *, depth, heads, patch_nums, mask, attn_l2_norm, shared_aln,
                eps=1e-6):
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  c = sd['word_embed.weight'].shape[0]
  hd = c // heads
  lvl = np.concatenate([np.full(p * p, i) for i, p in enumerate(patch_nums)])
  allowed = lvl[:, None] >= lvl[None, :] if mask == 'causal' else lvl[:, None] == lvl[None, :]
  bias = np.where(allowed, 0.0, -np.inf)
  b = len(labels)
  cond = sd['class_emb.weight'][labels]
  first_l = patch_nums[0] ** 2
  sos = cond[:, None, :] + sd['pos_start']
  x = np.concatenate([np.broadcast_to(sos, (b, first_l, c)), _linear(x_in, sd, 'word_embed')], 1)
  x = x + sd['lvl_embed.weight'][lvl][None] + sd['pos_1LC']
  gss = _linear(_silu(cond), sd, 'shared_ada_lin.1').reshape(b, 1, 6, c) if shared_aln else None
  for i in range(depth):
    p = f'blocks.{i}.'
    if shared_aln:
      mods = sd[p + 'ada_gss'] + gss
    else:
      mods = _linear(_silu(cond), sd, p + 'ada_lin.1').reshape(b, 1, 6, c)
    g1, g2, s1, s2, h1, h2 = [mods[:, :, j] for j in range(6)]
    h = _ln(x, eps) * (1 + s1) + h1
    qkv_b = np.concatenate([sd[p + 'attn.q_bias'], np.zeros(c), sd[p + 'attn.v_bias']])
    qkv = (h @ sd[p + 'attn.mat_qkv.weight'].T + qkv_b).reshape(b, -1, 3, heads, hd)
    q, k, v = [qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3)]  # B H L hd
    if attn_l2_norm:
      sm = np.exp(np.minimum(sd[p + 'attn.scale_mul_1H11'], math.log(100)))
      q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12) * sm
      k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
      scale = 1.0
    else:
      scale = 0.25 / math.sqrt(hd)
    att = (q * scale) @ k.transpose(0, 1, 3, 2) + bias
    att = np.exp(att - att.max(-1, keepdims=True))
    att = att / att.sum(-1, keepdims=True)
    o = (att @ v).transpose(0, 2, 1, 3).reshape(b, -1, c)
    x = x + _linear(o, sd, p + 'attn.proj') * g1
    h = _ln(x, eps) * (1 + s2) + h2
    x = x + _linear(_gelu_tanh(_linear(h, sd, p + 'ffn.fc1')), sd, p + 'ffn.fc2') * g2
  mods = _linear(_silu(cond), sd, 'head_nm.ada_lin.1').reshape(b, 1, 2, c)
  h = _ln(x, eps) * (1 + mods[:, :, 0]) + mods[:, :, 1]
  return _linear(h, sd, 'head')


class VarProgressiveTrainer:
  """VAR's progressive training as its train.py and trainer.py run it, one call per iteration: the
  stage of g_it (train.py), the trainer's stage counters and warm-up (trainer.py, stateful), and the
  loss with per-token weights 1/L. Returns the loss of `nll` (B, L) float64 at that iteration."""

  def __init__(self, patch_nums, pg, pg0, wp_it, max_it, pgwp_it):
    self.patch_nums, self.pg, self.pg0 = tuple(patch_nums), pg, pg0
    self.wp_it, self.max_it, self.pgwp_it = wp_it, max_it, pgwp_it
    self.L = sum(p * p for p in patch_nums)
    self.begin_ends, cur = [], 0
    for p in patch_nums:
      self.begin_ends.append((cur, cur + p * p))
      cur += p * p
    self.prog_it, self.last_prog_si, self.first_prog = 0, -1, True

  def prog_si(self, g_it):
    if g_it <= self.wp_it:
      return self.pg0
    if g_it >= self.max_it * self.pg:
      return len(self.patch_nums) - 1
    delta = len(self.patch_nums) - 1 - self.pg0
    progress = min(max((g_it - self.wp_it) / (self.max_it * self.pg - self.wp_it), 0), 1)
    return self.pg0 + round(progress * delta)

  def loss(self, g_it, nll):
    prog_si = self.prog_si(g_it)
    if self.last_prog_si != prog_si:
      if self.last_prog_si != -1:
        self.first_prog = False
      self.last_prog_si = prog_si
      self.prog_it = 0
    self.prog_it += 1
    prog_wp = max(min(self.prog_it / self.pgwp_it, 1), 0.01)
    if self.first_prog:
      prog_wp = 1
    if prog_si == len(self.patch_nums) - 1:
      prog_si = -1
    lw = np.ones((1, self.L)) / self.L
    if prog_si >= 0:
      bg, ed = self.begin_ends[prog_si]
      nll = nll[:, :ed]
      lw = lw[:, :ed].copy()
      lw[:, bg:ed] *= min(max(prog_wp, 0), 1)
    return float((nll * lw).sum(-1).mean()), nll.shape[1], prog_wp
