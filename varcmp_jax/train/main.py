"""`varcmp train`: an ml_collections config file with command-line overrides -> a trained workdir.

  varcmp train --config configs/synthetic.py --workdir /tmp/run --config.train.num_steps=300
  varcmp train --config configs/ucfcrime_ar.py:features --workdir runs/ucf

Exits 0 when training finished or was stopped by SIGTERM / SIGINT (after saving), non-zero with one line
naming the problem otherwise (see train.train).
"""
from varcmp_jax import command_flags


def train_main(argv: list[str]) -> int:
  values = command_flags.parse(argv, "varcmp train")
  import jax                              # after parsing: --help stays fast
  from varcmp_jax.train import sharding
  from varcmp_jax.train import train as train_lib
  from varcmp_jax.train.workdir import RunError
  sharding.maybe_initialize_distributed()
  command_flags.validate(values, "varcmp train", jax.device_count())   # the mesh and batch sizes fit the devices
  try:
    train_lib.train(values.config, values.workdir)
  except RunError as e:
    raise SystemExit(f"varcmp train: {e}") from None
  except KeyboardInterrupt:      # a second Ctrl-C, or one before the first step: nothing to save yet
    raise SystemExit("varcmp train: interrupted") from None
  return 0
