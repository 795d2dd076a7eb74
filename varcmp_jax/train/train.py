"""The training loop: data -> sharded batch -> jitted step -> metrics, checkpoints, preemption.

The batches come from the Grain pipeline or, in the features regime, from the split held on the devices
(`config.data.resident`; feed.py says which, in one line). The first step compiles (the progress bar says
so); metrics.jsonl and TensorBoard get the throughput with the losses (metrics_log.Throughput).

Resume is exact: the checkpoint holds the train state and the input's state of the same step (the Grain
iterator, or the resident sampler's epoch and position), so a restarted run sees the same next batch and
reproduces the same per-step losses and final parameters.

Workdir safety (SPEC section 4c, `workdir.py`): one writer per workdir (a lock), a resume only with the
config in WORKDIR/config.json (up to cadence, worker and memory settings), the newest checkpoint that restores,
SIGTERM and SIGINT save and exit 0, and a full disk stops the run with one line and its checkpoints intact.
"""
import contextlib
import copy
import os
import time

import jax
import ml_collections
import tqdm
from jax.experimental import multihost_utils

from varcmp_jax import compilation_cache
from varcmp_jax import evaluate
from varcmp_jax import flops
from varcmp_jax.alignment import losses
from varcmp_jax.data import pipeline, records_check
from varcmp_jax.train import checkpoint as checkpoint_lib
from varcmp_jax.train import feed as feed_lib
from varcmp_jax.train import metrics_log
from varcmp_jax.train import step as step_lib
from varcmp_jax.train import workdir as workdir_lib
from varcmp_jax.train.metrics_log import MetricsLog, Throughput
from varcmp_jax.train.workdir import RunError


def load_clip_params(path: str):
  """Tower params from a HF CLIPModel directory or a `varcmp import-clip` output."""
  from varcmp_jax import clip
  return clip.load(path)[1]


def restore_or_init(trainer: step_lib.Trainer, checkpointer, config, data=None):
  """(state, step): the newest checkpoint that restores, onto this mesh, or a fresh state at step 0.

  Newer checkpoints that do not restore are set aside (WORKDIR/unrestorable_checkpoints/), so that their step
  numbers can be saved again. RunError if checkpoints exist and none restores: never a silent restart.
  """
  if not checkpointer.all_steps():
    clip_params = load_clip_params(config.model.clip_checkpoint) if config.model.clip_checkpoint else None
    return trainer.init_state(config.seed, clip_params), 0
  target = checkpoint_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
  try:
    state, step, skipped = checkpointer.restore_newest(target, data)
  except checkpoint_lib.NoCheckpoint as e:
    raise RunError(f"{e}; move them away to start over") from None
  if skipped:
    if jax.process_index() == 0:
      checkpointer.set_aside(s for s, _ in skipped)   # reloads the manager itself
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("varcmp: unrestorable checkpoints set aside")
    if jax.process_index() != 0:    # after the barrier: the moves are done
      checkpointer.manager.reload()
  return state, step


def _compile(feed, state, inputs, bar, meter: Throughput):
  """The first step's compilation, shown on the bar and kept out of the step times; its FLOPs, for the log."""
  bar.set_description("compiling")
  bar.refresh()
  start = time.perf_counter()
  run_step, count = feed.compile(state, inputs)
  meter.flops, meter.peak = count.model, flops.device_peak()
  if jax.process_index() == 0:
    peak = (f"; MFU against {meter.peak.flops / 1e12:.0f} TFLOP/s x {jax.device_count()} devices" if meter.peak
            else "; no MFU (no datasheet peak for this device)")
    tqdm.tqdm.write(f"step compiled in {time.perf_counter() - start:.1f} s: {count.model / 1e12:.4g} TFLOP model, "
                    f"{count.executed / 1e12:.4g} executed, {100 * count.bf16_share:.0f}% of them on bf16 "
                    f"operands{peak}")
    work = losses.fine_work(feed.trainer.config, feed.trainer.config.train.batch_size)
    if work:
      tqdm.tqdm.write(work)
  bar.set_description("train")
  meter.restart()
  return run_step


