"""`varcmp ablate`: sweep parsing and validation before training, variant expansion, tables, reuse."""
import csv
import json
import os

import pytest

from varcmp_jax import ablate

CONFIG_FILE = '''
from varcmp_jax import config as config_lib

def get_config():
  c = config_lib.default_config("text", "features")
  c.data.records = "/records/of/the/test"
  return c
'''


@pytest.fixture
def config_path(tmp_path):
  path = tmp_path / "tiny_config.py"
  path.write_text(CONFIG_FILE)
  return str(path)


@pytest.fixture
def trainer(monkeypatch):
  """Replaces training and evaluation by fakes that write a made-up eval.json; records each call."""
  from varcmp_jax import evaluate as evaluate_lib
  from varcmp_jax.train import train as train_lib
  calls = []

  def fake_train(config, workdir):
    calls.append(("train", os.path.basename(workdir), config.weighting.beta, config.loss.levels.spatial))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  def fake_evaluate(config, workdir, step=None):
    calls.append(("eval", os.path.basename(workdir)))
    recalls = {"R1": 10.0, "R5": 20.0, "R10": 30.0, "MdR": 7.0, "MnR": 9.0}
    result = {"text_to_video": recalls, "video_to_text": recalls, "SumR": 120.0, "levels": {}}
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f)

  monkeypatch.setattr(train_lib, "train", fake_train)
  monkeypatch.setattr(evaluate_lib, "evaluate", fake_evaluate)
  return calls


@pytest.mark.parametrize("sweep, message", [
    ("loss.levels.spatil=0,1", "no field 'spatil'"),
    ("weighting.bta=0,1", "no field 'bta'"),
    ("weighting.beta=0,abc", "not a number"),
    ("train.num_steps=10,2.5", "not an integer"),
    ("weighting.beta", "expected KEY=VALUE"),
    ("weighting.beta=", "expected KEY=VALUE"),
    ("loss.levels=0,1", "is a group"),
    ("weighting.beta=0,2", "weighting.beta=2.0: must lie in [0, 1]"),          # config.validate per variant
    ("weighting.beta=0,0", "repeated value"),
    ("loss.fine_candidates=0,1", "loss.fine_candidates=1: must be 0"),               # the large-batch switches too
    ("loss.fine_snippets=0,-4", "loss.fine_snippets=-4: must be >= 0"),
])
def test_bad_sweep_fails_before_training(config_path, tmp_path, trainer, sweep, message):
  with pytest.raises(SystemExit) as error:
    ablate.main(["--config", config_path, "--workdir", str(tmp_path / "ab"), "--sweep", "loss.mil=0,1",
                 "--sweep", sweep])
  assert message in str(error.value) and error.value.code not in (0, None)
  assert trainer == []
  assert not (tmp_path / "ab").exists()


def test_bad_variant_and_all_levels_off_fail_before_training(config_path, tmp_path, trainer):
  workdir = str(tmp_path / "ab")
  for argv, message in [
      (["--variant", "novalue:weighting.beta"], "is not KEY=VALUE"),
      (["--variant", "weighting.beta=0"], "expected NAME:"),
      (["--variant", "off:loss.levels.video=0,loss.levels.frame=0,loss.levels.spatial=0"],
       "at least one level needs a weight > 0"),
      (["--variant", "a b:", "--variant", "a_b:weighting.beta=0"], "share the directory"),
      ([], "nothing to run"),
      (["--sweep", "loss.mil=0,1", "--config.loss.levels.nope=1"], "loss.levels has no field 'nope'"),
  ]:
    with pytest.raises(SystemExit) as error:
      ablate.main(["--config", config_path, "--workdir", workdir] + argv)
    assert message in str(error.value) and error.value.code not in (0, None), argv
  assert trainer == []


