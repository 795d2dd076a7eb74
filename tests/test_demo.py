"""`varcmp demo` end to end on a handful of videos: every stage runs and writes its outputs, the trained model
beats chance, the audio half runs on the same videos, and the output ends with what to run next, as a shell
without the environment on its PATH runs it."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from varcmp_jax import demo
from varcmp_jax import evaluate
from varcmp_jax import metrics


def test_demo_text_and_audio_halves(tmp_path, capsys):
  assert demo.main(["--workdir", str(tmp_path), "--videos", "16", "--steps", "40", "--top-k", "2"]) == 0
  out = capsys.readouterr().out
  result = json.loads((tmp_path / "run" / "eval.json").read_text())
  assert (result["step"], result["split"], result["records"]) == (40, "test", str(tmp_path / "records"))
  assert set(metrics.directions(result)) == {"text_to_video", "video_to_text"}
  # The printed table is the eval.json's; the search example ranks 2 videos with the segment column.
  assert metrics.format_table(result) in out
  assert "key segments (s)" in out and "ground truth: synth_" in out
  r1 = result["text_to_video"]["R1"]
  assert "(4 videos, chance R@1 = 25.0%)" in out and f"text_to_video R@1 = {r1:.1f}%, {r1 / 25:.1f} times chance" in out
  next_steps = out[out.index("\nnext"):]
  assert f"varcmp eval --workdir {tmp_path / 'run'}" in next_steps and "varcmp demo --task audio" in next_steps

  # The demo's model learned: on the 12 videos it trained on, text -> video R@1 is far above chance (8.3%;
  # 91.7% measured). The 4-video test split is too small to tell 40 steps of learning from luck.
  assert evaluate.main(["--workdir", str(tmp_path / "run"), "--config.data.eval_split=train"]) == 0
  on_train = json.loads((tmp_path / "run" / "eval_train_step40.json").read_text())
  assert on_train["split"] == "train"
  for direction in ("text_to_video", "video_to_text"):
    assert on_train[direction]["R1"] > 6 * 100 / 12, on_train[direction]
  assert json.loads((tmp_path / "run" / "eval.json").read_text()) == result       # not replaced
  capsys.readouterr()

  # The printed eval line runs as printed in a shell whose PATH lacks this environment (`make demo` then a copy
  # and paste: the environment is not activated), and evaluates the same run.
  eval_line = next(line.strip() for line in next_steps.splitlines() if " eval --workdir " in line)
  assert shlex.split(eval_line)[1:] == ["eval", "--workdir", str(tmp_path / "run")]
  env = dict(os.environ, PATH=os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                              if p and not os.path.isfile(os.path.join(p, "varcmp"))))
  ran = subprocess.run(["bash", "-c", eval_line], env=env, capture_output=True, text=True, timeout=600)
  assert ran.returncode == 0, ran.stderr[-3000:]
  assert json.loads((tmp_path / "run" / "eval.json").read_text()) == result

  # The audio half reuses the videos (no synth stage) and searches with a test video's soundtrack.
  assert demo.main(["--task", "audio", "--workdir", str(tmp_path), "--videos", "16", "--steps", "2", "--top-k", "2"]) == 0
  out = capsys.readouterr().out
  assert "synth" not in out.split("[2/5]")[0]
  result = json.loads((tmp_path / "run_audio" / "eval.json").read_text())
  assert (result["step"], result["records"]) == (2, str(tmp_path / "records_audio"))
  assert set(metrics.directions(result)) == {"audio_to_video", "video_to_audio"}
  assert metrics.format_table(result) in out and "query: audio of synth_" in out
  assert "varcmp demo --task text" in out[out.index("\nnext"):]


@pytest.fixture
def environment(tmp_path, monkeypatch):
  """A fake virtual environment env/bin (python, varcmp, activate) and a working directory beside it; PATH
  holds neither."""
  bin_dir = tmp_path / "env" / "bin"
  bin_dir.mkdir(parents=True)
  for name in ("python", "varcmp"):
    (bin_dir / name).write_text("#!/bin/sh\n")
    (bin_dir / name).chmod(0o755)
  (bin_dir / "activate").write_text("")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("PATH", "/usr/bin:/bin")
  monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
  return bin_dir


def test_next_lines_name_varcmp_by_its_path_unless_path_finds_it(environment, monkeypatch):
  """Run as `env/bin/varcmp demo` (or from Python, its varcmp beside the Python): the path, relative to here;
  `source env/bin/activate` said once. Once PATH finds that varcmp: plain `varcmp`. Without an entry point:
  `python -m varcmp_jax.cli`."""
  from varcmp_jax import demo
  for argv0 in ("env/bin/varcmp", "/usr/lib/python3/dist-packages/pytest.py"):
    monkeypatch.setattr(sys, "argv", [argv0, "demo"])
    assert demo.environment_bin() == "env/bin/"
    typed = demo.commands(demo.environment_bin())
    assert typed == {"varcmp": "env/bin/varcmp", "pip": "env/bin/pip", "tensorboard": "env/bin/tensorboard"}
    assert demo.next_heading("env/bin/") == "next (or `source env/bin/activate` first, then plain `varcmp ...`):"
  lines = demo.next_steps("text", environment.parent, environment.parent / "records", environment.parent / "run",
                          environment.parent / "videos", "v.mp4", typed)
  assert all(line.startswith("env/bin/") for line in lines), lines
  assert lines[4] == ("env/bin/pip install tensorboard && env/bin/tensorboard --logdir "
                      f"{environment.parent}/run/tensorboard")
  (environment.parent.parent / "elsewhere").mkdir()
  monkeypatch.chdir(environment.parent.parent / "elsewhere")          # not under the current directory: absolute
  assert demo.environment_bin() == f"{environment}/"
  monkeypatch.chdir(environment)                                      # in the bin folder itself: ./varcmp
  assert demo.environment_bin() == "./" and demo.commands("./")["varcmp"] == "./varcmp"
  other = environment.parent.parent / "other_bin"                     # another varcmp on PATH: not this one
  other.mkdir()
  (other / "varcmp").write_text("#!/bin/sh\n")
  (other / "varcmp").chmod(0o755)
  monkeypatch.setenv("PATH", f"{other}:/usr/bin")
  assert demo.environment_bin() == "./"
  monkeypatch.setenv("PATH", f"{environment}:/usr/bin")               # the environment activated
  assert demo.environment_bin() == "" and demo.commands("")["varcmp"] == "varcmp"
  assert demo.next_heading("") == "next:"
  (environment / "varcmp").unlink()                                   # run as `python -m varcmp_jax.cli demo`
  monkeypatch.setattr(sys, "argv", ["/x/varcmp_jax/cli.py", "demo"])
  assert demo.environment_bin() is None
  assert demo.commands(None)["varcmp"] == "./python -m varcmp_jax.cli"            # (in the bin folder)


def training_log(workdir, records, cpus: set[int], cache) -> list[tuple[float, float]]:
  """(loss, grad_norm) of every step of the tiny training, run in a process pinned to `cpus`, its compiled step
  cached in `cache`."""
  import subprocess
  import sys
  from test_checkpoint import train_command
  from test_sharding import subprocess_env
  from varcmp_jax.train import metrics_log
  pinned = (f"import os, runpy, sys; os.sched_setaffinity(0, {sorted(cpus)}); sys.argv[0] = 'varcmp'; "
            "runpy.run_module('varcmp_jax.cli', run_name='__main__')")      # pinned before jax starts its threads
  command = train_command(workdir, records)
  assert command[1:3] == ["-m", "varcmp_jax.cli"]
  result = subprocess.run([sys.executable, "-c", pinned, *command[3:]], capture_output=True, text=True, timeout=600,
                          env=subprocess_env(JAX_COMPILATION_CACHE_DIR=str(cache)))
  assert result.returncode == 0, result.stderr[-3000:]
  return [(row["loss"], row["grad_norm"]) for row in metrics_log.read_jsonl(str(workdir / "metrics.jsonl"))]


def test_training_reruns_bit_for_bit_on_the_same_number_of_cores(tmp_path):
  """What the README claims about determinism: a rerun with the same number of cores (another core, the step
  loaded from the compilation cache) gives bitwise the same losses and gradients; another number of cores may
  round differently (XLA's CPU kernels split sums over the cores), so there only closeness is asserted."""
  import os
  import numpy as np
  from test_checkpoint import write_feature_records
  records = write_feature_records(tmp_path / "records")
  cpus = sorted(os.sched_getaffinity(0))
  first = training_log(tmp_path / "first", records, {cpus[0]}, tmp_path / "cache")
  again = training_log(tmp_path / "again", records, {cpus[-1]}, tmp_path / "cache")
  assert len(first) == 6 and again == first
  if len(cpus) > 1:
    two_cores = training_log(tmp_path / "two_cores", records, set(cpus[:2]), tmp_path / "cache_two_cores")
    np.testing.assert_allclose(two_cores, first, rtol=1e-4)
