"""The train state and the one jitted train step over the (data, fsdp) mesh.

The contrastive loss is computed over the *global* batch: the batch is sharded over every device, the
towers run where their rows live, and the loss runs partitioned over the mesh (losses.varcmp_loss with
`mesh`): each device scores every (gathered) query against its own videos only, and the InfoNCE
reduces across devices.

Gradient accumulation keeps that global-batch loss exact (GradCache, Gao et al. 2021): the k
micro-batches are first embedded without gradients, the loss and its gradient w.r.t. the embeddings are
taken over the whole batch, then each micro-batch is re-run under `jax.vjp` with its slice of that
gradient. So `grad_accum_steps = k` gives the same update as one step on the full batch, with the
activation memory of one micro-batch (plus the embeddings of the whole batch).
"""
import copy
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from varcmp_jax import config as config_lib
from varcmp_jax import flops
from varcmp_jax.alignment import losses
from varcmp_jax.data import pipeline
from varcmp_jax.model import varcmp
from varcmp_jax.train import optimizer as optimizer_lib
from varcmp_jax.train import sharding as sharding_lib


def example_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
  """A zero batch with the shapes and dtypes of the Grain pipeline's batches (for init and tracing)."""
  m, t = config.model, config.data.snippets
  batch = {
      "tokens": np.zeros((batch_size, 77), np.int32),
      "label": np.zeros((batch_size,), np.int32),
      "mask": np.ones((batch_size, t), bool),
      "index": np.arange(batch_size, dtype=np.int32),
  }
  if config.regime == "frames":
    size = m.clip.vision.image_size
    batch["frames"] = np.zeros((batch_size, t, size, size, 3), np.uint8)
  else:
    d = config_lib.stored_video_width(m)
    batch["features"] = np.zeros((batch_size, t, d), np.float32)
    if config_lib.uses_regions(config):   # the pipeline passes regions only to the spatial level
      batch["regions"] = np.zeros((batch_size, t, m.region_grid ** 2, d), np.float32)
  if config.prior.source != "head":
    batch["prior"] = np.zeros((batch_size, t), np.float32)
  if config.task == "audio":
    if m.audio.kind == "spectrogram":
      batch["mel"] = np.zeros((batch_size, t, m.audio.mel_frames, m.audio.mel_bins), np.float32)
    else:
      batch["audio_features"] = np.zeros((batch_size, t, m.audio.feature_dim), np.float32)
  return batch


