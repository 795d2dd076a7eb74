"""Records against config (varcmp_jax.data.records_check): every mismatch is named with its config field, what
the records hold and the fix, before any compilation; a fitting config passes."""
import json

import pytest

from varcmp_jax import config as config_lib
from varcmp_jax.data import pipeline, records_check

T = 8


def split_entry(records=4, **shapes):
  """A manifest split entry as `varcmp prep` writes it: shapes of the first record, `fields` counts."""
  counted = ("frames", "mel", "features", "audio_features", "prior")
  fields = {"caption": shapes.pop("captions", records)}
  fields.update({k: shapes.pop(f"{k}_records", records) for k in counted if k in shapes})
  return {"records": records, "shards": [], "shapes": {"tokens": [77], **shapes}, "fields": fields}


def tiny(task="text", regime="features", **changes):
  config = config_lib.default_config(task, regime)
  config.model.clip = config_lib.clip_tiny(image_size=32, patch_size=8, width=32, depth=1)
  config.data.snippets = T
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split("__")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def problems(config, entry, task=None):
  return records_check.problems(config, entry, {"task": task or config.task})


def test_fitting_records_pass():
  assert problems(tiny(regime="frames"), split_entry(frames=[T, 32, 32, 3])) == []
  assert problems(tiny(), split_entry(features=[T, 32], regions=[T, 4, 32])) == []
  released_text = tiny(loss__levels=dict(video=1.0, frame=1.0, spatial=0.0))
  assert problems(released_text, split_entry(features=[T + 4, 32])) == []          # a smaller T subsamples
  released_audio = tiny("audio", model__video_features=dict(dim=1024), model__audio__kind="features",
                        loss__levels=dict(semantic=1.0, temporal=1.0, spatial=0.0), prior__source="mean")
  assert problems(released_audio, split_entry(features=[T, 1024], audio_features=[T, 128], prior=[T], captions=0),
                  task="audio") == []
  assert problems(tiny(), {"records": 3, "shards": []}) == []     # a manifest without shapes is not checked


@pytest.mark.parametrize("config, entry, expected", [
    (tiny(regime="frames"), split_entry(frames=[T, 64, 64, 3]),
     "model.clip.vision.image_size=32, the records' frames are 64 x 64: set --config.model.clip.vision.image_size=64"),
    (tiny(regime="frames"), split_entry(features=[T, 32]),
     "regime='frames' needs `frames`, and the records have none (feature records): set --config.regime=features"),
    (tiny(loss__levels__spatial=0.0), split_entry(frames=[T, 32, 32, 3]),
     "regime='features' needs `features` in every record, and the records have none"),
    (tiny(loss__levels__spatial=0.0), split_entry(features=[T, 1024]),
     "model.video_features.dim=0 (CLIP joint-space features, model.clip.projection_dim=32 wide): the records' "
     "features are 1024 wide: set --config.model.video_features.dim=1024"),
    (tiny(model__video_features=dict(dim=1024), loss__levels__spatial=0.0), split_entry(features=[T, 32]),
     "model.video_features.dim=1024: the records' features are 32 wide: set --config.model.video_features.dim=32 "
     "(a learned projection), or 0 if they are CLIP joint-space features"),
    (tiny(), split_entry(features=[T, 32]),
     "loss.levels.spatial=1.0 needs region tokens, and the records have no `regions` (released features): "
     "set --config.loss.levels.spatial=0"),
    (tiny(), split_entry(features=[T, 32], regions=[T, 9, 32]),
     "model.region_grid=2 gives 4 regions, the records hold 9: set --config.model.region_grid=3"),
    (tiny("audio"), split_entry(features=[T, 32], regions=[T, 4, 32], mel=[T, 96, 64], mel_records=3, captions=0),
     "model.audio.kind='spectrogram' needs a log-mel `mel` in every record, and 3 of 4 records have it"),
    (tiny("audio"), split_entry(features=[T, 32], regions=[T, 4, 32], mel=[T, 48, 32], captions=0),
     "model.audio.mel_frames x mel_bins = 96 x 64, the records' mel is 48 x 32: set "
     "--config.model.audio.mel_frames=48 --config.model.audio.mel_bins=32"),
    (tiny("audio", model__audio__kind="features"), split_entry(features=[T, 32], regions=[T, 4, 32], mel=[T, 96, 64]),
     "model.audio.kind='features' needs `audio_features` in every record, and the records have none: set "
     "--config.model.audio.kind=spectrogram"),
    (tiny("audio", model__audio__kind="features"), split_entry(features=[T, 32], regions=[T, 4, 32],
                                                               audio_features=[T, 64]),
     "model.audio.feature_dim=128, the records' audio features are 64 wide: set --config.model.audio.feature_dim=64"),
    (tiny(prior__source="external"), split_entry(features=[T, 32], regions=[T, 4, 32]),
     "prior.source='external' needs an external `prior` in every record, and the records have none: set "
     "--config.prior.source=head"),
    (tiny(data__snippets=16), split_entry(features=[T, 32], regions=[T, 4, 32]),
     f"data.snippets=16, the records hold {T} snippets per video (padding would add only empty snippets): set "
     f"--config.data.snippets={T}"),
])
def test_each_mismatch_names_the_field_the_records_and_the_fix(config, entry, expected):
  found = problems(config, entry)
  assert len(found) == 1, found
  assert found[0].startswith(expected), found[0]


