"""The bench: `python -m srdd_jax.bench` (timing.py has its flags, uses and JSON).

  timing.py        the train step and the sampler timed here, TPU programs compiled ahead, the command line
  vs_var.py        side by side with the official PyTorch VAR (--vs-var), and the GPU suite (--suite)
  var_pytorch.py   the PyTorch side: a script run by a PyTorch environment's Python, importing nothing of
                   srdd_jax (nor jax)
  __main__.py      python -m srdd_jax.bench
"""
