"""The scale-wise transformer: parity, masks, converter, presets, FLOPs, sharding, loss."""
import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srdd_jax.convert import params_io
from srdd_jax.convert import state_dict as sd
from srdd_jax.convert import var_transformer as cvt
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.vqvae import count_params
from srdd_jax.tools import check_reference, convert_var
from srdd_jax.transformer import attention, flops
from srdd_jax.transformer.config import VARConfig, preset
from srdd_jax.transformer.loss import cross_entropy_metrics
from srdd_jax.transformer.model import VAR
from tests.conftest import reference_file
from tests.var_numpy import var_forward

PATCH = (1, 2, 3)


def _init(config, labels, x, seed=0):
  """The model's initial parameters, unboxed: one compiled initialiser (op by op, a model's init compiles
  a program per operation, 2.5x the work on CPU)."""
  return jax.jit(lambda k: nn.meta.unbox(VAR(config).init(k, labels, x)['params']))(jax.random.PRNGKey(seed))


def random_torch_state(depth, c, heads, classes, vocab, cvae, patch_nums, l2, shared, seed):
  """A VAR state dict in PyTorch names and layouts, written out by hand, with random values."""
  rng = np.random.default_rng(seed)
  r = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
  seq = sum(p * p for p in patch_nums)
  st = {'pos_start': r(1, patch_nums[0] ** 2, c), 'pos_1LC': r(1, seq, c),
        'word_embed.weight': r(c, cvae), 'word_embed.bias': r(c),
        'class_emb.weight': r(classes + 1, c), 'lvl_embed.weight': r(len(patch_nums), c),
        'head_nm.ada_lin.1.weight': r(2 * c, c), 'head_nm.ada_lin.1.bias': r(2 * c),
        'head.weight': r(vocab, c), 'head.bias': r(vocab),
        'lvl_1L': np.zeros((1, seq), np.int64), 'attn_bias_for_masking': np.zeros((1, 1, seq, seq), np.float32)}
  if shared:
    st.update({'shared_ada_lin.1.weight': r(6 * c, c), 'shared_ada_lin.1.bias': r(6 * c)})
  for i in range(depth):
    p = f'blocks.{i}.'
    st.update({p + 'attn.mat_qkv.weight': r(3 * c, c), p + 'attn.q_bias': r(c), p + 'attn.v_bias': r(c),
               p + 'attn.zero_k_bias': np.zeros(c, np.float32), p + 'attn.proj.weight': r(c, c),
               p + 'attn.proj.bias': r(c), p + 'ffn.fc1.weight': r(4 * c, c), p + 'ffn.fc1.bias': r(4 * c),
               p + 'ffn.fc2.weight': r(c, 4 * c), p + 'ffn.fc2.bias': r(c)})
    if l2:
      s = np.full((1, heads, 1, 1), math.log(4.0), np.float32) + r(1, heads, 1, 1)
      s[0, 0] = 5.0  # Above log(100): exercises the temperature cap.
      st[p + 'attn.scale_mul_1H11'] = s
    if shared:
      st[p + 'ada_gss'] = r(1, 1, 6, c)
    else:
      st.update({p + 'ada_lin.1.weight': r(6 * c, c), p + 'ada_lin.1.bias': r(6 * c)})
  return st


