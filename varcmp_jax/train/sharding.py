"""The device mesh (data, fsdp) and where every array lives on it.

Parameters and optimizer state are sharded FSDP-style by a short rule table on their path; the batch is
sharded over both axes, so every device holds a slice of the global batch and XLA inserts the
all-gathers of the FSDP'd weights. The loss is partitioned explicitly over every axis of the mesh
(alignment/losses.py, `mesh`), so BATCH_AXES stays all of MESH_AXES. Works unchanged on one CPU, 8 fake
CPU devices, or a multi-host pod.
"""
import os
import re

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")   # the batch dimension is split over every device

# (regex on the "/"-joined param path, rule). "fsdp": shard the largest dimension divisible by the fsdp
# axis size; "replicate": keep a full copy on every device. First match wins. Matrices and embeddings
# hold nearly all the bytes, so sharding them is enough; biases, norms and scalars stay replicated.
FSDP_RULES = (
    (r"(kernel|embedding|position_embedding|class_embedding)$", "fsdp"),
    (r".*", "replicate"),
)
# Arrays smaller than this stay replicated: sharding them costs collectives and saves nothing.
MIN_SHARD_SIZE = 2 ** 12


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp) mesh; `data = -1` takes all devices left after fsdp."""
  devices = jax.devices() if devices is None else devices
  fsdp = mesh_config.fsdp
  data = len(devices) // fsdp if mesh_config.data == -1 else mesh_config.data
  if data * fsdp != len(devices):
    raise ValueError(f"mesh data={mesh_config.data} x fsdp={fsdp} does not match the {len(devices)} devices")
  return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def path_str(path) -> str:
  """`(DictKey('clip'), DictKey('vision'), ...)` -> "clip/vision/..."; works for optax states too."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def spec_for(path: str, shape: tuple[int, ...], fsdp_size: int) -> P:
  """PartitionSpec of one parameter (or of an optimizer-state leaf that mirrors it)."""
  rule = next(r for pattern, r in FSDP_RULES if re.search(pattern, path))
  if rule == "replicate" or fsdp_size == 1 or int(np.prod(shape)) < MIN_SHARD_SIZE:
    return P()
  candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp_size == 0]
  if not candidates:
    return P()
  spec = [None] * len(shape)
  spec[int(candidates[0])] = "fsdp"
  return P(*spec)


def tree_shardings(tree, mesh: jax.sharding.Mesh):
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs (params, optimizer state, train state)."""
  fsdp_size = mesh.shape["fsdp"]

  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    return NamedSharding(mesh, spec_for(path_str(path), shape, fsdp_size))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global arrays sharded over (data, fsdp).

  Each process feeds the rows its own Grain shard read; the global batch is their concatenation.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def maybe_initialize_distributed():
  """Joins a multi-process run when VARCMP_COORDINATOR (host:port), VARCMP_NUM_PROCESSES and
  VARCMP_PROCESS_ID are set, or lets JAX detect the cluster (SLURM, Open MPI, TPU) when
  VARCMP_DISTRIBUTED=auto. Must run before anything touches a device."""
  if os.environ.get("VARCMP_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
  elif os.environ.get("VARCMP_COORDINATOR"):
    jax.distributed.initialize(
        coordinator_address=os.environ["VARCMP_COORDINATOR"],
        num_processes=int(os.environ["VARCMP_NUM_PROCESSES"]),
        process_id=int(os.environ["VARCMP_PROCESS_ID"]))
