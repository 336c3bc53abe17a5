"""Models named by a config: the one way every mode gets its tokenizer and transformer weights."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np
from absl import logging

from srdd_jax import files
from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.convert import params_io, var_vqvae
from srdd_jax.convert.reference import read_meta, vqvae_config_from_meta
from srdd_jax.data import token_cache
from srdd_jax.parallel.workdir import describe_change
from srdd_jax.tokenizer.api import Tokenizer, tokenizer_config, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.model import blocks_layout, refine_params


class LoadedTokenizer:
  """A tokenizer's config, its weights and where they came from (`source`, in words); `images` are those
  a reference file supplies (NHWC, [-1, 1]). Fresh weights are initialised when first used, so that a
  config error found before then costs no initialisation."""

  def __init__(self, config: VQVAEConfig, params=None, source: str = '', images=None, init=None):
    self.config, self.source, self.images = config, source, images
    self._params, self._init = params, init
    self._identity = None

  @property
  def params(self):
    if self._params is None:
      self._params = self._init()
    return self._params

  def identity(self) -> dict:
    """tokenizer_identity of this tokenizer, with where it came from (`source`); hashed once."""
    if self._identity is None:
      self._identity = {**tokenizer_identity(self.config, self.params), 'source': self.source}
    return self._identity


def tokenizer_identity(vq: VQVAEConfig, params) -> dict:
  """What tells one tokenizer from another: {'hash': of the two below, 'weights': token_cache.params_hash of
  its weights, 'architecture': its VQVAEConfig (model.json's config)}. The architecture counts as much as
  the weights: the same weights with quant_resi 0.1 instead of 0.5 give other token ids for most tokens.
  The scales (patch_nums) are left out: each user quantizes at its own (a token cache, a model and a
  student at theirs) and records them beside."""
  architecture = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(vq))).items() if k != 'patch_nums'}
  weights = token_cache.params_hash(params)
  both = json.dumps({'architecture': architecture, 'weights': weights}, sort_keys=True)
  return {'hash': hashlib.sha256(both.encode()).hexdigest(), 'weights': weights, 'architecture': architecture}


def tokenizer_difference(recorded: dict, current: dict) -> str:
  """How two tokenizer identities differ, in words: the architecture's keys that changed, or the weights."""
  if recorded.get('architecture') is not None and recorded['architecture'] != current['architecture']:
    return 'architecture ' + describe_change(recorded['architecture'], current['architecture'])
  return f'weights {str(recorded.get("weights"))[:12]} -> {str(current["weights"])[:12]}'


def check_tokenizer_of(directory: str, key: str, tok: LoadedTokenizer, what: str = 'trained') -> None:
  """A transformer export (`key`=`directory`) that records the tokenizer it was trained with (its
  model.json's train record) is used only with that tokenizer: another one's ids mean other images. A
  ConfigError naming both; an export without a record (convert_var's, an earlier version's) passes."""
  recorded = (params_io.model_meta(directory).get('train') or {}).get('tokenizer')
  if not recorded or recorded.get('hash') == tok.identity()['hash']:
    return
  mine = tok.identity()
  raise ConfigError(
      f'{key}={directory!r} was {what} with the tokenizer {recorded.get("source") or "(not recorded)"} (hash '
      f'{str(recorded.get("hash"))[:12]}), config.tokenizer.checkpoint gives another, {mine["source"]} (hash '
      f'{mine["hash"][:12]}; {tokenizer_difference(recorded, mine)}): use the tokenizer it was {what} with')


def check_checkpoint(config, key: str) -> dict:
  """config.<key>.checkpoint (key 'model': a transformer, 'tokenizer': a VQ-VAE) present and of its kind,
  no weight read: its model.json. The errors the loaders below give for the same directory."""
  path = config[key].checkpoint
  if not path:
    raise ConfigError(f'config.{key}.checkpoint is empty: give the directory written by '
                      f'`python -m srdd_jax.tools.convert_var --{"var" if key == "model" else "vae"} ...` '
                      'or by training')
  if not files.isdir(path):
    if key == 'tokenizer':
      raise ConfigError(
          f'config.tokenizer.checkpoint={path!r} does not exist; convert VAR\'s tokenizer with '
          f'`python -m srdd_jax.tools.convert_var --vae vae_ch160v4096z32.pth --out {path}` or '
          'train one with --mode=train_tokenizer')
    raise ConfigError(f'config.{key}.checkpoint={path!r} does not exist')
  try:
    return params_io.check_model_dir(path, 'var' if key == 'model' else 'vqvae')
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'config.{key}.checkpoint: {e}') from e


def load_tokenizer(config, *, reference: bool = False) -> LoadedTokenizer:
  """config.tokenizer -> the tokenizer, from (in order) `checkpoint`, `reference_npz` when `reference`
  is allowed and the file exists, or a fresh initialisation when `allow_random` (or `reference`) says
  so. A checkpoint carries its own architecture; the others are built by `tokenizer_config`."""
  c = with_defaults(config)
  tc = c.tokenizer
  if tc.checkpoint:
    check_checkpoint(c, 'tokenizer')
    try:
      vq, params = params_io.load_vqvae(tc.checkpoint)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f'config.tokenizer.checkpoint: {e}') from e
    tok = LoadedTokenizer(vq, params, f'checkpoint {files.absolute(tc.checkpoint)}')
    if tc.params_sha256:
      found = tok.identity()['hash']  # Its architecture (model.json) and its weights.
      if found != tc.params_sha256:
        raise ConfigError(f'config.tokenizer.checkpoint={tc.checkpoint!r} holds a tokenizer of hash {found[:16]}... '
                          f'(architecture and weights), not config.tokenizer.params_sha256={tc.params_sha256[:16]}...: '
                          "another or damaged tokenizer (set params_sha256='' to use it anyway)")
    return tok
  if reference and tc.reference_npz and files.isfile(tc.reference_npz):
    with files.np_load(tc.reference_npz) as z:
      vq = vqvae_config_from_meta(read_meta(z, tc.reference_npz), tc.reference_npz)
      params = var_vqvae.convert_vqvae({k[4:]: z[k] for k in z.files if k.startswith('vae/')}, vq)
      images = np.transpose(z['img'], (0, 2, 3, 1)).astype(np.float32) if 'img' in z.files else None
    return LoadedTokenizer(vq, params, f'reference file {tc.reference_npz} (VAR code, random weights)', images)
  if not (tc.allow_random or reference):
    raise ConfigError(_EMPTY_TOKENIZER)
  vq = tokenizer_config(c)

  def init():
    logging.warning('config.tokenizer.checkpoint is empty: a freshly initialised (seed %d) tokenizer is '
                    'used, fine for smoke runs only', c.seed)
    return unbox(Tokenizer(tok.config).init(jax.random.PRNGKey(c.seed + 1)))

  tok = LoadedTokenizer(vq, source='fresh random initialisation (no weights found)', init=init)
  return tok