@pytest.mark.parametrize('l2,shared', [(True, False), (False, False), (False, True), (True, True)])
def test_matches_independent_numpy_forward(l2, shared):
  depth, c, heads = 2, 64, 4
  st = random_torch_state(depth, c, heads, 5, 48, 8, PATCH, l2, shared, seed=int(l2) * 2 + int(shared))
  config = cvt.infer_var_config({k: v.shape for k, v in st.items()}, patch_nums=PATCH, num_heads=heads,
                                drop_path_rate=0.0, cond_drop_rate=0.0)
  assert (config.attn_l2_norm, config.shared_aln, config.depth, config.num_heads) == (l2, shared, 2, 4)
  params = cvt.convert_var(st, config)
  rng = np.random.default_rng(0)
  labels = np.array([0, 3, 5])  # 5 = the null class.
  x_in = rng.standard_normal((3, config.seq_len - 1, 8)).astype(np.float32)
  for mask in ('causal', 'markov'):
    ours = VAR(dataclasses.replace(config, mask=mask)).apply({'params': params}, labels, x_in)
    ref = var_forward(st, labels, x_in.astype(np.float64), depth=depth, heads=heads, patch_nums=PATCH,
                      mask=mask, attn_l2_norm=l2, shared_aln=shared)
    assert np.linalg.norm(np.asarray(ours) - ref) / np.linalg.norm(ref) < 1e-5, mask


def test_markov_blocks_equal_dense_masked_attention():
  pn = (1, 2, 3, 4)
  be = VARConfig(depth=1, width=64, num_heads=2, patch_nums=pn).begin_ends
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  shape = (2, sum(p * p for p in pn), 2, 16)
  q, k, v = (jax.random.normal(kk, shape) for kk in (k1, k2, k3))
  dense = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, 0.3, attention.markov_mask(pn)))(q, k, v)
  np.testing.assert_allclose(jax.jit(lambda q, k, v: attention.markov_attention(q, k, v, 0.3, be))(q, k, v),
                             dense, atol=1e-6)


@pytest.mark.parametrize('mask', ['causal', 'markov'])
def test_what_each_scale_sees(mask):
  """Changing scale 2's input moves scale 2's logits (and, causal only, the finer scales'), never the coarser."""
  pn = (1, 2, 3, 4)
  config = VARConfig(depth=2, width=64, num_heads=2, num_classes=4, vocab_size=16, z_channels=4,
                     patch_nums=pn, mask=mask, init_adaln_gamma=0.5)  # Blocks far from identity.
  x = np.random.default_rng(1).standard_normal((2, config.seq_len - 1, 4)).astype(np.float32)
  labels = np.array([1, 2], np.int32)
  params = _init(config, labels, x)
  be = config.begin_ends
  x2 = x.copy()
  x2[:, be[2][0] - 1:be[2][1] - 1] += 1.0
  forward = jax.jit(lambda p, x: VAR(config).apply({'params': p}, labels, x))
  a, b = np.asarray(forward(params, x)), np.asarray(forward(params, x2))
  changed = [bool(np.max(np.abs(a[:, s:e] - b[:, s:e])) > 1e-6) for s, e in be]
  assert changed == ([False, False, True, True] if mask == 'causal' else [False, False, True, False])


def test_reference_var_files_pass_logits_and_greedy_sampling(capsys):
  # The compact files of the repository: test_check_reference.test_compact_reference_files_pass.
  files = [reference_file('var_d2_w128.npz'), reference_file('var_d2_w128_shared_aln.npz')]
  assert check_reference.main(files + ['--strict']) == 0
  out = capsys.readouterr().out
  for m in ('causal', 'markov'):
    for s in ('slice', 'lse', 'argmax'):
      assert out.count(f'PASS         logits_{m}_{s}') == 2
    for k in range(10):
      assert f'PASS         greedy_{m}_idx_{k} ' in out
    assert f'PASS         greedy_{m}_img' in out
  assert 'FAIL' not in out and 'NOT CHECKED' not in out