def train_steps(trainer, state, start: int, feed, checkpointer, log: MetricsLog, stop, eval_data=None):
  """Steps start+1 .. num_steps (or until a stop signal); saves the last step. Returns (state, the last step
  done, its loss).

  `eval_data`: the eval split on the devices (resident data) for the periodic eval, else None (Grain)."""
  t = trainer.config.train
  last_saved = done = start
  metrics = None
  bar = tqdm.trange(start, t.num_steps, initial=start, total=t.num_steps, desc="train",
                    disable=jax.process_index() != 0)
  meter, run_step = Throughput(t.batch_size, 0.0, devices=jax.device_count()), None
  for step in bar:
    with meter.waiting():
      inputs = feed.next()
    if run_step is None:
      run_step = _compile(feed, state, inputs, bar, meter)
    state, metrics = run_step(state, inputs)
    meter.stepped()
    done = step + 1
    if done % t.log_every == 0 or done == t.num_steps:
      metrics = jax.device_get(metrics)
      log.write(done, metrics, meter.report())
      bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    if checkpointer.save(done, state, feed.checkpointable):
      last_saved = done
    if t.eval_every and done % t.eval_every == 0 and done != t.num_steps:
      with meter.paused():
        log.write_eval(done, evaluate.evaluate_params(trainer, state["params"], resident_split=eval_data))
    if stop.received or checkpointer.reached_preemption(done):
      why = "interrupted (SIGINT)" if stop.received == "SIGINT" else "preempted"
      print(f"{why}: saving step {done} and exiting", flush=True)
      break
  bar.close()
  if last_saved != done:
    checkpointer.save(done, state, feed.checkpointable, force=True)
  checkpointer.wait_until_finished()
  return state, done, None if metrics is None else float(jax.device_get(metrics["loss"]))


def summary(workdir: str, start: int, done: int, num_steps: int, loss: float | None, seconds: float) -> str:
  """The closing line of a run: the steps it did, the final loss and time, where the checkpoint and metrics are."""
  where = (f"checkpoint {os.path.join(workdir, 'checkpoints', str(done))}, metrics "
           f"{os.path.join(workdir, 'metrics.jsonl')} (TensorBoard: {os.path.join(workdir, 'tensorboard')})")
  loss_text = "" if loss is None else f", loss {loss:.4f}"
  if done >= num_steps:
    return f"trained steps {start + 1}-{done} of {num_steps} in {seconds:.0f} s{loss_text}; {where}"
  return (f"stopped at step {done} of {num_steps} after {done - start} steps in {seconds:.0f} s{loss_text}; {where}; "
          "rerun the same command to go on")


def nothing_to_do(workdir: str, step: int, num_steps: int) -> str:
  """The one line of a rerun that finds the run finished: its step, last logged loss, checkpoint and metrics."""
  rows = metrics_log.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  loss = next((f", loss {row['loss']:.4f}" for row in reversed(rows) if row["step"] == step and "loss" in row), "")
  return (f"nothing to train: {workdir} already holds step {step} of train.num_steps={num_steps}{loss} (checkpoint "
          f"{os.path.join(workdir, 'checkpoints', str(step))}, metrics {os.path.join(workdir, 'metrics.jsonl')}); "
          "to train longer, give a larger train.num_steps and a new --workdir")


def _disk_full(workdir: str, reason: str) -> RunError:
  steps = checkpoint_lib.complete_steps(workdir)
  last = (f"the last complete checkpoint is step {steps[-1]} ({os.path.join(workdir, 'checkpoints', str(steps[-1]))})"
          if steps else "no checkpoint was completed")
  return RunError(f"disk full writing into {workdir} ({reason}): training stopped; {last}. Free some space "
                  "and rerun the same command to resume")


