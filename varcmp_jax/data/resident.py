"""Device-resident data (SPEC section 3): a split's arrays placed on the devices once, batches gathered there.

In the features regime a whole split is small next to an accelerator's memory (UCF train about 2 GB in
float16, XD about 5 GB), while the host pipeline decodes about 1.5 batches/s per core at T = 256, B = 128
against a train step of 8-15 ms on an H100. So the split is read once, each record fitted to
`config.data.snippets` by the Grain pipeline's own `DecodeAndFit` (kept in its stored dtype: float16 stays
float16 on the device; `as_float32` casts inside the jitted consumer), and every batch is a gather on the
devices.

Layout. The row axis is split into D equal blocks, one per device of the batch axes (block g on the g-th
device, as `jax.make_array_from_process_local_data` places a batch); each process reads the records of its
own devices' blocks. Train: a block holds r = N // D consecutive records (the last N mod D records of the
split, at most D - 1, are not placed; the Grain pipeline drops N mod processes). Eval: ceil(N / D) records
per block, padded to whole batches with rows of valid=False, index=-1.

Sampling (train). Each device takes its B / D rows of every batch from its own block, so a gather never
crosses devices: block g is walked in the order of a permutation drawn from (seed, epoch, g), epoch after
epoch without a gap (a batch may straddle two epochs). Every placed record is seen once per epoch, as with
Grain; the order is not Grain's (another shuffle, and B / D records from each device's block where Grain
takes B / P from each process's slice). It depends on the device count, not on the mesh shape. The sampler
state (epoch, position) goes into the checkpoint (`EpochSampler.state_dict`), so a resume is exact.
"""
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import NamedSharding

from varcmp_jax.data import pipeline


def as_float32(batch: dict) -> dict:
  """Float arrays stored narrower (float16, bfloat16) as float32, inside the consumer's jit (exact)."""
  return {k: v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) and v.dtype != jnp.float32 else v
          for k, v in batch.items()}


def rows_per_device(records: int, devices: int, train: bool) -> int:
  """Records in each device's block: train drops the remainder, eval keeps every record."""
  return records // devices if train else math.ceil(records / devices)


def decide(config, split: str, devices: int, train: bool = True,
           checkpoint_item: str | None = None) -> tuple[bool, str]:
  """(resident?, one line saying which and why) for `split` of config.data.records on `devices` devices.

  `checkpoint_item`: what the checkpoint being resumed holds ("sampler": resident, "data": a Grain iterator);
  "auto" follows it, since the other path would change the batch order. ValueError for an explicit choice
  the checkpoint contradicts, or "on" with fewer records than devices.
  """
  choice = config.data.get("resident", "auto")
  name = f"data.resident={choice}"
  if choice == "off" or config.regime != "features":
    why = "the Grain pipeline feeds the steps" if choice == "off" else "off in the frames regime (frames stay on Grain)"
    return _against_checkpoint(False, f"{name}: {why}", checkpoint_item)
  if checkpoint_item is not None and choice == "auto":
    on = checkpoint_item == "sampler"
    return on, (f"{name}: {'on' if on else 'off'}, as in the checkpoint being resumed (the other path would "
                "change the batch order)")
  records = pipeline.split_size(config.data.records, split)
  rows = rows_per_device(records, devices, train)
  if rows == 0:
    if choice == "on":
      raise ValueError(f"{name}: the {split!r} split has {records} records, fewer than the {devices} devices")
    return False, f"{name}: off ({records} {split} records, fewer than the {devices} devices)"
  share = rows * example_bytes(first_example(config, split)) / 2 ** 30
  limit = float(config.data.get("resident_max_gib", 8.0))
  size = f"{records} {split} records, {share:.3g} GiB per device"
  if choice == "on":
    return _against_checkpoint(True, f"{name} ({size})", checkpoint_item)
  on = share <= limit
  line = f"{name}: {'on' if on else 'off'} ({size} {'<=' if on else '>'} data.resident_max_gib={limit:g})"
  return _against_checkpoint(on, line, checkpoint_item)


def _against_checkpoint(on: bool, line: str, checkpoint_item: str | None):
  if checkpoint_item is not None and (checkpoint_item == "sampler") != on:
    held = "resident data's sampler state" if checkpoint_item == "sampler" else "Grain iterator state"
    raise ValueError(f"{line}, but the checkpoint being resumed holds the {held}: the batch order would change; "
                     f"set --config.data.resident={'on' if checkpoint_item == 'sampler' else 'off'} (or auto)")
  return on, line


def first_example(config, split: str) -> dict:
  source = pipeline.IndexedSource(config.data.records, split)
  return pipeline.decode_and_fit(config, cast=False).map(source[0])


def example_bytes(example: dict) -> int:
  return sum(np.asarray(v).nbytes for v in example.values())


