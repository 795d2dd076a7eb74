"""Orbax checkpoints of the train state and the input's state, in one step directory.

The input's state is the Grain iterator's (item "data") or, with device-resident data, the sampler's epoch and
position (item "sampler", JSON): a resumed run continues with the same next batch.

Saves are async (training goes on while the arrays are written), every `checkpoint_every` steps, keeping
the last `keep_checkpoints`. Restoring goes through an abstract target whose leaves carry the shardings
of the *current* mesh, so a run saved on 8x1 devices restores onto 2x4 or onto one device.

A checkpoint that does not restore (truncated files, a step directory without its items) is skipped for the
newest one that does, with a note saying which and why (`restore_newest`); an interrupted save leaves a
`<step>.orbax-checkpoint-tmp*` directory that Orbax never lists and the writer removes (`remove_partial_saves`).
"""
import contextlib
import gc
import logging
import os
import re
import shutil
import signal
import sys

import grain
import jax
import orbax.checkpoint as ocp

from varcmp_jax.data import resident
from varcmp_jax.train import workdir as workdir_lib

PARTIAL_SAVE = re.compile(r"^\d+\.orbax-checkpoint-tmp")
UNRESTORABLE_DIR = "unrestorable_checkpoints"   # in the workdir, beside checkpoints/
DATA_ITEMS = ("data", "sampler")                  # the Grain iterator's state, the resident sampler's


class NoCheckpoint(FileNotFoundError):
  """No checkpoint restores (or none exists); the message says what was tried."""


def failure_reason(error: BaseException) -> str:
  """One line: the innermost cause of a failed restore (TensorStore's own message is the informative one)."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= 240 else text[:237] + "..."


@contextlib.contextmanager
def _quiet_unraisable(drop):
  """Unraisable exceptions for which drop(unraisable) is true are not printed; collected before leaving."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not drop(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


def _quiet_failed_restore():
  """A failed TensorStore read leaves one coroutine per array that prints its exception when collected
  (the "Event loop is closed" tracebacks): none of them says more than the error restore() reports."""
  return _quiet_unraisable(lambda unraisable: True)


class _DropOutOfSpace(logging.Filter):
  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not (workdir_lib.out_of_space(error) if error else
                any(reason in record.getMessage() for reason in workdir_lib.OUT_OF_SPACE_ERRNOS.values()))


_ASYNCIO_OUT_OF_SPACE = _DropOutOfSpace()


def _leftover_of_failed_save(unraisable) -> bool:
  error = unraisable.exc_value
  return (isinstance(error, RuntimeError) and "Event loop is closed" in str(error)) or bool(
      workdir_lib.out_of_space(error))


@contextlib.contextmanager
def quiet_failed_saves():
  """A save that fails (a full disk) makes Orbax log several ERROR tracebacks and leaves TensorStore callbacks
  that print one "Event loop is closed" traceback per array: silenced here, since the caller reports the
  failure once, in one line. Other errors and logs pass."""
  absl_logger, drop = logging.getLogger("absl"), _DropOutOfSpace()
  absl_logger.addFilter(drop)
  # asyncio logs "Task exception was never retrieved" when the failed TensorStore writes' tasks are collected,
  # which can be after this block: its filter stays (it drops only out-of-space records).
  logging.getLogger("asyncio").addFilter(_ASYNCIO_OUT_OF_SPACE)
  try:
    with _quiet_unraisable(_leftover_of_failed_save):
      yield
  finally:
    absl_logger.removeFilter(drop)


def _data_args(data, restore: bool) -> dict:
  """The checkpoint item of the input's state: a Grain iterator ("data") or a resident.EpochSampler ("sampler")."""
  if data is None:
    return {}
  if isinstance(data, resident.EpochSampler):
    return {"sampler": ocp.args.JsonRestore() if restore else ocp.args.JsonSave(data.state_dict())}
  return {"data": grain.checkpoint.CheckpointRestore(data) if restore else grain.checkpoint.CheckpointSave(data)}


