"""The study (--mode=study, or its older name --mode=ablation) on the embedded default (Fashion-MNIST).

  python -m srdd_jax.main --config=configs/ablation.py --workdir=workdir/study --mode=study
  python -m srdd_jax.main --config=configs/ablation.py:gpu --workdir=OUT --mode=study   # one H100/H200
  python -m srdd_jax.main --config=configs/ablation.py:quick --workdir=/tmp/study_quick --mode=study

configs/fashion_mnist.py's data, tokenizer (the carried one), transformer, optimizer and training steps
(S: the same model, data, batch and steps as `make demo`), VAR's top-p 0.96 for its protocol, plus
config.ablation (srdd_jax/config.py documents each key; srdd_jax/study/arms.py the arms). Every preset logs
its plan (models, training steps, validation and test runs and image-passes, per group of arms) when it
starts; study.json keeps the plan, the rates and every unit's wall time, the numbers a preset is sized from.

- default (CPU): the headline arms (VAR and SDD from scratch for S steps, VAR continued and SDD fine-tuned
  from VAR for S more, each with VAR's protocol and with its own guidance strength; both from-scratch
  models at S/2 too) and the sampling tools on the two fine-tunes; 6 training seeds, 5,000 test samples
  per model (one sampling seed x 500 per class).
- gpu: the same arms and every group (refine, distill) with the same model and data on one GPU, batch 256,
  2,400 steps per model from scratch (10 epochs), bfloat16. A first sizing from counts; its plan line and
  unit times size it.
- quick: every group of arms (the tools on (i), MR refine, the student), two training seeds, tiny step
  counts and few samples: a smoke test of every kind of arm, unit and output, not a result. Combines with
  gpu (`gpu,quick`).
`make demo` (configs/fashion_mnist.py) is unchanged.
"""
import importlib.util
import os

import ml_collections

from srdd_jax.config import with_defaults


def _fashion_mnist():
  # By path, as main.py loads configs: `configs` is not a package and the command may run from anywhere.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fashion_mnist.py')
  spec = importlib.util.spec_from_file_location('_srdd_config_fashion_mnist', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  presets = {part.strip() for part in (arg or '').split(',') if part.strip()}
  unknown = presets - {'quick', 'gpu'}
  if unknown:
    raise ValueError(f'config argument {sorted(unknown)[0]!r}: configs/ablation.py takes "quick", "gpu" or '
                     '"gpu,quick"')
  quick = 'quick' in presets
  c = _fashion_mnist().get_config()
  c.eval.batch_size = 100  # Sampling batches: a class per 10 images, no padding.
  c.sampler.top_p = 0.96  # VAR's protocol's top-p; the truncation grids set their own.
  c.ablation = ml_collections.ConfigDict({'quick': quick})  # The other keys: srdd_jax/config.py's defaults.
  if 'gpu' in presets:
    # Batch 256 (8x the CPU's) with the peak rate scaled by the square-root rule from the demo's 2.5e-3 at
    # 32; 2,400 steps = 10 epochs, each fine-tune 2,400 more. Sampling in batches of 200. bfloat16 compute,
    # as training on accelerators runs.
    c.model.dtype = 'bfloat16'
    c.train.update(global_batch=256, steps=2400, log_every=100, checkpoint_every=1200)
    c.optim.update(base_lr=7e-3, warmup_steps=100)
    c.ablation.arms = 'headline,tools,refine,distill'
    c.eval.batch_size = 200
  if quick:
    c.train.update(steps=10, log_every=5, checkpoint_every=5)
    c.optim.warmup_steps = 2
    c.tokenize.max_examples = 1000  # Every cache (train, test, the student's): seconds of encoding, not minutes.
    # Every group, each of its arms once: the tools on (i) (on (h) they are the same rows on the causal
    # model), MR refine, the student without the KL term. A smaller search of the same shape: 2 strengths
    # (one program: guidance is traced); grids of one point, the threshold SRDD's 0.01 x 10, so the grid's
    # redraw program is SRDD's. Every other sampler setting and model kind compiles a program of its own,
    # most of a quick run's time. Two held-out points of 200 examples.
    quick_arms = 'headline,i_constant,i_paper,i_redraw,i_redraw_grid,i_truncation_grid,l,f'
    c.ablation.update(dict(arms=quick_arms, train_seeds='0,1', sample_seeds='0',
                           val_per_class=2, test_per_class=2, timing_repeats=1, cfg_grid='1.5,3',
                           mr_thresholds='0.01', mr_iterations='10', truncations='min_p=0.05',
                           heldout_points=2, heldout_examples=200))
    c.eval.update(batch_size=20, proxy_epochs=1, proxy_examples=1000)
  return with_defaults(c)
