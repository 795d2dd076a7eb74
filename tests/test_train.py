"""The train step: gradient accumulation, per-tower learning rates and freezing, the schedule."""
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varcmp_jax.train import optimizer as optimizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_tower_of_paths():
  assert optimizer_lib.tower_of("clip/vision/encoder/layers_0/kernel") == "image"
  assert optimizer_lib.tower_of("clip/visual_projection/kernel") == "image"
  assert optimizer_lib.tower_of("clip/text/token_embedding/embedding") == "text"
  assert optimizer_lib.tower_of("clip/text_projection/kernel") == "text"
  assert optimizer_lib.tower_of("audio/vit/kernel") == "audio"
  assert optimizer_lib.tower_of("clip/logit_scale") == "heads"
  assert optimizer_lib.tower_of("temporal/attn/kernel") == "heads"
  assert optimizer_lib.tower_of("logit_scales/video") == "heads"
  assert optimizer_lib.tower_of("anomaly_head/fc1/bias") == "heads"


def test_schedule_warmup_then_cosine():
  config = load_config("tiny_text").train
  config.learning_rate, config.warmup_steps, config.num_steps = 0.1, 10, 110
  schedule = optimizer_lib.learning_rate_schedule(config)
  for step, expected in [(0, 0.0), (5, 0.05), (10, 0.1), (60, 0.05), (110, 0.0)]:
    assert float(schedule(step)) == pytest.approx(expected, abs=1e-7)
  assert float(schedule(35)) == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 25 / 100)), rel=1e-5)


def _numpy_adamw(params, grads_per_step, lr_of_step, mults, wd, b1, b2, clip, eps=1e-8):
  """Reference AdamW written out: frozen towers zeroed, global-norm clip, bias-corrected moments."""
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  nu = {k: np.zeros_like(v) for k, v in params.items()}
  for step, grads in enumerate(grads_per_step):
    grads = {k: (0.0 if mults[k] == 0 else 1.0) * g.astype(np.float64) for k, g in grads.items()}
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
    scale = min(1.0, clip / norm)
    for k in params:
      if mults[k] == 0:
        continue
      g = grads[k] * scale
      mu[k] = b1 * mu[k] + (1 - b1) * g
      nu[k] = b2 * nu[k] + (1 - b2) * g * g
      m_hat, v_hat = mu[k] / (1 - b1 ** (step + 1)), nu[k] / (1 - b2 ** (step + 1))
      decay = wd * params[k] if params[k].ndim >= 2 else 0.0
      params[k] = params[k] - mults[k] * lr_of_step(step) * (m_hat / (np.sqrt(v_hat) + eps) + decay)
  return params


