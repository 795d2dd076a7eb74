"""Time to the first train step without and with the persistent compilation cache (config.compilation_cache).

  python benchmarks/compile_cache.py            # configs/ucfcrime_ar.py:features (ViT-B/16 text tower, T=256)
                                                # at batch 16 on random records, and configs/synthetic.py

Each config trains one step twice, each time on a fresh workdir, with one fresh cache folder ($XDG_CACHE_HOME):
the first run compiles and fills the cache, the second is what a resume, another seed or an evaluation of the same
config pays. "to first step" is the time from starting `varcmp train` until its step is compiled (the line
`step compiled in ...`); the rows are printed as measured, with the cache's size on disk.
"""
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import train_step  # benchmarks/train_step.py: random records

ROOT = pathlib.Path(__file__).resolve().parents[1]


def folder_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def time_to_first_step(command: list[str], env: dict) -> tuple[float, float]:
  """(seconds until the step is compiled, total seconds), streaming the run's output."""
  start = time.perf_counter()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
  first = None
  for line in proc.stdout:
    if first is None and "step compiled in" in line:
      first = time.perf_counter() - start
      print(f"    {line.strip()}", flush=True)
  if proc.wait():
    raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode})")
  return first, time.perf_counter() - start


def main() -> int:
  varcmp = [sys.executable, "-m", "varcmp_jax.cli", "train"]
  print("| config | run | cache | to first step s | total s | cache on disk MB |\n| --- | --- | --- | --- | --- | --- |",
        flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    features = tmp / "features_records"
    features.mkdir()
    config = train_step.make_config("features", batch=16)
    train_step.write_random_records(str(features), config, 32)
    synthetic = tmp / "synthetic_records"
    subprocess.run([sys.executable, "-m", "varcmp_jax.cli", "synth", "--out", str(tmp / "videos"), "--videos", "24"],
                   check=True, capture_output=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "varcmp_jax.cli", "prep", "--dataset", "folder", "--videos", str(tmp / "videos"),
                    "--captions", str(tmp / "videos" / "captions.csv"), "--out", str(synthetic), "--snippets", "16",
                    "--image-size", "32"], check=True, capture_output=True, cwd=ROOT)
    cases = {
        "ucfcrime_ar.py:features B=16": ["configs/ucfcrime_ar.py:features", f"--config.data.records={features}",
                                         "--config.train.batch_size=16", "--config.data.resident=on",
                                         "--config.train.lr_mult.image=0.0"],
        "synthetic.py": ["configs/synthetic.py", f"--config.data.records={synthetic}", "--config.train.batch_size=8",
                         "--config.eval.batch_size=8"],
    }
    for name, (config_file, *overrides) in cases.items():
      cache = tmp / f"cache_{len(name)}"
      env = dict(os.environ, XDG_CACHE_HOME=str(cache), PYTHONPATH=str(ROOT))
      env.pop("JAX_COMPILATION_CACHE_DIR", None)
      for run, state in (("first", "empty"), ("second", "filled")):
        command = [*varcmp, "--config", config_file, "--workdir", str(tmp / f"run_{name[:3]}_{run}"), *overrides,
                   "--config.train.num_steps=1", "--config.train.warmup_steps=0", "--config.train.checkpoint_every=1"]
        first, total = time_to_first_step(command, env)
        print(f"| {name} | {run} | {state} | {first:.1f} | {total:.1f} | {folder_bytes(cache) / 1e6:.1f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
