"""Matmul FLOPs of a JAX function, counted from its jaxpr; MFU and a roofline time against the device's peaks.

  count = flops.count(step, state, batch)    # traces (never runs) any function, jitted or not
  count = flops.count_jaxpr(traced.jaxpr)    # or what jax.jit(step).trace(state, batch) traced
  count.executed, count.model                # FLOPs of one call, all devices together
  count.bf16_share                           # the share of executed FLOPs whose operands are both bf16
  peak = flops.device_peak(jax.devices()[0]) # datasheet dense bf16 FLOP/s and HBM bytes/s, or None
  flops.mfu(count.model, seconds, peak, devices=jax.device_count())

Why the jaxpr: the count is the same on every backend and carries the dtypes the program asked for. Counting
the compiled HLO's `dot` instructions misses the GEMMs that XLA:GPU lowers to cuBLAS custom calls (an H200 run
saw 0.37 of 5.5 TFLOP that way), and XLA:CPU may run bf16 dots in float32.

What is counted:
- dot_general: 2 x prod(output shape) x prod(contracted dims); conv_general_dilated: 2 x prod(output shape) x
  the kernel's window x its input features / the input dilation. Elementwise work (norms, softmax, the optimizer) is not counted:
  MFU's convention, and small next to the contractions here.
- Loops: a scan body (lax.map is a scan) counts `length` times; a while loop, whose trip count the jaxpr does
  not know, counts once (`unknown_loops` says how many such loops there were); a cond its costliest branch.
- shard_map: its body has per-device shapes and runs once per device of its manual mesh axes.
- Executed vs model FLOPs: executed FLOPs include the forward work that is computed twice: what jax.checkpoint
  recomputes in the backward pass (equations JAX names "rematted_computation") and any region run under
  `jax.named_scope(RECOMPUTED)` (GradCache's gradient-free embedding pass). Model FLOPs leave that out:
  forward + backward once, the numerator of MFU.
"""
import dataclasses
import math

import jax
import numpy as np

RECOMPUTED = "varcmp_recomputed"          # named_scope of a region whose work is repeated later on purpose
_JAX_REMAT = "rematted_computation"      # jax's own name scope for the recomputed forward of a checkpoint
_LOW_PRECISION = ("bfloat16",)


@dataclasses.dataclass
class Count:
  """FLOPs of one call of a function, summed over all devices."""
  executed: float = 0.0
  model: float = 0.0
  by_dtype: dict = dataclasses.field(default_factory=dict)   # operand dtypes ("bfloat16", "float32 x bfloat16") -> executed
  sites: dict = dataclasses.field(default_factory=dict)      # (scope, operation, shapes) -> [executions, executed FLOPs]
  unknown_loops: int = 0                                     # while loops counted once (trip count unknown)
  io_bytes: int = 0                                          # bytes of the call's inputs and outputs

  def add(self, other: "Count"):
    self.executed += other.executed
    self.model += other.model
    self.unknown_loops += other.unknown_loops
    for key, value in other.by_dtype.items():
      self.by_dtype[key] = self.by_dtype.get(key, 0.0) + value
    for site, (runs, total) in other.sites.items():
      entry = self.sites.setdefault(site, [0.0, 0.0])
      entry[0] += runs
      entry[1] += total

  @property
  def bf16_share(self) -> float:
    low = sum(f for dtypes, f in self.by_dtype.items() if dtypes in _LOW_PRECISION)
    return low / self.executed if self.executed else 0.0

  def top(self, n: int = 8) -> list[tuple[str, float, float]]:
    """The n costliest contraction sites: (description, executions per call, executed FLOPs)."""
    rows = sorted(self.sites.items(), key=lambda kv: -kv[1][1])[:n]
    return [(site, runs, total) for site, (runs, total) in rows]


def _dims(var) -> tuple[int, ...]:
  return tuple(int(d) for d in var.aval.shape)


def _contraction_flops(eqn) -> float | None:
  """FLOPs of one execution of a dot_general / conv_general_dilated equation, None for anything else."""
  name = eqn.primitive.name
  if name == "dot_general":
    (contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = _dims(eqn.invars[0])
    return 2.0 * math.prod(_dims(eqn.outvars[0])) * math.prod(lhs[d] for d in contracting)
  if name == "conv_general_dilated":
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec     # (out features, in features, *window)
    rhs = _dims(eqn.invars[1])
    per_output = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
    # An input-dilated conv (the input gradient of a strided one) multiplies the holes' zeros: not work.
    per_output /= math.prod(eqn.params.get("lhs_dilation") or (1,))
    return 2.0 * math.prod(_dims(eqn.outvars[0])) * per_output
  return None


def _sub_jaxprs(eqn, platform: str):
  """(jaxpr, executions per execution of eqn, is-a-branch) for the jaxprs inside an equation. Of a
  jax.lax.platform_dependent choice only the branch that `platform` compiles."""
  params, name = eqn.params, eqn.primitive.name
  if name == "cond" and params.get("branches_platforms"):
    chosen = [i for i, names in enumerate(params["branches_platforms"]) if names and platform in names]
    chosen = chosen or [i for i, names in enumerate(params["branches_platforms"]) if names is None]
    yield params["branches"][chosen[0]].jaxpr, 1, False
    return
  repeat = 1
  if name == "scan":
    repeat = int(params["length"])
  elif name == "shard_map":
    mesh = params["mesh"]
    axes = (params.get("newly_manual_axes") or params.get("manual_axes") or params.get("axis_names")
            or mesh.axis_names)
    repeat = math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in axes)
  for key, value in params.items():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(item, "jaxpr", item)            # ClosedJaxpr -> Jaxpr
      if hasattr(inner, "eqns"):
        yield inner, repeat, name == "cond" and key == "branches"