def test_check_reference_reads_other_var_files(tmp_path, capsys):
  """A var file with attn_l2_norm false, 3 heads of width 96, 7 classes, 3 scales, batch 3."""
  st = random_torch_state(3, 96, 3, 7, 40, 8, PATCH, False, False, seed=11)
  config = cvt.infer_var_config({k: v.shape for k, v in st.items()}, patch_nums=PATCH, num_heads=3,
                                drop_path_rate=0.0, cond_drop_rate=0.0)
  labels = np.array([1, 7, 4])
  x_in = np.random.default_rng(3).standard_normal((3, config.seq_len - 1, 8)).astype(np.float32)
  data = {'var/' + k: v.astype(np.float16) for k, v in st.items()}
  st16 = {k: v.astype(np.float16).astype(np.float64) for k, v in st.items()}
  for mask in ('causal', 'markov'):
    lg = var_forward(st16, labels, x_in.astype(np.float64), depth=3, heads=3, patch_nums=PATCH, mask=mask,
                     attn_l2_norm=False, shared_aln=False)
    data[f'logits_{mask}_slice'] = lg[..., :32].astype(np.float32)
    data[f'logits_{mask}_lse'] = np.log(np.exp(lg).sum(-1)).astype(np.float32)
    data[f'logits_{mask}_argmax'] = lg.argmax(-1)
  meta = dict(kind='var', depth=3, width=96, heads=3, num_classes=7, attn_l2_norm=False, shared_aln=False,
              patch_nums=list(PATCH), batch=3)
  path = tmp_path / 'var_other.npz'
  np.savez(path, meta=np.array(json.dumps(meta)), labels=labels, x_in=x_in, **data)
  assert check_reference.main([str(path), '--strict']) == 0, capsys.readouterr().out
  data['logits_markov_slice'] = data['logits_markov_slice'] * 1.001
  np.savez(path, meta=np.array(json.dumps(meta)), labels=labels, x_in=x_in, **data)
  assert check_reference.main([str(path)]) == 1
  assert 'FAIL         logits_markov_slice' in capsys.readouterr().out


PARAM_COUNTS = {'var_d16': 310_283_520, 'var_d20': 600_917_136, 'var_d24': 1_033_399_360,
                'var_d30': 2_010_020_356, 'var_d36_shared_aln_512': 2_353_893_904}


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_released_manifests_map_and_count(name):
  with open(reference_file('checkpoint_manifests.json')) as f:
    shapes = json.load(f)[name]
  config = cvt.infer_var_config(shapes)
  km = cvt.map_var(shapes, config)
  assert len(km.targets) + len(km.dropped) == len(shapes)
  assert all(k.endswith(('lvl_1L', 'attn_bias_for_masking', 'zero_k_bias')) for k in km.dropped)
  assert config.attn_l2_norm and config.shared_aln == name.startswith('var_d36')
  assert count_params(cvt.abstract_params(config)) == PARAM_COUNTS[name]
  depth = int(name[5:7])
  assert config == preset(f'd{depth}', num_classes=1000, mask='causal')
  assert count_params(cvt.abstract_params(preset(f'd{depth}'))) == PARAM_COUNTS[name]


def test_converter_is_strict_and_cli_saves(tmp_path, capsys):
  st = random_torch_state(2, 64, 4, 5, 48, 8, PATCH, True, False, seed=0)
  config = cvt.infer_var_config({k: v.shape for k, v in st.items()}, patch_nums=PATCH)
  bad = dict(st)
  del bad['blocks.1.attn.q_bias']
  bad['blocks.0.ffn.fc1.weight'] = bad['blocks.0.ffn.fc1.weight'][:100]
  bad['blocks.0.attn.k_bias'] = np.zeros(64, np.float32)
  with pytest.raises(sd.StateDictMismatch) as e:
    cvt.convert_var(bad, config)
  msg = str(e.value)
  assert 'blocks.0.attn.k_bias' in msg and 'blocks_1/attn/q_bias (64,)' in msg
  assert 'blocks.0.ffn.fc1.weight: shape (100, 64)' in msg
  assert convert_var.main(['--var', reference_file('var_d2_w128.npz'), '--prefix', 'var/',
                           '--out', str(tmp_path / 'v')]) == 0
  cfg, params = params_io.load_var(str(tmp_path / 'v'))
  assert (cfg.depth, cfg.width, cfg.num_heads, cfg.num_classes) == (2, 128, 2, 10)
  assert count_params(params) == 1_248_900


