"""The `--config FILE[:arg] --workdir DIR [--config.x.y=value ...]` flags of train, eval and ablate.

  values = command_flags.parse(argv, "varcmp train")       # validated config, workdir
  config = command_flags.load_config_file("configs/synthetic.py", ["--config.seed=3"])
"""
from absl import flags
from ml_collections import config_flags

from varcmp_jax import config as config_lib


def load_config_file(path: str, overrides=()):
  """The ConfigDict of `path[:arg]` with `--config.x.y=value` overrides applied (not validated)."""
  argv = ["varcmp", f"--config={path}", *overrides]
  values = flags.FlagValues()
  # sys_argv: config_flags finds the overrides there (default: sys.argv, not the argv parsed below).
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def unknown_override(argv: list[str]) -> str | None:
  """A message naming the first `--config.x.y=v` override whose field does not exist, if any."""
  paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  paths += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
  if not paths:
    return None
  config = load_config_file(paths[0])
  for arg in argv:
    if arg.startswith("--config."):
      try:
        config_lib.lookup(config, arg[len("--config."):].split("=", 1)[0])
      except ValueError as e:
        return f"{arg}: {e}"
  return None


USAGE = "usage: {prog} --config configs/<name>.py[:arg] --workdir DIR [--config.x.y=value ...]"


def parse_flags(argv: list[str], prog: str, usage: str | None = None, define_extra=None) -> flags.FlagValues:
  """argv (without the program name) -> a fresh FlagValues with the required --config and --workdir.

  A fresh FlagValues per call, so train, eval and ablate can run in one process. `define_extra(values)`
  adds a command's own flags. Bad overrides, missing flags and empty config.data.records exit with a
  message naming the problem; the config is not validated here.
  """
  usage = usage or USAGE.format(prog=prog)
  argv = [prog] + list(argv)
  values = flags.FlagValues()
  # sys_argv: config_flags finds the overrides there (default: sys.argv, not the argv parsed below).
  config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/synthetic.py[:arg]",
                                  flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "output directory", flag_values=values)
  if define_extra is not None:
    define_extra(values)
  try:
    values(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections reports an override of an unknown field (--config.x.nope=1) this way.
    raise SystemExit(f"{prog}: {unknown_override(argv) or e}") from None
  except (flags.Error, TypeError) as e:
    raise SystemExit(f"{prog}: {e}\n{usage}") from None
  for name in ("config", "workdir"):
    if values[name].value is None:
      raise SystemExit(f"{prog}: --{name} is required\n{usage}")
  if not values.config.data.records:
    raise SystemExit(f"{prog}: config.data.records is empty: pass --config.data.records=DIR "
                     "(a directory written by `varcmp prep`)")
  # grain's worker processes read absl's global flags; mark them parsed as absl.app would.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return values


def parse(argv: list[str], prog: str, define_extra=None) -> flags.FlagValues:
  """parse_flags, then the config validated before jax starts or data is read."""
  values = parse_flags(argv, prog, define_extra=define_extra)
  try:
    config_lib.validate(values.config)
  except ValueError as e:
    raise SystemExit(f"{prog}: {values['config'].config_filename}: {e}") from None
  return values