def test_per_tower_learning_rates_and_freezing_match_numpy_adamw():
  config = load_config("tiny_text").train
  config.learning_rate, config.warmup_steps, config.num_steps = 0.01, 2, 10
  config.weight_decay, config.grad_clip_norm = 0.1, 1.0
  config.lr_mult = dict(image=0.0, text=0.5, audio=2.0, heads=1.0)
  rng = np.random.default_rng(0)
  shapes = {"clip/vision/proj/kernel": (4, 3), "clip/visual_projection/kernel": (3, 3),
            "clip/text/ln/bias": (3,), "clip/text_projection/kernel": (3, 2), "audio/fc/kernel": (2, 5),
            "temporal/fc/kernel": (5, 2), "logit_scales/video": ()}
  flat = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  mults = {k: config.lr_mult[optimizer_lib.tower_of(k)] for k in flat}

  def nest(d):
    tree = {}
    for path, value in d.items():
      node = tree
      *parents, leaf = path.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = jnp.asarray(value)
    return tree

  def unnest(tree):
    from varcmp_jax.train.sharding import path_str
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}

  grads_per_step = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(4)]
  tx = optimizer_lib.make_optimizer(config, nest(flat))
  params = nest(flat)
  state = tx.init(params)
  for grads in grads_per_step:
    updates, state = tx.update(nest(grads), state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
  schedule = optimizer_lib.learning_rate_schedule(config)
  expected = _numpy_adamw(flat, grads_per_step, lambda s: float(schedule(s)), mults, config.weight_decay,
                          config.b1, config.b2, config.grad_clip_norm)
  got = unnest(params)
  for k in flat:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(got["clip/vision/proj/kernel"], flat["clip/vision/proj/kernel"])   # frozen


def _random_batch(config, batch_size, seed):
  from varcmp_jax.train.step import example_batch
  rng = np.random.default_rng(seed)
  b = example_batch(config, batch_size)
  n, t = b["mask"].shape
  for key in ("features", "regions"):
    b[key] = rng.normal(size=b[key].shape).astype(np.float32)
  b["tokens"][:] = 0
  for i, length in enumerate(rng.integers(4, 12, n)):
    b["tokens"][i, 0], b["tokens"][i, 1:length], b["tokens"][i, length] = 49406, rng.integers(300, 4000, length - 1), 49407
  b["mask"] = np.arange(t)[None] < rng.integers(1, t + 1, n)[:, None]
  b["label"] = rng.integers(0, 2, n).astype(np.int32)
  return b


def test_grad_accumulation_equals_one_big_batch():
  """k = 4 micro-batches of 2 (GradCache) give the loss and gradient of one batch of 8."""
  from varcmp_jax.model.varcmp import VarCMP
  from varcmp_jax.train import sharding
  from varcmp_jax.train.step import Trainer
  config = load_config("tiny_text", "features")
  config.mesh.data = 1
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = VarCMP(config.model, task=config.task, regime=config.regime)
  batch = _random_batch(config, config.train.batch_size, seed=1)
  results = []
  for k in (1, 4):
    config.train.grad_accum_steps = k
    trainer = Trainer(model, config, mesh)
    params = trainer.init_state(seed=0)["params"]
    (loss, terms), grads = jax.jit(trainer.loss_and_grads)(params, batch)
    results.append((float(loss), jax.device_get(terms), jax.device_get(grads)))
  (loss1, terms1, grads1), (loss4, terms4, grads4) = results
  assert loss4 == pytest.approx(loss1, rel=1e-5)
  for name in terms1:
    assert float(terms4[name]) == pytest.approx(float(terms1[name]), rel=1e-5), name
  flat1, flat4 = jax.tree_util.tree_leaves_with_path(grads1), jax.tree_util.tree_leaves(grads4)
  assert any(np.abs(g).max() > 1e-3 for _, g in flat1)
  for (path, g1), g4 in zip(flat1, flat4):
    np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_clip_checkpoint_replaces_the_random_towers(tmp_path):
  """config.model.clip_checkpoint (an `import-clip` dir) -> the initial params hold exactly those towers."""
  from varcmp_jax import clip
  from varcmp_jax.model.varcmp import VarCMP, clip_config
  from varcmp_jax.train import sharding
  from varcmp_jax.train import train as train_lib
  from varcmp_jax.train.step import Trainer
  config = load_config("tiny_text", "frames")   # both towers: a whole CLIP checkpoint
  config.mesh.data = 1
  trainer = Trainer(VarCMP(config.model, task=config.task, regime=config.regime), config,
                    sharding.make_mesh(config.mesh, jax.devices()[:1]))
  donor = jax.device_get(trainer.init_state(seed=7)["params"]["clip"])
  clip.save_params(donor, clip_config(config.model), str(tmp_path))
  loaded = trainer.init_state(seed=0, clip_params=train_lib.load_clip_params(str(tmp_path)))["params"]["clip"]
  random = jax.device_get(trainer.init_state(seed=0)["params"]["clip"])
  kernel = ("text", "token_embedding", "embedding")
  pick = lambda tree: tree[kernel[0]][kernel[1]][kernel[2]]
  assert not np.array_equal(pick(random), pick(donor))
  for got, expected in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(donor)):
    np.testing.assert_array_equal(np.asarray(got), expected)


# ---- the loop's workdir safety and the command line's errors -----------------------------------------


