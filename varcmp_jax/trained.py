"""A trained workdir, read back: its config (workdir/config.json, written by `varcmp train`) and its params.

  run = trained.load("runs/demo")            # latest checkpoint; trained.load(dir, step=200) for another
  run.model.apply({"params": run.params}, batch, method=run.model.encode_video)

Used by `varcmp export` and `varcmp search`. The params are restored through the trainer's abstract state,
so a checkpoint written on any mesh loads on the devices of this process.
"""
import dataclasses
import json
import os
from typing import Any

import ml_collections

from varcmp_jax import config as config_lib


@dataclasses.dataclass
class Trained:
  config: ml_collections.ConfigDict
  trainer: Any          # varcmp_jax.train.step.Trainer: the model, its mesh and shardings
  params: Any
  step: int
  workdir: str

  @property
  def model(self):      # varcmp_jax.model.varcmp.VarCMP
    return self.trainer.model


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found; is {workdir} a `varcmp train` workdir?")
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  try:
    config_lib.validate(config)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return config


def load(workdir: str, step: int | None = None) -> Trained:
  """The model and params of `workdir` at checkpoint `step` (default: the latest)."""
  from varcmp_jax.train import checkpoint as checkpoint_lib   # pylint: disable=g-import-not-at-top
  from varcmp_jax.train import evaluate as evaluate_lib       # pylint: disable=g-import-not-at-top
  config = read_config(workdir)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
  available = sorted(checkpointer.manager.all_steps())
  checkpointer.close()
  if not available or step is not None and step not in available:
    raise FileNotFoundError(f"{os.path.join(workdir, 'checkpoints')}: no checkpoint "
                            f"{'at all' if not available else f'at step {step}'} (steps: {available})")
  trainer, params, step = evaluate_lib.restore_params(config, workdir, step)
  return Trained(config, trainer, params, int(step), workdir)