_EMPTY_TOKENIZER = ('config.tokenizer.checkpoint is empty: give a converted or trained tokenizer (or set '
                    'config.tokenizer.allow_random=True for a smoke run)')


def tokenizer_architecture(config) -> VQVAEConfig:
  """The architecture of the tokenizer config.tokenizer names, without its weights: the checkpoint's
  model.json, or the config's own for a fresh one (allow_random). What a dry run checks against."""
  c = with_defaults(config)
  if c.tokenizer.checkpoint:
    return VQVAEConfig(**check_checkpoint(c, 'tokenizer')['config'])
  if not c.tokenizer.allow_random:
    raise ConfigError(_EMPTY_TOKENIZER)
  return tokenizer_config(c)


def at_model_scales(config, vq: VQVAEConfig) -> VQVAEConfig:
  """`vq` at the scales of config.model.patch_nums (the tokenizer quantizes at whatever scales it is
  given; the model's schedule must end at its latent side)."""
  pn = tuple(int(p) for p in with_defaults(config).model.patch_nums)
  if not pn or pn[-1] != vq.latent_side:
    raise ConfigError(f'config.model.patch_nums={pn} must end at the tokenizer latent side {vq.latent_side}')
  try:
    return dataclasses.replace(vq, patch_nums=pn)
  except ValueError as e:
    raise ConfigError(f'config.model.patch_nums={pn}: {e}') from e


