"""The (data, fsdp) mesh: FSDP rules, and the sharded train step equals the single-device step.

The multi-device checks run in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before jax
starts, and other test modules in this session may already have started it).
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from varcmp_jax.train import sharding

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
MESHES = [(8, 1), (4, 2), (2, 4)]
COMPILATION_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"varcmp_jax_test_cache_{os.getuid()}")


def test_fsdp_rules():
  # Matrices shard their largest axis divisible by the fsdp size; vectors and small arrays replicate.
  assert sharding.spec_for("clip/text/layers_0/mlp/fc1/kernel", (64, 256), 4) == P(None, "fsdp")
  assert sharding.spec_for("clip/text/token_embedding/embedding", (49408, 64), 4) == P("fsdp", None)
  assert sharding.spec_for("temporal/attn/kernel", (1000, 4098), 4) == P("fsdp", None)   # 4098 % 4 != 0
  assert sharding.spec_for("clip/text/layers_0/mlp/fc1/bias", (4096,), 4) == P()
  assert sharding.spec_for("temporal/ln/scale", (4096,), 4) == P()
  assert sharding.spec_for("anomaly_head/fc1/kernel", (8, 8), 4) == P()          # too small to bother
  assert sharding.spec_for("clip/x/kernel", (3, 5001), 4) == P()                   # nothing divides by 4
  assert sharding.spec_for("clip/text/layers_0/mlp/fc1/kernel", (64, 256), 1) == P()
  # Optimizer-state leaves mirror their parameter's path, so they get the same spec.
  assert sharding.spec_for("1/0/mu/clip/text/layers_0/mlp/fc1/kernel", (64, 256), 4) == P(None, "fsdp")


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def random_batches(config, count, seed=0):
  from varcmp_jax.train.step import example_batch
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    b = example_batch(config, config.train.batch_size)
    n, t = b["mask"].shape
    for key in ("features", "regions", "mel", "audio_features"):
      if key in b:
        b[key] = rng.normal(size=b[key].shape).astype(np.float32)
    if "frames" in b:
      b["frames"] = rng.integers(0, 256, b["frames"].shape, dtype=np.uint8)
    lengths = rng.integers(5, 20, n)
    b["tokens"][:] = 0
    for i, length in enumerate(lengths):
      b["tokens"][i, 0], b["tokens"][i, 1:length] = 49406, rng.integers(300, 40000, length - 1)
      b["tokens"][i, length] = 49407
    b["mask"] = np.arange(t)[None] < rng.integers(1, t + 1, n)[:, None]
    b["label"] = rng.integers(0, 2, n).astype(np.int32)
    batches.append(b)
  return batches


def flat_params(params):
  import jax
  return {sharding.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def sharded_steps_worker(out_dir: str, config_name: str, config_arg: str):
  """Runs 2 train steps on one device and on each mesh of MESHES; writes params, losses, specs."""
  import jax
  from varcmp_jax.model.varcmp import VarCMP
  from varcmp_jax.train.step import Trainer
  config = load_config(config_name, config_arg)
  batches = random_batches(config, 2)
  model = VarCMP(config.model, task=config.task, regime=config.regime)
  report, initial = {}, None
  for data, fsdp in [(1, 1)] + MESHES:
    config.mesh.data, config.mesh.fsdp = data, fsdp
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:data * fsdp])
    trainer = Trainer(model, config, mesh)
    if initial is None:
      initial = jax.device_get(trainer.init_state(seed=0))
    # The same initial values laid out on this mesh (initialization is not what is compared here).
    state = jax.device_put(initial, trainer.state_shardings)
    losses = []
    for b in batches:
      state, metrics = trainer.train_step(state, trainer.shard_batch(b))
      losses.append(float(metrics["loss"]))
    name = f"{data}x{fsdp}"
    np.savez(os.path.join(out_dir, f"{name}.npz"), **flat_params(state["params"]))
    specs = {sharding.path_str(p): str(v.sharding.spec) for p, v in jax.tree_util.tree_leaves_with_path(state)}
    shard_shapes = {sharding.path_str(p): list(v.addressable_shards[0].data.shape)
                    for p, v in jax.tree_util.tree_leaves_with_path(state)}
    report[name] = {"losses": losses, "specs": specs, "shard_shapes": shard_shapes}
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f)


def subprocess_env(devices: int | None = None, **extra) -> dict[str, str]:
  """Environment for a jax subprocess with `devices` fake CPU devices (None: jax's default).

  The persistent compilation cache lets reruns (and repeated `varcmp train` runs) skip XLA compiles;
  LLVM optimization level 0 roughly halves the compile time of these tiny programs.
  """
  xla_flags = ["--xla_backend_optimization_level=0"]
  if devices:
    xla_flags.append(f"--xla_force_host_platform_device_count={devices}")
  env = dict(os.environ, XLA_FLAGS=" ".join(xla_flags), JAX_COMPILATION_CACHE_DIR=COMPILATION_CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]))
  env.update(extra)
  return env


def run_with_devices(function: str, *args, devices: int = 8, timeout: int = 600):
  module = pathlib.Path(sys._getframe(1).f_code.co_filename).stem
  code = f"import {module}; {module}.{function}(*{list(args)!r})"
  result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(devices), capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
  return result


@pytest.mark.parametrize("config_name, config_arg", [
    ("tiny_text", "features"),
    ("tiny_audio", "frames"),     # image tower on pixels + spectrogram audio tower
])
def test_sharded_step_equals_single_device(tmp_path, config_name, config_arg):
  run_with_devices("sharded_steps_worker", str(tmp_path), config_name, config_arg)
  report = json.loads((tmp_path / "report.json").read_text())
  single = np.load(tmp_path / "1x1.npz")
  for data, fsdp in MESHES:
    name = f"{data}x{fsdp}"
    np.testing.assert_allclose(report[name]["losses"], report["1x1"]["losses"], rtol=1e-5, atol=1e-5)
    sharded = np.load(tmp_path / f"{name}.npz")
    assert sorted(sharded.files) == sorted(single.files)
    for key in single.files:
      if key.endswith("k_proj/bias"):
        # Its gradient is exactly 0 (softmax ignores a constant added to every key); Adam divides the
        # rounding noise by its own magnitude, so the updates are noise of size ~lr on any device count.
        continue
      np.testing.assert_allclose(sharded[key], single[key], rtol=1e-5, atol=1e-5, err_msg=f"{name}: {key}")
  if config_name != "tiny_text":
    return
  # FSDP really shards: on 2x4 the token embedding and its Adam moments live in quarters.
  embedding = "params/clip/text/token_embedding/embedding"
  specs, shapes = report["2x4"]["specs"], report["2x4"]["shard_shapes"]
  key = next(k for k in specs if k.endswith(embedding))
  assert "fsdp" in specs[key] and shapes[key][0] == 49408 // 4
  moments = [k for k in specs if k.startswith("opt_state") and k.endswith("token_embedding/embedding")]
  assert moments and all("fsdp" in specs[k] for k in moments)
  assert "fsdp" not in report["8x1"]["specs"][key]     # fsdp = 1: replicated
