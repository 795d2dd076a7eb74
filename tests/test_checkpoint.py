"""Checkpoints: restore onto another mesh, exact resume after SIGTERM and SIGKILL, 2-process runs.

Multi-device and multi-process runs happen in subprocesses: the device count is fixed when jax starts.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from varcmp_jax.data import records

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
from test_sharding import flat_params, load_config, run_with_devices, subprocess_env  # noqa: E402

WIDTH, SNIPPETS, GRID = 32, 4, 2      # configs/tiny_text.py:features


def write_feature_records(out: pathlib.Path, splits=(("train", 32), ("test", 16)), num_classes=4, seed=0):
  """A features-regime record directory: each video's features carry its class, its caption names it."""
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(num_classes, WIDTH)).astype(np.float32)
  words = rng.integers(1000, 40000, size=(num_classes, 3))
  out.mkdir(parents=True, exist_ok=True)
  manifest = {"splits": {}, "skipped": []}
  for split, count in splits:
    name = f"{split}-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(out / name), "group_size:1")
    for i in range(count):
      c = int(rng.integers(num_classes))
      length = int(rng.integers(2, SNIPPETS + 1))
      features = prototypes[c] + 0.5 * rng.normal(size=(length, WIDTH))
      regions = features[:, None, :] + 0.5 * rng.normal(size=(length, GRID ** 2, WIDTH))
      tokens = np.zeros(77, np.int32)
      tokens[0], tokens[1:4], tokens[4] = 49406, words[c], 49407
      writer.write(records.encode_record(dict(
          video=f"{split}_{i:03d}", caption=f"class {c}", tokens=tokens, label=np.int32(c % 2), split=split,
          duration=np.float32(length), times=np.stack([np.arange(length), np.arange(length) + 1], 1).astype(np.float32),
          event=np.array([-1, -1], np.float32), features=features.astype(np.float16),
          regions=regions.astype(np.float16))))
    writer.close()
    manifest["splits"][split] = {"records": count, "shards": [name]}
  (out / "manifest.json").write_text(json.dumps(manifest))
  return out


def train_command(workdir, records_dir, *overrides):
  return [sys.executable, "-m", "varcmp_jax.cli", "train", "--config", f"{ROOT / 'configs' / 'tiny_text.py'}:features",
          "--workdir", str(workdir), f"--config.data.records={records_dir}", *overrides]


def read_metrics(workdir):
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if line.strip()]


def final_params(workdir):
  """The last checkpoint's params as numpy, whatever devices wrote it."""
  import jax
  import orbax.checkpoint as ocp
  steps = sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())
  path = pathlib.Path(workdir) / "checkpoints" / str(steps[-1]) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  return steps[-1], flat_params(state["params"])


# ---- restore onto another mesh --------------------------------------------------------------------


def other_mesh_worker(records_dir: str, out_dir: str):
  """4 steps on 8x1, versus 2 steps on 8x1 + checkpoint + restore onto 2x4 and onto 1 device + 2 steps."""
  import jax
  from varcmp_jax.data import pipeline
  from varcmp_jax.model.varcmp import VarCMP
  from varcmp_jax.train import checkpoint as checkpoint_lib
  from varcmp_jax.train import sharding
  from varcmp_jax.train.step import Trainer
  config = load_config("tiny_text", "features")
  config.data.records = records_dir
  model = VarCMP(config.model, task=config.task, regime=config.regime)

  def trainer_on(data, fsdp):
    config.mesh.data, config.mesh.fsdp = data, fsdp
    return Trainer(model, config, sharding.make_mesh(config.mesh, jax.devices()[:data * fsdp]))

  def run(trainer, state, iterator, steps):
    losses = []
    for _ in range(steps):
      state, metrics = trainer.train_step(state, trainer.shard_batch(next(iterator)))
      losses.append(float(metrics["loss"]))
    return state, losses

  batch, seed = config.train.batch_size, config.seed
  first = trainer_on(8, 1)
  state, losses = run(first, first.init_state(0), pipeline.make_train_iterator(config, batch, seed), 4)
  report = {"uninterrupted": losses}
  np.savez(os.path.join(out_dir, "uninterrupted.npz"), **flat_params(state["params"]))

  iterator = pipeline.make_train_iterator(config, batch, seed)
  state, losses = run(first, first.init_state(0), iterator, 2)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(out_dir, "work"), every=2, keep=2)
  assert checkpointer.save(2, state, iterator)
  checkpointer.wait_until_finished()
  for data, fsdp in [(2, 4), (1, 1)]:
    trainer = trainer_on(data, fsdp)
    fresh_iterator = pipeline.make_train_iterator(config, batch, seed)
    target = checkpoint_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    restored = checkpointer.restore(target, fresh_iterator)
    leaf = restored["params"]["clip"]["text"]["token_embedding"]["embedding"]
    assert leaf.sharding == trainer.state_shardings["params"]["clip"]["text"]["token_embedding"]["embedding"]
    restored, more = run(trainer, restored, fresh_iterator, 2)
    report[f"{data}x{fsdp}"] = losses + more
    np.savez(os.path.join(out_dir, f"{data}x{fsdp}.npz"), **flat_params(restored["params"]))
  checkpointer.close()
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f)