class ResidentSplit:
  """A split's fitted examples on the devices: `arrays[key]` is (D * rows, ...), block g on device g.

  `blocks`: the blocks this process placed, in global order. `gather(rows)` takes, on every device, the
  given local rows of its own block.
  """

  def __init__(self, arrays: dict[str, jax.Array], rows: int, blocks: list[int], sharding: NamedSharding):
    self.arrays, self.rows, self.blocks, self.sharding = arrays, rows, blocks, sharding
    spec, mesh = sharding.spec, sharding.mesh
    take = lambda arrays, rows: {k: jnp.take(v, rows, axis=0, mode="clip") for k, v in arrays.items()}
    self._take = jax.shard_map(take, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
    self._gather = jax.jit(self._take)
    # Into the buffers of a spent batch (donated): no fresh allocation per batch, which on a CPU costs more
    # than the copy itself (page faults on first touch).
    take_into = lambda out, arrays, rows: {k: out[k].at[:].set(v) for k, v in take(arrays, rows).items()}
    self._gather_into = jax.jit(jax.shard_map(take_into, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec),
                                donate_argnums=0)

  def gather(self, rows: jax.Array, into: dict | None = None) -> dict[str, jax.Array]:
    """The batch of local `rows` (a (D * b,) array sharded like a batch), in the stored dtypes.

    `into`: a spent batch of the same shapes whose buffers are reused (donated: it is invalid afterwards)."""
    return self._gather(self.arrays, rows) if into is None else self._gather_into(into, self.arrays, rows)

  def traced_gather(self, arrays, rows):
    """`gather` for use inside another jit (the train step), with the arrays passed as arguments."""
    return self._take(arrays, rows)

  def device_rows(self, local_rows: np.ndarray) -> jax.Array:
    """This process's rows (len(blocks) * b,) -> the global (D * b,) row array, sharded like a batch."""
    return jax.make_array_from_process_local_data(self.sharding, np.asarray(local_rows, np.int32))

  def eval_batches(self, batch_per_device: int):
    """Every placed row once, in order: `rows / batch_per_device` batches with "valid" and "index"."""
    batch = None
    for start in range(0, self.rows, batch_per_device):
      rows = np.arange(start, start + batch_per_device)
      # The consumer is done with the previous batch when it asks for the next: reuse its buffers.
      batch = self.gather(self.device_rows(np.tile(rows, len(self.blocks))), into=batch)
      yield batch


def load(config, split: str, sharding: NamedSharding, train: bool, batch_per_device: int = 1,
         progress: bool = True) -> ResidentSplit:
  """Reads this process's records of `split` once and places them (see the module docstring for the layout).

  Eval (`train=False`) pads every block to whole batches of `batch_per_device` and adds "valid".
  """
  records = pipeline.split_size(config.data.records, split)
  devices = len(sharding.device_set)
  per_block = rows_per_device(records, devices, train)
  rows = per_block if train else math.ceil(per_block / batch_per_device) * batch_per_device
  if rows == 0:
    raise ValueError(f"{config.data.records}: split {split!r} has {records} records, fewer than the {devices} devices")
  global_rows = devices * rows
  starts = sorted(index[0].start or 0 for index in sharding.addressable_devices_indices_map((global_rows,)).values())
  blocks = [start // rows for start in starts]
  source = pipeline.IndexedSource(config.data.records, split)
  fit = pipeline.decode_and_fit(config, cast=False)
  # Zeros, index -1 (and valid False): what stays of a padding row.
  host = {k: np.zeros((len(blocks) * rows,) + np.shape(v), np.asarray(v).dtype)
          for k, v in fit.map(source[0]).items()}
  host["index"][:] = -1
  if not train:
    host["valid"] = np.zeros(len(blocks) * rows, bool)
  wanted = [(slot * rows + i, g * per_block + i) for slot, g in enumerate(blocks) for i in range(per_block)
            if g * per_block + i < records]
  for row, index in tqdm.tqdm(wanted, desc=f"place {split} on the devices", leave=False,
                              disable=not progress or jax.process_index() != 0):
    for k, v in fit.map(source[index]).items():
      host[k][row] = v
    if not train:
      host["valid"][row] = True
  arrays = {k: jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:])
            for k, v in host.items()}
  del host
  return ResidentSplit(arrays, rows, blocks, sharding)


class EpochSampler:
  """The local rows of each step's batch: block g walks a permutation of its `rows` rows drawn from
  (seed, epoch, g), `batch_per_device` rows a step, epochs back to back. State: (epoch, position)."""

  def __init__(self, seed: int, rows: int, batch_per_device: int, blocks: list[int], devices: int):
    self.seed, self.rows, self.batch, self.blocks, self.devices = seed, rows, batch_per_device, blocks, devices
    self.epoch = self.position = 0
    self._orders = {}

  def _order(self, epoch: int, block: int) -> np.ndarray:
    if (epoch, block) not in self._orders:
      self._orders = {key: v for key, v in self._orders.items() if key[0] >= epoch}   # older epochs are done
      self._orders[epoch, block] = np.random.default_rng([self.seed, epoch, block]).permutation(self.rows)
    return self._orders[epoch, block]

  def next(self) -> np.ndarray:
    """This process's local rows of the next batch, block after block: (len(blocks) * batch_per_device,)."""
    pieces = [[] for _ in self.blocks]
    need = self.batch
    while need:
      take = min(need, self.rows - self.position)
      for piece, block in zip(pieces, self.blocks):
        piece.append(self._order(self.epoch, block)[self.position:self.position + take])
      self.position, need = self.position + take, need - take
      if self.position == self.rows:
        self.epoch, self.position = self.epoch + 1, 0
    return np.concatenate([np.concatenate(piece) for piece in pieces]).astype(np.int32)

  def state_dict(self) -> dict:
    return {"epoch": self.epoch, "position": self.position, "rows_per_device": self.rows, "devices": self.devices,
            "seed": self.seed}

  def load_state_dict(self, saved: dict) -> None:
    self.epoch, self.position = int(saved["epoch"]), int(saved["position"])
    if (saved.get("rows_per_device"), saved.get("devices"), saved.get("seed")) != (self.rows, self.devices, self.seed):
      # Another device count places other blocks: go on at the same point of the epoch, in another order.
      self.position = min(self.rows - 1, round(self.position * self.rows / max(1, int(saved["rows_per_device"]))))
      print(f"note: the checkpoint's resident data had {saved.get('devices')} devices x {saved.get('rows_per_device')} "
            f"rows (seed {saved.get('seed')}), this run {self.devices} x {self.rows} (seed {self.seed}): continuing at "
            f"epoch {self.epoch}, row {self.position} of {self.rows}, in another order than an uninterrupted run",
            file=sys.stderr)
