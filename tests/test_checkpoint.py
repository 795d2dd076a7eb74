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


# ---- what does not restore, signals, failed saves ----------------------------------------------------


def small_state(step):
  import jax.numpy as jnp
  return {"w": jnp.full((64, 64), float(step)), "b": jnp.arange(8.0) + step, "step": jnp.asarray(step)}


def test_restore_newest_skips_checkpoints_that_do_not_restore(tmp_path, capfd):
  """A truncated checkpoint and an empty step directory are skipped for the newest one that restores, each
  named with its reason in one line, without the "Event loop is closed" tracebacks of the failed reads."""
  import jax
  from varcmp_jax.train import checkpoint as checkpoint_lib
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=5)
  for step in (1, 2, 3):
    checkpointer.save(step, small_state(step), force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  directory = tmp_path / "checkpoints"
  for data in (directory / "3" / "state").rglob("d/*"):
    with open(data, "r+b") as f:
      f.truncate(10)                               # torn: a crash or a full disk mid-write
  (directory / "4").mkdir()                        # a step directory without its items
  (directory / "5.orbax-checkpoint-tmp-1732").mkdir()     # an interrupted save
  capfd.readouterr()

  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=5)
  target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                  small_state(0))
  state, step, skipped = checkpointer.restore_newest(target)
  assert step == 2 and float(state["w"][0, 0]) == 2.0 and int(state["step"]) == 2
  assert [s for s, _ in skipped] == [4, 3]
  assert 'Item "state" was not found' in skipped[0][1]
  assert "checkpoints/3/state" in skipped[1][1] and len(skipped[1][1]) <= 240
  err = capfd.readouterr().err
  assert "note: skipping checkpoint 4: " in err and "note: skipping checkpoint 3: " in err
  assert "Traceback" not in err and "Event loop is closed" not in err and "Exception ignored" not in err

  assert checkpointer.partial_saves() == ["5.orbax-checkpoint-tmp-1732"]
  checkpointer.remove_partial_saves()
  checkpointer.set_aside([4, 3])                   # kept for the user, out of Orbax's way
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]
  assert sorted(p.name for p in (tmp_path / checkpoint_lib.UNRESTORABLE_DIR).iterdir()) == ["3", "4"]
  assert checkpointer.save(3, small_state(3))      # the step number is free again
  checkpointer.wait_until_finished()
  assert checkpointer.restore_newest(target)[1] == 3
  checkpointer.close()
  with pytest.raises(checkpoint_lib.NoCheckpoint, match="checkpoints/9 does not restore"):
    checkpoint_lib.Checkpointer(str(tmp_path), 1, 5, read_only=True).restore(target, None, 9)


def test_sigint_and_sigterm_ask_to_save_and_stop(capsys):
  from varcmp_jax.train import checkpoint as checkpoint_lib
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with checkpoint_lib.StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.received == "SIGTERM"
  with checkpoint_lib.StopSignals() as stop:
    assert stop.received is None
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.received == "SIGINT"
    assert "saving a checkpoint at the end of this step" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):       # a second Ctrl-C stops at once
      os.kill(os.getpid(), signal.SIGINT)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def failed_save_worker(workdir: str):
  """A real failed Orbax save: a file-size limit (EFBIG, as unprivileged as a full disk gets) after step 1."""
  import resource
  import jax.numpy as jnp
  from varcmp_jax.train import checkpoint as checkpoint_lib
  from varcmp_jax.train import workdir as workdir_lib
  checkpointer = checkpoint_lib.Checkpointer(workdir, every=1, keep=1)
  checkpointer.save(1, {f"w{i}": jnp.full((4,), float(i)) for i in range(40)})
  checkpointer.wait_until_finished()
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))    # Python ignores SIGXFSZ: writes get EFBIG
  with checkpoint_lib.quiet_failed_saves():
    try:
      noise = np.random.default_rng(0).normal(size=(40, 50_000)).astype(np.float32)   # incompressible
      checkpointer.save(2, {f"w{i}": jnp.asarray(noise[i]) for i in range(40)})
      checkpointer.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      print("reason:", workdir_lib.out_of_space(e), flush=True)
    try:
      checkpointer.close()
    except Exception:  # pylint: disable=broad-except
      pass
  print("done", flush=True)


def test_a_failed_save_is_recognized_quiet_and_keeps_the_last_checkpoint(tmp_path):
  import jax
  import jax.numpy as jnp
  from varcmp_jax.train import checkpoint as checkpoint_lib
  result = run_with_devices("failed_save_worker", str(tmp_path), devices=1, timeout=120)
  assert "reason: File too large" in result.stdout and "done" in result.stdout
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr[-3000:]
  assert checkpoint_lib.complete_steps(str(tmp_path)) == [1]
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), 1, 1, read_only=True)
  assert [p for p in checkpointer.partial_saves() if p.startswith("2.")]
  target = {f"w{i}": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
      jax.devices()[0])) for i in range(40)}
  restored = checkpointer.restore(target, None, 1)
  assert float(restored["w7"][0]) == 7.0
  checkpointer.close()


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


