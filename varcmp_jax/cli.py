"""The `varcmp` command: one subcommand per job, each implemented as `main(argv) -> int` in its module.

Modules are imported only when their subcommand runs, so `varcmp synth` does not pay for jax or torch.
"""
import importlib
import os
import sys

COMMANDS = {
    "synth": ("data_prep.synth", "main", "write the procedural benchmark (mp4 + captions.csv)"),
    "prep": ("data_prep.prep", "main", "decode videos into ArrayRecord shards + manifest.json"),
    "extract-features": ("data_prep.extract_features", "main", "frame records -> features records"),
    "import-clip": ("varcmp_jax.clip.cli", "import_main", "HF CLIPModel directory -> Flax params"),
    "train": ("varcmp_jax.train.main", "train_main", "train VarCMP from a config"),
    "eval": ("varcmp_jax.evaluate", "main", "evaluate a trained workdir, write eval.json"),
    "search": ("varcmp_jax.search", "main", "rank a gallery for a text or audio query, with key segments"),
    "index": ("varcmp_jax.index.build", "main", "embed a split into an on-disk index for archive-scale search"),
    "serve": ("varcmp_jax.serve.main", "main", "a local web page over an index: query, hits, keyframes, player"),
    "export": ("varcmp_jax.export", "main", "trained workdir -> HF CLIPModel + safetensors heads"),
    "ablate": ("varcmp_jax.ablate", "main", "train and evaluate config sweeps, write ablation tables"),
    "demo": ("varcmp_jax.demo", "main", "synth -> prep -> train -> eval -> search on the default"),
    "compile": ("varcmp_jax.pod.main", "main", "will it fit on the pod? the train step compiled for a TPU slice"),
}


def usage() -> str:
  lines = ["usage: varcmp <command> [args]  (varcmp <command> --help for its options; varcmp --version)", "",
           "commands:"]
  lines += [f"  {name:<17} {help_}" for name, (_, _, help_) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv:
    print(usage(), file=sys.stderr)
    return 2
  if argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  if argv[0] in ("-V", "--version", "version"):
    from varcmp_jax import __version__  # pylint: disable=g-import-not-at-top
    print(f"varcmp {__version__}")
    return 0
  if argv[0] not in COMMANDS:
    print(f"varcmp: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
    return 2
  module_name, function_name, _ = COMMANDS[argv[0]]
  command = getattr(importlib.import_module(module_name), function_name)
  try:
    return int(command(argv[1:]) or 0)
  except BrokenPipeError:   # the output went into a pipe that closed early (`varcmp ... | head`): not an error
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # so that exiting does not fail again
    return 0


if __name__ == "__main__":
  sys.exit(main())
