"""The one config module: every section's keys with their defaults, one ConfigError, the recipes.

A config file (`configs/<x>.py`, ml_collections) writes only what differs from the defaults below and
returns `with_defaults(c)`: a copy with every section complete, so every key can be overridden on the
command line. A key or section that is not listed here is an error naming it (a typo would otherwise be
silently ignored). Every mode reads its config through `with_defaults`, so the defaults live here and
nowhere else.

Sections, and who reads them:
  seed           every random draw (data order, init, sampling) is a function of it.
  compile_cache  where compiled programs are kept between runs (srdd_jax/parallel/compile_cache.py).
  tokenizer      the VQ-VAE: a checkpoint to load, or the architecture to build (tokenizer.api).
  tokenizer_train  --mode=train_tokenizer.
  data           the input pipeline (data.pipeline), and `token_cache` for --mode=train.
  tokenize       --mode=tokenize.
  model          the transformer; `model.patch_nums` are the scales of the tokenizer and the transformer.
  train, optim   --mode=train (and --mode=distill, which trains a student with them).
  distill        --mode=distill: the teacher, the student's scales and the KL term (SPEC §6).
  sampler        guidance, filtering and masked resampling of every sampling mode.
  sample, edit, eval, reconstruct   the runners of those modes.
  mesh, mesh_rules  devices (data, fsdp, tensor) and the logical-axis rules.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import sys


class ConfigError(ValueError):
  """A config value, input file or path that cannot work; the message names the key and what would."""


PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

DEFAULTS: dict = {
    'seed': 0,
    # JAX's persistent compilation cache, every mode (srdd_jax/parallel/compile_cache.py): '' for
    # $JAX_COMPILATION_CACHE_DIR or else WORKDIR/jax_cache, a directory (gs:// too), or 'off'.
    'compile_cache': '',
    'tokenizer': dict(
        checkpoint='',  # Directory written by `convert_var --vae` or by --mode=train_tokenizer.
        # When set, the checkpoint must have this hash of its architecture and weights
        # (convert/loading.tokenizer_identity): a tokenizer the repository carries is the one its record
        # describes, or the run stops.
        params_sha256='',
        allow_random=False,  # No checkpoint: True builds a freshly initialised one (smoke runs only).
        reference_npz='',  # --mode=reconstruct: a reference .npz (VAR code, random weights) to load.
        # The architecture (VQVAEConfig's fields; VAR's vae_ch160v4096z32 by default), used to build
        # a tokenizer to train or a random one; a checkpoint carries its own.
        vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,  # Encoder; the decoder has one more per level.
        using_sa=True, using_mid_sa=True,
        share_quant_resi=4,  # 0: one phi per scale, 1: one shared phi, K >= 2: K phis (VAR: 4).
        quant_resi=0.5,
        image_size=0,  # 0 = derived: patch_nums[-1] * 2^(len(ch_mult) - 1); non-zero is checked.
        precision='highest'),
    'tokenizer_train': dict(
        seed=-1,  # -1 = config.seed.
        global_batch=64, steps=100_000,
        # Generator optimiser: AdamW, linear warm-up from 0, then constant or cosine to
        # lr * lr_final_fraction. The codebook, biases and norms are never weight-decayed.
        lr=1e-4, lr_schedule='constant', lr_final_fraction=0.1, warmup_steps=0,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
        clip_norm=0.0,  # Global-norm gradient clipping; 0 = off.
        # Loss: l1 * |x - x'| + l2 * (x - x')^2 + vq * VQ + gan * adversarial (all means).
        beta=0.25,  # Commitment weight inside the VQ loss (SPEC §1).
        l1_weight=1.0, l2_weight=1.0, vq_weight=1.0,
        gan_weight=0.0,  # 0 = no discriminator at all (none is built, none is checkpointed).
        gan_start_step=5000,  # Before it the adversarial term is 0 and the discriminator is frozen.
        disc_lr=-1.0,  # -1 = lr.
        disc_ch=64,
        disc_layers=3,  # Stride-2 layers of the patch discriminator; 2 for images under ~32 px.
        usage_ema_decay=0.99,  # EMA of per-scale code frequencies (logged and used for restarts).
        dead_code_restart_every=1000,  # Steps between restarts (at K, 2K, ...); 0 = never.
        dead_code_threshold=0.05,  # Dead: overall EMA share < threshold / vocab_size.
        # Dead codes restart on 'residuals' (the vectors the scales quantize, each scale weighted by its
        # positions) or 'features' (raw encoder outputs, the earlier choice).
        restart_from='residuals',
        log_every=100,
        eval_every=1000,  # Held-out PSNR every this many steps (and at the start and the end); 0 = never.
        eval_examples=256,
        eval_split='test',  # digits, fashion_mnist, tfds: the held-out split.
        eval_path='',  # folder: the held-out folder ('' = the training folder, with a warning).
        grid_examples=8,  # Held-out images in reconstructions.png.
        checkpoint_every=1000, keep_checkpoints=3,
        prefetch=True),  # True: config.data.workers threads decode ahead; False: each batch in the loop.
    # The input pipeline; srdd_jax/data/pipeline.py documents each key.
    'data': dict(
        source='synthetic',  # synthetic | tfds | folder | fashion_mnist | digits.
        split=None,  # None = 'train' for training, else 'test'.
        resize_ratio=1.125, random_crop=None, flip=None,  # None = on for training.
        name=None, data_dir=None, download=False, image_key='image', label_key='label',
        workers=0,  # Threads that read and decode images; 0 = two per CPU core (at most 64).
        path=None, labels='subfolder',  # folder
        idx_dir='/usr/share/datasets/fashion-mnist',  # fashion_mnist: Debian's IDX files.
        num_examples=1024, num_classes=None,  # synthetic; None = 10 (training: config.model.num_classes)
        token_cache=''),  # --mode=train: a directory written by --mode=tokenize ('' = encode images).
    'tokenize': dict(
        out_dir='',  # '' = WORKDIR/tokens.
        split='',  # '' = config.data.split, else 'train'.
        flips=False,  # Also cache the mirror image; training then picks one copy per example.
        max_examples=0,  # > 0: only the first N examples of the split (index order); 0 = all of them.
        batch_size=64, shard_size=4096),
    'model': dict(
        checkpoint='',  # Sampling and evaluation: a transformer directory (convert_var or training).
        preset='',  # d16 | d20 | d24 | d30 | d36, or '' and depth/width/heads below.
        depth=0, width=0, heads=0,  # 0 = from the preset (width 64*depth, heads = depth).
        num_classes=1000,
        # The scales, stated once: the tokenizer quantizes and the transformer predicts at these.
        # Sampling from a checkpoint uses the checkpoint's.
        patch_nums=PATCH_NUMS_256,
        mask='',  # markov | causal; '' = the checkpoint's when sampling, markov when training.
        dtype='bfloat16',  # Compute dtype of the matmuls; parameters stay float32.
        # A float32 model's matmuls on a CPU: float32 | bfloat16 | auto (bfloat16 products, float32 sums,
        # where the CPU has bfloat16 dot instructions); VARConfig.cpu_matmul. auto: the demo's step 1.6x
        # faster on an AMD EPYC with AVX512-BF16, training curves within seed noise (docs/PERFORMANCE.md).
        # Parity with the reference is checked in float32 (VARConfig's own default).
        cpu_matmul='auto',
        # auto | xla | cudnn | splash; auto = cuDNN on a GPU (16-bit dtype), splash on a TPU, else xla.
        # Name it when compiling ahead of time for another platform than the host's.
        attention='auto',
        cond_drop_rate=0.1, drop_path_rate=-1.0,  # -1 = VAR's 0.1 * depth / 24.
        # The blocks as one nn.scan (compiles one block, not depth copies) and what their backward
        # recomputes: 'none', 'dots' (keep the weight matmuls' outputs) or 'full' (keep block inputs).
        scan=True, remat='none',
        # Masked resampling `refine` (SPEC §5): the transformer's second stream of the current scale's
        # revealed tokens (zero-initialised; a checkpoint without it is loaded with the stream added).
        refine=False),
    'train': dict(
        global_batch=768, epochs=0.0, steps=0,  # steps > 0 wins; else epochs * examples / batch.
        # The exported and evaluated weights are an EMA of the trained ones (0 = none, the trained weights),
        # warmed up (train/step.py: decay min(ema_decay, (1 + t) / (10 + t)) at step t), so that after 3
        # steps it keeps under 1% of its starting point (the random initialisation, or init_from's model).
        ema_decay=0.999,
        accum_steps=1, log_every=100, checkpoint_every=1000, keep_checkpoints=3,
        sample_every=0,  # Steps between sample grids (0 = never); samples/step_<n>.png + TensorBoard.
        # Held-out token loss (teacher forcing, per scale) on a token cache of another split, written to
        # metrics.jsonl as heldout_loss / heldout_loss_per_scale: every heldout_every steps (0 = at the
        # end only), over its first heldout_examples examples (0 = all). '' = none.
        heldout_cache='', heldout_every=0, heldout_examples=0,
        # VAR's progressive training (train/progressive.py): > 0 trains the first n scales during the
        # learning-rate warm-up, then one more scale at a time (the sequence cut after the newest) ...
        progressive_start_scales=0,
        progressive_steps=0,  # ... until this step, from which every scale is trained (VAR: pg * steps);
        progressive_warmup_steps=-1,  # the newest scale's loss weight ramps from 0.01 over these; -1 = VAR's steps/300.
        # A transformer directory (WORKDIR/export/step_<n> or convert_var's) whose weights start the run
        # (fine-tuning); '' = a fresh initialisation. The run's own checkpoints, when present, win. A
        # fine-tune counts its own steps from 0 (its EMA warms up again) and continues the data stream where
        # its start model's export says it stopped (train/export.data_stream); its export records both.
        init_from='',
        # config.model.refine: per example a reveal ratio r, 0 with probability refine_zero_prob (the
        # plain next-scale task), else uniform in [0, refine_max_ratio].
        refine_zero_prob=0.1, refine_max_ratio=1.0),
    # --mode=distill (SPEC §6): a student on a subset of the teacher's scales, initialised from it and
    # trained (config.train, config.optim) on the tokens re-quantized at the student's scales.
    'distill': dict(
        teacher='',  # A transformer directory: WORKDIR/export/step_<n> of a training run, or convert_var's.
        # The student's scales, a subset of the teacher's ending at its last scale; '' = every other
        # scale of the teacher's (indices 0, 2, 4, ...) plus the last: (1,3,5,8,13,16) from VAR's 256 px.
        patch_nums='',
        kl_weight=0.0,  # > 0: + kl_weight * KL(teacher || student) on the student's inputs (markov teacher).
        kl_temperature=1.0,
        token_cache=''),  # '' = encode images in the step, else --mode=tokenize's cache at the student's scales.
    # --mode=study (= --mode=ablation; srdd_jax/study/): VAR against SDD and SRDD's sampling tools, every arm
    # with the same data, steps, optimizer and seeds, one choice rule for all, compared by training seed.
    'ablation': dict(
        # The arms run: groups (headline, tools, refine, distill) or arm keys (srdd_jax/study/arms.py), and
        # every model they need.
        arms='headline,tools',
        train_seeds='0,1,2,3,4,5',  # Seeds (config.seed) of every trained model: init, data order, dropout.
        sample_seeds='0',  # Test sampling seeds of every arm (batch i uses fold_in(PRNGKey(s), i)).
        cfg_grid='0.5,1,1.5,2,3',  # Guidance strengths an arm chooses from (<= 5), one grid for every arm.
        schedules='linear,constant',  # Guidance schedules whose arms run (linear always: the protocols').
        val_per_class=20,  # Validation samples per class of a choice (seed 1000, training-split reals).
        # Masked resampling redraw's threshold grid (at mr_iterations iterations) and its partner, the plain
        # truncation grid of the same size (top_p=P or min_p=P, each alone, top-k the config's), each
        # chosen jointly with the guidance strength.
        mr_thresholds='0.001,0.01,0.05', mr_iterations='10',
        truncations='top_p=0.9,top_p=0.8,min_p=0.05',
        test_per_class=500,  # Test samples per class per sampling seed (scored against the test split).
        # Steps of each model trained on from another of the same seed (VAR continued, SDD from VAR), of the
        # refine fine-tune and of a student; 0 = config.train.steps (refine: the fine-tunes').
        finetune_steps=0, refine_steps=0, distill_steps=0,
        distill_kl_weight=1.0,  # config.distill.kl_weight of the student_kl model; `student` trains with 0.
        # The held-out token loss curve of every model: heldout_points evaluations over its training, on the
        # first heldout_examples examples of the test cache (0 = all).
        heldout_points=10, heldout_examples=1000,
        timing_repeats=3,  # Timed sampling calls (one batch of config.eval.batch_size) after a warm-up.
        quick=False),  # Set by configs/ablation.py:quick (tiny steps, few samples); recorded in study.json.
    'optim': dict(
        base_lr=1e-4,  # Per 256 examples: peak LR = base_lr * global_batch / 256.
        weight_decay=0.05, weight_decay_end=-1.0,
        warmup_steps=-1,  # -1 = VAR's: a fiftieth of training.
        final_fraction=0.1, clip_norm=2.0),
    'sampler': dict(
        # auto | var | srdd: where the four values below come from when they are left unset (-1 or '').
        # auto = the model's method: VAR's evaluation protocol for the causal mask (cfg 1.5 linear, no
        # masked resampling), SRDD's for markov (cfg 5.0 linear, resampling 0.01 x 10); see
        # diffusion/filtering.PROTOCOLS. A value set here (or on the command line) always wins.
        protocol='auto',
        cfg=-1.0,
        cfg_schedule='',  # 'linear', 'constant' or comma-separated per-scale values.
        temperature=1.0, top_k=900, top_p=0.96, greedy=False,
        min_p=0.0,  # > 0: drop tokens less likely than min_p x the most likely one (after top-k, top-p).
        mr_threshold=-1.0, mr_iterations=-1,  # Masked resampling; 0 iterations = off.
        mr_scales='',  # '' = every scale, or comma-separated 0/1 per scale.
        # 'redraw' (draw the low-probability tokens again from the same logits) or 'refine' (re-mask
        # them and run the scale again with the others revealed; needs a model with config.model.refine).
        mr_mode='redraw',
        # The image decoder's matmul precision: 'default' (the accelerator's fast path: bfloat16 passes on
        # TPU, TF32 on GPU; float32 on a CPU either way), 'high', 'highest', or '' = config.tokenizer.precision.
        # Sampled images are scored, not compared bit for bit; reference checks decode at 'highest'.
        decode_precision='default'),
    'sample': dict(
        classes='',  # '' = every class (grids during training: the first 10), or comma-separated ids.
        num_per_class=4, batch_size=16),
    'edit': dict(
        task='inpaint',  # inpaint | outpaint | class_edit | super_res
        image='',  # The image to edit (center-cropped and resized to the model's size).
        box='',  # 'x0,y0,x1,y1' in model pixels: regenerated (inpaint) or kept (outpaint/class_edit).
        mask='',  # Alternatively a mask image of the model's size: white = keep.
        class_id=-1,  # The class of the edits; -1 = unconditional (null class). class_edit needs one.
        low_res=0,  # super_res: side the image is downsampled to first (0 = keep the input as is).
        keep_scales=0,  # super_res: coarse scales kept (0 = those the low-res image determines).
        num_samples=4),
    'eval': dict(
        metrics='proxy',  # Comma-separated subset of fid, is, pr, proxy.
        classes='',  # '' = every class.
        num_per_class=50,  # The VAR/ADM protocol: 50 per class (50,000 for ImageNet).
        batch_size=16,
        inception_weights='',  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its .npz.
        reference='',  # .npz with mu/sigma (FID) and/or arr_0 images (FID, precision/recall).
        inception_batch_size=64,
        proxy_examples=10000,  # Held-out real images of config.data (its test split).
        proxy_epochs=0,  # 0 = the classifier's default training length.
        samples=''),  # An existing samples .npz (arr_0 uint8 NHWC, arr_1 labels) instead of sampling.
    'reconstruct': dict(
        num_images=4,  # Synthetic images, used when the weights' source supplies none.
        batch_size=2),
    'mesh': dict(data=-1, fsdp=1, tensor=1),
    'mesh_rules': (),  # ((logical axis, mesh axis or axes), ...); () = parallel.mesh.DEFAULT_RULES.
}


# Keys that live elsewhere now: (section, key) -> where to write them.
MOVED = {('tokenizer', 'patch_nums'): 'config.model.patch_nums (the scales are stated once, for the '
                                      'tokenizer and the transformer)'}


# Keys whose default None means "derived" and their type once given: a typed placeholder keeps them
# overridable from the command line (ml_collections refuses to override a plain None).
_OPTIONAL_TYPES = {('data', 'split'): str, ('data', 'random_crop'): bool, ('data', 'flip'): bool,
                   ('data', 'name'): str, ('data', 'data_dir'): str, ('data', 'path'): str,
                   ('data', 'num_classes'): int}


def _plain(value):
  return value.to_dict() if hasattr(value, 'to_dict') else value


def with_defaults(config) -> ml_collections.ConfigDict:
  """A copy of `config` with every section complete; unknown sections and keys are a ConfigError."""
  # Imported here, not at the top: ConfigError and the defaults are imported by code that never builds
  # a config (srdd_jax.bench), on machines that may not have ml_collections.
  import ml_collections  # pylint: disable=import-outside-toplevel
  given = _plain(config) if config is not None else {}
  if not isinstance(given, dict):
    raise ConfigError(f'a config must be a ConfigDict or dict, got {type(config).__name__}')
  merged = copy.deepcopy(DEFAULTS)
  for section, value in given.items():
    if section not in DEFAULTS:
      raise ConfigError(f'config.{section} is not a config section; known: {sorted(DEFAULTS)}')
    default = DEFAULTS[section]
    if isinstance(default, dict):
      value = _plain(value)
      if not isinstance(value, dict):
        raise ConfigError(f'config.{section} must be a section (a dict of keys), got {value!r}')
      unknown = sorted(set(value) - set(default))
      moved = [k for k in unknown if (section, k) in MOVED]
      if moved:
        raise ConfigError(f'config.{section}.{moved[0]} is not a key of config.{section}: write it as '
                          f'{MOVED[(section, moved[0])]}')
      if unknown:
        raise ConfigError(f'config.{section}.{unknown[0]} is not a key of config.{section}; known: '
                          f'{sorted(default)}')
      merged[section] = {**default, **value}
      for key, v in merged[section].items():
        # Every float of the config is a finite number: nan or inf is a typo or an overflow, and would
        # otherwise surface steps later as a non-finite loss or as NaN in a JSON summary.
        if isinstance(v, float) and not math.isfinite(v):
          raise ConfigError(f'config.{section}.{key}={v!r}: must be a finite number')
    else:
      merged[section] = value
  for (section, key), kind in _OPTIONAL_TYPES.items():
    if merged[section].get(key) is None:
      merged[section][key] = ml_collections.config_dict.placeholder(kind)
  return ml_collections.ConfigDict(merged)


def section(config, name: str) -> dict:
  """One section of `config` with its defaults, as a plain dict (unknown keys are an error)."""
  return with_defaults({name: _plain(config[name])} if name in config else {})[name].to_dict()


def patch_nums(config) -> tuple[int, ...]:
  """The scales of the run (config.model.patch_nums)."""
  pn = tuple(int(p) for p in with_defaults(config).model.patch_nums)
  if not pn or any(p < 1 for p in pn):
    raise ConfigError(f'config.model.patch_nums={pn}: must be a non-empty sequence of positive sides')
  return pn


def _numbers(value, key: str, cast, what: str) -> tuple:
  parts = value if isinstance(value, (tuple, list)) else str(value).split(',')
  try:
    return tuple(cast(x) for x in parts if str(x).strip())
  except ValueError as e:
    raise ConfigError(f'{key}={value!r}: expected comma-separated {what}') from e


def ints(value, key: str) -> tuple[int, ...]:
  """'1,2,3' (or a sequence) -> (1, 2, 3); an error naming `key` otherwise."""
  return _numbers(value, key, int, 'integers')


def floats(value, key: str) -> tuple[float, ...]:
  """'0.5,1' (or a sequence) -> (0.5, 1.0); nan or inf is an error naming `key` (it would pass every
  range check, a comparison with nan being false, and surface later as a wrong key or a NaN result)."""
  out = _numbers(value, key, float, 'numbers')
  if not all(math.isfinite(x) for x in out):
    raise ConfigError(f'{key}={value!r}: every value must be a finite number')
  return out


# The step counters of the training state, the optimiser's schedules and the data order are 32-bit
# integers on the accelerator: a count above this overflows there (after the model is built and compiled).
MAX_STEPS = 2**31 - 1


def unset_or_at_least(value, key: str, minimum, unset=-1, meaning: str = '') -> None:
  """A key whose one "unset" value is `unset` (-1): any other value below `minimum` is a typo, never a
  request for the default."""
  if value != unset and not value >= minimum:
    raise ConfigError(f'{key}={value!r}: {unset} {meaning or "leaves it to its default"}; other values must be '
                      f'>= {minimum}')


class ArgumentParser(argparse.ArgumentParser):
  """argparse for the package's command-line programs: a bad flag or value is one `error:` line on stderr
  and exit status 2 (argparse's own prints the whole usage first, and names the program, not `error:`)."""

  def error(self, message):
    print(f'error: {message} (--help lists the flags)', file=sys.stderr)
    sys.exit(2)


# --- recipes (SPEC §8) ---------------------------------------------------------------------------

# VAR's recipes per model size: global batch, epochs, base LR (per 256 examples), final LR fraction
# and the weight decay at the end of training (-1 = constant). d36 (512 px) has no published recipe
# here; it takes d30's.
RECIPES = {
    'd16': dict(global_batch=768, epochs=200, base_lr=1e-4, final_fraction=0.1, weight_decay_end=-1.0),
    'd20': dict(global_batch=768, epochs=250, base_lr=1e-4, final_fraction=0.1, weight_decay_end=-1.0),
    'd24': dict(global_batch=768, epochs=350, base_lr=8e-5, final_fraction=0.01, weight_decay_end=-1.0),
    'd30': dict(global_batch=1024, epochs=350, base_lr=8e-5, final_fraction=0.01, weight_decay_end=0.08),
    'd36': dict(global_batch=1024, epochs=350, base_lr=8e-5, final_fraction=0.01, weight_decay_end=0.08),
}


def base_config(preset: str, *, num_classes: int, resolution: int = 256, mask: str = 'markov'):
  """A full training config for a VAR model size with SPEC §8's recipe, before data set choices."""
  if preset not in RECIPES:
    raise ValueError(f'unknown preset {preset!r}; known: {sorted(RECIPES)}')
  r = RECIPES[preset]
  c = with_defaults({})
  c.model.preset = preset
  c.model.num_classes = num_classes
  c.model.mask = mask
  c.model.patch_nums = PATCH_NUMS_512 if resolution == 512 else PATCH_NUMS_256
  # Keep only the weight matmuls' outputs for the backward: on an H100 the d16 step at batch 64 ran
  # 1.6x faster with a third of the memory (docs/PERFORMANCE.md), and d16 at batch 768 fits v5p:2x2x2.
  c.model.remat = 'dots'
  c.train.global_batch = r['global_batch']
  c.train.epochs = float(r['epochs'])
  c.train.log_every = 100
  c.train.checkpoint_every = 2000
  c.train.sample_every = 5000
  c.optim.base_lr = r['base_lr']
  c.optim.final_fraction = r['final_fraction']
  c.optim.weight_decay_end = r['weight_decay_end']
  # TPU pod: parameters and optimizer state sharded over every chip of a slice (fsdp -1), data parallel
  # across slices (data -1); maxtext's default, and a mesh that builds on any slice (fsdp 8 has no
  # v5p-8, and fits no physical axis of v5p-128's 4x4x4 torus). The batch is split over both axes.
  # Tensor parallelism is off until widths reach several thousand.
  import ml_collections  # pylint: disable=import-outside-toplevel
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': -1, 'tensor': 1})
  return c


def parse_arg(arg: str | None, **defaults) -> dict:
  """`--config=configs/x.py:d20,causal,source=folder` -> {'preset': 'd20', 'mask': 'causal', ...}.

  Bare words are a preset (d16...) or a mask (markov, causal); `key=value` sets anything else the
  config file accepts. Unknown keys are an error naming them.
  """
  out = dict(defaults)
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    if '=' in part:
      k, v = part.split('=', 1)
    elif part in RECIPES:
      k, v = 'preset', part
    elif part in ('markov', 'causal'):
      k, v = 'mask', part
    else:
      raise ValueError(f'config argument {part!r}: expected a preset {sorted(RECIPES)}, a mask '
                       f'(markov, causal) or key=value with a key in {sorted(defaults)}')
    if k not in defaults:
      raise ValueError(f'config argument {k!r} is not one of {sorted(defaults)}')
    out[k] = type(defaults[k])(v) if defaults[k] is not None else v
  return out


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`configs/x.py[:arg]` -> the ConfigDict its get_config(arg) returns: the file --config=SPEC names,
  for programs that read a config file without the command-line flag."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_srdd_config', path)
  if module_spec is None:
    raise ConfigError(f'--config={spec}: {path!r} is not a Python config file (configs/<x>.py)')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
