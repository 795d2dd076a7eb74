"""The `varcmp` command: one subcommand per job, each implemented as `main(argv) -> int` in its module.

Modules are imported only when their subcommand runs, so `varcmp synth` does not pay for jax or torch.
"""
import importlib
import sys

COMMANDS = {
    "synth": ("data_prep.synth", "main", "write the procedural benchmark (mp4 + captions.csv)"),
    "prep": ("data_prep.prep", "main", "decode videos into ArrayRecord shards + manifest.json"),
    "extract-features": ("data_prep.extract_features", "main", "frame records -> features records"),
    "import-clip": ("varcmp_jax.clip.cli", "import_main", "HF CLIPModel directory -> Flax params"),
    "train": ("varcmp_jax.train.main", "train_main", "train VarCMP from a config"),
    "eval": ("varcmp_jax.evaluate", "main", "evaluate a trained workdir, write eval.json"),
    "search": ("varcmp_jax.search", "main", "rank a gallery for a text or audio query, with key segments"),
    "export": ("varcmp_jax.export", "main", "trained workdir -> HF CLIPModel + safetensors heads"),
    "ablate": ("varcmp_jax.ablate", "main", "train and evaluate config sweeps, write ablation tables"),
    "demo": ("varcmp_jax.demo", "main", "synth -> prep -> train -> eval -> search on the default"),
}


def usage() -> str:
  lines = ["usage: varcmp <command> [args]  (varcmp <command> --help for its options)", "", "commands:"]
  lines += [f"  {name:<17} {help_}" for name, (_, _, help_) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  if argv[0] not in COMMANDS:
    print(f"varcmp: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
    return 2
  module_name, function_name, _ = COMMANDS[argv[0]]
  command = getattr(importlib.import_module(module_name), function_name)
  return int(command(argv[1:]) or 0)


if __name__ == "__main__":
  sys.exit(main())
