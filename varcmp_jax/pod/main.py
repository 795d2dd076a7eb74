"""The `varcmp compile` command: flags, config, the compiles, the table, the exit status (varcmp_jax/pod/__init__.py)."""
import argparse
import json
import math
import os
import sys

from varcmp_jax import command_flags
from varcmp_jax import config as config_lib
from varcmp_jax import evaluate
from varcmp_jax.pod import CompileError
from varcmp_jax.pod.fit import fit_search
from varcmp_jax.pod.report import report, table, verdict
from varcmp_jax.pod.steps import check_config, compile_eval, compile_train, resident_plan
from varcmp_jax.pod.targets import TOPOLOGY_EXAMPLES, local_target, tpu_target
from varcmp_jax.train import train as train_lib
from varcmp_jax.train.workdir import RunError


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    """One line (argparse prints the usage too), exit status 2."""
    self.exit(2, f"{self.prog}: {message} (--help for the flags)\n")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog="varcmp compile", description="Compile the train step (and the eval step) for a TPU slice or this "
      "machine's accelerators; print memory per chip, fits, collectives, FLOPs and a roofline time.",
      epilog="Config overrides as for train: --config.x.y=VALUE. Exit status 0 fits, 1 does not fit, 2 bad input.")
  p.add_argument("--config", required=True, help="config file, or the name of a bundled one (ucfcrime_ar:features)")
  p.add_argument("--topology", help=f"TPU slice as jax names it, e.g. {TOPOLOGY_EXAMPLES}; default: this machine's "
                 "GPUs or TPUs")
  p.add_argument("--per-chip-batch", type=int, help="default: config.train.batch_size / chips (must divide)")
  p.add_argument("--fit", action="store_true", help="also find the largest per-chip batch that fits")
  p.add_argument("--fit-step", type=int, default=8, help="--fit's answer is a multiple of this (default 8)")
  p.add_argument("--hbm-bytes", type=int, help="compare with this many bytes per chip, not the datasheet HBM")
  p.add_argument("--no-eval", action="store_true", help="compile the train step only")
  p.add_argument("--json", help="write the report here as JSON")
  return p


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(the command's own flags, the --config.x.y=v overrides); `--config.x.y v` becomes `--config.x.y=v`."""
  own, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      if "=" not in arg and i + 1 < len(argv):
        arg, i = f"{arg}={argv[i + 1]}", i + 1
      overrides.append(arg)
    else:
      own.append(arg)
    i += 1
  return own, overrides


def load_config(spec: str, overrides: list[str]):
  """The config with its overrides; CompileError (one line) for a missing file, an unknown field, a bad value."""
  try:
    config = command_flags.load_config_file(spec, overrides)
  except Exception as e:  # pylint: disable=broad-except  # every way a config file or an override can fail
    message = None
    if isinstance(e, (AttributeError, KeyError)):
      try:
        message = command_flags.unknown_override(overrides, command_flags.load_config_file(spec))
      except Exception:  # pylint: disable=broad-except
        message = None
    cause = e.__cause__ or e
    message = message or command_flags.one_line_text(cause)
    raise CompileError(f"--config {spec}: {message}") from None
  try:
    config_lib.validate(config)
  except ValueError as e:
    raise CompileError(f"--config {spec}: {command_flags.one_line(e)}") from None
  return config


def _with_word_budget(config):
  """`varcmp train`'s word budget: with the records given, model.max_words as train resolves it."""
  if config.task != "text":
    return config
  if config.data.records:
    try:
      evaluate.check_records(config, config.data.train_split)
      return train_lib.with_word_budget(config)
    except (RunError, OSError, ValueError, KeyError) as e:
      raise CompileError(f"config.data.records: {command_flags.one_line_text(e)}") from None
  if not config.model.get("max_words", 0):
    print("caption words: the text tower reads all 75 (model.max_words=0 and no records to size it from; "
          "`varcmp train` sizes it from the records' longest caption: pass --config.model.max_words=N)", flush=True)
  return config


def run(args, overrides) -> int:
  config = load_config(args.config, overrides)
  if args.per_chip_batch is not None and args.per_chip_batch < 1:
    raise CompileError(f"--per-chip-batch {args.per_chip_batch}: must be >= 1")
  if args.fit_step < 1:
    raise CompileError(f"--fit-step {args.fit_step}: must be >= 1")
  if args.hbm_bytes is not None and args.hbm_bytes < 1:
    raise CompileError(f"--hbm-bytes {args.hbm_bytes}: must be >= 1")
  folder = os.path.dirname(os.path.abspath(args.json)) if args.json else None
  if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):   # before minutes of compiling
    raise CompileError(f"--json {args.json}: {folder} is not a folder this user can write into")
  target = tpu_target(args.topology, args.hbm_bytes) if args.topology else local_target(args.hbm_bytes)
  chips = target.chips
  per_chip = args.per_chip_batch
  if per_chip is None:
    if config.train.batch_size % chips:
      raise CompileError(f"train.batch_size={config.train.batch_size} does not divide over the {chips} chips of "
                         f"{target.name}: pass --per-chip-batch N (global batch = N x {chips})")
    per_chip = config.train.batch_size // chips
  check_config(config, chips, per_chip)
  config = _with_word_budget(config)
  plan, input_line = resident_plan(config, chips)
  print(f"compiling the train step for {target.name} ({chips} x {target.kind}) at {per_chip} per chip ...",
        flush=True)
  train = compile_train(config, target, per_chip, plan, input_line)
  eval_, eval_note = (None, "not compiled (--no-eval)") if args.no_eval else compile_eval(config, target)
  fit = None
  if args.fit:
    step = math.lcm(args.fit_step, max(1, config.train.grad_accum_steps))

    def fits_at(batch):
      print(f"--fit: compiling at {batch} per chip ...", flush=True)
      s = compile_train(config, target, batch, plan, input_line)
      return s.fits(target.hbm), (s.memory or {}).get("total")

    known = {per_chip: (train.fits(target.hbm), (train.memory or {}).get("total"))} if per_chip % step == 0 else {}
    fit = fit_search(fits_at, per_chip, step, known)
  print(table(target, args.config, train, eval_, eval_note, fit), flush=True)
  result = report(target, args.config, train, eval_, eval_note, fit)
  if args.json:
    try:
      with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    except OSError as e:
      raise CompileError(f"--json {args.json}: cannot write it: {e.strerror or e}") from None
  if not result["fits"]:
    print(f"varcmp compile: does not fit: {verdict(target, train, eval_)}", file=sys.stderr, flush=True)
    return 1
  return 0


def main(argv: list[str]) -> int:
  own, overrides = _split_overrides(list(argv))
  try:
    args = _parser().parse_args(own)
  except SystemExit as e:        # argparse printed its one line (or the help)
    return int(e.code or 0)
  try:
    return run(args, overrides)
  except CompileError as e:
    print(f"varcmp compile: {e}", file=sys.stderr, flush=True)
    return 2
  except KeyboardInterrupt:
    print("varcmp compile: interrupted", file=sys.stderr, flush=True)
    return 130