def _walk(jaxpr, runs: float, recomputed: bool, count: Count, platform: str):
  for eqn in jaxpr.eqns:
    scope = str(eqn.source_info.name_stack)
    again = recomputed or _JAX_REMAT in scope or RECOMPUTED in scope
    flops = _contraction_flops(eqn)
    if flops is not None:
      total = flops * runs
      dtypes = [str(v.aval.dtype) for v in eqn.invars[:2]]
      key = dtypes[0] if dtypes[0] == dtypes[1] else " x ".join(dtypes)
      site = (f"{scope.rsplit('/', 1)[-1] or eqn.primitive.name}: {key} "
              f"{list(_dims(eqn.invars[0]))} x {list(_dims(eqn.invars[1]))} -> {list(_dims(eqn.outvars[0]))}")
      count.add(Count(executed=total, model=0.0 if again else total, by_dtype={key: total},
                      sites={site: [runs, total]}))
      continue
    if eqn.primitive.name == "while":
      count.unknown_loops += 1
    branches = []
    for inner, repeat, is_branch in _sub_jaxprs(eqn, platform):
      if is_branch:
        branches.append(inner)
      else:
        _walk(inner, runs * repeat, again, count, platform)
    if branches:   # a cond runs one branch: count the costliest
      costs = []
      for branch in branches:
        costs.append(Count())
        _walk(branch, runs, again, costs[-1], platform)
      count.add(max(costs, key=lambda c: c.executed))


def lowering_platform(device=None) -> str:
  """The platform a program for `device` (default: the first device) is lowered for, as jax.lax.platform_dependent
  names it: "cpu", "tpu", "cuda" or "rocm" (both GPUs are platform "gpu"; the backend's version tells them apart)."""
  device = device or jax.devices()[0]
  if device.platform != "gpu":
    return device.platform
  return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


def _nbytes(aval) -> int:
  return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize if hasattr(aval, "shape") else 0


def count(fn, *args, platform: str | None = None) -> Count:
  """The matmul FLOPs of one call fn(*args), traced with jax.make_jaxpr (arrays or ShapeDtypeStructs), as
  compiled for `platform` ("cpu", "cuda", "rocm", "tpu"; default: the default backend's)."""
  return count_jaxpr(jax.make_jaxpr(fn)(*args), platform)


def count_jaxpr(closed, platform: str | None = None) -> Count:
  """`count` of a traced program's ClosedJaxpr, e.g. `jax.jit(f).trace(*args).jaxpr`: one trace serves both the
  count and the compilation (`.lower().compile()`)."""
  result = Count()
  _walk(closed.jaxpr, 1.0, False, result, platform or lowering_platform())
  result.io_bytes = sum(_nbytes(v.aval) for v in closed.jaxpr.invars) + sum(
      _nbytes(v.aval) for v in closed.jaxpr.outvars if hasattr(v, "aval"))
  return result


# ---- the devices' peaks ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Peak:
  """A chip's datasheet figures."""
  flops: float              # dense bf16 matmul FLOP/s (datasheet, no sparsity)
  hbm_bytes: float          # memory bandwidth, bytes/s
  hbm_capacity: float = 0   # memory per chip, bytes (varcmp compile's "fits"); 0: not known
  source: str = ""          # where the three figures come from


_GIB = 2 ** 30
# Capacities in GiB: the datasheets' "GB" of HBM are binary (TPU v4's page writes 32 GiB; for a v5e's "16 GB" the
# TPU compiler offers 15.75 GiB, more than 16e9 bytes; 31.25 of a v6e's 32, 30.75 of a v4's 32 and 95.74 GiB on a
# v5p, whose "95 GB" is so a little conservative). NVIDIA's bf16 figures are quoted "with sparsity": halved here.
_TPU_DOCS = "Cloud TPU docs, system architecture, https://cloud.google.com/tpu/docs/"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/"
_A100 = "NVIDIA A100 datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/" \
        "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
