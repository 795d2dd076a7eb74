"""metrics.jsonl, eval_history.jsonl and TensorBoard scalars of a run, written by process 0 only.

On resume from step s, lines after s (logged after the last checkpoint of a killed run) are dropped, so the
files read like one uninterrupted run, and TensorBoard purges the same steps. A torn last line (the run died
mid-write) is dropped with a note; any other unreadable line is an error naming the file and line.

Throughput (`Throughput`) rides along with the logged steps: step time, input wait per step, samples/s,
achieved model TFLOP/s (varcmp_jax.flops: the step's matmul FLOPs without rematerialization) and, where the
device's datasheet peak is known, MFU; averaged over the steps since the previous log line.

TensorBoard events are written synchronously, in the caller's thread: tensorboardX's SummaryWriter writes
from a background thread, and when that thread dies (a full disk) the next `add_scalar` blocks forever on
its full queue. Here a failed write raises where it happened.
"""
import contextlib
import json
import os
import sys
import time

import numpy as np
from tensorboardX import event_file_writer, summary
from tensorboardX.proto import event_pb2, summary_pb2

from varcmp_jax.train.workdir import RunError, write_atomically


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSON-lines file; a torn last line is dropped (with a note), any other bad line is an error."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    lines = f.read().decode("utf-8", "replace").split("\n")
  numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip(" \t\r\0")]
  rows = []
  for n, (number, line) in enumerate(numbered):
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError("not an object with an integer \"step\"")
    except ValueError as e:
      if n == len(numbered) - 1:
        print(f"note: {path}:{number}: dropping a torn last line (the run was stopped mid-write): "
              f"{line[:60]!r}", file=sys.stderr)
        break
      raise RunError(f"{path}:{number}: not a metrics line ({e}): {line[:80]!r}; fix or delete that line") from None
    rows.append(row)
  return rows


def keep_through(path: str, step: int) -> None:
  """Rewrites a JSON-lines file with only its rows of step <= `step` (atomically)."""
  if not os.path.exists(path):
    return
  kept = [row for row in read_jsonl(path) if row["step"] <= step]
  write_atomically(path, "".join(json.dumps(row) + "\n" for row in kept))


class TensorBoardScalars:
  """Scalars into an event file of `logdir`, flushed on every call; errors raise in the caller."""

  def __init__(self, logdir: str, purge_step: int | None = None):
    os.makedirs(logdir, exist_ok=True)
    # The library names the file by the second and the host; the suffix keeps a quick restart from replacing it.
    self._writer = event_file_writer.EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}.{time.time_ns()}")
    if purge_step:   # TensorBoard hides the events of step >= purge_step written before this (a resume)
      self._writer.write_event(event_pb2.Event(
          step=purge_step, wall_time=time.time(),
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self._writer.flush()

  def write(self, step: int, scalars: dict[str, float]):
    values = [summary.scalar(tag, float(value)).value[0] for tag, value in scalars.items()]
    self._writer.write_event(event_pb2.Event(step=step, wall_time=time.time(),
                                             summary=summary_pb2.Summary(value=values)))
    self._writer.flush()

  def close(self):
    self._writer.close()


class MetricsLog:
  """metrics.jsonl + eval_history.jsonl + TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: str, start_step: int, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.eval_path = os.path.join(workdir, "eval_history.jsonl")
    for path in (self.path, self.eval_path):
      keep_through(path, start_step)
    self.tb = TensorBoardScalars(os.path.join(workdir, "tensorboard"), start_step + 1 if start_step else None)

  def write(self, step: int, metrics: dict[str, np.ndarray], throughput: dict[str, float] | None = None):
    """One metrics.jsonl row (the step's metrics and the throughput): TensorBoard "train/..." and "throughput/..."."""
    if not self.enabled:
      return
    train = {k: float(v) for k, v in metrics.items()}
    throughput = throughput or {}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": step, **train, **throughput}) + "\n")
    self.tb.write(step, {**{f"train/{k}": v for k, v in train.items()},
                         **{f"throughput/{k}": v for k, v in throughput.items()}})

  def write_eval(self, step: int, result: dict):
    """Periodic eval (train.eval_every): eval_history.jsonl and TensorBoard "eval/..." scalars."""
    if not self.enabled:
      return
    with open(self.eval_path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": step, **result}) + "\n")
    scalars = {}
    for name, entry in [("combined", result), *result["levels"].items()]:
      for direction, values in entry.items():
        if direction != "levels" and isinstance(values, dict):
          scalars.update({f"eval/{name}/{direction}/{metric}": value for metric, value in values.items()})
      scalars[f"eval/{name}/SumR"] = entry["SumR"]
    self.tb.write(step, scalars)

  def close(self):
    if self.enabled:
      self.tb.close()


class Throughput:
  """Wall time per step, input wait per step, samples/s and TFLOP/s over the steps since the last `report`.

  The loop wraps its input fetch in `waiting()` and anything that is not training (a periodic eval) in
  `paused()`; `report` is called after the metrics were fetched from the devices, so the steps are done.
  """

  def __init__(self, batch_size: int, flops_per_step: float, peak=None, devices: int = 1):
    """flops_per_step: model FLOPs of a step, all devices; peak: a varcmp_jax.flops.Peak of one device, or None."""
    self.batch_size, self.flops, self.peak, self.devices = batch_size, flops_per_step, peak, devices
    self.restart()

  def restart(self):
    self._start, self._wait, self._paused, self._steps = time.perf_counter(), 0.0, 0.0, 0

  @contextlib.contextmanager
  def _timed(self, total: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      setattr(self, total, getattr(self, total) + time.perf_counter() - start)

  def waiting(self):
    """Around getting the next input: counted as input wait."""
    return self._timed("_wait")

  def paused(self):
    """Around what is not training (an eval): left out of the step time."""
    return self._timed("_paused")

  def stepped(self):
    self._steps += 1

  def report(self) -> dict[str, float]:
    steps = max(1, self._steps)
    step_time = max(time.perf_counter() - self._start - self._paused, 1e-9) / steps
    figures = {"step_time_s": step_time, "input_wait_s": self._wait / steps,
               "samples_per_s": self.batch_size / step_time, "tflops_per_s": self.flops / step_time / 1e12}
    if self.peak is not None:
      figures["mfu"] = self.flops / step_time / (self.peak.flops * self.devices)
    self.restart()
    return figures
