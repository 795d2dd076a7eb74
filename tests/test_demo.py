"""`varcmp demo` end to end on a handful of videos: every stage runs, writes its outputs, and resumes."""
import json

from varcmp_jax import metrics
from varcmp_jax import demo


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
  argv = ["--workdir", str(tmp_path), "--videos", "8", "--steps", "2", "--top-k", "2"]
  assert demo.main(argv) == 0
  out = capsys.readouterr().out
  result = json.loads((tmp_path / "run" / "eval.json").read_text())
  assert set(result) == {"text_to_video", "video_to_text", "SumR", "levels"}
  # The printed table is the eval.json's; the search example ranks 2 videos with the segment column.
  assert metrics.format_table(result) in out
  assert "key segments (s)" in out and "ground truth: synth_" in out
  # A second call reuses the videos, records and checkpoint: no synth stage, same result.
  assert demo.main(argv) == 0
  out = capsys.readouterr().out
  assert "[1/4] synth" not in out
  assert json.loads((tmp_path / "run" / "eval.json").read_text()) == result
