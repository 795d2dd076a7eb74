"""The loss where the videos live (losses.varcmp_loss with a mesh, SPEC section 4).

On 8 fake CPU devices (meshes 8x1, 4x2, 2x4), against the same functions on one device: the loss, every
term and every gradient of all six levels with a chunk that divides neither the local nor the global
batch; the per-device program never holds other devices' videos (its compiled HLO has no global
region-token tensor and all-gathers only the queries); evaluation's gallery split over the devices; the
GradCache path (grad_accum_steps = 2) of the train step. One subprocess checks everything, the tests read
its report.
"""
import json
import re

import numpy as np
import pytest

from test_sharding import MESHES, load_config, random_batches, run_with_devices

B, T, R, L, D = 40, 5, 3, 6, 8     # 5 videos per device on 8 devices
CHUNK = 3                           # divides neither 5 nor 40: blocks overlap at the end on both
FINE_CANDIDATES, FINE_SNIPPETS = 6, 3   # loss.fine_*: fewer queries than the batch's, fewer snippets than T
EVAL_GALLERY = 29                   # not a multiple of 8: the gallery is padded


def random_embeddings(task, num, seed=0):
  import jax.numpy as jnp
  from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  lengths = lambda size: jnp.asarray(np.arange(size)[None] < rng.integers(1, size + 1, (num, 1)))
  video = VideoEmbeddings(frames=normal(num, T, D), regions=normal(num, T, R, D), mask=lengths(T),
                          anomaly=jnp.asarray(rng.uniform(0.05, 0.95, (num, T)), jnp.float32),
                          external_prior=jnp.asarray(rng.uniform(size=(num, T)), jnp.float32))
  if task == "text":
    query = TextEmbeddings(sentence=normal(num, D), words=normal(num, L, D), word_mask=lengths(L))
  else:
    query = AudioEmbeddings(segments=normal(num, T, D), mask=lengths(T))
  return video, query


def loss_config(task):
  from varcmp_jax import config as config_lib
  config = config_lib.default_config(task)
  config.loss.levels = dict(zip(config_lib.TASK_LEVELS[task], (0.5, 1.0, 2.0)))
  config.loss.mil, config.loss.chunk_size = 0.3, CHUNK
  config.prior.source = "mean"
  config.weighting.stop_gradient = False     # gradients reach the anomaly scores through the weights too
  return config


def max_difference(a, b) -> float:
  import jax
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in pairs if x.dtype != jax.dtypes.float0)


def all_gathered_shapes(hlo: str) -> list[str]:
  """Result shapes of every all-gather of a compiled (per-device) HLO module, tuples unpacked."""
  results = re.findall(r"= (\([^)]*\)|\S+) all-gather(?:-start)?\(", hlo)
  return [shape for result in results for shape in re.findall(r"\w+\[[\d,]*\]", result)]


def mesh_of(data, fsdp):
  import jax
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:data * fsdp])


def loss_worker(out_dir: str):
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from varcmp_jax import evaluate
  from varcmp_jax.alignment import losses, similarity, weighting
  report = {}
  for task in ("text", "audio"):
    config = loss_config(task)
    video, query = random_embeddings(task, B)
    labels = jnp.asarray(np.arange(B) % 2)
    scales = {name: jnp.float32(2.0 + 0.5 * i) for i, name in enumerate(config.loss.levels)}

    def loss_and_grads(mesh):
      loss = lambda v, q, s: losses.varcmp_loss(v, q, labels, s, config, mesh)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True, allow_int=True))

    want = loss_and_grads(None)(video, query, scales)
    report.update(fine_report(task, config, video, query, labels, scales, exact=want[0]))
    for data, fsdp in MESHES:
      mesh = mesh_of(data, fsdp)
      rows = NamedSharding(mesh, P(("data", "fsdp")))
      args = (*jax.device_put((video, query), rows), scales)
      compiled = loss_and_grads(mesh).lower(*args).compile()
      (total, terms), grads = compiled(*args)
      entry = {"terms": sorted(terms), "loss": max_difference((total, terms), want[0]),
               "grads": max_difference(grads, want[1])}
      if (data, fsdp) == MESHES[0]:
        hlo = compiled.as_text()
        entry["global_regions"] = f"f32[{B},{T},{R},{D}]" in hlo
        entry["all_gathered"] = all_gathered_shapes(hlo)
      report[f"{task} {data}x{fsdp}"] = entry

    # Evaluation: the gallery split over the 8 devices (padded to 32) against one device, unsplit.
    video, query = jax.device_get(random_embeddings(task, EVAL_GALLERY, seed=1))
    config.eval.chunk_size = CHUNK
    got = evaluate.level_and_combined_similarities(video, query, config)
    weights = weighting.snippet_weights(weighting.prior(video, config.prior), video.mask, config.weighting.beta,
                                        config.weighting.tau)
    sims = similarity.level_similarities(video, weights, query, task, CHUNK)
    sims["combined"] = similarity.combined_score(sims, config.loss.levels)
    report[f"{task} eval"] = {"keys": sorted(got), "shape": list(got["combined"].shape),
                              "sims": max_difference(got, {name: sims[name] for name in got})}
  report["grad_cache"] = grad_cache_report()
  with open(f"{out_dir}/report.json", "w") as f:
    json.dump(report, f)