def test_a_text_model_on_audio_task_records():
  found = problems(tiny(loss__levels__spatial=0.0), split_entry(features=[T, 32], captions=1), task="audio")
  assert found == ["task='text' needs a caption in every record, and 3 of 4 have none (written by `varcmp prep "
                   "--task audio`): use an audio config (--config.task=audio, e.g. configs/xdviolence_ar.py), or "
                   "re-run prep with --task text and a captions table"]


def test_the_pipeline_checks_before_reading(tmp_path):
  (tmp_path / "manifest.json").write_text(json.dumps({"task": "text", "splits": {
      "train": split_entry(features=[T, 512]), "test": split_entry(features=[T, 32])}}))
  config = tiny(loss__levels__spatial=0.0)
  config.data.records = str(tmp_path)
  with pytest.raises(records_check.RecordsMismatch, match=r"(?s)'train' records of .*manifest.json do not fit.*"
                     r"features are 512 wide: set --config.model.video_features.dim=512"):
    pipeline.make_train_iterator(config, 2, 0)
  config.data.snippets = 12
  with pytest.raises(records_check.RecordsMismatch, match=r"'test' records.*\n  data.snippets=12"):
    pipeline.make_eval_iterator(config, "test", 2)


def word_manifest(train, test):
  return {"splits": {"train": {"caption_words": {str(k): n for k, n in train.items()}},
                     "test": {"caption_words": {str(k): n for k, n in test.items()}} if test is not None else {}}}


def test_word_budget_is_the_longest_caption_or_says_what_it_cuts():
  config = config_lib.default_config("text", "features")
  config.data.records = "/data/ucf"
  histograms = ({17: 80, 38: 19, 50: 1}, {21: 9, 49: 1})
  assert records_check.word_budget(config, word_manifest(*histograms), ("train", "test")) == (50, [])
  config.model.max_words = 40
  budget, notes = records_check.word_budget(config, word_manifest(*histograms), ("train", "test"))
  assert budget == 40 and len(notes) == 2
  assert notes[0].startswith("1 of 100 'train' captions have more than model.max_words=40 words (p50 17, p99 38, "
                             "max 50 words)")
  assert notes[1].startswith("1 of 10 'test' captions")
  # Records from a prep that did not count words: all 75 words, and a note that says how to size it.
  config.model.max_words = 0
  budget, notes = records_check.word_budget(config, word_manifest({9: 3}, None), ("train", "test"))
  assert budget == config_lib.MAX_WORDS and "/data/ucf/manifest.json does not count caption words" in notes[0]


def test_describe_words_percentiles_by_hand():
  # 100 captions: 50 of 10 words, 49 of 20, 1 of 30 -> the 50th is 10 words, the 99th 20, the longest 30.
  assert records_check.describe_words({10: 50, 20: 49, 30: 1}) == "p50 10, p99 20, max 30 words"
  assert records_check.describe_words({}) == "no captions"
