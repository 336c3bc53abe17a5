"""Sampling a trained transformer with an arm's settings and scoring the samples with the proxy metrics
(fd in the project's classifier, class consistency, precision and recall) against real images of the
training split (choosing) or the test split (reporting), one classifier for every model."""
from __future__ import annotations

import collections
import dataclasses
import time

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from srdd_jax import files
from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.convert.loading import load_models
from srdd_jax.diffusion.generate import generate, sampler_from_config
from srdd_jax.diffusion.sampler import batch_rng
from srdd_jax.evaluation import protocol, proxy
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel.compile import compiled_stats, jit_inference

LOADED_MODELS = 8  # Models the scorer keeps in memory: every model of one training seed (the study's are small).


class Scorer:
  """Samples trained transformers (dicts with their 'export') with given sampler values and scores the
  samples against real images of the training or the test split, one classifier for every model (seed
  0, whatever the training seed: the fd numbers compare).

  `config` is the base config (its data, sampler, eval and mesh); `tokenizer` the tokenizer checkpoint of
  every model. One compiled sampling program per architecture and sampler setting other than guidance,
  the guidance strengths an argument of it (`program(traced=True)`): a grid of strengths compiles once."""

  def __init__(self, config, workdir: str, tokenizer: str):
    self.base, self.workdir, self.tok = config, workdir, tokenizer
    self.compiled = {}  # (architecture, SamplerConfig, traced) -> (sampler, compiled, stats, batch)
    self.loaded = collections.OrderedDict()  # Model export -> load_models(...): the last few, read once.
    c = with_defaults(config)
    self.proxy = protocol.ProxyScorer(c, c.eval.to_dict(), workdir, seed=0, precision_recall=True)
    # One resolved config whose sampler and checkpoint are set for each call (resolving one per sample
    # run cost seconds in a small study); the sampler's values start from the base's every time.
    self.work, self.sampler_base = c, c.sampler.to_dict()

  def config(self, export: str, values: dict):
    """The base config sampling `export` (its mask and refine stream the checkpoint's) with `values`."""
    c = self.work
    c.tokenizer.checkpoint, c.model.checkpoint, c.model.mask, c.model.refine = self.tok, export, '', False
    c.sampler.update({**self.sampler_base, **values})
    return c

  def models(self, c, export: str):
    """load_models of `c`, kept for the last LOADED_MODELS exports: a model is sampled for every
    validation point, test seed and timing, and reading its checkpoint each time cost a third of a
    quick run."""
    if export not in self.loaded:
      self.loaded[export] = load_models(c)
      while len(self.loaded) > LOADED_MODELS:
        self.loaded.popitem(last=False)
    self.loaded.move_to_end(export)
    return self.loaded[export]

  def program(self, export: str, values: dict, traced: bool = False):
    """(sampler, var params, vae params, compiled, stats, batch, guidance) for `export` sampled with
    `values`. traced=False: guidance is a constant of the program (what `cost` times unguided);
    traced=True: the strengths are an argument (`guidance`, returned), and strength 0 still runs the
    null-class half, giving the unguided tokens exactly."""
    c = self.config(export, values)
    sampler, var_params, vae_params = sampler_from_config(c, self.models(c, export))
    guidance = sampler.guidance_array() if traced else None
    program = dataclasses.replace(sampler.config, cfg=0.0, cfg_schedule='constant') if traced else sampler.config
    # Keyed on the architecture, not the weights: the seeds' models share one compiled program.
    key = (repr(sampler.var_config), repr(sampler.vae_config), repr(sampler.decoder.config), program, traced)
    if key not in self.compiled:
      bs = int(c.eval.batch_size)
      n_par = pm.data_parallel_size(sampler.mesh)
      if bs < 1 or bs % n_par:
        raise ConfigError(f'config.eval.batch_size={bs} must be a positive multiple of the data-parallel '
                          f'size {n_par}')
      labels = self.labels(sampler, np.zeros((bs,), np.int32))
      t0 = time.time()
      if traced:
        fn = lambda vp, ap, lab, rng, g, s=sampler: s.sample(vp, ap, lab, rng, guidance=g)
        compiled = jit_inference(fn).lower(var_params, vae_params, labels, batch_rng(0, 0), guidance).compile()
      else:
        compiled = jit_inference(sampler.sample).lower(var_params, vae_params, labels, batch_rng(0, 0)).compile()
      logging.info('study: sampler compiled in %.1fs (%s, %s, MR %s)', time.time() - t0, files.basename(export),
                   'guidance as an argument' if traced else f'cfg {values["cfg"]:g} {values["cfg_schedule"]}',
                   values['mr_mode'] if values['mr_iterations'] else 'off')
      self.compiled[key] = (sampler, compiled, compiled_stats(compiled), bs)
    sampler, compiled, stats, bs = self.compiled[key]
    return sampler, var_params, vae_params, compiled, stats, bs, guidance

  @staticmethod
  def labels(sampler, labels):
    """Labels placed as the compiled programs take them: split over the mesh's batch axes."""
    return jax.device_put(np.asarray(labels, np.int32), NamedSharding(sampler.mesh, PartitionSpec(('data', 'fsdp'))))

  def score(self, export: str, values: dict, per_class: int, seed: int, which: str) -> dict:
    """The proxy metrics of per_class samples of every class, drawn with sampling seed `seed`
    (diffusion/generate), against the real images of split `which`."""
    sampler, var_params, vae_params, compiled, _, bs, guidance = self.program(export, values, traced=True)
    labels = np.repeat(np.arange(sampler.var_config.num_classes, dtype=np.int32), per_class)
    images = generate(sampler, var_params, vae_params, labels, bs, seed, key='config.eval.batch_size',
                      program=lambda vp, ap, lab, rng: compiled(vp, ap, lab, rng, guidance))
    m = self.proxy(images, labels, which)
    name = proxy.fd_name(self.proxy.clf)
    return {'fd_name': name, 'fd': m[name], 'class_consistency': m['class_consistency'],
            'precision': m['precision'], 'recall': m['recall'],
            'classifier_test_accuracy': m['classifier_test_accuracy'], 'proxy_classifier': m['proxy_classifier'],
            'real_split': which, 'real_examples': m['proxy_real_examples'], 'num_samples': int(len(labels)),
            'sampling_seed': seed, 'sampler': values, 'model': export}
