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
  with pytest.raises(ValueError, match="no variant 'pixels'; the variants of ucfcrime_ar are 'features'"):
    load_config("ucfcrime_ar", "pixels")


@pytest.mark.parametrize("spec, valid", [
    ("synthetic:nonexistent_variant", "the variants of synthetic are 'text' (the default) and 'audio'"),
    ("xdviolence_ar:nope", "the variants of xdviolence_ar are 'features' (the default), 'frames' and 'released'"),
    ("ucfcrime_ar:nope", "the variants of ucfcrime_ar are 'features' (the default), 'frames' and 'released'"),
    ("tiny_text:nope", "the variants of tiny_text are 'frames' (the default) and 'features'"),
    ("tiny_audio:nope", "the variants of tiny_audio are 'frames' (the default) and 'features'"),
])
def test_an_unknown_variant_is_one_line_with_exit_status_2(tmp_path, capsys, spec, valid):
  """train, eval and ablate: one line naming the variant and the valid ones (no ml_collections traceback), exit
  status 2 as for any bad argument, nothing written."""
  from varcmp_jax import ablate, command_flags, evaluate
  from varcmp_jax.train import main as train_main_lib
  variant = spec.split(":")[1]
  for prog, command in (("train", train_main_lib.train_main), ("eval", evaluate.main), ("ablate", ablate.main)):
    argv = ["--config", spec, "--workdir", str(tmp_path / "run"), "--config.data.records=/r", "--sweep", "seed=1,2"]
    with pytest.raises(SystemExit) as error:
      command(argv if prog == "ablate" else argv[:-2])
    expected = f"varcmp {prog}: --config {spec}: no variant {variant!r}; {valid}"
    assert error.value.code == 2 and str(error.value) == expected, prog
    assert capsys.readouterr().err == expected + "\n", prog          # printed: status 2 alone prints nothing
  with pytest.raises(ValueError, match=f"^no variant {variant!r}; "):
    command_flags.load_config_file(spec)
  assert not (tmp_path / "run").exists()


def test_an_unknown_variant_from_the_command_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "varcmp_jax.cli", "train", "--config", "synthetic:nonexistent_variant",
                           "--workdir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr == ("varcmp train: --config synthetic:nonexistent_variant: no variant 'nonexistent_variant'; "
                           "the variants of synthetic are 'text' (the default) and 'audio'\n")


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


def test_bundled_configs_by_name_from_any_directory(tmp_path, monkeypatch):
  """`--config NAME[:arg]` finds the configs the package ships from any directory; a FILE still works; an unknown
  name is one line listing the bundled ones."""
  from varcmp_jax import command_flags
  from varcmp_jax.train import main as train_main_lib
  assert command_flags.bundled_names() == sorted(p.stem for p in CONFIGS.glob("*.py"))
  monkeypatch.chdir(tmp_path)                 # not the repository: configs/ is not here
  config = command_flags.load_config_file("xdviolence_ar:released")
  assert (config.task, config.model.audio.kind, config.data.snippets) == ("audio", "features", 128)
  assert command_flags.load_config_file("synthetic.py:audio").to_dict() == load_config("synthetic", "audio").to_dict()
  values = command_flags.parse(["--config", "tiny_text:features", "--workdir", str(tmp_path / "run"),
                                "--config.data.records=/r"], "varcmp train")
  assert values.config.regime == "features"
  assert command_flags.config_source(values) == str(CONFIGS / "tiny_text.py") + ":features"
  (tmp_path / "configs").mkdir()              # a file of the user's own wins over a bundled name
  (tmp_path / "configs" / "mine.py").write_text((CONFIGS / "tiny_text.py").read_text().replace("= 8", "= 4", 1))
  assert command_flags.load_config_file("configs/mine.py").train.batch_size == 4
  for spec in ("nosuch:released", "configs/synthetic.py"):      # (no configs/synthetic.py in this directory)
    with pytest.raises(SystemExit) as error:
      train_main_lib.train_main(["--config", spec, "--workdir", str(tmp_path / "run"), "--config.data.records=/r"])
    message = str(error.value)
    assert message.startswith(f"varcmp train: --config {spec.split(':')[0]}: no such file, and not a bundled config "
                              "(bundled, usable by name from any directory: synthetic, tiny_audio, tiny_text, "
                              "ucfcrime_ar, xdviolence_ar;") and "\n" not in message
  assert not (tmp_path / "run").exists()


