"""JAX's persistent compilation cache, on by default (config.compilation_cache; SPEC section 4).

  compilation_cache.enable(config.get("compilation_cache", True))   # before the first jit compiles

Compiling the features train step takes ~50 s on a GPU; with the cache, a resume, a run with another seed or an
evaluation of the same config loads the compiled program from disk instead. The cache lives in
$XDG_CACHE_HOME/varcmp/jax (else ~/.cache/varcmp/jax), or wherever JAX_COMPILATION_CACHE_DIR already points.
Entries are keyed by the program, the JAX/XLA version, the flags and the devices, so a stale one is never used.
The folder is capped at MAX_BYTES (least recently used entries go first); the cap also makes JAX lock the folder
around reads and writes, so that processes compiling the same program at once (the hosts of one machine, test
workers) never read a half-written entry. Delete the folder to reclaim its space.
"""
import os

import jax

# Programs that compile faster than this are not worth a disk read (JAX's default is 1 s; the train step's
# initialization and the small eval programs take ~0.1-1 s on a CPU and add up at start-up).
MIN_COMPILE_SECONDS = 0.1
MAX_BYTES = 4 * 2 ** 30


def directory() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "varcmp", "jax")


def enable(enabled: bool = True) -> str | None:
  """Turns the cache on and returns its folder, or off (`enabled` false) and returns None; None also when the
  folder cannot be made. JAX settles the cache at the process's first compilation: call this before it."""
  jax.config.update("jax_enable_compilation_cache", bool(enabled))
  if not enabled:
    return None
  path = jax.config.jax_compilation_cache_dir or directory()   # a folder the user chose wins
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:   # a read-only home: run without the cache rather than fail
    print(f"note: no compilation cache ({path}: {e.strerror})", flush=True)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path
