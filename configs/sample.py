"""Sampling and zero-shot editing from converted checkpoints (a VAR transformer and its tokenizer).

  python -m srdd_jax.tools.convert_var --vae vae_ch160v4096z32.pth --out ckpt/vae
  python -m srdd_jax.tools.convert_var --var var_d16.pth --out ckpt/var_d16
  python -m srdd_jax.main --config=configs/sample.py --workdir=DIR --mode=sample \
      --config.model.checkpoint=ckpt/var_d16 --config.tokenizer.checkpoint=ckpt/vae
  python -m srdd_jax.main --config=configs/sample.py --workdir=DIR --mode=edit \
      --config.model.checkpoint=... --config.tokenizer.checkpoint=... \
      --config.edit.image=photo.png --config.edit.task=inpaint --config.edit.box=64,64,192,192
  python -m srdd_jax.main --config=configs/sample.py --workdir=DIR --mode=eval \
      --config.model.checkpoint=... --config.tokenizer.checkpoint=... \
      --config.eval.inception_weights=fid_inception_weights.npz --config.eval.reference=VIRTUAL_imagenet256_labeled.npz
"""
import ml_collections

from srdd_jax.config import with_defaults


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = ''  # Directory written by `convert_var --var`.
  c.model.mask = ''  # '' = the checkpoint's; 'markov' or 'causal' to override.
  c.model.dtype = 'float32'
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.checkpoint = ''  # Directory written by `convert_var --vae`.
  c.sampler = ml_collections.ConfigDict()
  # The checkpoint's method decides the protocol: VAR's (cfg 1.5 linear, no resampling) for a causal
  # model, SRDD's (cfg 5.0 linear, resampling 0.01 x 10) for a markov one. Set any value to override it.
  c.sampler.protocol = 'auto'  # auto | var | srdd
  c.sampler.cfg = -1.0  # -1 = the protocol's.
  c.sampler.cfg_schedule = ''  # 'linear', 'constant' or comma-separated per-scale values; '' = the protocol's.
  c.sampler.temperature = 1.0
  c.sampler.top_k = 900
  c.sampler.top_p = 0.96
  c.sampler.greedy = False
  c.sampler.mr_threshold = -1.0  # Masked Resampling (redraw); -1 = the protocol's.
  c.sampler.mr_iterations = -1  # 0 = off; -1 = the protocol's.
  c.sampler.mr_scales = ''  # '' = all scales, or comma-separated 0/1 per scale.
  c.sample = ml_collections.ConfigDict()
  c.sample.classes = ''  # '' = every class, or comma-separated class ids.
  c.sample.num_per_class = 4
  c.sample.batch_size = 16
  c.edit = ml_collections.ConfigDict()
  c.edit.task = 'inpaint'  # inpaint | outpaint | class_edit | super_res
  c.edit.image = ''  # Path of the image to edit (resized and center-cropped to the model's size).
  c.edit.box = ''  # 'x0,y0,x1,y1' in model pixels: regenerated (inpaint) or kept (outpaint/class_edit).
  c.edit.mask = ''  # Alternatively a mask image of the model's size: white = keep.
  c.edit.class_id = -1  # The class of the edits; -1 = unconditional (null class). class_edit needs one.
  c.edit.low_res = 0  # super_res: side the image is downsampled to first (0 = keep the input as is).
  c.edit.keep_scales = 0  # super_res: coarse scales kept (0 = those the low-res image determines).
  c.edit.num_samples = 4
  # --mode=eval (srdd_jax/config.py documents every key).
  c.eval = ml_collections.ConfigDict()
  c.eval.metrics = 'fid,is,pr'  # Needs eval.inception_weights and eval.reference; or 'proxy' with config.data.
  c.eval.classes = ''
  c.eval.num_per_class = 50
  c.eval.batch_size = 16
  c.eval.inception_weights = ''  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its converted .npz.
  c.eval.reference = ''  # e.g. OpenAI's VIRTUAL_imagenet256_labeled.npz.
  c.eval.samples = ''  # An existing samples .npz to evaluate instead of sampling.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  return with_defaults(c)  # Every key present, so each can be overridden on the command line.
