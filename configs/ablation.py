"""VAR against scale-wise discrete diffusion and SRDD's tools on the embedded default (Fashion-MNIST).

  python -m srdd_jax.main --config=configs/ablation.py --workdir=workdir/ablation --mode=ablation
  python -m srdd_jax.main --config=configs/ablation.py:gpu --workdir=OUT --mode=ablation   # one H100/H200
  python -m srdd_jax.main --config=configs/ablation.py:quick --workdir=/tmp/ablation_quick --mode=ablation

configs/fashion_mnist.py's data, tokenizer (the carried one), transformer, optimizer and sampler (the runner
sets each model's mask and refine stream), plus config.ablation (srdd_jax/config.py documents each key).
Every preset runs the same 15 variants and 23 models (3 training seeds x 7 kinds, 2 students) and logs its
plan (models, training steps, validation and test runs) when it starts; ablation.json keeps the plan and
every unit's wall time, the numbers a preset is sized from.

- default (CPU): 1,000 steps per model at batch 32 (0.53 epoch), the demo's model. Not trained to the
  plateau: on 2 CPU cores one model at the demo's rate (3.1 steps/s at a float32 matmul peak of 0.224
  TFLOP/s) still improves its loss by ~7% over the last fifth of 2,800 steps, so 23 models to a plateau
  need tens of hours; the answer to the paper's claims is the gpu preset's. docs/RESULTS.md.
- gpu: the same model and data on one GPU, batch 256, models trained ~10 epochs (plateau rule in the
  table); a first sizing from counts, not yet timed on a GPU (issue 32): the plan line and unit_seconds of
  its first run size it to the 9-minute target. Resumable like every preset: a command cut off by a time
  limit, run again, redoes no finished unit.
- quick: every variant and seed with tiny step counts and few samples: a smoke test, not a result.
  Combines with gpu (`gpu,quick`: the gpu preset's programs at smoke sizes, to try it on a CPU first).
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
  c.eval.batch_size = 100  # Sampling and held-out loss batches: a class per 10 images, no padding.
  c.sampler.top_p = 0.96  # VAR's protocol's top-p for (a), (b), (h), (i); the searches set their own.
  c.train.steps = 1000
  c.ablation = ml_collections.ConfigDict(dict(
      train_seeds='0,1,2', sample_seeds='0,1,2', cfg_grid='0,1,1.5,2,3,5,8', schedules='linear,constant',
      val_per_class=20, test_per_class=100, refine_steps=0, distill_steps=0, timing_repeats=3, quick=quick))
  if 'gpu' in presets:
    # Batch 256 (8x the CPU's) with the peak rate scaled by the square-root rule from the demo's 2.5e-3 at
    # 32; 2,400 steps = 10 epochs, each fine-tune 1,200 more. Sampling in batches of 200: one per validation
    # run (20 per class), five per test run. bfloat16 compute, as training on accelerators runs.
    c.model.dtype = 'bfloat16'
    c.train.update(global_batch=256, steps=2400, log_every=100, checkpoint_every=1200)
    c.optim.update(base_lr=7e-3, warmup_steps=100)
    c.ablation.update(finetune_steps=1200, cfg_grid='0,1,1.5,2,3,5')
    c.eval.batch_size = 200
  if quick:
    c.train.update(steps=10, log_every=5, checkpoint_every=10)
    c.optim.warmup_steps = 2
    c.tokenize.max_examples = 1000  # Every cache (train, test, the student's): seconds of encoding, not minutes.
    # A smaller search of the same shape (3 strengths, MR 2 x 1 against 2 truncations; refine's 2
    # iterations cost 3 passes per scale, 10 cost 11), and two held-out points of 200 examples (ten of
    # 1,000 took 40 of each model's 46 s). Measured: docs/PERFORMANCE.md.
    c.ablation.update(val_per_class=2, test_per_class=2, timing_repeats=1, cfg_grid='0,1.5,3',
                      mr_thresholds='0.01,0.05', mr_iterations='2', truncations='top_p=0.96,min_p=0.05',
                      finetune_steps=0, heldout_points=2, heldout_examples=200)
    c.eval.update(batch_size=20, proxy_epochs=1, proxy_examples=1000)
  return with_defaults(c)