def _run(trainer, config, workdir: str, started: float):
  """Restores or initializes, trains to train.num_steps, and says so in one closing line (`started`: the
  perf_counter time the command started, for the time it gives)."""
  t = config.train
  writer = jax.process_index() == 0
  checkpointer = checkpoint_lib.Checkpointer(workdir, t.checkpoint_every, t.keep_checkpoints)
  log = None
  with checkpoint_lib.quiet_failed_saves():
    try:
      if writer:
        checkpointer.remove_partial_saves()
      feed = feed_lib.make(trainer, config, checkpoint_lib.data_item(workdir))
      state, start = restore_or_init(trainer, checkpointer, config, feed.checkpointable)
      if start >= t.num_steps:
        _close(None, checkpointer)
        if writer:
          print(nothing_to_do(workdir, start, t.num_steps), flush=True)
        return state
      eval_data = evaluate.resident_eval_split(trainer, config.data.eval_split) if t.eval_every else None
      if writer:
        workdir_lib.write_config(workdir, config)
      log = MetricsLog(workdir, start, enabled=writer)
      with checkpoint_lib.StopSignals() as stop:    # also while the last save finishes
        state, done, loss = train_steps(trainer, state, start, feed, checkpointer, log, stop, eval_data)
        _close(log, checkpointer)
      if writer:
        print(summary(workdir, start, done, t.num_steps, loss, time.perf_counter() - started), flush=True)
      return state
    except Exception as e:
      _close(log, checkpointer, quietly=True)     # a save in flight finishes (or fails) before the report
      reason = workdir_lib.out_of_space(e)
      if reason is None:
        raise
      raise _disk_full(workdir, reason) from None


def _close(log, checkpointer, quietly: bool = False):
  """`quietly` (after a failure): closing must neither hide that error nor raise again (a failed save does)."""
  for closing in (log, checkpointer):
    with contextlib.suppress(Exception) if quietly else contextlib.nullcontext():
      if closing is not None:
        closing.close()


def resolve_word_budget(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
  """(config with model.max_words resolved from the records' manifest (0: their longest caption), one note per
  split with captions longer than the budget). The resolved config is what WORKDIR/config.json keeps, so a rerun
  of the same command (`varcmp ablate` reusing a finished run) compares against this, not against the 0 it gave."""
  if config.task != "text":
    return config, []
  splits = (config.data.train_split, config.data.eval_split)
  budget, notes = records_check.word_budget(config, pipeline.read_manifest(config.data.records), splits)
  resolved = copy.deepcopy(config)
  resolved.model.max_words = budget
  return resolved, notes


def with_word_budget(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """resolve_word_budget's config, the budget and any captions longer than it said in one line each."""
  resolved, notes = resolve_word_budget(config)
  if config.task == "text" and jax.process_index() == 0:
    how = "the longest caption of the records" if not config.model.get("max_words", 0) else "model.max_words"
    print(f"caption words: the text tower reads <BOS> + {resolved.model.max_words} words + <EOS> ({how})", flush=True)
    for note in notes:
      print(f"note: {note}", flush=True)
  return resolved


def train(config: ml_collections.ConfigDict, workdir: str):
  """Trains to config.train.num_steps (resuming from workdir's checkpoints); returns the final state.

  RunError (one line, for the command line) when the records are missing, the workdir is busy or cannot be
  written, its config differs, no checkpoint restores, or the disk is full; ValueError for a config that
  does not fit the devices.
  """
  started = time.perf_counter()
  workdir = os.path.abspath(workdir)
  compilation_cache.enable(config.get("compilation_cache", True))
  holding = workdir_lib.writer(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with holding:        # first: a second writer fails at once, before anything is built
    evaluate.check_records(config, config.data.train_split)
    if config.train.eval_every:
      evaluate.check_records(config, config.data.eval_split)
    config = with_word_budget(config)
    if checkpoint_lib.complete_steps(workdir):
      workdir_lib.check_same_config(workdir, config)
    return _run(step_lib.build(config), config, workdir, started)
