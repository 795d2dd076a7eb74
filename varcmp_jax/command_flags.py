"""The `--config FILE[:arg] --workdir DIR [--config.x.y=value ...]` flags of train, eval and ablate.

  values = command_flags.parse(argv, "varcmp train")       # validated config, workdir
  config = command_flags.load_config_file("configs/synthetic.py", ["--config.seed=3"])
  config = command_flags.load_config_file("xdviolence_ar:released")      # a bundled config, by name

`--config` takes a config file, or the name of a config the package ships (`synthetic`, `ucfcrime_ar:released`:
the files of the repository's configs/ folder), which works from any directory. `--help` prints the usage and
exits 0; every problem with the flags or the config file exits with one line naming the flag, file or field (a
variant the config file does not know, `--config synthetic:nope`, with exit status 2, as a bad argument).
"""
import os
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from varcmp_jax import config as config_lib

# A config sets model.clip_checkpoint to this when training without the CLIP it names would be silently
# meaningless (configs/ucfcrime_ar.py:released: the features are OpenAI CLIP's, so the text tower must be that
# CLIP's, or it learns a random map into their space): the command refuses it until the user gives a checkpoint,
# or the empty value to train a random tower on purpose.
CHECKPOINT_REQUIRED = "required"


def bundled_configs() -> pathlib.Path:
  """The folder of the configs the package ships: varcmp_jax/configs in an installed wheel (setup.py puts the
  repository's configs/ there), the repository's configs/ in a source checkout or an editable install."""
  package = pathlib.Path(__file__).resolve().parent
  shipped = package / "configs"
  return shipped if shipped.is_dir() else package.parent / "configs"


def bundled_names() -> list[str]:
  return sorted(p.stem for p in bundled_configs().glob("*.py") if not p.name.startswith("_"))


def resolve_config(spec: str) -> str:
  """`FILE[:arg]` as given when FILE exists, else a bundled config's `NAME[:arg]` (NAME or NAME.py) as its path.
  ValueError (one line, listing the bundled names) when it is neither."""
  path, colon, arg = spec.partition(":")
  if os.path.isfile(path):
    return spec
  name = path.removesuffix(".py")
  if name in bundled_names():
    return str(bundled_configs() / f"{name}.py") + colon + arg
  raise ValueError(f"--config {path}: no such file, and not a bundled config (bundled, usable by name from any "
                   f"directory: {', '.join(bundled_names())}; e.g. --config xdviolence_ar:released)")


def load_config_file(path: str, overrides=()):
  """The ConfigDict of `path[:arg]` (a file or a bundled name) with `--config.x.y=value` overrides applied (not
  validated). ValueError with the file's own one-line message for a variant its get_config refuses (the caller
  names the --config it was given)."""
  argv = ["varcmp", f"--config={resolve_config(path)}", *overrides]
  values = flags.FlagValues()
  # sys_argv: config_flags finds the overrides there (default: sys.argv, not the argv parsed below).
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, sys_argv=argv)
  try:
    values(argv)
  except flags.Error as e:
    refused = config_file_error(e)
    if refused is None:
      raise
    raise ValueError(one_line_text(refused)) from None
  return values.config


# How ml_collections starts the ValueError it raises in place of the one a config file's get_config raised: the
# config's own error is kept only as the traceback text of that message (and as the exception's context).
_CONFIG_FILE_FAILED = "Error whilst parsing config file"


def config_file_error(error: BaseException) -> BaseException | None:
  """The exception the config file's own get_config raised (e.g. its ValueError for a variant it does not
  know: `synthetic:nope`), when `error` is absl's flag error wrapping ml_collections' report of it; else None."""
  chain = []
  while error is not None and len(chain) < 10:
    chain.append(error)
    error = error.__cause__ or error.__context__
  if len(chain) > 1 and any(str(e).startswith(_CONFIG_FILE_FAILED) for e in chain[:-1]):
    return chain[-1]
  return None


def one_line_text(error: BaseException) -> str:
  return " ".join(str(error).split())[:300] or type(error).__name__


class UsageError(SystemExit):
  """A bad argument: exit status 2, as argparse's; str() is the message (for callers that catch it)."""

  def __init__(self, message: str):
    super().__init__(2)
    self.message = message

  def __str__(self):
    return self.message


def usage_error(message: str) -> UsageError:
  """UsageError(message) to raise, its message printed on stderr now: a SystemExit with a status code prints
  nothing when it ends the program."""
  print(message, file=sys.stderr, flush=True)
  return UsageError(message)


def flag_value(argv: list[str], name: str) -> str | None:
  """The value of `--name=v` or `--name v` in argv (the last one given), without parsing the rest."""
  found = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      found = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      found = argv[i + 1]
  return found


def unknown_override(argv: list[str], config=None) -> str | None:
  """A message naming the first `--config.x.y=v` override whose field does not exist, if any."""
  if config is None:
    path = flag_value(argv, "config")
    if path is None:
      return None
    config = load_config_file(path)
  for arg in argv:
    if arg.startswith("--config."):
      try:
        config_lib.lookup(config, arg[len("--config."):].split("=", 1)[0])
      except ValueError as e:
        return f"{arg}: {e}"
  return None


USAGE = "usage: {prog} --config FILE|NAME[:arg] --workdir DIR [--config.x.y=value ...]"
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def _help(usage: str, values: flags.FlagValues, config_from_workdir: bool) -> str:
  lines = [usage, "", "flags:"]
  for name in sorted(values):
    if name == "config":
      text = (f"config file, or the name of a bundled one ({', '.join(bundled_names())}), e.g. "
              "--config synthetic or --config ucfcrime_ar:features")
      text += " (default: WORKDIR/config.json, the run's own config)" if config_from_workdir else " (required)"
    else:
      text = values[name].help + (" (required)" if name == "workdir" else "")
    lines.append(f"  {'--' + name:<16} {text}")
  lines.append(f"  {'--config.x.y=V':<16} override one config field, e.g. --config.train.batch_size=64 "
               "--config.data.records=DIR")
  return "\n".join(lines)


