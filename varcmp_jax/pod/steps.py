"""The train and eval steps `varcmp train` runs, compiled for a Target: the compiler's memory per chip, the collectives
of the compiled program and the FLOPs of the same trace."""
import copy
import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from varcmp_jax import command_flags
from varcmp_jax import config as config_lib
from varcmp_jax import evaluate, flops
from varcmp_jax.data import pipeline, resident
from varcmp_jax.model import varcmp
from varcmp_jax.pod import CompileError
from varcmp_jax.pod.targets import Target
from varcmp_jax.train import checkpoint, feed, sharding, step

@dataclasses.dataclass
class Step:
  """One step compiled for a target: the compiler's memory per chip, its collectives, the FLOPs of its trace."""
  name: str                         # "train" or "eval"
  global_batch: int
  per_chip_batch: int
  input: str                        # what feeds it, in words
  memory: dict | None               # memory_analysis() per chip: arguments, outputs, aliased, temporaries, total, code
  logical: dict                     # bytes per chip of the arguments by part, from their shardings
  collectives: dict                 # kind -> {"count": instructions, "bytes": bytes of their results}
  count: object                     # flops.Count of one call, all chips together
  lowering_seconds: float
  compile_seconds: float
  refused: str | None = None        # the compiler's message when it ran out of memory

  def fits(self, hbm: int) -> bool:
    return self.refused is None and self.memory["total"] <= hbm


_ELEMENT_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                  "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


_COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
                     "ragged-all-to-all", "collective-broadcast")


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(" + "|".join(_COLLECTIVE_KINDS)
                          + r")(-start)?\(", re.M)


_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


def _array_bytes(element: str, dims: str) -> float:
  size = _ELEMENT_BYTES.get(element, 1 if element.startswith("f8") else 0)
  return size * math.prod(int(d) for d in dims.split(",") if d)