class Checkpointer:
  """A CheckpointManager over `workdir/checkpoints` with items "state" and (optionally) "data" or "sampler".

  `read_only`: for readers (eval, export, search), which never save: creates no directory.
  """

  def __init__(self, workdir: str, every: int, keep: int, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    # Readers get create=False rather than Orbax's read_only, which logs three warnings on every open.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=True, create=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data=None, force: bool = False) -> bool:
    """Starts an async save if `step` is due (or `force`); returns whether one started.

    Waits for the previous save first, and raises its error if it failed (e.g. a full disk).
    """
    items = {"state": ocp.args.StandardSave(state), **_data_args(data, restore=False)}
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data=None, step: int | None = None):
    """Restores onto the shardings carried by `abstract_state` (a tree of jax.ShapeDtypeStruct).

    `data` (a Grain iterator or a resident.EpochSampler) is restored in place; returns the state. A
    checkpoint that does not restore raises NoCheckpoint with the reason in one line.
    """
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise NoCheckpoint(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state), **_data_args(data, restore=True)}
    try:
      with _quiet_failed_restore():
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many kinds
      raise NoCheckpoint(f"{os.path.join(self.directory, str(step))} does not restore: {failure_reason(e)}") from e
    if "sampler" in items:
      data.load_state_dict(restored["sampler"])
    return restored["state"]

  def restore_newest(self, abstract_state, data=None) -> tuple[object, int, list[tuple[int, str]]]:
    """(state, step, skipped): the newest checkpoint that restores; skipped = [(step, reason)] newer ones.

    Prints a note per skipped checkpoint. NoCheckpoint (listing every reason) when none restores.
    """
    skipped = []
    for step in reversed(self.all_steps()):
      try:
        state = self.restore(abstract_state, data, step)
      except NoCheckpoint as e:
        reason = failure_reason(e)
        print(f"note: skipping checkpoint {step}: {reason}", file=sys.stderr, flush=True)
        skipped.append((step, reason))
        continue
      return state, step, skipped
    if not skipped:
      raise NoCheckpoint(f"{self.directory}: no checkpoint")
    raise NoCheckpoint(f"{self.directory}: no checkpoint restores (" +
                       "; ".join(f"step {s}: {why}" for s, why in skipped) + ")")

  def partial_saves(self) -> list[str]:
    """Directories of saves that never finished (`<step>.orbax-checkpoint-tmp*`), which Orbax ignores."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(name for name in os.listdir(self.directory) if PARTIAL_SAVE.match(name))

  def remove_partial_saves(self):
    """Writer only: deletes the leftovers of interrupted saves, with a note."""
    for name in self.partial_saves():
      print(f"note: removing {os.path.join(self.directory, name)}: a save that never finished", file=sys.stderr)
      shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def set_aside(self, steps) -> None:
    """Writer only: moves unrestorable step directories to WORKDIR/unrestorable_checkpoints/ (kept, not
    deleted), so that the run can save those step numbers again."""
    aside = os.path.join(self.workdir, UNRESTORABLE_DIR)
    for step in steps:
      os.makedirs(aside, exist_ok=True)
      target, n = os.path.join(aside, str(step)), 1
      while os.path.exists(target):
        target, n = os.path.join(aside, f"{step}.{n}"), n + 1
      shutil.move(os.path.join(self.directory, str(step)), target)
      print(f"note: moved the unrestorable checkpoint {step} to {target} (delete it when you like)", file=sys.stderr)
    self.manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: all processes agree on a step to stop at after a preemption notice."""
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  def wait_until_finished(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def complete_steps(workdir: str) -> list[int]:
  """Step numbers of the finished checkpoints on disk (what a rerun can resume from), without Orbax."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def data_item(workdir: str) -> str | None:
  """What the newest finished checkpoint holding an input state holds: "data" (a Grain iterator), "sampler"
  (resident data), or None (no such checkpoint)."""
  for step in reversed(complete_steps(workdir)):
    held = [item for item in DATA_ITEMS if os.path.isdir(os.path.join(workdir, "checkpoints", str(step), item))]
    if held:
      return held[0]
  return None


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`: the restore target for any mesh."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class StopSignals:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) set `received`; the loop saves and exits at the next step.

  A second SIGINT stops at once (KeyboardInterrupt), without saving. On multi-host runs jax.distributed's
  own preemption notifier owns SIGTERM; see `reached_preemption`.
  """

  def __init__(self):
    self.received = None          # the name of the signal, once one arrived
    self._previous = {}

  def __enter__(self):
    signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
    for signum in signals:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (e.g. called from a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    if self.received == "SIGINT" and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    if signum == signal.SIGINT:
      print("\ninterrupted: saving a checkpoint at the end of this step (Ctrl-C again to stop without saving)",
            file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    return False

