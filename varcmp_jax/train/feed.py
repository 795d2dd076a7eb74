"""Where the train step's batches come from, and the step compiled for them.

  feed = feed_lib.make(trainer, config, checkpoint_item)   # prints one line: which feed and why
  step, compiled = feed.compile(state, inputs := feed.next())   # compiled once (xla_flops(compiled, devices))
  state, metrics = step(state, feed.next())
  checkpointer.save(n, state, feed.checkpointable)          # the Grain iterator, or the resident sampler

GrainFeed: host batches from the Grain pipeline, placed on the mesh (`Trainer.shard_batch`), into
`Trainer.train_step`. ResidentFeed (features regime, data/resident.py): the split lives on the devices; a
step's input is the row numbers of its batch, and one jit gathers the rows, casts them to float32 and runs
`Trainer.train_step`, so the batch never leaves the devices.
"""
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from varcmp_jax.data import pipeline, resident
from varcmp_jax.train.workdir import RunError


def xla_flops(compiled, devices: int) -> float:
  """FLOPs of one call of a compiled SPMD step on all its devices, by XLA's cost analysis (which reports one
  device's module, and counts a loop body once: a lower bound for chunked levels and accumulation)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0)) * devices


class GrainFeed:
  kind = "grain"

  def __init__(self, trainer, config):
    self.trainer = trainer
    self.checkpointable = pipeline.make_train_iterator(config, config.train.batch_size // jax.process_count(),
                                                       config.seed)

  def next(self):
    return self.trainer.shard_batch(next(self.checkpointable))

  def compile(self, state, batch):
    """(step(state, batch), the compiled XLA program)."""
    compiled = self.trainer.train_step.lower(state, batch).compile()
    return compiled, compiled


class ResidentFeed:
  kind = "resident"

  def __init__(self, trainer, config, progress: bool = True):
    self.trainer = trainer
    self.split = split = resident.load(config, config.data.train_split, trainer.batch_sharding, train=True,
                                       progress=progress)
    devices = trainer.mesh.size
    self.checkpointable = resident.EpochSampler(config.seed, split.rows, config.train.batch_size // devices,
                                                split.blocks, devices)

    def step(state, arrays, rows):
      return trainer.train_step(state, resident.as_float32(split.traced_gather(arrays, rows)))

    self._step = jax.jit(step, donate_argnums=0,
                         out_shardings=(trainer.state_shardings, NamedSharding(trainer.mesh, P())))

  def next(self):
    return self.split.device_rows(self.checkpointable.next())

  def compile(self, state, rows):
    """(step(state, rows), the compiled XLA program: gather, cast and train step)."""
    compiled = self._step.lower(state, self.split.arrays, rows).compile()
    arrays = self.split.arrays
    return (lambda state, rows: compiled(state, arrays, rows)), compiled


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
