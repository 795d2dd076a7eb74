"""The training loop: data -> sharded batch -> jitted step -> metrics, checkpoints, preemption.

Resume is exact: the checkpoint holds the train state and the Grain iterator state of the same step, so a
restarted run sees the same next batch and reproduces the same per-step losses and final parameters.
"""
import json
import os

import jax
import ml_collections
import numpy as np
import tensorboardX
import tqdm

from varcmp_jax import evaluate
from varcmp_jax.data import pipeline
from varcmp_jax.train import checkpoint as checkpoint_lib
from varcmp_jax.train import step as step_lib


def load_clip_params(path: str):
  """Tower params from a HF CLIPModel directory or a `varcmp import-clip` output."""
  from varcmp_jax import clip
  return clip.load(path)[1]


class MetricsLog:
  """metrics.jsonl + TensorBoard events, written by process 0 only.

  On resume from step s, lines after s (logged before a kill, after the last checkpoint) are dropped so the
  file reads like one uninterrupted run, and TensorBoard purges the same steps.
  """

  def __init__(self, workdir: str, start_step: int):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self.path = os.path.join(workdir, "metrics.jsonl")
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
    with open(self.path, "w") as f:
      f.writelines(kept)
    self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"),
                                         purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, metrics: dict[str, np.ndarray]):
    if not self.enabled:
      return
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step":
        self.tb.add_scalar(f"train/{k}", v, step)

  def write_eval(self, step: int, result: dict):
    """Periodic eval (train.eval_every): eval_history.jsonl and TensorBoard "eval/..." scalars."""
    if not self.enabled:
      return
    with open(os.path.join(os.path.dirname(self.path), "eval_history.jsonl"), "a") as f:
      f.write(json.dumps({"step": step, **result}) + "\n")
    for name, entry in [("combined", result), *result["levels"].items()]:
      for direction, values in entry.items():
        if direction != "levels" and isinstance(values, dict):
          for metric, value in values.items():
            self.tb.add_scalar(f"eval/{name}/{direction}/{metric}", value, step)
      self.tb.add_scalar(f"eval/{name}/SumR", entry["SumR"], step)

  def close(self):
    if self.enabled:
      self.tb.close()


def restore_or_init(trainer: step_lib.Trainer, checkpointer, config, data_iterator=None):
  """(state, step): the latest checkpoint restored onto this mesh, or a fresh state at step 0."""
  step = checkpointer.latest_step()
  if step is None:
    clip_params = load_clip_params(config.model.clip_checkpoint) if config.model.clip_checkpoint else None
    return trainer.init_state(config.seed, clip_params), 0
  target = checkpoint_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
  return checkpointer.restore(target, data_iterator, step), step


def train(config: ml_collections.ConfigDict, workdir: str):
  """Trains to config.train.num_steps (resuming from workdir's checkpoints); returns the final state."""
  os.makedirs(workdir, exist_ok=True)
  trainer = step_lib.build(config)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  t = config.train
  checkpointer = checkpoint_lib.Checkpointer(workdir, t.checkpoint_every, t.keep_checkpoints)
  data_iterator = pipeline.make_train_iterator(config, t.batch_size // jax.process_count(), config.seed)
  state, start = restore_or_init(trainer, checkpointer, config, data_iterator)
  log = MetricsLog(workdir, start)
  last_saved = done = start
  with checkpoint_lib.SigtermFlag() as sigterm:
    bar = tqdm.trange(start, t.num_steps, initial=start, total=t.num_steps, desc="train",
                      disable=jax.process_index() != 0)
    for step in bar:
      batch = trainer.shard_batch(next(data_iterator))
      state, metrics = trainer.train_step(state, batch)
      done = step + 1
      if done % t.log_every == 0 or done == t.num_steps:
        metrics = jax.device_get(metrics)
        log.write(done, metrics)
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
      if checkpointer.save(done, state, data_iterator):
        last_saved = done
      if t.eval_every and done % t.eval_every == 0 and done != t.num_steps:
        log.write_eval(done, evaluate.evaluate_params(trainer, state["params"]))
      if sigterm.received or checkpointer.reached_preemption(done):
        print(f"preempted: saving step {done} and exiting", flush=True)
        break
  if last_saved != done:
    checkpointer.save(done, state, data_iterator, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  log.close()
  return state
