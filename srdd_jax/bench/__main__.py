"""`python -m srdd_jax.bench`: the bench's command line (srdd_jax/bench/cli.py)."""
import sys

from srdd_jax.bench import cli

if __name__ == '__main__':
  sys.exit(cli.main())