def test_markov_needs_fewer_flops_and_no_dense_mask_d16():
  """XLA cost analysis of the d16 training forward (680 tokens, width 1024) at depth 2: every block
  computes the same attention, so the gap below is linear in the depth and depth 2 checks the same
  per-block count as 16 blocks would (at an eighth of the compile). Neither mask builds an L x L array."""
  depth = 2  # d16's width 1024 and 16 heads kept (preset(depth=2) would narrow them by VAR's rule).
  causal = flops.compiled_forward_flops(dataclasses.replace(preset('d16', mask='causal'), depth=depth))
  markov = flops.compiled_forward_flops(dataclasses.replace(preset('d16', mask='markov'), depth=depth))
  assert markov < causal
  # Attention matmuls cost 4 * C * depth FLOPs per (query, key) pair evaluated: per chunk of scales,
  # its queries times its key range (causal: the prefix; markov: the chunk itself, about sum pn^4,
  # against VAR's L^2 for both). The gap is that difference.
  pn = preset('d16').patch_nums
  pairs = {m: sum((qe - qb) * (ke - kb) for qb, qe, kb, ke, _ in attention.chunks(pn, m))
           for m in attention.MASKS}
  assert pairs['causal'] < preset('d16').seq_len ** 2 and pairs['markov'] < 2 * sum(p ** 4 for p in pn)
  expected_gap = 4 * 1024 * depth * (pairs['causal'] - pairs['markov'])
  assert abs((causal - markov) - expected_gap) / expected_gap < 0.05
  for mask in attention.MASKS:
    cfg = preset('d16', mask=mask, depth=1)
    p = cvt.abstract_params(cfg)
    hlo = jax.jit(lambda p, l, x, cfg=cfg: VAR(cfg).apply({'params': p}, l, x)).lower(
        p, jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1, 679, 32), jnp.float32)).as_text()
    assert '680x680' not in hlo


def test_d16_parameters_are_sharded_on_a_2x2x2_mesh():
  abstract = cvt.abstract_params(preset('d16'), boxed=True)
  leaves = jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  mesh = pm.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  shardings = pm.param_shardings(abstract, mesh)
  flat_s = sd.flatten_params(shardings)
  big_replicated = [('/'.join(path), leaf.shape) for path, leaf in sd.flatten_params(nn.meta.unbox(abstract)).items()
                    if math.prod(leaf.shape) * 4 > 2 ** 20 and all(a is None for a in flat_s[path].spec)]
  assert not big_replicated, big_replicated


def test_init_follows_var():
  config = VARConfig(depth=4, width=256, num_heads=4, num_classes=10, vocab_size=512, init_adaln_gamma=1e-3)
  p = _init(config, np.zeros((2,), np.int32), np.zeros((2, config.seq_len - 1, 32), np.float32))
  std = math.sqrt(1 / (3 * 256))
  close = lambda a, s: abs(float(np.std(a)) / s - 1) < 0.05
  assert close(p['blocks_0']['ffn']['fc1']['kernel'], std)
  assert close(p['blocks_0']['attn']['proj']['kernel'], std / math.sqrt(8))
  assert close(p['head']['kernel'], std * 0.02)
  assert close(p['head_nm']['ada_lin_1']['kernel'], std * 0.5)
  ada = np.asarray(p['blocks_1']['ada_lin_1']['kernel'])
  assert close(ada[:, :512], std * 1e-3) and close(ada[:, 512:], std * 0.5)
  assert close(p['class_emb']['embedding'], std) and close(p['pos_1LC'], std)
  np.testing.assert_allclose(p['blocks_2']['attn']['scale_mul_1H11'], math.log(4.0))
  assert not np.any(p['blocks_0']['attn']['q_bias']) and not np.any(p['head']['bias'])