# jax's device_kind -> datasheet figures; the first pattern contained in the kind wins (so the more specific
# pattern comes first: "H100 PCIe" and "H100 NVL" before "H100", "GH200" before "H200").
PEAKS = (
    ("H100 PCIe", Peak(756e12, 2.0e12, 80 * _GIB, f"{_H100}: H100 PCIe, bf16 1,513 TFLOPS sparse, 80 GB, 2 TB/s")),
    ("H100 NVL", Peak(835e12, 3.9e12, 94 * _GIB, f"{_H100}: H100 NVL, bf16 1,671 TFLOPS sparse, 94 GB, 3.9 TB/s")),
    ("H100", Peak(989e12, 3.35e12, 80 * _GIB, f"{_H100}: H100 SXM, bf16 1,979 TFLOPS sparse, 80 GB, 3.35 TB/s")),
    ("GH200", Peak(989e12, 4.0e12, 96 * _GIB, "NVIDIA GH200 Grace Hopper Superchip datasheet, "
                                              "https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/: "
                                              "96 GB HBM3, 4 TB/s")),
    ("H200", Peak(989e12, 4.8e12, 141 * _GIB, "NVIDIA H200 datasheet, https://www.nvidia.com/en-us/data-center/h200/: "
                                              "H200 SXM, bf16 1,979 TFLOPS sparse, 141 GB, 4.8 TB/s")),
    ("B200", Peak(2250e12, 8.0e12, 180 * _GIB, "NVIDIA DGX B200 datasheet, https://www.nvidia.com/en-us/data-center/"
                                               "dgx-b200/: 1,440 GB HBM3e for 8 GPUs, 8 TB/s each; HGX B200 bf16 "
                                               "4.5 PFLOPS sparse")),
    ("A100-SXM4-80GB", Peak(312e12, 2.039e12, 80 * _GIB, f"{_A100}: A100 80GB SXM, bf16 312 TFLOPS, 2,039 GB/s")),
    ("A100 80GB PCIe", Peak(312e12, 1.935e12, 80 * _GIB, f"{_A100}: A100 80GB PCIe, bf16 312 TFLOPS, 1,935 GB/s")),
    ("A100", Peak(312e12, 1.555e12, 40 * _GIB, f"{_A100}: A100 40GB, bf16 312 TFLOPS, 1,555 GB/s")),
    ("L4", Peak(121e12, 0.3e12, 24 * _GIB, "NVIDIA L4 datasheet, https://www.nvidia.com/en-us/data-center/l4/: "
                                           "bf16 242 TFLOPS sparse, 24 GB, 300 GB/s")),
    ("TPU v4", Peak(275e12, 1.2e12, 32 * _GIB, f"{_TPU_DOCS}v4: 275 TFLOPS bf16, HBM2 32 GiB, 1200 GBps per chip")),
    ("TPU v5 lite", Peak(197e12, 0.819e12, 16 * _GIB, f"{_TPU_DOCS}v5e: 197 TFLOPS bf16, HBM2 16 GB, 819 GBps")),
    ("TPU v5e", Peak(197e12, 0.819e12, 16 * _GIB, f"{_TPU_DOCS}v5e: 197 TFLOPS bf16, HBM2 16 GB, 819 GBps")),
    ("TPU v5", Peak(459e12, 2.765e12, 95 * _GIB, f"{_TPU_DOCS}v5p: 459 TFLOPS bf16, HBM2e 95 GB, 2765 GBps")),
    ("TPU v6 lite", Peak(918e12, 1.638e12, 32 * _GIB, f"{_TPU_DOCS}v6e: 918 TFLOPS bf16, HBM 32 GB, 1638 GBps")),
)


def peak_of_kind(kind: str) -> Peak | None:
  """The datasheet figures of a device_kind ("NVIDIA H100 80GB HBM3", "TPU v5 lite"), None when unknown."""
  return next((peak for pattern, peak in PEAKS if pattern in kind), None)


def device_peak(device=None) -> Peak | None:
  """The datasheet peaks of `device` (default: the first device), None when unknown (a CPU)."""
  return peak_of_kind((device or jax.devices()[0]).device_kind)


def mfu(flops_per_step: float, step_seconds: float, peak: Peak | None, devices: int = 1) -> float | None:
  """Model FLOPs utilization: FLOPs per second against the peak of `devices` devices; None without a peak."""
  if peak is None or not step_seconds > 0:
    return None
  return flops_per_step / step_seconds / (peak.flops * devices)


def roofline_seconds(count_: Count, peak: Peak, devices: int = 1) -> float:
  """A lower bound on a step's time: max(executed FLOPs / peak, the bytes it must move / bandwidth), where the
  bytes are its inputs read and outputs written once (state, batch), spread over the devices."""
  return max(count_.executed / (peak.flops * devices), count_.io_bytes / (peak.hbm_bytes * devices))
