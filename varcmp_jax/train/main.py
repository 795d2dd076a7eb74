"""`varcmp train`: an ml_collections config file with command-line overrides -> a trained workdir.

  varcmp train --config configs/synthetic.py --workdir /tmp/run --config.train.num_steps=300
  varcmp train --config configs/ucfcrime_ar.py:features --workdir runs/ucf
"""
from varcmp_jax import command_flags


def train_main(argv: list[str]) -> int:
  values = command_flags.parse(argv, "varcmp train")
  from varcmp_jax.train import train as train_lib   # after parsing: --help stays fast
  from varcmp_jax.train import sharding
  sharding.maybe_initialize_distributed()
  train_lib.train(values.config, values.workdir)
  return 0
