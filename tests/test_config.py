"""Config files load and validate; bad values fail with a message naming the field."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

from varcmp_jax import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name,arg", [
    ("synthetic", None), ("synthetic", "audio"), ("tiny_text", None), ("tiny_text", "features"), ("tiny_audio", None),
    ("tiny_audio", "features"), ("ucfcrime_ar", "features"), ("ucfcrime_ar", "frames"),
    ("xdviolence_ar", "features"), ("xdviolence_ar", "frames")])
def test_config_files_are_valid(name, arg):
  config = load_config(name, arg)
  config_lib.validate(config, num_devices=8)
  assert set(config.loss.levels) == set(config_lib.TASK_LEVELS[config.task])
  if arg in ("frames", "features"):
    assert config.regime == arg
  if name == "synthetic":
    assert config.task == (arg or "text")


def test_benchmark_configs_pick_their_regime():
  assert load_config("ucfcrime_ar", "features").data.snippets == 256
  assert load_config("xdviolence_ar", "features").model.audio.kind == "features"
  assert load_config("xdviolence_ar", "frames").model.audio.kind == "spectrogram"
  with pytest.raises(ValueError, match="'pixels' must be 'features'"):
    load_config("ucfcrime_ar", "pixels")


@pytest.mark.parametrize("field,value,message", [
    ("task", "video", "task='video': must be one of"),
    ("regime", "pixels", "regime='pixels'"),
    ("prior.source", "vad", "prior.source='vad'"),
    ("weighting.beta", 1.5, r"weighting.beta=1.5: must lie in \[0, 1\]"),
    ("weighting.beta", -0.1, r"weighting.beta=-0.1"),
    ("weighting.tau", 0.0, "weighting.tau=0.0: must be > 0"),
    ("loss.mil", -1.0, "loss.mil=-1.0: must be >= 0"),
    ("loss.levels.video", -1.0, "loss.levels.video=-1.0: weights must be >= 0"),
    ("train.batch_size", 0, "train.batch_size=0: must be >= 1"),
    ("train.learning_rate", -1e-3, "train.learning_rate=-0.001"),
    ("train.lr_mult.text", -1.0, "train.lr_mult.text=-1.0"),
    ("train.grad_accum_steps", 3, "not divisible by train.grad_accum_steps=3"),
    ("model.dtype", "float8", "model.dtype='float8'"),
    ("mesh.fsdp", 0, "mesh.fsdp=0"),
    ("data.snippets", 1000, "exceeds model.temporal.max_len"),
])
def test_bad_values_name_the_field(field, value, message):
  config = load_config("tiny_text")
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_unknown_level_and_zero_levels():
  config = load_config("tiny_text")
  config.loss.levels.temporal = 1.0          # an audio level in a text config
  with pytest.raises(ValueError, match="loss.levels.temporal: unknown level for task 'text'"):
    config_lib.validate(config)
  config = load_config("tiny_audio")
  for name in config.loss.levels:
    config.loss.levels[name] = 0.0
  with pytest.raises(ValueError, match="at least one level"):
    config_lib.validate(config)


def test_mesh_and_batch_against_devices():
  config = load_config("tiny_text")          # batch 8, eval batch 8
  config_lib.validate(config, num_devices=8)
  config.mesh.fsdp = 3
  with pytest.raises(ValueError, match="mesh.fsdp=3 does not divide the 8 devices"):
    config_lib.validate(config, num_devices=8)
  config.mesh.fsdp, config.mesh.data = 2, 2
  with pytest.raises(ValueError, match=r"mesh data=2 x fsdp=2 = 4 != 8 devices"):
    config_lib.validate(config, num_devices=8)
  config.mesh.data, config.mesh.fsdp = -1, 1
  config.train.batch_size, config.train.grad_accum_steps = 8, 2   # micro-batch 4 on 8 devices
  with pytest.raises(ValueError, match="micro-batch .*=4 is not divisible by the 8 mesh devices"):
    config_lib.validate(config, num_devices=8)


def test_every_error_is_reported_at_once():
  config = load_config("tiny_text")
  config.weighting.tau = -1.0
  config.prior.source = "oracle"
  with pytest.raises(ValueError) as e:
    config_lib.validate(config)
  assert "weighting.tau" in str(e.value) and "prior.source" in str(e.value)


def test_cli_reports_bad_config_before_training(tmp_path):
  """`varcmp train` with a bad override exits non-zero naming the config file and the field."""
  code = ("import sys; from varcmp_jax.train.main import train_main; "
          "sys.exit(train_main(sys.argv[1:]))")
  result = subprocess.run(
      [sys.executable, "-c", code, "--config", str(CONFIGS / "tiny_text.py"), "--workdir", str(tmp_path),
       "--config.weighting.beta=2.0", "--config.data.records=/nonexistent"],
      capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "tiny_text.py" in result.stderr and "weighting.beta=2.0" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_overrides_parse_from_the_given_argv_not_sys_argv(tmp_path):
  """train_main(argv) called from Python (the demo, notebooks) must see its own --config.x.y overrides."""
  from varcmp_jax import command_flags
  values = command_flags.parse(
      ["--config", f"{CONFIGS / 'tiny_audio.py'}:features", "--workdir", str(tmp_path),
       "--config.train.num_steps=17", "--config.data.records=/some/records", "--config.weighting.beta=0.25"],
      "varcmp train")
  config = values.config
  assert (config.task, config.regime, config.model.audio.kind) == ("audio", "features", "features")
  assert (config.train.num_steps, config.data.records, config.weighting.beta) == (17, "/some/records", 0.25)
  assert command_flags.load_config_file(str(CONFIGS / "synthetic.py"), ["--config.seed=3"]).seed == 3


def failed(error) -> bool:
  """A SystemExit of a failed command: a message (exit status 1) or a non-zero code, never 0 or None."""
  return error.value.code not in (0, None)


def test_cli_requires_records_and_workdir(tmp_path):
  from varcmp_jax.train import main as train_main_lib
  with pytest.raises(SystemExit, match="config.data.records is empty") as error:
    train_main_lib.train_main(["--config", str(CONFIGS / "tiny_text.py"), "--workdir", str(tmp_path)])
  assert failed(error)
  with pytest.raises(SystemExit, match="--workdir is required") as error:
    train_main_lib.train_main(["--config", str(CONFIGS / "tiny_text.py")])
  assert failed(error)


def test_cli_names_an_unknown_override_field(tmp_path):
  from varcmp_jax.train import main as train_main_lib
  with pytest.raises(SystemExit, match=r"--config.loss.levels.nope=1: .*loss.levels has no field 'nope' "
                                       r"\(fields: frame, spatial, video\)") as error:
    train_main_lib.train_main(["--config", str(CONFIGS / "tiny_text.py"), "--workdir", str(tmp_path),
                               "--config.loss.levels.nope=1"])
  assert failed(error)
  with pytest.raises(SystemExit, match="could not convert string to float") as error:
    train_main_lib.train_main(["--config", str(CONFIGS / "tiny_text.py"), "--workdir", str(tmp_path),
                               "--config.weighting.beta=abc"])
  assert failed(error)


def test_lookup_against_hand_cases():
  config = config_lib.default_config("audio")
  assert config_lib.lookup(config, "loss.levels.temporal") == 1.0
  assert config_lib.lookup(config, "weighting.beta") == 0.5
  with pytest.raises(ValueError, match="weighting has no field 'betta'"):
    config_lib.lookup(config, "weighting.betta")
  with pytest.raises(ValueError, match="the config has no field 'nope'"):
    config_lib.lookup(config, "nope.x")


def test_varcmp_usage_version_and_help(capsys):
  from varcmp_jax import __version__, cli
  assert cli.main([]) == 2                                      # bare `varcmp`: the usage, as an error
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.startswith("usage: varcmp <command>") and "train" in captured.err
  assert cli.main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: varcmp <command>")
  assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"varcmp {__version__}\n"
  assert cli.main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err
  for command in ("train", "eval", "ablate"):
    try:
      code = cli.main([command, "--help"])
    except SystemExit as e:                                    # absl-style commands exit from their parser
      code = e.code
    assert code in (0, None) and f"varcmp {command}" in capsys.readouterr().out


def test_a_config_file_that_does_not_load_is_one_line(tmp_path):
  from varcmp_jax.train import main as train_main_lib
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  with pytest.raises(SystemExit) as error:
    train_main_lib.train_main(["--config", str(broken), "--workdir", str(tmp_path / "run")])
  assert failed(error)
  assert f"--config {broken}: cannot load it: SyntaxError" in str(error.value) and "\n" not in str(error.value)
  assert not (tmp_path / "run").exists()