class Trainer:
  """Builds the sharded train state and the jitted step for one model, config and mesh."""

  def __init__(self, model, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    # A private copy: the jitted functions read the config when they trace, possibly after the caller
    # changed its own ConfigDict.
    self.model, self.config, self.mesh = model, copy.deepcopy(config), mesh
    config = self.config
    self.schedule = optimizer_lib.learning_rate_schedule(config.train)
    # The parameters' shapes do not depend on the batch: one example row (a micro-batch of zeros would be 64 GiB of
    # host memory at 32,768 features videos).
    self._example = example_batch(config, 1)
    abstract_params = jax.eval_shape(self._init_params, jax.random.key(0))
    self.tx = optimizer_lib.make_optimizer(config.train, abstract_params)
    self.abstract_state = jax.eval_shape(lambda p: self._init_state(None, p), abstract_params)   # one model trace
    self.state_shardings = sharding_lib.tree_shardings(self.abstract_state, mesh)
    self.batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    self.train_step = jax.jit(
        self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)

  # ---- state -------------------------------------------------------------------------------------
  def _init_params(self, rng):
    return self.model.init(rng, pipeline.model_inputs(self._example))["params"]

  def _init_state(self, rng, params=None):
    params = self._init_params(rng) if params is None else params
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

  def init_state(self, seed: int, clip_params=None):
    """A fresh sharded state; `clip_params` (imported CLIP weights) replace the random towers."""
    params_shardings = self.state_shardings["params"]
    params = jax.jit(self._init_params, out_shardings=params_shardings)(jax.random.key(seed))
    if clip_params is not None:
      params = jax.device_put(varcmp.load_clip(params, clip_params, self.config.model), params_shardings)
    return jax.jit(lambda p: self._init_state(None, p), out_shardings=self.state_shardings)(params)

  # ---- loss and gradients ------------------------------------------------------------------------
  def loss_from_embeddings(self, embeddings, scales, labels):
    video, query = embeddings
    return losses.varcmp_loss(video, query, labels, scales, self.config, mesh=self.mesh)

  def _encode(self, params, batch):
    return self.model.apply({"params": params}, pipeline.model_inputs(batch))

  def _scales(self, params):
    return self.model.apply({"params": params}, method=self.model.logit_scales)

  def loss_and_grads(self, params, batch):
    """((loss, terms), grads) of the loss over the whole (global) batch."""
    k = self.config.train.grad_accum_steps
    if k == 1:
      def loss_fn(p):
        return self.loss_from_embeddings(self._encode(p, batch), self._scales(p), batch["label"])
      return jax.value_and_grad(loss_fn, has_aux=True)(params)
    return self._grad_cache(params, batch, k)

  def _grad_cache(self, params, batch, k):
    micro_sharding = NamedSharding(self.mesh, P(None, sharding_lib.BATCH_AXES))

    def split(x):  # (B, ...) -> (k, B/k, ...); micro-batch i = rows i, i+k, ...: every device keeps its rows
      if x.dtype == jax.dtypes.float0:  # the "gradient" of a mask
        return np.zeros((k, x.shape[0] // k, *x.shape[1:]), x.dtype)
      x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, micro_sharding)

    def merge(x):  # the inverse of split
      return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])

    micro = jax.tree_util.tree_map(split, batch)
    with jax.named_scope(flops.RECOMPUTED):   # the towers' forward, run again under jax.vjp below
      embeddings = jax.lax.map(lambda mb: self._encode(params, mb), micro)
    embeddings = jax.tree_util.tree_map(merge, embeddings)
    scales, scales_vjp = jax.vjp(self._scales, params)
    (loss, terms), (d_embeddings, d_scales) = jax.value_and_grad(
        self.loss_from_embeddings, argnums=(0, 1), has_aux=True, allow_int=True)(embeddings, scales, batch["label"])
    d_micro = jax.tree_util.tree_map(split, d_embeddings)

    def backward(grads, inputs):
      mb, d_mb = inputs
      _, vjp = jax.vjp(lambda p: self._encode(p, mb), params)
      return jax.tree_util.tree_map(jnp.add, grads, vjp(d_mb)[0]), None

    grads, _ = jax.lax.scan(backward, scales_vjp(d_scales)[0], (micro, d_micro))
    return (loss, terms), grads

  # ---- the step ----------------------------------------------------------------------------------
  def _train_step(self, state, batch) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    (loss, terms), grads = self.loss_and_grads(state["params"], batch)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # Clamp the log-scales after the update, as OpenCLIP does; the loss passes their gradient through its
    # clip (losses.clip_log_scale), so a scale at the max still gets a gradient and can come back down.
    top = self.config.model.logit_scale_max
    params = {**params, "logit_scales": jax.tree_util.tree_map(lambda s: jnp.minimum(s, top), params["logit_scales"])}
    # lr: the base schedule; each tower's rate is this times its train.lr_mult.
    metrics = {"loss": loss, **terms, "grad_norm": optax.global_norm(grads), "lr": self.schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def shard_batch(self, batch):
    return sharding_lib.shard_batch(batch, self.mesh)




def build(config: ml_collections.ConfigDict) -> Trainer:
  """The Trainer (model, mesh, shardings, jitted step) of a validated config on the devices of this run."""
  config_lib.validate(config, jax.device_count())
  mesh = sharding_lib.make_mesh(config.mesh)
  return Trainer(varcmp.VarCMP(config.model, task=config.task, regime=config.regime), config, mesh)
