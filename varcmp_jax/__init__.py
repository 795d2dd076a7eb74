"""varcmp-jax: VarCMP (AAAI 2025) video anomaly retrieval in JAX/Flax."""
import glob
import os

__version__ = "0.1.0"

_GOOGLE_PCI_VENDOR = "0x1ae0"   # TPU chips show up as PCI devices of this vendor (what JAX itself checks)


def _quiet_libtpu_without_a_tpu():
  """With libtpu installed (the `tpu` extra, for `varcmp compile`), JAX loads it at start-up on every machine. On a
  machine without a TPU it then prints several lines ("could not determine TPU accelerator type", "unexpected worker
  hostname") before falling back to the CPU or GPU, and the first such process holds /tmp/libtpu_lockfile, so a
  second one (a `varcmp compile` beside a training run or a test) cannot start libtpu for deviceless compilation.
  There, name a placeholder host and allow several libtpu processes: JAX's backends and what deviceless compilation
  produces are unchanged (the same memory and collectives were compiled with and without these settings). A TPU
  VM, or a user's own setting, is left alone. Runs when varcmp_jax is imported, before anything loads libtpu."""
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path, encoding="ascii") as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return
    except OSError:
      continue
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

_quiet_libtpu_without_a_tpu()