def assert_params_close(a, b, tolerance=1e-5):
  assert sorted(a) == sorted(b)
  for key in a:
    if key.endswith("k_proj/bias"):   # zero gradient: Adam-normalized rounding noise (see test_sharding)
      continue
    np.testing.assert_allclose(a[key], b[key], rtol=tolerance, atol=tolerance, err_msg=key)


def test_restore_onto_another_mesh_and_continue(tmp_path):
  records_dir = write_feature_records(tmp_path / "records")
  run_with_devices("other_mesh_worker", str(records_dir), str(tmp_path), devices=8)
  report = json.loads((tmp_path / "report.json").read_text())
  uninterrupted = dict(np.load(tmp_path / "uninterrupted.npz"))
  for name in ("2x4", "1x1"):
    np.testing.assert_allclose(report[name], report["uninterrupted"], rtol=1e-5, atol=1e-5)
    assert_params_close(dict(np.load(tmp_path / f"{name}.npz")), uninterrupted)


# ---- kill and resume through the command line ---------------------------------------------------------


def wait_for_step(process, workdir, step, timeout=300):
  """Blocks until metrics.jsonl shows `step` (or the process ends)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines() if line.strip()):
      return
    time.sleep(0.01)
  raise AssertionError(f"the run ended or stalled before step {step}: {process.poll()}")


def test_sigterm_and_sigkill_resume_exactly(tmp_path):
  """Uninterrupted run == run preempted by SIGTERM, restarted, killed by SIGKILL, restarted."""
  records_dir = write_feature_records(tmp_path / "records")
  steps = ["--config.train.num_steps=40", "--config.train.checkpoint_every=5", "--config.train.warmup_steps=4"]
  env = subprocess_env(devices=1)
  reference = tmp_path / "reference"
  # The reference also evaluates every 20 steps: that must not change the training.
  done = subprocess.run(train_command(reference, records_dir, *steps, "--config.train.eval_every=20"), env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  history = [json.loads(line) for line in (reference / "eval_history.jsonl").read_text().splitlines()]
  assert [h["step"] for h in history] == [20] and "text_to_video" in history[0]

  workdir = tmp_path / "interrupted"
  run = subprocess.Popen(train_command(workdir, records_dir, *steps), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  wait_for_step(run, workdir, 7)
  run.send_signal(signal.SIGTERM)             # preemption: save the current step and exit cleanly
  out, err = run.communicate(timeout=300)
  assert run.returncode == 0, err[-4000:]
  assert "preempted" in out
  preempted_at = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert preempted_at >= 7 and preempted_at == read_metrics(workdir)[-1]["step"]

  run = subprocess.Popen(train_command(workdir, records_dir, *steps), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
  wait_for_step(run, workdir, preempted_at + 8)
  run.send_signal(signal.SIGKILL)             # no chance to save: resume from the last periodic checkpoint
  run.wait(timeout=60)
  assert run.returncode == -signal.SIGKILL

  done = subprocess.run(train_command(workdir, records_dir, *steps), env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]

  expected, got = read_metrics(reference), read_metrics(workdir)
  assert [m["step"] for m in got] == list(range(1, 41)) == [m["step"] for m in expected]
  for e, g in zip(expected, got):
    for key in ("loss", "loss_video", "loss_frame", "loss_spatial", "loss_mil", "lr"):
      assert g[key] == pytest.approx(e[key], rel=1e-6, abs=1e-7), (g["step"], key)
  (step_a, params_a), (step_b, params_b) = final_params(reference), final_params(workdir)
  assert step_a == step_b == 40
  for key in params_a:
    np.testing.assert_allclose(params_b[key], params_a[key], rtol=1e-6, atol=1e-7, err_msg=key)
  assert list((workdir / "tensorboard").iterdir()), "no TensorBoard event files"

  # `varcmp eval` on the finished run: eval.json in the format and the table on stdout.
  command = train_command(workdir, records_dir, *steps)
  command[command.index("train")] = "eval"
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  result = json.loads((workdir / "eval.json").read_text())
  assert set(result) == {"text_to_video", "video_to_text", "SumR", "levels"}
  assert set(result["levels"]) == {"video", "frame", "spatial"}
  for entry in [result, *result["levels"].values()]:
    for direction in ("text_to_video", "video_to_text"):
      assert set(entry[direction]) == {"R1", "R5", "R10", "MdR", "MnR"}
      assert 0 <= entry[direction]["R1"] <= entry[direction]["R5"] <= entry[direction]["R10"] <= 100
      assert 1 <= entry[direction]["MdR"] <= 16
    assert entry["SumR"] == pytest.approx(sum(entry[d][f"R{k}"] for d in ("text_to_video", "video_to_text")
                                              for k in (1, 5, 10)))
  assert "combined" in done.stdout and "SumR" in done.stdout


# ---- two processes through jax.distributed ----------------------------------------------------------


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def one_process_reference_worker(records_dir: str, out_dir: str, steps: int):
  """The same training on one process with 4 devices, fed the concatenation of both processes' shards."""
  import jax
  from varcmp_jax.data import pipeline
  from varcmp_jax.model.varcmp import VarCMP
  from varcmp_jax.train import sharding
  from varcmp_jax.train.step import Trainer
  config = load_config("tiny_text", "features")
  config.data.records, config.mesh.fsdp, config.train.num_steps = records_dir, 2, steps
  trainer = Trainer(VarCMP(config.model, task=config.task, regime=config.regime), config,
                    sharding.make_mesh(config.mesh))
  shards = [pipeline.make_train_iterator(config, config.train.batch_size // 2, config.seed, shard_index=i,
                                         shard_count=2) for i in range(2)]
  state, losses = trainer.init_state(config.seed), []
  for _ in range(steps):
    parts = [next(s) for s in shards]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    losses.append(float(metrics["loss"]))
  np.savez(os.path.join(out_dir, "reference.npz"), **flat_params(state["params"]))
  with open(os.path.join(out_dir, "reference.json"), "w") as f:
    json.dump(losses, f)