def fine_report(task, config, video, query, labels, scales, exact):
  """loss.fine_candidates / fine_snippets under the partitioned loss: each device chooses its videos' hardest queries
  among all (gathered) ones and the rows reduce across devices; the loss and gradients equal one device's."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from varcmp_jax.alignment import losses
  config = config.copy_and_resolve_references()
  config.loss.fine_candidates, config.loss.fine_snippets = FINE_CANDIDATES, FINE_SNIPPETS

  def loss_and_grads(mesh):
    loss = lambda v, q, s: losses.varcmp_loss(v, q, labels, s, config, mesh)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True, allow_int=True))

  want = loss_and_grads(None)(video, query, scales)
  report = {f"{task} fine vs exact": max_difference(want[0], exact)}
  for data, fsdp in ((8, 1), (2, 4)):
    mesh = mesh_of(data, fsdp)
    args = (*jax.device_put((video, query), NamedSharding(mesh, P(("data", "fsdp")))), scales)
    compiled = loss_and_grads(mesh).lower(*args).compile()
    (total, terms), grads = compiled(*args)
    report[f"{task} fine {data}x{fsdp}"] = {
        "loss": max_difference((total, terms), want[0]), "grads": max_difference(grads, want[1]),
        "global_regions": f"f32[{B},{T},{R},{D}]" in compiled.as_text()}
  return report


def grad_cache_report():
  """Train-step loss and gradients with grad_accum_steps = 2: one device against a 2x4 mesh."""
  import jax
  from varcmp_jax.model.varcmp import VarCMP
  from varcmp_jax.train.step import Trainer
  config = load_config("tiny_text", "features")
  config.train.batch_size, config.train.grad_accum_steps, config.loss.chunk_size = 48, 2, 4   # local batch 6
  batch = random_batches(config, 1)[0]
  model = VarCMP(config.model, task=config.task, regime=config.regime)

  def loss_and_grads(mesh, params=None):
    trainer = Trainer(model, config, mesh)
    params = jax.device_get(trainer.init_state(seed=0)["params"]) if params is None else params
    placed = (jax.device_put(params, trainer.state_shardings["params"]), trainer.shard_batch(batch))
    compiled = jax.jit(trainer.loss_and_grads).lower(*placed).compile()
    return params, compiled(*placed), compiled.as_text()

  params, want, _ = loss_and_grads(mesh_of(1, 1))
  _, got, hlo = loss_and_grads(mesh_of(2, 4), params)
  return {"loss": max_difference(got[0], want[0]), "grads": max_difference(got[1], want[1]),
          "global_regions": f"f32[{','.join(map(str, batch['regions'].shape))}]" in hlo}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("partitioned_loss")
  run_with_devices("loss_worker", str(out), devices=8)
  return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("task", ["text", "audio"])
def test_partitioned_loss_and_gradients_equal_one_device(report, task):
  from varcmp_jax import config as config_lib
  for data, fsdp in MESHES:
    entry = report[f"{task} {data}x{fsdp}"]
    assert entry["terms"] == sorted([f"loss_{name}" for name in config_lib.TASK_LEVELS[task]] + ["loss_mil"])
    assert entry["loss"] < 1e-5, (data, fsdp, entry)
    assert entry["grads"] < 1e-5, (data, fsdp, entry)


@pytest.mark.parametrize("task", ["text", "audio"])
def test_each_device_scores_only_its_own_videos(report, task):
  entry = report[f"{task} {MESHES[0][0]}x{MESHES[0][1]}"]
  gathered = entry["all_gathered"]
  # The queries are all-gathered (so the HLO was read right) ...
  query_shape = f"f32[{B},{L},{D}]" if task == "text" else f"f32[{B},{T},{D}]"
  assert query_shape in gathered, gathered
  # ... the videos never: no global region tokens anywhere, no gathered (B, T, D) frames (in the audio
  # task the audio segments have that shape too: one gather of them).
  assert not entry["global_regions"]
  assert gathered.count(f"f32[{B},{T},{D}]") == (1 if task == "audio" else 0), gathered


@pytest.mark.parametrize("task", ["text", "audio"])
def test_evaluation_splits_the_gallery_over_devices(report, task):
  entry = report[f"{task} eval"]
  assert entry["shape"] == [EVAL_GALLERY, EVAL_GALLERY]
  assert "combined" in entry["keys"] and len(entry["keys"]) == 4
  assert entry["sims"] < 1e-5, entry


@pytest.mark.parametrize("task", ["text", "audio"])
def test_partitioned_fine_candidates_and_snippets_equal_one_device(report, task):
  for data, fsdp in ((8, 1), (2, 4)):
    entry = report[f"{task} fine {data}x{fsdp}"]
    assert entry["loss"] < 1e-5 and entry["grads"] < 1e-5, (data, fsdp, entry)
    assert not entry["global_regions"]
  assert report[f"{task} fine vs exact"] > 1e-3      # the switches did change the loss


def test_grad_cache_step_is_partitioned_and_exact(report):
  entry = report["grad_cache"]
  assert entry["loss"] < 1e-5 and entry["grads"] < 1e-5, entry
  assert not entry["global_regions"]