def test_variant_expansion(config_path):
  config = ablate._parse(["--config", config_path, "--workdir", "x"]).config
  planned = ablate.plan(config, ["loss.levels.spatial=0,1", "weighting.beta=0,0.5", "train.num_steps=300"],
                        ["full:", "video only:loss.levels.frame=0,loss.levels.spatial=0"])
  names = [v.name for v, _ in planned]
  assert names == ["spatial=0_beta=0_num_steps=300", "spatial=0_beta=0.5_num_steps=300",
                   "spatial=1_beta=0_num_steps=300", "spatial=1_beta=0.5_num_steps=300", "full", "video only"]
  assert [v.dirname for v, _ in planned][-1] == "video_only"
  first, last = planned[1][1], planned[-1][1]
  # Values are typed like the config fields: floats stay floats, ints stay ints.
  assert first.loss.levels.spatial == 0.0 and isinstance(first.loss.levels.spatial, float)
  assert first.weighting.beta == 0.5 and first.train.num_steps == 300 and isinstance(first.train.num_steps, int)
  assert (last.loss.levels.video, last.loss.levels.frame, last.loss.levels.spatial) == (1.0, 0.0, 0.0)
  # Everything else is the base config: same seed, same data.
  for _, cfg in planned:
    assert cfg.seed == config.seed and cfg.data.records == "/records/of/the/test"
  assert config.weighting.beta == 0.5 and config.loss.levels.spatial == 1.0   # the base is untouched
  # The large-batch switches sweep like any field (issue 28).
  planned = ablate.plan(config, ["loss.fine_candidates=0,16", "loss.fine_snippets=0,8"], [])
  assert [(c.loss.fine_candidates, c.loss.fine_snippets) for _, c in planned] == [(0, 0), (0, 8), (16, 0), (16, 8)]


def test_tables_from_eval_files(config_path, tmp_path, trainer):
  """Finished variants (eval.json present) are read, not retrained; the tables hold their numbers."""
  workdir = tmp_path / "ab"
  made_up = {
      "beta=0": ((12.34, 40.0, 55.54, 9.0), (10.0, 35.06, 50.0, 10.5), 202.96),
      "beta=0.5": ((20.0, 50.0, 70.0, 4.0), (18.0, 45.0, 65.0, 6.0), 268.0),
  }
  for name, (t2v, v2t, sumr) in made_up.items():
    os.makedirs(workdir / name)
    pack = lambda r: dict(zip(("R1", "R5", "R10", "MdR"), r), MnR=99.0)
    (workdir / name / "eval.json").write_text(json.dumps(
        {"text_to_video": pack(t2v), "video_to_text": pack(v2t), "SumR": sumr, "levels": {}, "step": 5}))
  assert ablate.main(["--config", config_path, "--workdir", str(workdir), "--sweep", "weighting.beta=0,0.5"]) == 0
  assert trainer == []
  with open(workdir / "ablation.csv") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["variant", "beta", "text_to_video/R1", "text_to_video/R5", "text_to_video/R10",
                     "text_to_video/MdR", "video_to_text/R1", "video_to_text/R5", "video_to_text/R10",
                     "video_to_text/MdR", "SumR"]
  assert rows[1] == ["beta=0", "0", "12.3", "40.0", "55.5", "9.0", "10.0", "35.1", "50.0", "10.5", "203.0"]
  assert rows[2] == ["beta=0.5", "0.5", "20.0", "50.0", "70.0", "4.0", "18.0", "45.0", "65.0", "6.0", "268.0"]
  markdown = (workdir / "ablation.md").read_text().splitlines()
  assert markdown[2] == ("| variant | beta | q→v R@1 | q→v R@5 | q→v R@10 | q→v MdR | v→q R@1 | v→q R@5 | "
                         "v→q R@10 | v→q MdR | SumR |")
  assert markdown[4] == "| beta=0 | 0 | 12.3 | 40.0 | 55.5 | 9.0 | 10.0 | 35.1 | 50.0 | 10.5 | 203.0 |"
  assert len(markdown) == 6


