"""Evaluation against hand-built embeddings whose similarity matrices and metrics are worked out by hand, in
both directions and per level, written to eval.json with its step, split and records; eval.json naming;
`varcmp eval` flags and one-line errors.

One snippet per video (T = 1), so every level reduces to a cosine: with unit sentence vectors s_q = e_q and
video vectors f_g, S[q, g] = f_g[q] / |f_g| (rows = text queries, columns = videos). The matrices are not
symmetric in their ranks, so reporting text -> video under video -> text (or scoring the transpose) fails.
"""
import dataclasses
import json

import numpy as np
import pytest

from varcmp_jax import config as config_lib
from varcmp_jax import evaluate
from varcmp_jax.alignment.embeddings import TextEmbeddings, VideoEmbeddings

# Video (and frame) level: columns f_g (already unit length).
#   S = [[1, .6,  0,  0],      text -> video, row by row: 1; .8 ties with .8 -> rank 1.5; .6 under .8 -> 2; 1
#        [0, .8, .8,  0],      video -> text, column by column: 1; 1; .6 under .8 -> 2; .6 under .8 -> 2
#        [0,  0, .6, .8],
#        [0,  0,  0,  1]]
FRAMES = np.array([[1, 0, 0, 0], [.6, .8, 0, 0], [0, .8, .6, 0], [0, 0, .8, .6]], np.float32)
FRAME_LEVEL = {"text_to_video": {"R1": 62.5, "MdR": 1.25, "MnR": 1.375},
               "video_to_text": {"R1": 50.0, "MdR": 1.5, "MnR": 1.5}}
# Spatial level: one region r_g per video, one word w_q = e_q per query: S' = cos(r_g, e_q).
#   columns r_0 = (1, .6, 0, 0)/|.|, r_1 = (0, .8, .8, 0)/|.|, r_2 = (0, 0, .6, .8), r_3 = (0, 0, 0, 1)
#   text -> video rows: [.857 0 0 0] 1; [.514 .707 0 0] 1; [0 .707 .6 0] 2; [0 0 .8 1] 1
#   video -> text columns: 1; [0 .707 .707 0] tie -> 1.5; [0 0 .6 .8] -> 2; 1
REGIONS = np.array([[1, .6, 0, 0], [0, .8, .8, 0], [0, 0, .6, .8], [0, 0, 0, 1]], np.float32)
SPATIAL_LEVEL = {"text_to_video": {"R1": 75.0, "MdR": 1.0, "MnR": 1.25},
                 "video_to_text": {"R1": 62.5, "MdR": 1.25, "MnR": 1.375}}
# Combined (all lambdas 1): 2 S + S' has its maximum on the diagonal of every row and column.
COMBINED = {"text_to_video": {"R1": 100.0, "MdR": 1.0, "MnR": 1.0},
            "video_to_text": {"R1": 100.0, "MdR": 1.0, "MnR": 1.0}}


def hand_embeddings():
  n = len(FRAMES)
  video = VideoEmbeddings(frames=FRAMES[:, None, :], regions=REGIONS[:, None, None, :], mask=np.ones((n, 1), bool),
                          anomaly=np.full((n, 1), 0.5, np.float32))
  query = TextEmbeddings(sentence=np.eye(n, dtype=np.float32), words=np.eye(n, dtype=np.float32)[:, None, :],
                         word_mask=np.ones((n, 1), bool))
  return video, query


@dataclasses.dataclass
class FakeTrainer:
  config: object


@dataclasses.dataclass
class FakeRun:       # what evaluate_run reads of a trained.Trained
  config: object
  trainer: object
  params: object
  step: int
  workdir: str


def text_config():
  config = config_lib.default_config("text", "features")
  config.data.records = "/records/of/this/test"
  config.eval.chunk_size = 2
  return config


def check(entry, expected):
  for direction, values in expected.items():
    for name, value in values.items():
      assert entry[direction][name] == pytest.approx(value, abs=1e-6), (direction, name)
    assert entry[direction]["R5"] == entry[direction]["R10"] == 100.0


