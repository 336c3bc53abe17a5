"""The bench: `python -m srdd_jax.bench` (cli.py has its flags, uses and JSON). Each module imports only
those above it in this list, so none imports another in a circle (tests/test_architecture.py checks it):

  base.py          the log, error records and exit; the models (VAR at a depth, its tokenizer), their
                   analytic FLOPs, the sampler's settings
  timing.py        the train step and the sampler timed on this process's devices, on random weights;
                   the matmul peak and the environment beside them
  aot.py           the train step and the tokens program compiled for a TPU topology (no TPU needed)
  flags.py         the command line's flags and their checks
  var_pytorch.py   the official PyTorch VAR timed on the same shapes: a script run by a PyTorch
                   environment's Python, importing nothing of srdd_jax (nor jax)
  vs_var.py        side by side with VAR-PyTorch (--vs-var): the worker processes, the results, the ratios
                   and their table
  suite_worker.py  the JAX worker of the GPU suite: one depth of our side in a process of its own
  suite.py         --suite gpu: both implementations at the largest batches that fit, in a time budget
  cli.py           the command line: timed runs, --aot, or the side by side and the suite
  __main__.py      python -m srdd_jax.bench
"""