def collectives(hlo_text: str) -> dict:
  """{kind: {"count", "bytes"}} of the collective instructions of a compiled (per-device) HLO module: each
  instruction once, wherever it is (a loop body once), its bytes those of its result shape. Of an async
  "-start", the result part: the gathered output of all-gather-start, the received buffer of
  collective-permute-start, all of all-reduce-start."""
  found = {}
  for shape, kind, start in _INSTRUCTION.findall(hlo_text):
    arrays = _ARRAY.findall(shape)
    if start and kind == "all-gather":
      arrays = arrays[len(arrays) // 2:]
    elif start and kind == "collective-permute":
      arrays = arrays[1:2]
    entry = found.setdefault(kind, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += int(sum(_array_bytes(element, dims) for element, dims in arrays))
  return dict(sorted(found.items()))


def _per_chip_bytes(tree) -> int:
  """Bytes of one chip's shards of a pytree of ShapeDtypeStructs with shardings."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return int(total)


def _compile(fn, args, name, target, global_batch, input_, logical) -> Step:
  start = time.perf_counter()
  traced = fn.trace(*args)
  lowered = traced.lower()
  lowering = time.perf_counter() - start
  count = flops.count_jaxpr(traced.jaxpr, target.platform)
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    message = next((line for line in str(e).splitlines() if line.strip()), str(e))
    return Step(name, global_batch, global_batch // target.chips, input_, None, logical, {}, count, lowering,
                time.perf_counter() - start, refused=" ".join(message.split())[:400])
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  memory = {"arguments": int(stats.argument_size_in_bytes), "outputs": int(stats.output_size_in_bytes),
            "aliased": int(stats.alias_size_in_bytes), "temporaries": int(stats.temp_size_in_bytes),
            "generated_code": int(stats.generated_code_size_in_bytes)}
  memory["total"] = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
  return Step(name, global_batch, global_batch // target.chips, input_, memory, logical,
              collectives(compiled.as_text()), count, lowering, seconds)


def check_config(config, chips: int, per_chip: int):
  """config with train.batch_size = per_chip x chips, validated against the chips (CompileError, one line)."""
  k = config.train.grad_accum_steps
  if per_chip < 1 or (k >= 1 and per_chip % k):
    raise CompileError(f"per-chip batch {per_chip}: must be a positive multiple of train.grad_accum_steps={k} "
                       "(each chip runs its share of every micro-batch)")
  config = copy.deepcopy(config)
  config.train.batch_size = per_chip * chips
  checked = copy.deepcopy(config)
  if checked.eval.batch_size % chips:   # the eval step says so on its own line (compile_eval); not a train problem
    checked.eval.batch_size = chips
  try:
    config_lib.validate(checked, chips)
  except ValueError as e:
    raise CompileError(f"config: {command_flags.one_line(e)}") from None
  return config


def build_trainer(config, target: Target):
  """The Trainer `varcmp train` builds for config, on the target's chips."""
  mesh = sharding.make_mesh(config.mesh, devices=target.devices)
  return step.Trainer(varcmp.VarCMP(config.model, task=config.task, regime=config.regime), config, mesh)


def example_batch(config, batch_size: int, sharding) -> dict:
  """step.example_batch's keys, shapes and dtypes at batch_size rows, as ShapeDtypeStructs (nothing allocated)."""
  one = step.example_batch(config, 1)
  return {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=sharding) for k, v in one.items()}


@dataclasses.dataclass
class ResidentPlan:
  """The train split as `varcmp train` would hold it on the devices: per-key (shape, dtype) of the global arrays."""
  shapes: dict
  rows_per_chip: int
  line: str


def resident_plan(config, chips: int) -> tuple[ResidentPlan | None, str]:
  """(the resident split or None, one line saying which input the train step gets and why)."""
  if not config.data.records:
    if config.regime == "features" and config.data.get("resident", "auto") != "off":
      return None, ("host batches (no config.data.records given: `varcmp train` may hold the split on the devices "
                    "(data.resident); give the records to compile that step)")
    return None, "host batches"
  split = config.data.train_split
  try:
    on, line = resident.decide(config, split, chips, train=True)
    if not on:
      return None, f"host batches ({line})"
    example = resident.first_example(config, split)
    rows = resident.rows_per_device(pipeline.split_size(config.data.records, split), chips, train=True)
  except (OSError, KeyError, ValueError) as e:
    raise CompileError(f"config.data.records: {command_flags.one_line_text(e)}") from None
  shapes = {k: ((chips * rows,) + np.shape(v), np.asarray(v).dtype) for k, v in example.items()}
  return ResidentPlan(shapes, rows, line), f"the split resident on the devices ({line})"


def compile_train(config, target: Target, per_chip: int, plan: ResidentPlan | None, input_line: str) -> Step:
  """The train step `varcmp train` runs, at per_chip x chips, compiled for the target."""
  config = check_config(config, target.chips, per_chip)
  batch_size = config.train.batch_size
  trainer = build_trainer(config, target)
  state = checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
  logical = {"state": _per_chip_bytes(state)}
  if plan is None:
    batch = example_batch(config, batch_size, trainer.batch_sharding)
    logical["batch"] = _per_chip_bytes(batch)
    fn, args = trainer.train_step, (state, batch)
  else:
    arrays = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding)
              for k, (shape, dtype) in plan.shapes.items()}
    split = resident.ResidentSplit(arrays, plan.rows_per_chip, list(range(target.chips)), trainer.batch_sharding)
    rows = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=trainer.batch_sharding)
    logical["resident_split"] = _per_chip_bytes(arrays)
    logical["batch"] = _per_chip_bytes(rows)
    fn, args = feed.resident_step(trainer, split), (state, arrays, rows)
  return _compile(fn, args, "train", target, batch_size, input_line, logical)


def compile_eval(config, target: Target) -> tuple[Step | None, str | None]:
  """(the eval step compiled, None) or (None, why it was not): the jitted embedding of one eval batch."""
  batch_size, chips = config.eval.batch_size, target.chips
  if batch_size % chips:
    return None, (f"not compiled: eval.batch_size={batch_size} does not divide over the {chips} chips, and "
                  f"`varcmp train` refuses such a config: pass --config.eval.batch_size=N, a multiple of {chips}")
  config = check_config(config, chips, config.train.grad_accum_steps)   # the train batch does not matter here
  trainer = build_trainer(config, target)
  params = checkpoint.abstract_with_shardings(trainer.abstract_state["params"], trainer.state_shardings["params"])
  batch = example_batch(config, batch_size, trainer.batch_sharding)
  batch["valid"] = jax.ShapeDtypeStruct((batch_size,), np.bool_, sharding=trainer.batch_sharding)
  logical = {"state": _per_chip_bytes(params), "batch": _per_chip_bytes(batch)}
  encode = evaluate._batch_encoder(trainer, None)  # pylint: disable=protected-access  # the eval step itself
  return _compile(encode, (params, batch), "eval", target, batch_size, "host batches (float32)", logical), None
