"""The flags of `python -m srdd_jax.bench` and their checks (bad input: one `error:` line, exit 2). The side by side reads their defaults to hand its own process the flags that differ."""
from __future__ import annotations

from srdd_jax.config import ArgumentParser
from srdd_jax.transformer.config import MASKS

DESCRIPTION = 'Throughput and memory of the train step and the sampler, both masks, over depths and batch sizes.'


def parse_args(argv=None):
  ap = ArgumentParser(prog='python -m srdd_jax.bench', description=DESCRIPTION)
  ap.add_argument('--out', required=True, help='JSON file to write (rewritten after every record)')
  ap.add_argument('--quick', action='store_true',
                  help='depth 6, width 384, 6 heads, 256 px, float32, train batch 8, sample batch 32, '
                       '2 repeats after 1 warm-up; a reduced tokenizer (ch 32) on a CPU')
  ap.add_argument('--depths', default=None, help='comma-separated depths (width 64 * depth); '
                  'default 16,20,24,30 on an accelerator, 6 on a CPU')
  ap.add_argument('--width', type=int, default=0, help='transformer width (0: 64 * depth)')
  ap.add_argument('--heads', type=int, default=0, help='attention heads (0: depth)')
  ap.add_argument('--batches', default=None, help='train global batch sizes; default 64 on an '
                  'accelerator, 8 on a CPU')
  ap.add_argument('--sample_batches', default=None, help='sampling batch sizes; default 32')
  ap.add_argument('--masks', default='markov,causal', help='masks, in run order')
  ap.add_argument('--kinds', default='train,sample', help='what to run: train, sample or both')
  ap.add_argument('--dtype', default=None, help='compute dtype; default bfloat16 on an accelerator '
                  'and for --aot, float32 on a CPU and for --quick')
  ap.add_argument('--repeats', type=int, default=None, help='timed calls per program (default 5, '
                  '--quick 2)')
  ap.add_argument('--warmup', type=int, default=1, help='untimed calls before them')
  ap.add_argument('--tokenizer_ch', type=int, default=None,
                  help="decoder channels (160: VAR's tokenizer; default 160, or 32 for --quick on a CPU)")
  ap.add_argument('--aot', default=None, metavar='TOPOLOGY',
                  help='compile for a TPU topology (v5e:2x2, v5p:4x4x4) ahead of time instead of timing')
  ap.add_argument('--preset', default=None, help='--aot model: d16, d20, d24, d30 (default d16)')
  ap.add_argument('--batch', type=int, default=None, help='--aot train global batch (default 256)')
  ap.add_argument('--sample_batch', type=int, default=None, help='--aot sampling batch (default --batch)')
  ap.add_argument('--mesh', default='1,-1,1', help='--aot mesh sizes data,fsdp,tensor; -1 fills '
                  '(default: every chip on fsdp, as the project\'s FSDP rules)')
  ap.add_argument('--rules', default='fsdp', help='--aot parameter placement: fsdp or replicated')
  ap.add_argument('--scan', type=int, default=None, choices=(0, 1),
                  help='blocks under nn.scan (1) or unrolled (0); default 1, 0 for timed runs on a CPU '
                       '(XLA:CPU runs unrolled blocks faster)''')
  ap.add_argument('--remat', default=None, choices=('none', 'dots', 'full'),
                  help='what the backward recomputes (config.model.remat); default none, dots for --suite')
  ap.add_argument('--attention', default=None, choices=('auto', 'xla', 'cudnn', 'splash'),
                  help='attention implementation; default splash with --aot (the host is no TPU), else auto')
  ap.add_argument('--cpu_matmul', default=None, choices=('float32', 'bfloat16', 'auto'),
                  help="timed runs on a CPU: a float32 model's matmul products (VARConfig.cpu_matmul; default "
                  'float32, the function VAR-PyTorch computes in float32)')
  ap.add_argument('--patch_nums', default=None, help='timed runs: comma-separated scales (default VAR\'s '
                  '256 px: 1,2,3,4,5,6,8,10,13,16); small ones make tiny test models')
  ap.add_argument('--vs-var', dest='vs_var', default=None, metavar='DIR',
                  help='also time the official PyTorch VAR code of the checkout DIR (torch needed) on the '
                       'same shapes, in its own process; one JSON (OUT) and one Markdown table (OUT .md) '
                       'with both record sets and their ratios (srdd_jax.bench.vs_var)')
  ap.add_argument('--suite', default=None, choices=('gpu',),
                  help='gpu: d16 and d24 at 256 px, bfloat16, both masks, train and sampling at the largest '
                       'batch that fits, under --budget_s (srdd_jax.bench.suite)')
  ap.add_argument('--tiny', action='store_true', help='--suite at tiny sizes: a CPU dry run of its path')
  ap.add_argument('--budget_s', type=float, default=480.0, help='--suite: seconds for all of it (default 480)')
  ap.add_argument('--max_batch', type=int, default=None, help='--suite: largest train batch tried (1024)')
  ap.add_argument('--max_sample_batch', type=int, default=None,
                  help='--suite: largest sampling batch tried (128)')
  ap.add_argument('--memory_limit_gib', type=float, default=None,
                  help='--suite: our side fits its batches into this much memory instead of the device\'s '
                       '(dry runs of the fitting on a CPU)')
  ap.add_argument('--commit', default=None, help='recorded commit (default: git rev-parse HEAD, else '
                  '$SRDD_COMMIT)')
  args = ap.parse_args(argv)
  for m in args.masks.split(','):
    if m.strip() not in MASKS:
      ap.error(f'--masks {args.masks!r}: {m.strip()!r} is not one of {MASKS}')
  args.masks = tuple(m.strip() for m in args.masks.split(',') if m.strip())
  args.kinds = tuple(k.strip() for k in args.kinds.split(',') if k.strip())
  for k in args.kinds:
    if k not in ('train', 'sample'):
      ap.error(f'--kinds {k!r}: must be train or sample')
  if args.dtype is not None and args.dtype not in ('float32', 'bfloat16'):
    ap.error(f'--dtype {args.dtype!r}: must be float32 or bfloat16')
  if args.rules not in ('fsdp', 'replicated'):
    ap.error(f'--rules {args.rules!r}: must be fsdp or replicated')
  for flag in ('repeats', 'batch', 'sample_batch', 'tokenizer_ch', 'max_batch', 'max_sample_batch'):
    v = getattr(args, flag)
    if v is not None and v < 1:
      ap.error(f'--{flag} {v}: must be >= 1')
  for flag in ('warmup', 'width', 'heads'):
    if getattr(args, flag) < 0:
      ap.error(f'--{flag} {getattr(args, flag)}: must be >= 0')
  if args.budget_s <= 0:
    ap.error(f'--budget_s {args.budget_s}: must be > 0')
  if args.tiny and not args.suite:
    ap.error('--tiny is for --suite')
  if args.aot and (args.vs_var is not None or args.suite):
    ap.error('--aot compiles for a TPU without timing: it takes neither --vs-var nor --suite')
  if args.aot is None:
    for flag in ('preset', 'batch', 'sample_batch'):
      if getattr(args, flag) is not None:
        ap.error(f'--{flag} is for --aot; timed runs use --depths, --batches and --sample_batches')
  return args
