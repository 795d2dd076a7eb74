"""The chips a step is compiled for: a TPU slice by name (deviceless), or this machine's GPUs or TPUs."""
import dataclasses
import importlib.util
import re

import jax
from jax.experimental import topologies

from varcmp_jax import flops
from varcmp_jax.pod import CompileError

TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v5e:16x16, v5p:2x2x1, v5p:4x4x4, v6e:2x2, v6e:16x16, v4:2x2x1"


@dataclasses.dataclass
class Target:
  """The chips a program is compiled for."""
  name: str                 # the topology's name, or "local"
  devices: list             # one per chip: the mesh's devices
  kind: str                 # jax's device_kind ("TPU v5 lite")
  platform: str             # as varcmp_jax.flops counts for it: "tpu", "cuda", "rocm"
  peak: object              # flops.Peak, or None when the chip is not in flops.PEAKS
  hbm: int | None           # bytes of memory per chip the program must fit in
  hbm_source: str           # where that figure comes from

  @property
  def chips(self) -> int:
    return len(self.devices)


def topology_options(name: str) -> dict:
  """get_topology_desc's keywords for a slice as the hardware wires it (MaxText's train_compile does the same):
  v4 and v5p chips as one megacore device each (their two TensorCores, all the chip's HBM); wraparound links on
  whole v4/v5p cubes (every side a multiple of 4) and on the 16-chip sides of v5e/v6e; slices smaller than a host
  (v5e:1x1) as one host of that size."""
  match = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", name)
  if not match:
    return {}
  family, dims = match.group(1), [int(d) for d in match.group(2).split("x")]
  options = {"chips_per_host_bounds": (min(dims[0], 2), min(dims[1], 2), 1)}
  if family in ("v4", "v5p"):
    options["chip_config_name"] = "megacore"
    if len(dims) == 3:
      options["wrap"] = (all(d % 4 == 0 for d in dims),) * 3
  elif family in ("v5e", "v6e") and len(dims) == 2:
    options["wrap"] = (dims[0] == 16, dims[1] == 16, False)
  return options


def tpu_target(name: str, hbm_bytes: int | None = None) -> Target:
  """The chips of TPU topology `name` ("v5e:2x2"), deviceless. CompileError when libtpu is missing or jax does not
  know the name."""
  if importlib.util.find_spec("libtpu") is None:
    raise CompileError(f"--topology {name}: deviceless TPU compilation needs libtpu, which is not installed: "
                       f"pip install 'jax[tpu]=={jax.__version__}' (or, in a clone, pip install -e '.[tpu]')")
  try:
    topology = topologies.get_topology_desc(platform="tpu", topology_name=name, **topology_options(name))
  except Exception as e:  # pylint: disable=broad-except  # libtpu's refusal, whatever its type
    reason = " ".join(str(e).split())[:240]
    raise CompileError(f"--topology {name}: not a TPU slice jax can compile for ({reason}); "
                       f"examples: {TOPOLOGY_EXAMPLES}") from None
  # One device per chip (a chip with two TensorCores that are not a megacore shows them as two devices).
  devices = [d for d in topology.devices if getattr(d, "core_on_chip", 0) == 0]
  return _target(name, devices, "tpu", hbm_bytes)


def local_target(hbm_bytes: int | None = None) -> Target:
  """The accelerators of this machine; CompileError when it has none."""
  devices = jax.devices()
  if devices[0].platform == "cpu":
    raise CompileError("no GPU or TPU here (jax sees only the CPU): pass --topology NAME to compile for a TPU "
                       f"slice, e.g. {TOPOLOGY_EXAMPLES}")
  return _target("local", devices, flops.lowering_platform(devices[0]), hbm_bytes)


def _target(name, devices, platform, hbm_bytes) -> Target:
  kind = devices[0].device_kind
  peak = flops.peak_of_kind(kind)
  if hbm_bytes is not None:
    return Target(name, devices, kind, platform, peak, int(hbm_bytes), "--hbm-bytes")
  limit = _allocator_limit(devices[0]) if name == "local" else None
  if limit:
    return Target(name, devices, kind, platform, peak, limit, "the device's allocator limit (memory_stats)")
  if peak is None or not peak.hbm_capacity:
    raise CompileError(f"no HBM figure for {kind!r} in varcmp_jax.flops.PEAKS: pass --hbm-bytes N (bytes per chip)")
  return Target(name, devices, kind, platform, peak, int(peak.hbm_capacity), f"datasheet: {peak.source}")


def _allocator_limit(device) -> int | None:
  try:
    return int((device.memory_stats() or {}).get("bytes_limit") or 0) or None
  except Exception:  # pylint: disable=broad-except  # a backend without memory_stats
    return None