def test_full_disk_ends_the_run_with_one_line_and_the_last_checkpoint_intact(tmp_path, monkeypatch):
  """The disk fills while step 5 is logged: RunError (one line) naming the last complete checkpoint, which
  restores; the writer lock is released; no hang (the TensorBoard write fails in the loop's own thread)."""
  import errno
  import sys
  from tensorboardX import record_writer
  from varcmp_jax import trained
  from varcmp_jax.train import train as train_lib
  from varcmp_jax.train.workdir import RunError
  sys.path.insert(0, str(ROOT / "tests"))
  from test_checkpoint import write_feature_records
  config = load_config("tiny_text", "features")
  config.data.records = str(write_feature_records(tmp_path / "records"))
  config.train.num_steps, config.train.checkpoint_every = 8, 2
  workdir = tmp_path / "run"
  real_write = record_writer.RecordWriter.write
  def fill_up_at_step_5(self, data):
    if b"train/loss" in data and read_steps(workdir)[-1:] == [5]:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(self, data)
  monkeypatch.setattr(record_writer.RecordWriter, "write", fill_up_at_step_5)
  with pytest.raises(RunError) as error:
    train_lib.train(config, str(workdir))
  message = str(error.value)
  assert "\n" not in message and "disk full writing into" in message and "No space left on device" in message
  assert f"the last complete checkpoint is step 4 ({workdir / 'checkpoints' / '4'})" in message
  assert "rerun the same command to resume" in message
  assert (workdir / "writer.lock").read_text() == ""
  assert trained.restore(config, str(workdir)).step == 4


def read_steps(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_train_errors_are_one_line_and_leave_no_workdir(tmp_path, capsys):
  from varcmp_jax.train import main as train_main_lib
  config_file = str(ROOT / "configs" / "tiny_text.py")
  (tmp_path / "a_file").write_text("")
  for argv, message in [
      (["--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w1"), "--config.data.records=/r"],
       f"--config {tmp_path / 'nope.py'}: no such file"),
      (["--config", config_file, "--workdir", str(tmp_path / "w2"), f"--config.data.records={tmp_path / 'none'}"],
       f"config.data.records: {tmp_path / 'none' / 'manifest.json'}: no manifest"),
      (["--config", config_file, "--workdir", str(tmp_path / "a_file" / "w3"), f"--config.data.records={tmp_path}"],
       f"cannot create the workdir {tmp_path / 'a_file' / 'w3'}"),
      (["--config", config_file, "--workdir", str(tmp_path / "w4"), "--config.data.records=/r",
        "--config.mesh.data=3"], "mesh data=3 x fsdp=1 = 3 != 1 devices"),
  ]:
    with pytest.raises(SystemExit) as error:
      train_main_lib.train_main(argv)
    assert error.value.code not in (0, None) and message in str(error.value), argv
    assert "\n" not in str(error.value), argv
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]      # no workdir left behind
  with pytest.raises(SystemExit) as error:
    train_main_lib.train_main(["--help"])
  assert error.value.code == 0
  assert "usage: varcmp train --config" in capsys.readouterr().out