def test_eval_json_holds_both_directions_and_every_level_of_a_hand_built_matrix(tmp_path, monkeypatch):
  config = text_config()
  video, query = hand_embeddings()
  monkeypatch.setattr(evaluate, "embed_split", lambda trainer, params, split, *a, **k: (video, query))
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)
  result = evaluate.evaluate_run(FakeRun(config, FakeTrainer(config), None, 7, str(tmp_path)), show=False)
  written = json.loads((tmp_path / "eval.json").read_text())
  assert written == result
  assert (written["step"], written["split"], written["records"], written["ties"]) == (
      7, "test", "/records/of/this/test", "expected")
  check(written, COMBINED)
  check(written["levels"]["video"], FRAME_LEVEL)
  check(written["levels"]["frame"], FRAME_LEVEL)
  check(written["levels"]["spatial"], SPATIAL_LEVEL)
  assert written["levels"]["spatial"]["SumR"] == pytest.approx(75 + 200 + 62.5 + 200)


def test_an_older_step_never_replaces_eval_json(tmp_path, monkeypatch):
  config = text_config()
  video, query = hand_embeddings()
  monkeypatch.setattr(evaluate, "embed_split", lambda trainer, params, split, *a, **k: (video, query))
  for step in (3, 7):
    (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
  evaluate.evaluate_run(FakeRun(config, FakeTrainer(config), None, 7, str(tmp_path)), show=False)
  latest = (tmp_path / "eval.json").read_text()
  evaluate.evaluate_run(FakeRun(config, FakeTrainer(config), None, 3, str(tmp_path)), ties="optimistic", show=False)
  assert (tmp_path / "eval.json").read_text() == latest
  older = json.loads((tmp_path / "eval_step3_optimistic.json").read_text())
  assert older["step"] == 3 and older["ties"] == "optimistic"
  assert older["levels"]["video"]["text_to_video"]["R1"] == 75.0        # row 1's tie counts as a hit
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  for step, split, ties, name in [(7, "test", "expected", "eval.json"), (3, "test", "expected", "eval_step3.json"),
                                  (7, "train", "expected", "eval_train_step7.json"),
                                  (7, "test", "optimistic", "eval_optimistic.json")]:
    assert evaluate.result_name(str(tmp_path), step, split, ties) == name


def fake_records(root):
  """A records directory that passes evaluate.check_records (a manifest and its shard file)."""
  root.mkdir()
  (root / "test-00000-of-00001.array_record").write_bytes(b"")
  (root / "manifest.json").write_text(json.dumps(
      {"splits": {"test": {"records": 4, "shards": ["test-00000-of-00001.array_record"]}}}))
  return root


def test_eval_reads_the_workdir_config_and_names_what_is_missing(tmp_path, capsys):
  """Without --config, `varcmp eval` takes WORKDIR/config.json (overrides still apply); errors are one line
  with a non-zero exit code, and nothing is created in the workdir."""
  config = config_lib.default_config("text", "features")
  config.data.records = str(fake_records(tmp_path / "records"))
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  for argv, message in [
      ([], f"{workdir / 'checkpoints'}: no checkpoint at all; run `varcmp train` first"),
      ([f"--config.data.records={tmp_path / 'elsewhere'}"], f"{tmp_path / 'elsewhere' / 'manifest.json'}: no manifest"),
      (["--config.train.nope=1"], "train has no field 'nope'"),
  ]:
    with pytest.raises(SystemExit) as error:
      evaluate.main(["--workdir", str(workdir), *argv])
    assert message in str(error.value) and error.value.code not in (0, None), argv
  (workdir / "checkpoints" / "5").mkdir(parents=True)
  with pytest.raises(SystemExit, match=r"no checkpoint at step 9 \(steps: \[5\]\)") as error:
    evaluate.main(["--workdir", str(workdir), "--step", "9"])
  assert error.value.code not in (0, None)
  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json"]
  with pytest.raises(SystemExit, match="config.json: not found") as error:
    evaluate.main(["--workdir", str(tmp_path / "no_such_run")])
  assert error.value.code not in (0, None)
  assert not (tmp_path / "no_such_run").exists()


def test_eval_help_and_a_config_of_another_model(tmp_path, capsys):
  with pytest.raises(SystemExit) as error:
    evaluate.main(["--help"])
  assert error.value.code == 0 and "usage: varcmp eval --workdir DIR" in capsys.readouterr().out
  config = config_lib.default_config("text", "features")
  config.data.records = str(fake_records(tmp_path / "records"))
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  other = tmp_path / "other.py"
  other.write_text("from varcmp_jax import config as c\n\ndef get_config():\n  x = c.default_config('text', "
                   "'features')\n  x.model.region_grid = 3\n  return x\n")
  with pytest.raises(SystemExit, match=r"describes another model .*model.region_grid: 2 -> 3") as error:
    evaluate.main(["--workdir", str(workdir), "--config", str(other), f"--config.data.records={config.data.records}"])
  assert error.value.code not in (0, None)