def _config_from_workdir(prog: str, workdir: str | None, usage: str):
  from varcmp_jax import trained  # pylint: disable=g-import-not-at-top
  if workdir is None:
    raise SystemExit(f"{prog}: --workdir is required\n{usage}")
  try:
    return trained.read_config(workdir)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"{prog}: {e} (or pass --config)") from None


def _with_config(argv: list[str], spec: str) -> list[str]:
  """argv with every `--config` value (not the `--config.x.y` overrides) replaced by `spec`."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = f"--config={spec}"
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = spec
  return out


def parse_flags(argv: list[str], prog: str, usage: str | None = None, define_extra=None,
                config_from_workdir: bool = False) -> flags.FlagValues:
  """argv (without the program name) -> a fresh FlagValues with --config and --workdir.

  A fresh FlagValues per call, so train, eval and ablate can run in one process. `define_extra(values)`
  adds a command's own flags. `config_from_workdir`: without --config, the config is WORKDIR/config.json
  (overrides still apply). Bad overrides, missing flags or files and an empty config.data.records exit with
  a message naming the problem; the config is not validated here.
  """
  usage = usage or USAGE.format(prog=prog)
  argv = list(argv)
  values = flags.FlagValues()
  spec = given = flag_value(argv, "config")     # `given`: as the user wrote it, for messages
  wanted_help = any(a in HELP_FLAGS for a in argv)
  base = None
  if spec is None and config_from_workdir and not wanted_help:
    base = _config_from_workdir(prog, flag_value(argv, "workdir"), usage)
  elif spec is not None:
    try:
      spec = resolve_config(spec)
    except ValueError as e:
      raise SystemExit(f"{prog}: {e}") from None
    argv = _with_config(argv, spec)
  # sys_argv: config_flags finds the overrides there (default: sys.argv, not the argv parsed below).
  full_argv = [prog] + argv
  try:
    if base is not None:    # overrides apply as the flag is defined
      config_flags.DEFINE_config_dict("config", base, "the run's config", flag_values=values, lock_config=True,
                                      sys_argv=full_argv)
    else:
      config_flags.DEFINE_config_file("config", None, "config file or bundled name, e.g. synthetic[:arg]",
                                      flag_values=values, lock_config=True, sys_argv=full_argv)
    flags.DEFINE_string("workdir", None, "the run's directory: config.json, checkpoints/, metrics, eval.json",
                        flag_values=values)
    if define_extra is not None:
      define_extra(values)
    if not wanted_help:
      values(full_argv)
  except (AttributeError, KeyError) as e:
    # ml_collections reports an override of an unknown field (--config.x.nope=1) this way.
    raise SystemExit(f"{prog}: {unknown_override(argv, base) or e}") from None
  except (flags.Error, TypeError) as e:
    refused = config_file_error(e)
    if refused is not None:    # a variant the config file does not know (`synthetic:nope`): its own one line
      raise usage_error(f"{prog}: --config {given}: {one_line_text(refused)}") from None
    raise SystemExit(f"{prog}: {e}\n{usage}") from None
  except Exception as e:  # pylint: disable=broad-except  # the config file's own code failed to import / run
    cause = e.__cause__ or e
    raise SystemExit(f"{prog}: --config {given}: cannot load it: {type(cause).__name__}: "
                     f"{' '.join(str(cause).split())[:300]}") from None
  if wanted_help:
    print(_help(usage, values, config_from_workdir))
    raise SystemExit(0)
  for name in ("config", "workdir"):
    if values[name].value is None:
      raise SystemExit(f"{prog}: --{name} is required\n{usage}")
  if not values.config.data.records:
    raise SystemExit(f"{prog}: config.data.records is empty: pass --config.data.records=DIR "
                     "(a directory written by `varcmp prep`)")
  if values.config.model.get("clip_checkpoint") == CHECKPOINT_REQUIRED:
    raise SystemExit(f"{prog}: --config {given}: model.clip_checkpoint is required: the text tower must be the CLIP "
                     "whose image tower made the features (OpenAI CLIP ViT-B/16, a HF CLIPModel directory): pass "
                     "--config.model.clip_checkpoint=/path/to/clip-vit-base-patch16, or "
                     "--config.model.clip_checkpoint= (empty) to train a random text tower on purpose")
  # grain's worker processes read absl's global flags; mark them parsed as absl.app would.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return values


def config_source(values: flags.FlagValues) -> str:
  """The config file given with --config, or WORKDIR/config.json when it was read from the workdir."""
  return getattr(values["config"], "config_filename", None) or os.path.join(values.workdir, "config.json")


def one_line(error: Exception) -> str:
  """config.validate's "Bad config:\\n  a\\n  b" as "a; b"."""
  text = str(error)
  if text.startswith("Bad config:"):
    text = "; ".join(line.strip() for line in text.splitlines()[1:])
  return text


def parse(argv: list[str], prog: str) -> flags.FlagValues:
  """parse_flags, then the config validated before jax starts or data is read."""
  values = parse_flags(argv, prog)
  validate(values, prog)
  return values


def validate(values: flags.FlagValues, prog: str, num_devices: int | None = None) -> None:
  """config.validate (against `num_devices` when given: mesh, batch sizes), as a one-line exit."""
  try:
    config_lib.validate(values.config, num_devices)
  except ValueError as e:
    raise SystemExit(f"{prog}: {config_source(values)}: {one_line(e)}") from None
