"""`varcmp eval` and the evaluation that training, search and index share: embed a split in sharded batches,
score every level and the combined score, report.

Embedding runs batch by batch through one jit over the mesh (the same sharding as training), the batches coming
from the Grain pipeline or, when `config.data.resident` picks it (features regime), from the split placed on the
devices once (data/resident.py: periodic eval in training and `varcmp eval`). The (Q, G) similarities are
computed from the gathered embeddings, the spatial level in chunk_size x chunk_size blocks, so an 800 x 800
gallery with T = 256 fits one device.
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
from varcmp_jax.data import pipeline, records_check, resident
from varcmp_jax.train import checkpoint as checkpoint_lib
from varcmp_jax.train import sharding
from varcmp_jax.train import workdir as workdir_lib
from varcmp_jax.train.workdir import RunError


def embed_split(trainer, params, split: str, config: ml_collections.ConfigDict | None = None,
                method: str | None = None, resident_split=None):
  """Embeddings of every record of `split`, host numpy, in record order.

  `trainer`: a `train.step.Trainer` (its model, config, mesh and shardings).

  `config` (default: the trainer's) says where the records are and how to batch them; `method` is a model
  method ("encode_video", "encode_query"), default both: (video, query). `resident_split`: see embed_batches.
  """
  indices, pieces = zip(*embed_batches(trainer, params, split, config, method, resident_split=resident_split))
  order = np.argsort(np.concatenate(indices))
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[order], *pieces)


@functools.cache
def _batch_encoder(trainer, method: str | None):
  """One jit per (trainer, method), so streaming a split slice by slice compiles once."""
  model = trainer.model
  apply_method = getattr(model, method) if method else None   # None: __call__

  @functools.partial(jax.jit, in_shardings=(trainer.state_shardings["params"], trainer.batch_sharding),
                     out_shardings=NamedSharding(trainer.mesh, P()))
  def encode(params, batch):
    inputs = pipeline.model_inputs(resident.as_float32(batch))    # resident arrays keep their stored dtype
    return model.apply({"params": params}, inputs, method=apply_method), batch["valid"], batch["index"]
  return encode


def resident_eval_split(trainer, split: str, config: ml_collections.ConfigDict | None = None):
  """`split` placed on the devices when config.data.resident picks it (one line says which), else None."""
  config = config or trainer.config
  on, line = resident.decide(config, split, trainer.mesh.size, train=False)
  if jax.process_index() == 0:
    print(f"{split} data (eval): {line}", flush=True)
  if not on:
    return None
  return resident.load(config, split, trainer.batch_sharding, train=False,
                       batch_per_device=config.eval.batch_size // trainer.mesh.size)


def embed_batches(trainer, params, split: str, config: ml_collections.ConfigDict | None = None,
                  method: str | None = None, shard_index: int | None = None, shard_count: int | None = None,
                  progress: bool = True, resident_split=None):
  """Streams embed_split: yields (record indices, embeddings of those records) batch by batch, host numpy.

  Memory is one batch. `shard_index`/`shard_count` pick a contiguous slice of the split (grain's even split,
  as pipeline.IndexedSource slices it; default: this process's slice), which is how `varcmp index` embeds
  a large split slice by slice. `resident_split`: None (the Grain pipeline), a resident.ResidentSplit of
  `split` (already on the devices), or "auto" (config.data.resident decides: resident_eval_split).
  """
  config = config or trainer.config
  if isinstance(resident_split, str):
    resident_split = resident_eval_split(trainer, split, config)
  if resident_split is not None:
    per_device = config.eval.batch_size // trainer.mesh.size
    batches = resident_split.eval_batches(per_device)
    total = resident_split.rows // per_device
  else:
    host = pipeline.make_eval_iterator(config, split, config.eval.batch_size // jax.process_count(),
                                      shard_index=shard_index, shard_count=shard_count)
    batches, total = map(trainer.shard_batch, host), len(host)
  encode = _batch_encoder(trainer, method)
  for batch in tqdm.tqdm(batches, desc=f"embed {split}", total=total,
                         disable=not progress or jax.process_index() != 0):
    embeddings, valid, index = jax.device_get(encode(params, batch))
    yield np.asarray(index)[valid], jax.tree_util.tree_map(lambda x: np.asarray(x)[valid], embeddings)


def level_and_combined_similarities(video, query, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """{level: (Q, G)} for every level of the task plus "combined" = sum_g lambda_g S_g, as host numpy.

  The gallery is split over this host's devices (padded with masked-out videos to a multiple of their
  count): each device scores every query against its own videos, eval.chunk_size at a time. Without
  region tokens (video.regions None) there is no spatial level (similarity.level_similarities).
  """
  score, mesh = _gallery_scorer(config.to_json_best_effort(sort_keys=True))
  num_videos = video.mask.shape[0]
  pad = -num_videos % mesh.size
  video = jax.tree_util.tree_map(lambda x: np.pad(np.asarray(x), [(0, pad)] + [(0, 0)] * (np.ndim(x) - 1)), video)
  video = jax.device_put(video, NamedSharding(mesh, P("gallery")))
  query = jax.device_put(query, NamedSharding(mesh, P()))
  return {name: sim[:, :num_videos] for name, sim in jax.device_get(score(video, query)).items()}


@functools.lru_cache(maxsize=8)
def _gallery_scorer(config_json: str):
  """(jitted score(video, query), the gallery mesh over this host's devices), one per config: repeated
  evaluations and searches reuse the compiled scorer."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  devices = jax.local_devices()
  mesh = jax.make_mesh((len(devices),), ("gallery",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)

  @jax.jit
  def score(video, query):
    prior = weighting.prior(video, config.prior)
    weights = weighting.snippet_weights(prior, video.mask, config.weighting.beta, config.weighting.tau)
    sims = similarity.level_similarities(video, weights, query, config.task, config.eval.chunk_size, mesh=mesh,
                                         precision=config.eval.get("precision", "highest"))
    return {**sims, "combined": similarity.combined_score(sims, config.loss.levels)}
  return score, mesh


def check_records(config: ml_collections.ConfigDict, split: str) -> None:
  """RunError naming the file when config.data.records has no manifest, no such split, a missing shard, records
  that do not fit the config, no records in the split or (the train split) fewer than a train batch."""
  try:
    pipeline.shard_paths(config.data.records, split)
    pipeline.check_against_config(config, split)
    records_check.check_size(config, split, pipeline.read_manifest(config.data.records))
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise RunError(f"config.data.records: {e.args[0] if e.args else e}") from None


def evaluate_params(trainer, params, split: str | None = None, ties: str = "expected", resident_split="auto") -> dict:
  """The metrics of `params` on `split` (default the eval split); `resident_split` as in embed_batches."""
  config = trainer.config
  video, query = embed_split(trainer, params, split or config.data.eval_split, resident_split=resident_split)
  sims = level_and_combined_similarities(video, query, config)
  return metrics.report(sims, config.task, ties)


def result_name(workdir: str, step: int, split: str, ties: str = "expected") -> str:
  """eval.json: the newest checkpoint, on the run's own eval split (WORKDIR/config.json), ties in expectation.
  Any other evaluation is named by what differs and never replaces it: eval_step50.json (an older step),
  eval_train_step150.json (another split), eval_optimistic.json (optimistic ties)."""
  saved = workdir_lib.read_saved_config(workdir) or {}
  steps = checkpoint_lib.complete_steps(workdir)
  other_split = split != saved.get("data", {}).get("eval_split", split)
  parts = [split] if other_split else []
  if other_split or steps and step < steps[-1]:
    parts.append(f"step{step}")
  if ties != "expected":
    parts.append(ties)
  return "_".join(["eval", *parts]) + ".json"


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None, ties: str = "expected",
             show: bool = True) -> dict:
  """Evaluates the workdir's checkpoint (the newest that restores, or `step`) on config.data.eval_split;
  see evaluate_run."""
  check_records(config, config.data.eval_split)
  return evaluate_run(trained.restore(config, workdir, step), ties, show)


def evaluate_run(run: trained.Trained, ties: str = "expected", show: bool = True) -> dict:
  """Scores a restored run on run.config.data.eval_split and writes WORKDIR/eval.json (or, for an older step,
  another split or optimistic ties, a file named by that: see result_name) with the step, split, records and
  ties it measured; prints the table when `show`. Returns what it wrote."""
  config, workdir = run.config, run.workdir
  result = {"step": run.step, "split": config.data.eval_split, "records": os.path.abspath(config.data.records),
            "ties": ties, **evaluate_params(run.trainer, run.params, ties=ties)}
  if jax.process_index() == 0:
    path = os.path.join(workdir, result_name(workdir, run.step, config.data.eval_split, ties))
    workdir_lib.write_atomically(path, json.dumps(result, indent=2))
    if show:
      print(f"step {run.step}, {config.data.eval_split} split of {config.data.records} -> {path}")
      print(metrics.format_table(result))
  return result


def main(argv: list[str]) -> int:
  """`varcmp eval --workdir DIR [--config FILE] [--step N] [--ties expected|optimistic]`."""
  def define_flags(values):
    flags.DEFINE_integer("step", None, "checkpoint step to evaluate (default: the newest that restores); an "
                         "older step writes eval_step<N>.json", flag_values=values)
    flags.DEFINE_enum("ties", "expected", metrics.TIES, "rank ties in expectation over a random order "
                      "(SPEC section 4) or optimistically (as some published code does)", flag_values=values)
  usage = ("usage: varcmp eval --workdir DIR [--config FILE[:arg]] [--step N] [--ties expected|optimistic] "
           "[--config.x.y=value ...]")
  values = command_flags.parse_flags(argv, "varcmp eval", usage, define_flags, config_from_workdir=True)
  sharding.maybe_initialize_distributed()
  command_flags.validate(values, "varcmp eval", jax.device_count())
  try:
    saved = workdir_lib.read_saved_config(values.workdir) or {}
    if values.config.task == "text" and not values.config.model.get("max_words", 0):
      # max_words = 0 ("size it from the records") is what `varcmp train` resolved: the run's own number.
      values.config.model.max_words = saved.get("model", {}).get("max_words", 0)
    check_same_model(values.workdir, values.config, command_flags.config_source(values))
    evaluate(values.config, values.workdir, values.step, values.ties)
  except (RunError, FileNotFoundError) as e:
    raise SystemExit(f"varcmp eval: {e}") from None
  return 0


def check_same_model(workdir: str, config: ml_collections.ConfigDict, source: str) -> None:
  """RunError naming the fields if `config` (from `source`) describes another model than WORKDIR/config.json,
  whose checkpoints would not restore into it."""
  saved = workdir_lib.read_saved_config(workdir)
  differences = workdir_lib.model_differences(saved, json.loads(config.to_json_best_effort())) if saved else []
  if differences:
    raise RunError(f"--config {source} describes another model than {os.path.join(workdir, 'config.json')} "
                   f"({'; '.join(differences[:6])}); omit --config to evaluate with the run's own")
