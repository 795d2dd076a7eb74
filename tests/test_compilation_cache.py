"""The persistent compilation cache (config.compilation_cache): filled by a first process, read by a second,
left alone when the switch is off."""
import json
import os
import subprocess
import sys

from varcmp_jax import compilation_cache

# Compiles one program with the cache on or off; prints the folder enable() returned, whether JAX's cache is on,
# the cache events JAX reported and the program's cache files in each folder named after the switch.
SCRIPT = """
import json, os, sys
import jax, jax.numpy as jnp
from varcmp_jax import compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
folder = compilation_cache.enable(sys.argv[1] == "on")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)   # even this small program is kept
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
files = {d: sorted(f for f in os.listdir(d) if f.startswith("jit__lambda")) if os.path.isdir(d) else []
         for d in sys.argv[2:]}
print(json.dumps({"folder": folder, "enabled": jax.config.jax_enable_compilation_cache,
                  "hits": [e for e in events if "cache_hits" in e], "files": files}))
"""


def run(env, switch, *folders):
  out = subprocess.run([sys.executable, "-c", SCRIPT, switch, *map(str, folders)], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def cache_files(files):
  return [f for f in files if f.endswith("-cache")]


def test_a_second_process_reads_what_the_first_compiled_and_off_writes_nothing(tmp_path):
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  folder = str(tmp_path / "varcmp" / "jax")
  off = run(env, "off", folder)
  assert (off["folder"], off["enabled"], off["hits"], off["files"]) == (None, False, [], {folder: []})
  first = run(env, "on", folder)
  assert first["folder"] == folder and first["enabled"] and not first["hits"]
  assert len(cache_files(first["files"][folder])) == 1
  second = run(env, "on", folder)
  assert second["hits"] and second["files"] == first["files"]


def test_the_users_folder_wins_and_off_is_off_even_with_a_folder_configured(tmp_path):
  """JAX_COMPILATION_CACHE_DIR (the user's choice) is used instead of ours; with the switch off nothing is
  written even there, though JAX would otherwise cache into a folder configured this way."""
  chosen, ours = tmp_path / "chosen", tmp_path / "xdg" / "varcmp" / "jax"
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_COMPILATION_CACHE_DIR=str(chosen))
  off = run(env, "off", chosen, ours)
  assert (off["folder"], off["enabled"], off["files"]) == (None, False, {str(chosen): [], str(ours): []})
  on = run(env, "on", chosen, ours)
  assert on["folder"] == str(chosen) and on["enabled"]
  assert len(cache_files(on["files"][str(chosen)])) == 1 and on["files"][str(ours)] == []


def test_folder_follows_xdg_and_home(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compilation_cache.directory() == str(tmp_path / "xdg" / "varcmp" / "jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compilation_cache.directory() == str(tmp_path / "home" / ".cache" / "varcmp" / "jax")