def test_ucf_released_needs_the_clip_checkpoint_or_an_explicit_random_tower(tmp_path):
  """Its features are CLIP's: training a random text tower against them would run, silently, and learn nothing
  useful; the command says so and how to opt in."""
  from varcmp_jax import command_flags
  argv = ["--config", "ucfcrime_ar:released", "--workdir", str(tmp_path / "run"), "--config.data.records=/r"]
  with pytest.raises(SystemExit) as error:
    command_flags.parse(argv, "varcmp train")
  assert str(error.value) == (
      "varcmp train: --config ucfcrime_ar:released: model.clip_checkpoint is required: the text tower must be the "
      "CLIP whose image tower made the features (OpenAI CLIP ViT-B/16, a HF CLIPModel directory): pass "
      "--config.model.clip_checkpoint=/path/to/clip-vit-base-patch16, or --config.model.clip_checkpoint= (empty) to "
      "train a random text tower on purpose")
  assert command_flags.parse(argv + ["--config.model.clip_checkpoint=/ckpt"], "varcmp train").config.model \
      .clip_checkpoint == "/ckpt"
  assert command_flags.parse(argv + ["--config.model.clip_checkpoint="], "varcmp train").config.model \
      .clip_checkpoint == ""
  for other in ("ucfcrime_ar:features", "xdviolence_ar:released"):       # they do not ask for it
    assert command_flags.parse(["--config", other] + argv[2:], "varcmp train")


def test_train_refuses_an_empty_split_and_a_batch_larger_than_the_split(tmp_path, capsys):
  """One line, exit 1, before anything is built: no train records (every video skipped), or fewer train records
  than a batch (each batch would repeat videos, and InfoNCE's diagonal would count a copy as a negative)."""
  import json
  from test_checkpoint import write_feature_records
  from varcmp_jax.train import main as train_main_lib
  empty = write_feature_records(tmp_path / "empty", splits=(("train", 0), ("test", 8)))
  manifest = json.loads((empty / "manifest.json").read_text())
  manifest["splits"]["train"]["shards"] = []          # as `varcmp prep` writes a split whose rows were all skipped
  (empty / "manifest.json").write_text(json.dumps(manifest))
  small = write_feature_records(tmp_path / "small", splits=(("train", 5), ("test", 8)))
  for records, expected in [
      (empty, f"data.train_split='train': that split of {empty / 'manifest.json'} has no records"),
      (small, f"train.batch_size=8, and the 'train' split of {small / 'manifest.json'} holds 5 records: every batch "
              "would repeat videos (the contrastive loss needs 8 distinct ones): set --config.train.batch_size to at "
              "most 5")]:
    with pytest.raises(SystemExit) as error:
      train_main_lib.train_main(["--config", str(CONFIGS / "tiny_text.py") + ":features", "--workdir",
                                 str(tmp_path / "run"), f"--config.data.records={records}"])
    assert failed(error) and str(error.value).startswith("varcmp train: ") and expected in str(error.value)
    assert "\n" not in str(error.value) and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
  from varcmp_jax import evaluate               # an evaluation of the split: its records, not the train batch
  config = load_config("tiny_text", "features")
  config.data.records, config.train.batch_size = str(small), 64
  evaluate.check_records(config, "test")
  with pytest.raises(evaluate.RunError, match="train.batch_size=64"):
    evaluate.check_records(config, "train")
