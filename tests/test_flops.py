"""varcmp_jax.flops against FLOPs worked out by hand, and the train step against XLA:CPU's own compiled dots."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from varcmp_jax import flops

MATMUL = 2 * 8 * 16 * 16     # one (8, 16) x (16, 16) product


def blocks_remat_and_a_loop(x, w):
  y = jax.checkpoint(lambda x: jnp.tanh(x @ w))(x)                       # recomputed in the backward pass
  z = jax.lax.map(lambda rows: rows @ w, y.reshape(2, 4, 16)).reshape(8, 16)   # a scan of 2 half-size products
  return jnp.sum(z @ w)


def test_loops_remat_and_the_backward_pass_by_hand():
  x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
  forward = flops.count(blocks_remat_and_a_loop, x, w)
  assert forward.executed == forward.model == 3 * MATMUL
  # d/dw: every product's weight gradient, the input gradients of the two later products (x needs none),
  # and the checkpointed tanh(x @ w) once more: executed, not model, FLOPs.
  both = flops.count(jax.jit(jax.value_and_grad(blocks_remat_and_a_loop, argnums=1)), x, w)
  assert both.model == (3 + 3 + 2) * MATMUL
  assert both.executed == both.model + MATMUL
  assert both.by_dtype == {"float32": both.executed} and both.bf16_share == 0.0
  assert both.io_bytes == (8 * 16 + 16 * 16 + 1 + 16 * 16) * 4
  assert sum(total for _, _, total in both.top(100)) == both.executed


def test_recomputed_scope_operand_dtypes_and_while_loops():
  def f(x, w):
    with jax.named_scope(flops.RECOMPUTED):
      x @ w
    y = x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)
    return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ w), (0, y.astype(jnp.float32)))
  count = flops.count(f, jnp.ones((8, 16)), jnp.ones((16, 16)))
  assert count.executed == 3 * MATMUL and count.model == 2 * MATMUL     # the while body once: its trips are unknown
  assert count.unknown_loops == 1
  assert count.by_dtype == {"float32": 2 * MATMUL, "bfloat16": MATMUL}
  assert count.bf16_share == pytest.approx(1 / 3)


def test_shard_map_counts_every_device_and_cond_its_costliest_branch():
  mesh = jax.sharding.AbstractMesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  def f(x, w, pick):
    per_device = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))(x, w)
    return jax.lax.cond(pick, lambda: per_device @ w @ w, lambda: per_device)
  count = flops.count(f, jax.ShapeDtypeStruct((64, 16), jnp.float32), jnp.ones((16, 16)), True)
  assert count.executed == 8 * MATMUL + 2 * 8 * MATMUL


def test_platform_dependent_counts_the_branch_that_platform_compiles():
  def f(x):
    low = lambda x: jnp.matmul(x.astype(jnp.bfloat16), x.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return jax.lax.platform_dependent(x, cpu=lambda x: x @ x, default=low)
  x = jnp.ones((16, 16))
  assert flops.count(f, x, platform="cpu").by_dtype == {"float32": 2 * 16 ** 3}
  assert flops.count(f, x, platform="cuda").by_dtype == {"bfloat16": 2 * 16 ** 3}
  assert flops.count(f, x, platform="tpu").bf16_share == 1.0


def test_convolution_forward_and_both_gradients():
  # A patch embedding (stride = kernel): forward 2 N H' W' O (kh kw I); its input and kernel gradients the same.
  x, k = jnp.ones((2, 32, 32, 3)), jnp.ones((4, 4, 3, 8))
  conv = lambda x, k: jnp.sum(jax.lax.conv_general_dilated(x, k, (4, 4), "VALID",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")))
  forward = 2 * 2 * 8 * 8 * 8 * (4 * 4 * 3)
  assert flops.count(conv, x, k).executed == forward
  assert flops.count(jax.grad(conv, argnums=(0, 1)), x, k).executed == 3 * forward


def test_train_step_against_the_dots_xla_cpu_compiles():
  # On a CPU every contraction stays a `dot` (or convolution) in the compiled HLO, with its loops' trip counts:
  # an independent count of the same step (frames regime: convolution, towers, chunked loss under lax.map).
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
  from hlo_flops import dot_report
  from varcmp_jax import config as config_lib
  from varcmp_jax.model.varcmp import VarCMP
  from varcmp_jax.train import sharding
  from varcmp_jax.train.step import Trainer, example_batch
  config = config_lib.default_config("text", "frames")
  config.model.clip = config_lib.clip_tiny(image_size=16, patch_size=8, width=32, depth=1)
  config.model.dtype = "float32"
  config.model.temporal = dict(num_layers=1, num_heads=2, mlp_ratio=2, max_len=8)
  config.model.max_words = 6
  config.loss.precision, config.loss.chunk_size = "highest", 3     # 3 does not divide 8: overlapping blocks
  config.data.snippets, config.train.batch_size = 4, 8
  trainer = Trainer(VarCMP(config.model, task="text", regime="frames"), config, sharding.make_mesh(config.mesh))
  batch = trainer.shard_batch(example_batch(config, 8))
  state = trainer.init_state(0)
  count = flops.count(trainer.train_step, state, batch)
  hlo = trainer.train_step.lower(state, batch).compile().as_text()
  conv = 2 * 8 * 4 * 2 * 2 * 32 * (8 * 8 * 3)        # the patch embedding's forward (its gradient: weights only)
  np.testing.assert_allclose(count.executed, dot_report(hlo)["dot_flops"] + 2 * conv, rtol=0.005)
  assert count.model < count.executed       # the similarity blocks are rematerialized


def test_a_cond_counts_its_costliest_branch_wherever_it_stands():
  # lax.cond lists the false branch first: here the costly one. lax.switch: the costliest in the middle.
  def f(x, w, pick):
    return jax.lax.cond(pick, lambda: x, lambda: x @ w @ w)
  assert flops.count(f, jnp.ones((8, 16)), jnp.ones((16, 16)), True).executed == 2 * MATMUL

  def g(x, w, index):
    return jax.lax.switch(index, [lambda: x @ w, lambda: x @ w @ w @ w, lambda: x])
  assert flops.count(g, jnp.ones((8, 16)), jnp.ones((16, 16)), 0).executed == 3 * MATMUL


def test_a_partly_manual_shard_map_runs_once_per_device_of_its_manual_axes():
  # shard_map over "a" of a 2 x 4 mesh: its body (per-"a" shapes, global over "b") runs twice, not 8 times.
  mesh = jax.sharding.AbstractMesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  def f(x, w):
    return jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("a"), P()), out_specs=P("a"),
                         axis_names={"a"})(x, w)
  count = flops.count(f, jax.ShapeDtypeStruct((64, 16), jnp.float32), jnp.ones((16, 16)))
  assert count.executed == 2 * 64 * 16 * 16


def test_roofline_and_mfu_spread_the_work_and_the_bytes_over_the_devices():
  peak = flops.Peak(1e12, 1e9)
  compute_bound = flops.Count(executed=8e12, io_bytes=10)
  memory_bound = flops.Count(executed=8, io_bytes=8e9)
  assert flops.roofline_seconds(compute_bound, peak) == 8.0
  assert flops.roofline_seconds(compute_bound, peak, devices=4) == 2.0
  assert flops.roofline_seconds(memory_bound, peak) == 8.0
  assert flops.roofline_seconds(memory_bound, peak, devices=4) == 2.0
  assert flops.mfu(2e12, 1.0, peak, devices=4) == 0.5
  assert flops.mfu(2e12, 1.0, None) is None and flops.mfu(2e12, 0.0, peak) is None


class FakeDevice:
  def __init__(self, device_kind):
    self.device_kind = device_kind


@pytest.mark.parametrize("kind, tflops, tb_per_s, gib", [
    ("NVIDIA H100 PCIe", 756, 2.0, 80),          # PCIe before SXM: "H100" is in both names
    ("NVIDIA H100 80GB HBM3", 989, 3.35, 80),
    ("NVIDIA H100 NVL", 835, 3.9, 94),
    ("NVIDIA GH200 480GB", 989, 4.0, 96),        # "H200" is in "GH200"
    ("NVIDIA H200", 989, 4.8, 141),
    ("NVIDIA A100-SXM4-80GB", 312, 2.039, 80),
    ("NVIDIA A100 80GB PCIe", 312, 1.935, 80),
    ("NVIDIA A100-SXM4-40GB", 312, 1.555, 40),
    ("TPU v4", 275, 1.2, 32),
    ("TPU v5 lite", 197, 0.819, 16),
    ("TPU v5", 459, 2.765, 95),                   # v5p's device_kind: after "TPU v5 lite"
    ("TPU v6 lite", 918, 1.638, 32),
])
def test_device_peak_by_device_kind(kind, tflops, tb_per_s, gib):
  peak = flops.device_peak(FakeDevice(kind))
  expected = (tflops * 1e12, tb_per_s * 1e12, gib * 2 ** 30)
  assert (peak.flops, peak.hbm_bytes, peak.hbm_capacity) == pytest.approx(expected, rel=1e-12)
  assert peak.source.startswith(("NVIDIA", "Cloud TPU docs")) and "http" in peak.source


def test_no_peak_for_a_cpu():
  assert flops.device_peak(FakeDevice("cpu")) is None


def test_lowering_platform_tells_cuda_from_rocm():
  from types import SimpleNamespace
  gpu = lambda version: SimpleNamespace(platform="gpu", client=SimpleNamespace(platform_version=version))
  assert flops.lowering_platform(gpu("PJRT C API\ncuda 12080")) == "cuda"
  assert flops.lowering_platform(gpu("PJRT C API\nrocm 60300")) == "rocm"
  assert flops.lowering_platform(SimpleNamespace(platform="tpu")) == "tpu"
  assert flops.lowering_platform() == "cpu"          # this machine's default device
