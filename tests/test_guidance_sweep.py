"""benchmarks/guidance_sweep.py: its command line (the sweep itself runs the study's tested scoring)."""
import pytest

from benchmarks import guidance_sweep
from configs import fashion_mnist


def test_set_overrides_the_config_the_run_was_trained_with():
  c = fashion_mnist.get_config()
  guidance_sweep._override(c, 'model.dtype=float32')
  guidance_sweep._override(c, 'sampler.top_p=0.9')
  guidance_sweep._override(c, 'model.scan=True')
  assert (c.model.dtype, c.sampler.top_p, c.model.scan) == ('float32', 0.9, True)
  for bad, says in (('model.dtyp=float32', "'model.dtyp'"), ('model.depth', 'KEY=VALUE'),
                    ('sampler.top_p=high', "'high' is not a valid float")):
    with pytest.raises(ValueError, match=says):
      guidance_sweep._override(c, bad)


@pytest.mark.parametrize('argv, says', [
    (['--workdir', '{tmp}'], 'no export/step_'),
    (['--workdir', '{tmp}', '--set', 'model.width=wide'], "'wide' is not a valid int"),
])
def test_bad_command_lines_exit_2_naming_the_flag(tmp_path, capsys, argv, says):
  with pytest.raises(SystemExit) as e:
    guidance_sweep.main([a.format(tmp=tmp_path) for a in argv])
  assert e.value.code == 2
  assert says in capsys.readouterr().err
