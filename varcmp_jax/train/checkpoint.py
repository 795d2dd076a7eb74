"""Orbax checkpoints of the train state and the Grain iterator state, in one step directory.

Saves are async (training goes on while the arrays are written), every `checkpoint_every` steps, keeping
the last `keep_checkpoints`. Restoring goes through an abstract target whose leaves carry the shardings
of the *current* mesh, so a run saved on 8x1 devices restores onto 2x4 or onto one device.
"""
import os
import signal

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A CheckpointManager over `workdir/checkpoints` with items "state" and (optionally) "data"."""

  def __init__(self, workdir: str, every: int, keep: int):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, force: bool = False) -> bool:
    """Starts an async save if `step` is due (or `force`); returns whether one started."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """Restores onto the shardings carried by `abstract_state` (a tree of jax.ShapeDtypeStruct).

    `data_iterator` is restored in place (Grain iterators are stateful); returns the state.
    """
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: all processes agree on a step to stop at after a preemption notice."""
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  def wait_until_finished(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`: the restore target for any mesh."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class SigtermFlag:
  """Set by SIGTERM (preemption on a single host); the loop saves and exits at the next step boundary.

  On multi-host runs jax.distributed's own preemption notifier owns SIGTERM; see `reached_preemption`.
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread (e.g. called from a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
