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


def restore(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> Trained:
  """The workdir's checkpoint (latest or `step`) restored onto this run's mesh, for `config`."""
  from varcmp_jax.train import checkpoint as checkpoint_lib   # pylint: disable=g-import-not-at-top
  from varcmp_jax.train import step as step_lib               # pylint: disable=g-import-not-at-top
  trainer = step_lib.build(config)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
  available = sorted(checkpointer.manager.all_steps())
  if not available or step is not None and step not in available:
    checkpointer.close()
    raise FileNotFoundError(f"{os.path.join(workdir, 'checkpoints')}: no checkpoint "
                            f"{'at all; run `varcmp train` first' if not available else f'at step {step}'} "
                            f"(steps: {available})")
  step = available[-1] if step is None else step
  target = checkpoint_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
  state = checkpointer.restore(target, None, step)
  checkpointer.close()
  return Trained(config, trainer, state["params"], int(step), workdir)


def load(workdir: str, step: int | None = None) -> Trained:
  """The model and params of `workdir` at checkpoint `step` (default: the latest), with its config.json."""
  return restore(read_config(workdir), workdir, step)
