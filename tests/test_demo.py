"""`varcmp demo` end to end on a handful of videos: every stage runs and writes its outputs, the trained model
beats chance, the audio half runs on the same videos, and the output ends with what to run next."""
import json

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
  next_steps = out[out.index("\nnext:\n"):]
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

  # The audio half reuses the videos (no synth stage) and searches with a test video's soundtrack.
  assert demo.main(["--task", "audio", "--workdir", str(tmp_path), "--videos", "16", "--steps", "2", "--top-k", "2"]) == 0
  out = capsys.readouterr().out
  assert "synth" not in out.split("[2/5]")[0]
  result = json.loads((tmp_path / "run_audio" / "eval.json").read_text())
  assert (result["step"], result["records"]) == (2, str(tmp_path / "records_audio"))
  assert set(metrics.directions(result)) == {"audio_to_video", "video_to_audio"}
  assert metrics.format_table(result) in out and "query: audio of synth_" in out
  assert "varcmp demo --task text" in out[out.index("\nnext:\n"):]


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
