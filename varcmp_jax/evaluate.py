"""`varcmp eval` and the evaluation that training, search and index share: embed a split in sharded batches,
score every level and the combined score, report.

Embedding runs batch by batch through one jit over the mesh (the same sharding as training); the (Q, G)
similarities are computed from the gathered embeddings, the spatial level in chunk_size x chunk_size
blocks, so an 800 x 800 gallery with T = 256 fits one device.
"""
import functools
import json
import os

import jax
import ml_collections
import numpy as np
import tqdm
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from varcmp_jax import command_flags, metrics, trained
from varcmp_jax.alignment import similarity, weighting
from varcmp_jax.data import pipeline
from varcmp_jax.train import sharding


def embed_split(trainer, params, split: str, config: ml_collections.ConfigDict | None = None,
                method: str | None = None):
  """Embeddings of every record of `split`, host numpy, in record order.

  `trainer`: a `train.step.Trainer` (its model, config, mesh and shardings).

  `config` (default: the trainer's) says where the records are and how to batch them; `method` is a model
  method ("encode_video", "encode_query"), default both: (video, query).
  """
  config, mesh, model = config or trainer.config, trainer.mesh, trainer.model
  batches = pipeline.make_eval_iterator(config, split, config.eval.batch_size // jax.process_count())
  replicated = NamedSharding(mesh, P())
  apply_method = getattr(model, method) if method else None   # None: __call__

  @functools.partial(jax.jit, in_shardings=(trainer.state_shardings["params"], trainer.batch_sharding),
                     out_shardings=replicated)
  def encode(params, batch):
    return model.apply({"params": params}, pipeline.model_inputs(batch), method=apply_method), batch["valid"], batch["index"]

  pieces, indices = [], []
  for batch in tqdm.tqdm(batches, desc=f"embed {split}", disable=jax.process_index() != 0):
    embeddings, valid, index = jax.device_get(encode(params, trainer.shard_batch(batch)))
    pieces.append(jax.tree_util.tree_map(lambda x: np.asarray(x)[valid], embeddings))
    indices.append(np.asarray(index)[valid])
  order = np.argsort(np.concatenate(indices))
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[order], *pieces)


def level_and_combined_similarities(video, query, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """{level: (Q, G)} for every level of the task plus "combined" = sum_g lambda_g S_g."""
  @jax.jit
  def score(video, query):
    prior = weighting.prior(video, config.prior)
    weights = weighting.snippet_weights(prior, video.mask, config.weighting.beta, config.weighting.tau)
    levels = similarity.level_similarities(video, weights, query, config.task, config.eval.chunk_size)
    return {**levels, "combined": similarity.combined_score(levels, config.loss.levels)}
  return jax.device_get(score(video, query))


def evaluate_params(trainer, params, split: str | None = None) -> dict:
  config = trainer.config
  video, query = embed_split(trainer, params, split or config.data.eval_split)
  sims = level_and_combined_similarities(video, query, config)
  return metrics.report(sims, config.task)


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
  """Evaluates the workdir's checkpoint on config.data.eval_split, writes eval.json, prints the table."""
  run = trained.restore(config, workdir, step)
  result = evaluate_params(run.trainer, run.params)
  if jax.process_index() == 0:
    print(f"step {run.step}, {config.data.eval_split} split of {config.data.records}")
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=2)
    print(metrics.format_table(result))
  return result


def main(argv: list[str]) -> int:
  """`varcmp eval --config FILE --workdir DIR [--step N]`."""
  def define_step(values):
    flags.DEFINE_integer("step", None, "checkpoint step to evaluate (default: the latest)", flag_values=values)
  values = command_flags.parse(argv, "varcmp eval", define_extra=define_step)
  sharding.maybe_initialize_distributed()
  evaluate(values.config, values.workdir, values.step)
  return 0
