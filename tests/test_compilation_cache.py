"""The persistent compilation cache (config.compilation_cache): filled by a first process, read by a second,
left alone when the switch is off."""
import json
import os
import subprocess
import sys

from varcmp_jax import compilation_cache

# Compiles one program with the cache on or off; prints the cache events JAX reported and the folder's files.
SCRIPT = """
import json, os, sys
import jax, jax.numpy as jnp
from varcmp_jax import compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
folder = compilation_cache.enable(sys.argv[1] == "on")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)   # even this small program is kept
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
folder = folder or compilation_cache.directory()
files = sorted(f for f in os.listdir(folder) if f.startswith("jit__lambda")) if os.path.isdir(folder) else []
print(json.dumps({"hits": [e for e in events if "cache_hits" in e], "files": files}))
"""


def run(env, switch):
  out = subprocess.run([sys.executable, "-c", SCRIPT, switch], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_what_the_first_compiled_and_off_writes_nothing(tmp_path):
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  assert run(env, "off") == {"hits": [], "files": []}
  first = run(env, "on")
  assert not first["hits"] and len([f for f in first["files"] if f.endswith("-cache")]) == 1
  second = run(env, "on")
  assert second["hits"] and second["files"] == first["files"]


def test_folder_follows_xdg_and_home(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compilation_cache.directory() == str(tmp_path / "xdg" / "varcmp" / "jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compilation_cache.directory() == str(tmp_path / "home" / ".cache" / "varcmp" / "jax")