def test_loss_metrics_and_label_dropout():
  config = VARConfig(depth=1, width=64, num_heads=1, num_classes=3, vocab_size=8, z_channels=4,
                     patch_nums=(1, 2), cond_drop_rate=0.1)
  logits = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
  targets = np.array([[0, 1, 2, 3, 4], [5, 6, 7, 0, 1]], np.int32)
  metrics = jax.jit(cross_entropy_metrics, static_argnums=2)
  loss, m = metrics(logits, targets, config)
  lp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
  acc = (lp.argmax(-1) == targets)
  np.testing.assert_allclose(loss, nll.mean(), rtol=1e-6)
  np.testing.assert_allclose(m['last_scale_loss'], nll[:, 1:].mean(), rtol=1e-6)
  np.testing.assert_allclose(m['accuracy'], acc.mean())
  np.testing.assert_allclose(m['last_scale_accuracy'], acc[:, 1:].mean())
  # Label dropout: the logits of a dropped example equal those of the null class.
  model = VAR(config)
  n = 4000
  x = np.zeros((n, 4, 4), np.float32)
  params = _init(config, np.zeros((2,), np.int32), x[:2])
  rng = jax.random.PRNGKey(5)
  trained = jax.jit(lambda p, l, x, r: model.apply({'params': p}, l, x, train=True, rngs={'dropout': r}))(
      params, np.zeros((n,), np.int32), x, rng)
  evaluate = jax.jit(lambda p, l, x: model.apply({'params': p}, l, x))  # One program for both labels.
  null = evaluate(params, np.full((1,), 3, np.int32), x[:1])
  cls0 = evaluate(params, np.zeros((1,), np.int32), x[:1])
  dropped = np.all(np.abs(np.asarray(trained) - np.asarray(null)) < 1e-6, axis=(1, 2))
  kept = np.all(np.abs(np.asarray(trained) - np.asarray(cls0)) < 1e-6, axis=(1, 2))
  assert np.all(dropped ^ kept)
  # Binomial(4000, 0.1): mean 400, sd 19; 5 sd either side.
  assert 305 < dropped.sum() < 495
  # The loss of a training-mode forward (as the train step computes it): finite, the four metrics.
  loss, m = metrics(np.asarray(trained)[:2], np.zeros((2, 5), np.int32), config)
  assert np.isfinite(float(loss)) and set(m) == {'loss', 'accuracy', 'last_scale_loss', 'last_scale_accuracy'}


def test_drop_path_is_per_example_and_only_in_training():
  config = VARConfig(depth=3, width=64, num_heads=1, num_classes=3, vocab_size=8, z_channels=4,
                     patch_nums=(1, 2), cond_drop_rate=0.0, drop_path_rate=0.9, init_adaln_gamma=0.5)
  assert config.drop_path_rate == 0.9
  model = VAR(config)
  x = np.random.default_rng(1).standard_normal((512, 4, 4)).astype(np.float32)
  labels = np.zeros((512,), np.int32)
  params = _init(config, labels, x)
  ev = jax.jit(lambda p, l, x: model.apply({'params': p}, l, x))(params, labels, x)
  train = jax.jit(lambda p, l, x, key: model.apply({'params': p}, l, x, train=True, rngs={'dropout': key}))
  tr = lambda k: train(params, labels, x, jax.random.PRNGKey(k))
  np.testing.assert_array_equal(tr(3), tr(3))
  assert not np.allclose(tr(3), ev)
  # Rates linspace(0, 0.9, 3); like VAR's DropPath, each residual branch (attention, FFN) draws its own
  # per-example mask. Two draws agree on an example with probability
  # (0.45^2 + 0.55^2)^2 * (0.9^2 + 0.1^2)^2 = 0.171; a mask shared by the batch would make them agree on
  # all examples or none. Binomial(512, 0.171): 87.6 +- 8.5, bounds at 5 sd.
  same = np.all(np.asarray(tr(3)) == np.asarray(tr(4)), axis=(1, 2))
  assert 45 <= same.sum() <= 130
  assert VARConfig(depth=16).drop_path_rate == pytest.approx(0.1 * 16 / 24)
