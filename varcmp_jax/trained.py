"""A trained workdir, read back: its config (workdir/config.json, written by `varcmp train`) and its params.

  run = trained.load("runs/demo")            # latest checkpoint; trained.load(dir, step=200) for another
  run.model.apply({"params": run.params}, batch, method=run.model.encode_video)

Used by `varcmp export` and `varcmp search`. The params are restored through the trainer's abstract state,
so a checkpoint written on any mesh loads on the devices of this process.
"""
import dataclasses
import json
import os
import sys
from typing import Any

import ml_collections

from varcmp_jax import compilation_cache
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
  """The workdir's checkpoint restored onto this run's mesh, for `config`: the newest one that restores
  (saying which newer ones it skipped and why), or exactly `step`.

  FileNotFoundError (one line, naming the directory and the steps there) when there is no such checkpoint or
  it does not restore. Reads only: creates nothing in the workdir.
  """
  from varcmp_jax.train import checkpoint as checkpoint_lib   # pylint: disable=g-import-not-at-top
  from varcmp_jax.train import step as step_lib               # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  steps = checkpoint_lib.complete_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{directory}: no checkpoint at all; run `varcmp train` first")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"{directory}: no checkpoint at step {step} (steps: {steps})")
  compilation_cache.enable(config.get("compilation_cache", True))
  trainer = step_lib.build(config)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.train.checkpoint_every, config.train.keep_checkpoints,
                                             read_only=True)
  for name in checkpointer.partial_saves():
    print(f"note: ignoring {os.path.join(directory, name)}: not a finished checkpoint (a save in progress or "
          "an interrupted one)", file=sys.stderr)
  target = checkpoint_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
  try:
    if step is None:
      state, step, _ = checkpointer.restore_newest(target)
    else:
      state = checkpointer.restore(target, None, step)
  finally:
    checkpointer.close()
  return Trained(config, trainer, state["params"], int(step), workdir)


def load(workdir: str, step: int | None = None) -> Trained:
  """The model and params of `workdir` at checkpoint `step` (default: the latest), with its config.json."""
  return restore(read_config(workdir), workdir, step)