def newest_checkpoint(workdir):
  return max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_interrupted_killed_and_damaged_runs_resume_exactly(tmp_path):
  """Uninterrupted run == a run stopped by SIGINT (Ctrl-C), restarted, killed by SIGKILL, its newest checkpoint
  and its last metrics line then torn, restarted. On the way: a second writer is refused at once, the dead
  run's lock is taken over, the torn checkpoint and line are skipped with a note, a changed config is refused,
  and `varcmp eval` (without --config) writes eval.json with its step, split and records."""
  records_dir = write_feature_records(tmp_path / "records")
  steps = ["--config.train.num_steps=40", "--config.train.checkpoint_every=5", "--config.train.warmup_steps=4"]
  env = subprocess_env(devices=1)
  reference = tmp_path / "reference"
  # The reference also evaluates every 20 steps: that must not change the training.
  done = subprocess.run(train_command(reference, records_dir, *steps, "--config.train.eval_every=20"), env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  assert "train data: data.resident=auto: on (32 train records" in done.stdout   # resident data, one device
  history = [json.loads(line) for line in (reference / "eval_history.jsonl").read_text().splitlines()]
  assert [h["step"] for h in history] == [20] and "text_to_video" in history[0]

  workdir = tmp_path / "interrupted"
  run = subprocess.Popen(train_command(workdir, records_dir, *steps), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  wait_for_step(run, workdir, 7)
  run.send_signal(signal.SIGSTOP)             # frozen while holding the workdir's lock
  second = subprocess.run(train_command(workdir, records_dir, *steps), env=env, capture_output=True, text=True,
                          timeout=300)
  assert second.returncode == 1
  assert f"is in use by another run (pid {run.pid} on host {socket.gethostname()}, started" in second.stderr
  assert "Traceback" not in second.stderr
  run.send_signal(signal.SIGINT)              # Ctrl-C: save the current step and exit cleanly
  run.send_signal(signal.SIGCONT)
  out, err = run.communicate(timeout=300)
  assert run.returncode == 0, err[-4000:]
  assert "interrupted (SIGINT): saving step" in out
  interrupted_at = newest_checkpoint(workdir)
  assert interrupted_at >= 7 and interrupted_at == read_metrics(workdir)[-1]["step"]

  run = subprocess.Popen(train_command(workdir, records_dir, *steps), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
  wait_for_step(run, workdir, interrupted_at + 8)
  run.send_signal(signal.SIGKILL)             # no chance to save: resume from the last periodic checkpoint
  run.wait(timeout=60)
  assert run.returncode == -signal.SIGKILL
  killed_pid = run.pid
  torn = newest_checkpoint(workdir)
  for data in (workdir / "checkpoints" / str(torn) / "state").rglob("d/*"):
    with open(data, "r+b") as f:
      f.truncate(7)
  (workdir / "checkpoints" / f"{torn + 3}.orbax-checkpoint-tmp-1732").mkdir()
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 99, "loss": 0.1')

  done = subprocess.run(train_command(workdir, records_dir, *steps), env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  for note in [f"taking over the lock of a run that ended without releasing it (pid {killed_pid} ",
               f"skipping checkpoint {torn}: ", f"moved the unrestorable checkpoint {torn} to",
               f"removing {workdir / 'checkpoints'}/{torn + 3}.orbax-checkpoint-tmp-1732: a save that never finished",
               "metrics.jsonl", "dropping a torn last line"]:
    assert note in done.stderr, note
  assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr

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
  assert (workdir / "writer.lock").read_text() == ""

  # Resuming with another learning rate or model is refused, naming the fields; cadence may change.
  from varcmp_jax.train import main as train_main_lib
  command = train_command(workdir, records_dir, *steps)[4:]
  with pytest.raises(SystemExit) as error:
    train_main_lib.train_main(command + ["--config.train.learning_rate=0.5", "--config.model.anomaly_head.hidden=8"])
  assert error.value.code not in (0, None)
  assert "model.anomaly_head.hidden: 16 -> 8; train.learning_rate: 0.001 -> 0.5" in str(error.value)

  # `varcmp eval` reads WORKDIR/config.json: eval.json in the format, with step, split and records.
  done = subprocess.run([sys.executable, "-m", "varcmp_jax.cli", "eval", "--workdir", str(workdir)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  result = json.loads((workdir / "eval.json").read_text())
  assert set(result) == {"step", "split", "records", "ties", "text_to_video", "video_to_text", "SumR", "levels"}
  assert (result["step"], result["split"], result["records"], result["ties"]) == (40, "test", str(records_dir),
                                                                                  "expected")
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


# Global batch 12 on 4 devices: 3 videos per device, loss blocks of 2 (the last one overlaps).
CHUNKED_LOSS = (12, 2)
# The loss contractions of the two-process test run in float32 (loss.precision, whose default is "bf16"): see
# test_two_processes_match_one_process for why.
TWO_PROCESS_PRECISION = "highest"


def one_process_reference_worker(records_dir: str, out_dir: str, steps: int, resident: str):
  """The same training on one process with 4 devices: fed the concatenation of both processes' Grain shards, or
  (resident) the resident feed, whose 4 device blocks are those the two processes place."""
  import jax
  from varcmp_jax.data import pipeline
  from varcmp_jax.model.varcmp import VarCMP
  from varcmp_jax.train import feed as feed_lib
  from varcmp_jax.train import sharding
  from varcmp_jax.train.step import Trainer
  config = load_config("tiny_text", "features")
  config.data.records, config.mesh.fsdp, config.train.num_steps = records_dir, 2, steps
  config.train.batch_size, config.loss.chunk_size = CHUNKED_LOSS   # the partitioned, chunked loss
  config.loss.precision = TWO_PROCESS_PRECISION
  trainer = Trainer(VarCMP(config.model, task=config.task, regime=config.regime), config,
                    sharding.make_mesh(config.mesh))
  state, losses = trainer.init_state(config.seed), []
  if resident == "on":
    feed = feed_lib.ResidentFeed(trainer, config, progress=False)
    rows = [feed.next() for _ in range(steps)]
    run_step = feed.compile(state, rows[0])[0]
  else:
    shards = [pipeline.make_train_iterator(config, config.train.batch_size // 2, config.seed, shard_index=i,
                                           shard_count=2) for i in range(2)]
  for step in range(steps):
    if resident == "on":
      state, metrics = run_step(state, rows[step])
    else:
      parts = [next(s) for s in shards]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    losses.append(float(metrics["loss"]))
  np.savez(os.path.join(out_dir, "reference.npz"), **flat_params(state["params"]))
  with open(os.path.join(out_dir, "reference.json"), "w") as f:
    json.dump(losses, f)


@pytest.mark.parametrize("resident", ["off", "on"])
def test_two_processes_match_one_process(tmp_path, resident):
  """`varcmp train` on 2 local processes x 2 CPU devices (gloo collectives) == 1 process x 4 devices, fed by
  Grain (each process reads its shard) or by resident data (each process places its devices' blocks).

  The two cannot be bit-identical: the cross-device sums (the gradients' all-reduce, the loss's psums) add the
  four devices' partial sums in another order over gloo than in one process, so after a few steps the params
  differ in their last float32 bits (steps 1-3 are bit-identical, then ~1e-7 apart). Under loss.precision="bf16"
  (the default) the similarity contractions round their operands to bf16, and a value that moved by one float32
  ulp can round to the neighbouring bf16 value, 2^-8 away: that made step 5's loss 2.9e-5 apart (5.874557 vs
  5.874725), the same on every run, the failure issue 29 saw. So the comparison runs at "highest" (float32
  contractions; the collectives and data paths under test are the same at any precision, and the bf16 loss on
  8 devices is checked against one device, in one process, in test_sharding), where the difference is the
  summation order alone: measured at most 2.4e-7 relative on the loss (2 float32 ulps) and 5.5e-6 of a param's
  largest value; the tolerance, 1e-5 (84 float32 ulps), leaves room and is far below any real error (a shard fed
  twice or a missing psum moves the loss by percent)."""
  records_dir = write_feature_records(tmp_path / "records")
  steps = 6
  workdir = tmp_path / "two_processes"
  command = train_command(workdir, records_dir, f"--config.train.num_steps={steps}", "--config.mesh.fsdp=2",
                          f"--config.train.batch_size={CHUNKED_LOSS[0]}", f"--config.loss.chunk_size={CHUNKED_LOSS[1]}",
                          f"--config.data.resident={resident}", f"--config.loss.precision={TWO_PROCESS_PRECISION}")
  coordinator = f"127.0.0.1:{free_port()}"
  runs = []
  for i in range(2):
    env = subprocess_env(None, JAX_NUM_CPU_DEVICES="2", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                         VARCMP_COORDINATOR=coordinator, VARCMP_NUM_PROCESSES="2", VARCMP_PROCESS_ID=str(i))
    runs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  run_with_devices("one_process_reference_worker", str(records_dir), str(tmp_path), steps, resident, devices=4)
  outputs = [r.communicate(timeout=600) for r in runs]
  for r, (out, err) in zip(runs, outputs):
    assert r.returncode == 0, err[-6000:]
  assert f"train data: data.resident={resident}" in outputs[0][0]

  expected = json.loads((tmp_path / "reference.json").read_text())
  got = [m["loss"] for m in read_metrics(workdir)]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  step, params = final_params(workdir)
  assert step == steps
  assert_params_close(params, dict(np.load(tmp_path / "reference.npz")))
