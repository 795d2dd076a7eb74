"""`varcmp search`: retrieval of a video by its own caption, key segments in seconds, the gallery cache,
the localization hit rate and the plot.

The model is a tiny untrained VarCMP (features regime) saved as an Orbax checkpoint the way training
saves it. Its temporal adapter starts as the identity (zero-initialized residual), so f_t = g_t, and the
gallery is built so that it must retrieve correctly: in each video the event snippets carry the text
embedding of its caption (regions: its word embeddings), every other snippet is noise, and the external
prior is high on the event.
"""
import json

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from varcmp_jax import clip
from varcmp_jax import config as config_lib
from varcmp_jax import search
from varcmp_jax.data.records import encode_record

SNIPPET_SECONDS = 1.5
CAPTIONS = ["a red car crashes into a wall", "a blue ball bounces across the grass",
            "a green square spins near the door", "a yellow truck stops in the rain",
            "a person in white falls off a bicycle", "two purple circles drift slowly left"]
# (stored snippets, event snippets, has an event interval)
LAYOUT = [(8, (3, 4), True), (6, (1, 2), True), (10, (4, 5), True), (8, (6, 7), True), (5, (0,), True),
          (8, (2, 3), False)]


def tiny_config():
  config = config_lib.default_config("text", "features")
  config.model.clip = config_lib.clip_tiny(image_size=16, patch_size=8, width=32, depth=1)
  config.model.dtype = "float32"
  config.model.temporal = dict(num_layers=1, num_heads=2, mlp_ratio=2, max_len=16)
  config.model.anomaly_head.hidden = 16
  config.data.snippets = 8
  config.prior.source = "external"
  config.train.batch_size = config.eval.batch_size = 4
  config.eval.chunk_size = 4
  return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from varcmp_jax.train import checkpoint as checkpoint_lib
  from varcmp_jax.train import step as step_lib
  config = tiny_config()
  trainer = step_lib.build(config)
  model = trainer.model
  state = trainer.init_state(0)
  text = jax.device_get(jax.jit(lambda p, ids: model.apply({"params": p}, {"tokens": ids}, method=model.encode_query))(
      state["params"], clip.tokenizer()(CAPTIONS)))

  rng = np.random.default_rng(0)
  width, regions = config.model.clip.projection_dim, config.model.region_grid ** 2
  records, events = [], []
  for g, (n, event_snippets, has_event) in enumerate(LAYOUT):
    features = 0.3 * rng.standard_normal((n, width))
    region_tokens = 0.3 * rng.standard_normal((n, regions, width))
    prior = np.full(n, 0.05)
    words = text.words[g][text.word_mask[g]]
    for t in event_snippets:
      features[t] = text.sentence[g]
      region_tokens[t, :] = words[:regions]
      prior[t] = 0.95
    times = np.stack([np.arange(n), np.arange(n) + 1], -1) * SNIPPET_SECONDS
    event = [times[event_snippets[0], 0], times[event_snippets[-1], 1]] if has_event else [-1.0, -1.0]
    events.append(event)
    records.append(dict(
        video=f"video_{g}.mp4", caption=CAPTIONS[g], tokens=clip.tokenizer()([CAPTIONS[g]])[0], label=np.int32(has_event),
        split="test", duration=np.float32(n * SNIPPET_SECONDS), times=times.astype(np.float32),
        event=np.asarray(event, np.float32), features=features.astype(np.float16),
        regions=region_tokens.astype(np.float16), prior=prior.astype(np.float32)))
  root = tmp_path_factory.mktemp("records")
  writer = ArrayRecordWriter(str(root / "test-00000-of-00001.array_record"), "group_size:1")
  for record in records:
    writer.write(encode_record(record))
  writer.close()
  (root / "manifest.json").write_text(json.dumps(
      {"splits": {"test": {"records": len(records), "shards": ["test-00000-of-00001.array_record"]}}}))

  workdir = tmp_path_factory.mktemp("run")
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), 1, 1)
  checkpointer.save(1, state, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  return str(workdir), str(root), events


def run_json(capsys, argv):
  assert search.main(argv + ["--json"]) == 0
  return json.loads(capsys.readouterr().out)


def test_search_finds_own_video_with_key_segments_inside_it(setup, capsys):
  workdir, records, events = setup
  for g in (0, 2, 4):     # video 2 stores 10 snippets, the batches keep 8 of them
    result = run_json(capsys, ["--workdir", workdir, "--gallery", records, "--text", CAPTIONS[g], "--top-k", "3"])
    hits = result["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    top = hits[0]
    assert top["video"] == f"video_{g}.mp4" and top["score"] > hits[1]["score"]
    assert top["segments"], top
    for segment in top["segments"]:
      assert 0.0 <= segment["start"] < segment["end"] <= top["duration"]
    best = top["segments"][0]
    assert search.interval_iou((best["start"], best["end"]), events[g]) > 0.3, (best, events[g])


def test_gallery_cache_is_reused(setup, capsys, monkeypatch):
  workdir, records, _ = setup
  first = run_json(capsys, ["--workdir", workdir, "--gallery", records, "--text", CAPTIONS[1]])
  assert first["gallery_cache"] and first["gallery_cache"].startswith(records)

  def no_embedding(*args, **kwargs):
    raise AssertionError("the gallery was embedded again")
  monkeypatch.setattr(search.evaluate, "embed_split", no_embedding)
  second = run_json(capsys, ["--workdir", workdir, "--gallery", records, "--text", CAPTIONS[3]])
  assert second["gallery_cache"] == first["gallery_cache"]
  assert second["hits"][0]["video"] == "video_3.mp4"


def test_table_and_plot(setup, capsys, tmp_path):
  workdir, records, _ = setup
  png = tmp_path / "hits.png"
  assert search.main(["--workdir", workdir, "--gallery", records, "--text", CAPTIONS[5], "--top-k", "2",
                      "--plot", str(png)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == f"query: {CAPTIONS[5]}"
  assert out[2].split()[:3][0] == "1" and "video_5.mp4" in out[2]
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_localization_hit_rate(setup, capsys):
  workdir, records, _ = setup
  result = run_json(capsys, ["--workdir", workdir, "--gallery", records, "--localization"])
  assert result["queries"] == 6 and result["top1_correct"] == 6
  assert result["evaluated"] == 5          # the video without an event interval is not counted
  assert result["hits"] == 5 and result["hit_rate"] == 1.0
  assert result["all_events"] == 5 and result["hits_all_events"] == 5


def test_key_segments_by_hand():
  relevance = np.array([0.1, 0.6, 0.7, 0.2, 0.9, 5.0])
  mask = np.array([True, True, True, True, True, False])     # the padded slot's value is ignored
  times = np.array([[0, 2], [2, 4], [4, 6], [6, 8], [8, 10], [0, 0]], np.float32)
  # median 0.6, max 0.9: threshold 0 keeps >= 0.6 (snippets 1, 2 merged, and 4); 0.5 keeps >= 0.75.
  segments = search.key_segments(relevance, mask, times, threshold=0.0)
  assert [(s["start"], s["end"], s["peak"], s["peak_snippet"]) for s in segments] == [
      (8.0, 10.0, 0.9, 4), (2.0, 6.0, 0.7, 2)]
  assert [(s["start"], s["end"]) for s in search.key_segments(relevance, mask, times, 0.5)] == [(8.0, 10.0)]
  assert search.key_segments(-relevance, mask, times, 0.5) == []
  # A flat curve (peak 1.2x its median: no anomaly found) has no key segment, whatever the threshold.
  flat = np.array([1.0, 1.0, 1.2, 1.0, 1.1, 1.0])
  assert search.key_segments(flat, np.ones(6, bool), times, 0.0) == []
  assert search.interval_iou((2, 6), (4, 8)) == pytest.approx(2 / 6)


def test_slot_times_follow_the_pipeline_subsample():
  times = np.stack([np.arange(10), np.arange(10) + 1], -1).astype(np.float32)
  slots = search.slot_times([{"times": times}, {"times": times[:3]}], 8)
  # 10 snippets into 8 slots: the snippet under the centre of each eighth, floor((j + 0.5) * 10 / 8).
  np.testing.assert_array_equal(slots[0][:, 0], [0, 1, 3, 4, 5, 6, 8, 9])
  np.testing.assert_array_equal(slots[1][:3], times[:3])
  np.testing.assert_array_equal(slots[1][3:], 0)


def test_wrong_query_kind_is_a_clear_error(setup):
  workdir, records, _ = setup
  with pytest.raises(SystemExit, match="query it with --text"):
    search.main(["--workdir", workdir, "--gallery", records, "--audio", "clip.mp4"])