def test_batch_size_the_devices_do_not_divide_is_one_line(tmp_path):
  import subprocess
  import sys
  sys.path.insert(0, str(ROOT / "tests"))
  from test_sharding import subprocess_env
  result = subprocess.run(
      [sys.executable, "-m", "varcmp_jax.cli", "train", "--config", str(ROOT / "configs" / "tiny_text.py"),
       "--workdir", str(tmp_path / "run"), "--config.data.records=/r", "--config.train.batch_size=12"],
      env=subprocess_env(devices=8), capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"varcmp train: {ROOT / 'configs' / 'tiny_text.py'}: micro-batch train.batch_size/grad_accum_steps=12 is not "
      "divisible by the 8 mesh devices")
  assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_training_never_imports_search_or_index():
  """Imports run one way: train/ may use evaluate.py, never its users (search, index)."""
  import ast
  for path in sorted((ROOT / "varcmp_jax" / "train").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
      for name in names:
        assert not name.startswith(("varcmp_jax.search", "varcmp_jax.index", "varcmp_jax.serve")), (path.name, name)


def test_train_sizes_the_word_budget_logs_mfu_and_follows_the_cache_switch(tmp_path, monkeypatch, capsys):
  """model.max_words = 0 becomes the records' longest caption (manifest.json), kept in config.json (a smaller
  budget: test_records_check); metrics.jsonl carries MFU where the device's peak is known; config.compilation_cache
  reaches the cache; the log gives the fine-grained levels' work per step."""
  import sys
  from varcmp_jax import compilation_cache, flops
  from varcmp_jax.train import train as train_lib
  sys.path.insert(0, str(ROOT / "tests"))
  from test_checkpoint import write_feature_records
  records = write_feature_records(tmp_path / "records")     # every caption has 3 words
  manifest = json.loads((records / "manifest.json").read_text())
  for split, info in manifest["splits"].items():
    info["caption_words"] = {"3": info["records"]}
  (records / "manifest.json").write_text(json.dumps(manifest))
  switches = []
  monkeypatch.setattr(compilation_cache, "enable", switches.append)
  monkeypatch.setattr(flops, "device_peak", lambda device=None: flops.Peak(1e12, 1e11))
  config = load_config("tiny_text", "features")
  config.data.records, config.compilation_cache = str(records), False
  config.train.num_steps = config.train.log_every = 2
  config.loss.fine_candidates = 4                           # and the log says what the fine-grained levels compute
  train_lib.train(config, str(tmp_path / "run"))
  assert switches == [False]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["max_words"] == 3
  out = capsys.readouterr().out
  assert "reads <BOS> + 3 words + <EOS> (the longest caption of the records)" in out
  assert "fine-grained levels (spatial): 8 videos x 4 queries x 4 snippets per step, 50% of the exact loss's" in out
  logged = read_steps_rows(tmp_path / "run")[-1]
  assert 0 < logged["mfu"] == pytest.approx(logged["tflops_per_s"], rel=1e-6)     # against a 1 TFLOP/s peak


def read_steps_rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_ends_with_a_summary_line_and_a_finished_run_says_so(tmp_path, capsys):
  """`varcmp train` closes with one line: the steps done, the final loss (metrics.jsonl's last row), the time,
  and where the checkpoint and metrics are. The same command again has nothing to do: one line, exit 0, nothing
  written."""
  import re
  import sys
  from varcmp_jax.train import main as train_main_lib
  sys.path.insert(0, str(ROOT / "tests"))
  from test_checkpoint import write_feature_records
  records = write_feature_records(tmp_path / "records")
  run = tmp_path / "run"
  argv = ["--config", str(ROOT / "configs" / "tiny_text.py") + ":features", "--workdir", str(run),
          f"--config.data.records={records}", "--config.train.num_steps=3", "--config.train.warmup_steps=1"]
  assert train_main_lib.train_main(argv) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  final = read_steps_rows(run)[-1]
  assert final["step"] == 3
  where = (f"checkpoint {run / 'checkpoints' / '3'}, metrics {run / 'metrics.jsonl'} (TensorBoard: "
           f"{run / 'tensorboard'})")
  assert re.fullmatch(rf"trained steps 1-3 of 3 in \d+ s, loss {final['loss']:.4f}; {re.escape(where)}", last), last
  assert (run / "checkpoints" / "3").is_dir()

  before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "writer.lock"}
  assert train_main_lib.train_main(argv) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1] == (f"nothing to train: {run} already holds step 3 of train.num_steps=3, loss {final['loss']:.4f} "
                     f"(checkpoint {run / 'checkpoints' / '3'}, metrics {run / 'metrics.jsonl'}); to train longer, "
                     "give a larger train.num_steps and a new --workdir")
  assert not any(line.startswith("trained steps") for line in out)
  after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "writer.lock"}
  assert after == before                                   # no file written, none added


def test_a_run_stopped_early_says_where_it_stopped():
  from varcmp_jax.train import train as train_lib
  line = train_lib.summary("/w", 4, 9, 40, 5.12341, 61.4)
  assert line == ("stopped at step 9 of 40 after 5 steps in 61 s, loss 5.1234; checkpoint /w/checkpoints/9, metrics "
                  "/w/metrics.jsonl (TensorBoard: /w/tensorboard); rerun the same command to go on")
  assert train_lib.summary("/w", 0, 40, 40, None, 3).startswith("trained steps 1-40 of 40 in 3 s; checkpoint")
