"""`python -m srdd_jax.bench`: the bench's command line (srdd_jax/bench/timing.py)."""
import sys

from srdd_jax.bench import timing

if __name__ == '__main__':
  sys.exit(timing.main())