def test_two_processes_match_one_process(tmp_path):
  """`varcmp train` on 2 local processes x 2 CPU devices (gloo collectives) == 1 process x 4 devices."""
  records_dir = write_feature_records(tmp_path / "records")
  steps = 6
  workdir = tmp_path / "two_processes"
  command = train_command(workdir, records_dir, f"--config.train.num_steps={steps}", "--config.mesh.fsdp=2")
  coordinator = f"127.0.0.1:{free_port()}"
  runs = []
  for i in range(2):
    env = subprocess_env(None, JAX_NUM_CPU_DEVICES="2", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                         VARCMP_COORDINATOR=coordinator, VARCMP_NUM_PROCESSES="2", VARCMP_PROCESS_ID=str(i))
    runs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  run_with_devices("one_process_reference_worker", str(records_dir), str(tmp_path), steps, devices=4)
  outputs = [r.communicate(timeout=600) for r in runs]
  for r, (_, err) in zip(runs, outputs):
    assert r.returncode == 0, err[-6000:]

  expected = json.loads((tmp_path / "reference.json").read_text())
  got = [m["loss"] for m in read_metrics(workdir)]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  step, params = final_params(workdir)
  assert step == steps
  assert_params_close(params, dict(np.load(tmp_path / "reference.npz")))
