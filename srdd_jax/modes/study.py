"""`--mode=study` (and its older name `--mode=ablation`): VAR against scale-wise discrete diffusion (SDD) and
SRDD's sampling tools, every arm trained, sampled and scored alike, one resumable command.

  python -m srdd_jax.main --config=configs/ablation.py --workdir=DIR --mode=study
  python -m srdd_jax.main --config=configs/ablation.py:quick --workdir=DIR --mode=study   # smoke test

The study is srdd_jax/study/ (arms as data, plan, units, comparisons by training seed, report); this
runner hands it the stages it composes: the transformer's and the student's training tasks (train,
distill), the token cache (tokenize) and the tokenizer (train_tokenizer). config.ablation (srdd_jax/config.py)
sets the arms, seeds, grids and sizes. Outputs: DIR/study.json, study.md, study.png; every unit's result
under DIR (models/, arms/<arm>/seed<s>/, cost/), each with its recorded inputs.
"""
from __future__ import annotations

from srdd_jax.config import with_defaults
from srdd_jax.modes import distill, tokenize, train, train_tokenizer
from srdd_jax.study import plan
from srdd_jax.study import run as study_run
from srdd_jax.study.units import Stages

STAGES = Stages(train_task=train.task, distill_task=distill.task, tokenize=tokenize.run,
                train_tokenizer=train_tokenizer.run)


def check(config) -> None:
  """config.ablation's values (for --dry_run): ConfigError naming the key."""
  plan.options(config)


def run(config, workdir: str) -> dict:
  return study_run.run(with_defaults(config), workdir, STAGES)
