"""Peak memory for the benchmarks: the accelerator's own counter, else this process's peak resident set."""
import resource


def host_peak_bytes() -> int:
  """The process's peak resident set (VmHWM).

  Not getrusage's ru_maxrss alone: it survives exec, so a peer a benchmark starts as a subprocess would
  report its parent's peak.
  """
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def jax_peak_bytes() -> tuple[int, str]:
  """(bytes, what was measured): the first local device's peak_bytes_in_use, else the host peak."""
  import jax  # here, not at the top: the PyTorch peers measure host memory without jax loaded
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return host_peak_bytes(), "host peak RSS"