def test_runs_missing_variants_then_reuses_them(config_path, tmp_path, trainer):
  workdir = str(tmp_path / "ab")
  argv = ["--config", config_path, "--workdir", workdir, "--sweep", "loss.levels.spatial=0,1",
          "--variant", "no weighting:weighting.beta=0"]
  assert ablate.main(argv) == 0
  assert trainer == [("train", "spatial=0", 0.5, 0.0), ("eval", "spatial=0"),
                     ("train", "spatial=1", 0.5, 1.0), ("eval", "spatial=1"),
                     ("train", "no_weighting", 0.0, 1.0), ("eval", "no_weighting")]
  trainer.clear()
  assert ablate.main(argv) == 0      # second run: every variant is finished
  assert trainer == []
  with open(os.path.join(workdir, "ablation.csv")) as f:
    rows = list(csv.reader(f))
  assert [r[:3] for r in rows] == [["variant", "spatial", "beta"], ["spatial=0", "0", "0.5"],
                                   ["spatial=1", "1", "0.5"], ["no weighting", "1", "0"]]
  # The same directory with another config is refused instead of silently mixed.
  with pytest.raises(SystemExit, match=r"different config \(train.num_steps: 1000 -> 700\)") as error:
    ablate.main(argv + ["--config.train.num_steps=700"])
  assert error.value.code not in (0, None)


def test_rerunning_the_same_command_reuses_runs_whose_word_budget_was_sized_from_the_records(config_path, tmp_path,
                                                                                             monkeypatch):
  """model.max_words = 0 means "size it from the records": training writes the resolved budget (the longest caption,
  9 words here) into each variant's config.json, and the same command run again must take that for its own config
  (it was refused: "cannot reuse ... (model.max_words: 9 -> 0)"). Other records (longer captions) are refused."""
  from varcmp_jax import evaluate as evaluate_lib
  from varcmp_jax.train import train as train_lib
  records = tmp_path / "records"
  records.mkdir()
  manifest = {"splits": {split: {"records": 4, "shards": [], "caption_words": {"5": 3, "9": 1}}
                         for split in ("train", "test")}, "skipped": []}
  (records / "manifest.json").write_text(json.dumps(manifest))
  trained = []

  def train_as_train_does(config, workdir):     # the real budget resolution, then config.json as train writes it
    trained.append(os.path.basename(workdir))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(train_lib.with_word_budget(config).to_json_best_effort(indent=2))

  def fake_evaluate(config, workdir, step=None):
    recalls = {"R1": 10.0, "R5": 20.0, "R10": 30.0, "MdR": 7.0, "MnR": 9.0}
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"text_to_video": recalls, "video_to_text": recalls, "SumR": 120.0, "levels": {}}, f)

  monkeypatch.setattr(train_lib, "train", train_as_train_does)
  monkeypatch.setattr(evaluate_lib, "evaluate", fake_evaluate)
  workdir = tmp_path / "ab"
  argv = ["--config", config_path, "--workdir", str(workdir), f"--config.data.records={records}",
          "--sweep", "weighting.beta=0,0.5"]
  assert ablate.main(argv) == 0 and trained == ["beta=0", "beta=0.5"]
  assert json.loads((workdir / "beta=0" / "config.json").read_text())["model"]["max_words"] == 9
  assert ablate.main(argv) == 0 and trained == ["beta=0", "beta=0.5"]      # reused, nothing trained again
  manifest["splits"]["train"]["caption_words"]["12"] = 1                   # the records changed: a longer caption
  (records / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(SystemExit, match=r"cannot reuse .*beta=0 with a different config \(model.max_words: 9 -> 12\)"):
    ablate.main(argv)


def test_a_variant_another_run_is_writing_is_refused(config_path, tmp_path, trainer):
  """Each variant holds its directory's writer lock around train + eval: a busy one stops the sweep at once."""
  import sys
  sys.path.insert(0, os.path.dirname(__file__))
  from test_workdir import hold_in_another_process
  workdir = tmp_path / "ab"
  holder = hold_in_another_process(workdir / "beta=0.5")
  try:
    with pytest.raises(SystemExit) as error:
      ablate.main(["--config", config_path, "--workdir", str(workdir), "--sweep", "weighting.beta=0.5,0"])
  finally:
    holder.kill()
    holder.wait()
  assert error.value.code not in (0, None)
  assert f"variant 'beta=0.5': {workdir / 'beta=0.5'} is in use by another run (pid {holder.pid}" in str(error.value)
  assert trainer == []