def tokenizer_for_model(config) -> LoadedTokenizer:
  """The tokenizer at the scales of config.model.patch_nums (`at_model_scales`)."""
  c = with_defaults(config)
  tok = load_tokenizer(c)
  tok.config = at_model_scales(c, tok.config)
  return tok


def load_models(config):
  """(VARConfig, var params, VQVAEConfig, vae params) of the checkpoints config.model.checkpoint and
  config.tokenizer.checkpoint; config.model.mask / dtype override the checkpoint's when given."""
  c = with_defaults(config)
  for key in ('model', 'tokenizer'):
    check_checkpoint(c, key)
  try:
    var_config, var_params = params_io.load_var(c.model.checkpoint)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'config.model.checkpoint: {e}') from e
  tok = load_tokenizer(c)
  check_tokenizer_of(c.model.checkpoint, 'config.model.checkpoint', tok)
  # How the blocks run (scanned or not, the matmuls' dtypes) is the config's choice, whatever the weights
  # were saved with.
  # config.model.refine adds the (zero-initialised, so inert) refine stream to a checkpoint without it;
  # a checkpoint that has it keeps it.
  var_config = dataclasses.replace(var_config, dtype=c.model.dtype, scan_blocks=bool(c.model.scan),
                                   attention=c.model.attention, cpu_matmul=c.model.cpu_matmul,
                                   refine=var_config.refine or bool(c.model.refine),
                                   **({'mask': c.model.mask} if c.model.mask else {}))
  try:
    var_params = blocks_layout(var_params, var_config)
  except ValueError as e:
    raise ConfigError(f'config.model.checkpoint={c.model.checkpoint!r}: {e}') from e
  var_params = with_refine_params(var_params, var_config, jax.random.PRNGKey(c.seed))
  vq = tok.config
  if tuple(vq.patch_nums) != tuple(var_config.patch_nums):
    vq = dataclasses.replace(vq, patch_nums=var_config.patch_nums)
  return var_config, var_params, vq, tok.params


def with_refine_params(params, var_config: VARConfig, rng):
  """`params` with the refine stream's parameters added at their initial values (the projection at zero,
  so the logits are unchanged) when `var_config` has the stream and the weights were trained without
  it; otherwise `params` as they are."""
  if not var_config.refine or all(k in params for k in ('refine_embed', 'refine_proj')):
    return params
  fresh = refine_params(var_config, rng)
  return {**params, **{k: v for k, v in fresh.items() if k not in params}}


def init_params_from(directory: str, var_config: VARConfig, abstract_params, rng,
                     key: str = 'config.train.init_from'):
  """The weights of the transformer directory `directory` (a training export or convert_var's output)
  to start a run of `var_config` from: in its block layout, with the refine stream added if missing.
  Every parameter must have the shape of `abstract_params` (the run's, shapes only); a difference is a
  ConfigError naming the parameter and both shapes."""
  if not files.isdir(directory):
    raise ConfigError(f'{key}={directory!r} does not exist')
  try:
    _, params = params_io.load_var(directory)
    params = blocks_layout(params, var_config)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'{key}={directory!r}: {e}') from e
  params = with_refine_params(params, var_config, rng)
  path_str = lambda p: '/'.join(str(getattr(k, 'key', k)) for k in p)
  got = {path_str(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  want = {path_str(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  for name in sorted(set(got) | set(want)):
    if got.get(name) != want.get(name):
      raise ConfigError(
          f'{key}={directory!r}: parameter {name} has shape '
          f'{got.get(name, "(absent)")} there but {want.get(name, "(absent)")} in the model config.model '
          'describes; the architecture (depth, width, heads, classes, vocabulary, patch_nums, refine) '
          'must match')
  return params
