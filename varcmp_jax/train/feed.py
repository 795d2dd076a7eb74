"""Where the train step's batches come from, and the step compiled for them.

  feed = feed_lib.make(trainer, config, checkpoint_item)   # prints one line: which feed and why
  step, count = feed.compile(state, inputs := feed.next())   # compiled once; count: flops.Count of a step
  state, metrics = step(state, feed.next())
  checkpointer.save(n, state, feed.checkpointable)          # the Grain iterator, or the resident sampler

GrainFeed: host batches from the Grain pipeline, placed on the mesh (`Trainer.shard_batch`), into
`Trainer.train_step`. ResidentFeed (features regime, data/resident.py): the split lives on the devices; a
step's input is the row numbers of its batch, and one jit gathers the rows, casts them to float32 and runs
`Trainer.train_step`, so the batch never leaves the devices.
"""
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from varcmp_jax import flops
from varcmp_jax.data import pipeline, resident
from varcmp_jax.train.workdir import RunError


class GrainFeed:
  kind = "grain"

  def __init__(self, trainer, config):
    self.trainer = trainer
    self.checkpointable = pipeline.make_train_iterator(config, config.train.batch_size // jax.process_count(),
                                                       config.seed)

  def next(self):
    return self.trainer.shard_batch(next(self.checkpointable))

  def compile(self, state, batch) -> tuple[object, flops.Count]:
    """(step(state, batch) compiled, its FLOPs), from one trace."""
    traced = self.trainer.train_step.trace(state, batch)
    return traced.lower().compile(), flops.count_jaxpr(traced.jaxpr)


class ResidentFeed:
  kind = "resident"

  def __init__(self, trainer, config, progress: bool = True):
    self.trainer = trainer
    self.split = split = resident.load(config, config.data.train_split, trainer.batch_sharding, train=True,
                                       progress=progress)
    devices = trainer.mesh.size
    self.checkpointable = resident.EpochSampler(config.seed, split.rows, config.train.batch_size // devices,
                                                split.blocks, devices)

    self._step = resident_step(trainer, split)

  def next(self):
    return self.split.device_rows(self.checkpointable.next())

  def compile(self, state, rows) -> tuple[object, flops.Count]:
    """(step(state, rows) compiled: gather, cast and train step; its FLOPs), from one trace."""
    arrays = self.split.arrays
    traced = self._step.trace(state, arrays, rows)
    compiled, count = traced.lower().compile(), flops.count_jaxpr(traced.jaxpr)
    for array in jax.tree_util.tree_leaves(arrays):   # a step reads its batch's rows, not the whole split
      count.io_bytes -= array.nbytes - array.nbytes // array.shape[0] * rows.shape[0]
    return (lambda state, rows: compiled(state, arrays, rows)), count


def resident_step(trainer, split):
  """The jitted step of resident data, step(state, split arrays, rows): gather, cast and train step (`varcmp compile`
  compiles this same function for a pod)."""
  def step(state, arrays, rows):
    return trainer.train_step(state, resident.as_float32(split.traced_gather(arrays, rows)))

  return jax.jit(step, donate_argnums=0, out_shardings=(trainer.state_shardings, NamedSharding(trainer.mesh, P())))


def make(trainer, config, checkpoint_item: str | None = None):
  """The feed config.data.resident picks (printed in one line); `checkpoint_item` is what the checkpoint being
  resumed holds ("data": Grain, "sampler": resident), which "auto" follows. RunError if they contradict."""
  try:
    on, line = resident.decide(config, config.data.train_split, trainer.mesh.size, train=True,
                               checkpoint_item=checkpoint_item)
  except ValueError as e:
    raise RunError(str(e)) from None
  if jax.process_index() == 0:
    print(f"train data: {line}", flush=True)
  return ResidentFeed(trainer, config) if on else GrainFeed(trainer, config)
