"""The study: VAR against scale-wise discrete diffusion (SDD) and SRDD's sampling tools, every arm trained,
sampled and scored alike, one resumable command (`--mode=study`, alias `--mode=ablation`).

  arms.py         the models and the arms (model x sampler) as data, the comparisons between them
  plan.py         config.ablation read and checked, the work counted before it starts, progress and ETA
  scoring.py      sampling a model with an arm's settings and scoring it with the proxy metrics
  units.py        the units of work (token caches, models, validation points, test runs, timings), each
                  run once, its inputs recorded as --mode=all records its stages'
  comparisons.py  the paired comparisons by training seed (evaluation/paired.py) of an arm's files
  report.py       study.json / study.md / study.png, a pure function of the units' result files
  run.py          the order of the work: per training seed its models, then its arms; then the report

Layers inside: arms <- plan <- scoring <- units <- comparisons <- report <- run. The runner
(srdd_jax/modes/study.py) hands in the stages it composes (training, distillation, token caches).
"""
