"""`varcmp search`: retrieval of a video by its own caption, key segments in seconds, the gallery cache,
the localization hit rate, the plot, audio queries from audio files, and clear errors.

The models are tiny untrained VarCMPs saved as Orbax checkpoints (search_fixtures). The text gallery is built
so that it must retrieve correctly: in each video the event snippets carry the text embedding of its caption
(regions: its word embeddings), every other snippet is noise, and the external prior is high on the event.
"""
import dataclasses
import json
import os

import av
import jax
import numpy as np
import pytest

import search_fixtures as fixtures
from test_npy_file import Payload, lying_npy
from varcmp_jax import evaluate
from varcmp_jax import search
from varcmp_jax.index import build
from data_prep import decode as decode_lib

SNIPPET_SECONDS = fixtures.SNIPPET_SECONDS
CAPTIONS = ["a red car crashes into a wall", "a blue ball bounces across the grass",
            "a green square spins near the door", "a yellow truck stops in the rain",
            "a person in white falls off a bicycle", "two purple circles drift slowly left"]
# (stored snippets, event snippets, has an event interval)
LAYOUT = [(8, (3, 4), True), (6, (1, 2), True), (10, (4, 5), True), (8, (6, 7), True), (5, (0,), True),
          (8, (2, 3), False)]


def caption_records(trainer, params, with_events: bool = True):
  layout = [(n, event_snippets, has_event and with_events) for n, event_snippets, has_event in LAYOUT]
  records = fixtures.planted_text_records(trainer, params, CAPTIONS, layout=layout)
  return records, [record["event"].tolist() for record in records]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  trainer, params = fixtures.save_run(str(workdir), fixtures.tiny_config("text"))
  records, events = caption_records(trainer, params)
  root = fixtures.write_records(tmp_path_factory.mktemp("records"), records)
  return str(workdir), root, events


@pytest.fixture(scope="module")
def text_run(setup):
  """The run of `setup`, loaded once."""
  from varcmp_jax import trained
  return trained.load(setup[0])


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


def test_wrong_query_kind_is_a_clear_error(setup, tmp_path):
  workdir, records, _ = setup
  wav = fixtures.write_audio(tmp_path / "clip.wav", fixtures.tone_waveform(2.0))
  with pytest.raises(SystemExit, match="query it with --text"):
    search.main(["--workdir", workdir, "--gallery", records, "--audio", wav])


@pytest.mark.parametrize("argv, message", [
    (["--text", "   "], "--text is empty"),
    (["--text", ""], "--text is empty"),
    (["--text", "a car", "--plot", "missing_folder/hits.png"], "missing_folder does not exist"),
    (["--text", "a car", "--plot", "hits.xyz"], "unknown image type .xyz"),
    (["--audio", "no_such_file.wav"], "no_such_file.wav: file not found"),
    (["--audio", "q.npy", "--audio-clip-seconds", "nan"], "--audio-clip-seconds nan: the seconds one row covers"),
    (["--audio", "q.npy", "--audio-clip-seconds", "0"], "--audio-clip-seconds 0.0: the seconds one row covers"),
    (["--text", "a car", "--iou", "2"], "--threshold and --iou in [0, 1]"),
    (["--index", "INDEX", "--text", "a car", "--localization"], "not allowed with argument"),
])
def test_bad_queries_fail_before_anything_runs(setup, capsys, monkeypatch, tmp_path, argv, message):
  workdir, records, _ = setup
  monkeypatch.chdir(tmp_path)
  from varcmp_jax import trained
  monkeypatch.setattr(trained, "load", lambda *a, **k: pytest.fail("the model was loaded"))
  where = [] if "--index" in argv else ["--workdir", workdir, "--gallery", records]
  with pytest.raises(SystemExit) as exit_info:
    search.main(where + argv)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert message in error and "Traceback" not in error
  assert not os.listdir(tmp_path)


def test_blank_text_is_an_error_for_the_query_encoder_too(text_run):
  with pytest.raises(ValueError, match="text query is empty"):
    search.QueryEncoder(text_run).text(" \n")


def test_a_query_longer_than_the_word_budget_says_so(text_run, capsys):
  budget, config = 6, text_run.config.copy_and_resolve_references()
  config.model.max_words = budget
  encoder = search.QueryEncoder(dataclasses.replace(text_run, config=config))
  encoder.text(" ".join(["red"] * budget))
  assert capsys.readouterr().err == ""
  encoder.text(" ".join(["red"] * (budget + 3)))
  assert f"the query has {budget + 3} words; this model reads the first {budget}" in capsys.readouterr().err


def test_table_fits_long_xd_ids():
  names = ["Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6", "v_Riot_in_the_street_x264__#1_label_B4-0-0",
           "short.mp4"]
  hits = [{"rank": i + 1, "score": 1.5 - i, "video": name, "caption": "", "segments": []}
          for i, name in enumerate(names)]
  lines = search.format_table(hits, "q").splitlines()
  assert [line.split()[2] for line in lines[2:]] == names            # whole, never cut or run together
  column = lines[1].index("key segments")
  assert all(line[column - 1] == " " and line[column] != " " for line in lines[2:])


def test_localization_without_events_says_so(setup, text_run, tmp_path_factory, capsys):
  records = fixtures.write_records(tmp_path_factory.mktemp("no_events"),
                                   caption_records(text_run.trainer, text_run.params, with_events=False)[0])
  assert search.main(["--workdir", setup[0], "--gallery", records, "--localization"]) == 0
  out = capsys.readouterr().out
  assert "no video of the split has an event interval" in out and "nan" not in out
  gallery = search.load_gallery(text_run, records, "test")
  result = search.localization_hit_rate(text_run, gallery, records, "test")
  assert result["all_events"] == 0 and result["hit_rate"] is None and result["hit_rate_all_events"] is None
  json.dumps(result, allow_nan=False)      # valid JSON for --json


# --- audio queries from audio files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audio_setup(tmp_path_factory):
  from varcmp_jax import trained
  root = tmp_path_factory.mktemp("audio")
  config = fixtures.tiny_config("audio")
  trainer, params = fixtures.save_run(str(root / "run"), config)
  records = fixtures.write_records(root / "records", fixtures.random_audio_records(config, 12))
  run = trained.Trained(config, trainer, params, 1, str(root / "run"))    # what trained.load restores
  waveform = fixtures.tone_waveform(6.0)
  files = {ext: fixtures.write_audio(root / f"query{ext}", waveform) for ext in fixtures.AUDIO_FORMATS}
  return {"run": run, "records": records, "root": root, "waveform": waveform, "files": files}


def reference_mel(waveform: np.ndarray, duration: float, snippets: int, config) -> np.ndarray:
  """The log-mel windows of 16 kHz samples, cut at the snippet centres of `duration` seconds."""
  audio = config.model.audio
  length = decode_lib.mel_window_samples(audio.mel_frames)
  samples = np.zeros(int(round(duration * 16000)), np.float32)
  samples[:min(len(samples), len(waveform))] = waveform[:len(samples)]
  centres = decode_lib.snippet_times(duration, snippets).mean(axis=1)
  starts = np.clip(np.round(centres * 16000).astype(int) - length // 2, 0, len(samples) - length)
  filters = decode_lib.mel_filters(audio.mel_bins).astype(np.float32)
  return np.stack([decode_lib.log_mel(samples[s:s + length], filters) for s in starts])


def decoded_samples(path: str) -> np.ndarray:
  """All samples of a 16 kHz mono audio file, decoded here without resampling."""
  with av.open(path) as container:
    frames = list(container.decode(audio=0))
  assert {(f.sample_rate, len(f.layout.channels)) for f in frames} == {(16000, 1)}
  to_float = lambda f: f.to_ndarray().reshape(-1).astype(np.float32) / (32768.0 if f.format.name == "s16" else 1.0)
  return np.concatenate([to_float(f) for f in frames])


def test_audio_files_as_queries_end_to_end(audio_setup, capsys):
  run, config = audio_setup["run"], audio_setup["run"].config
  gallery = search.load_gallery(run, audio_setup["records"], "test", use_cache=False)
  model = run.model
  files = audio_setup["files"]
  mels = []
  for ext, path in files.items():
    samples = decoded_samples(path)
    if ext in (".wav", ".flac"):     # lossless: the samples written, to 16-bit precision
      np.testing.assert_allclose(samples, audio_setup["waveform"], atol=2 / 32768)
    mels.append(reference_mel(samples, 6.0, config.data.snippets, config))
  queries = jax.device_get(jax.jit(lambda p, batch: model.apply({"params": p}, batch, method=model.encode_query))(
      run.params, {"mel": np.stack(mels), "mask": np.ones((len(mels), 8), bool)}))
  encoder = search.QueryEncoder(run)
  for q, (ext, path) in enumerate(files.items()):     # each file type gives the query of its samples
    query = encoder.audio_file(path)
    np.testing.assert_allclose(query.segments[0], queries.segments[q], atol=2e-3, err_msg=ext)
  expected = evaluate.level_and_combined_similarities(gallery.video, queries, config)["combined"][0]
  hits = search.search(run, gallery, encoder.audio_file(files[".wav"]), top_k=12)
  scores = np.array([h["score"] for h in hits])
  np.testing.assert_allclose(scores, expected[[h["index"] for h in hits]], atol=2e-3)
  assert np.all(np.diff(scores) <= 0) and sorted(h["index"] for h in hits) == list(range(12))

  # The command, on the in-memory gallery and on an index of it: the same hits.
  index = audio_setup["root"] / "index"
  build.build(run, audio_setup["records"], str(index), "test", shard_size=5)
  wav = audio_setup["files"][".wav"]
  hits = run_json(capsys, ["--workdir", run.workdir, "--gallery", audio_setup["records"], "--audio", wav,
                           "--top-k", "5", "--no-cache"])["hits"]
  indexed = run_json(capsys, ["--index", str(index), "--audio", wav, "--top-k", "5"])
  assert indexed["query"] == f"audio of {wav}"
  assert [h["video"] for h in indexed["hits"]] == [h["video"] for h in hits]
  np.testing.assert_allclose([h["score"] for h in indexed["hits"]], [h["score"] for h in hits], atol=2e-3)


def test_undecodable_audio_names_the_upload_not_the_temp_file(audio_setup, tmp_path):
  encoder = search.QueryEncoder(audio_setup["run"])
  temp = tmp_path / "tmpq1w2e3.wav"
  temp.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(search.QueryError) as error:
    encoder.audio_file(str(temp), name="my clip.wav")
  message = str(error.value)
  assert message.startswith("my clip.wav: cannot open") and "tmpq1w2e3" not in message and "\n" not in message


# --- audio queries from pre-extracted features (model.audio.kind = "features", e.g. VGGish) ---------------


def overlap_mean(rows: np.ndarray, clip_seconds: float, times: np.ndarray, steps: int = 200_000) -> np.ndarray:
  """Independent reference: each snippet [a, b] is the mean of the piecewise-constant rows (row i over
  [i S, (i+1) S]) at `steps` midpoints of [a, b] (a fine sum, not the running integral of the code)."""
  rows, out = rows.astype(np.float64), []
  for a, b in times:
    t = a + (np.arange(steps) + 0.5) * (b - a) / steps
    out.append(rows[np.minimum((t // clip_seconds).astype(int), len(rows) - 1)].mean(0))
  return np.stack(out)


@pytest.fixture(scope="module")
def features_audio_setup(tmp_path_factory):
  from varcmp_jax import trained
  root = tmp_path_factory.mktemp("audio_features")
  config = fixtures.tiny_config("audio")
  config.model.audio.update(kind="features", feature_dim=12)
  trainer, params = fixtures.save_run(str(root / "run"), config)
  records = fixtures.write_records(root / "records", fixtures.random_audio_records(config, 6))
  return trained.Trained(config, trainer, params, 1, str(root / "run")), records


def test_audio_feature_arrays_as_queries(features_audio_setup, tmp_path, capsys):
  run, records = features_audio_setup
  rows = np.random.default_rng(0).standard_normal((23, 12)).astype(np.float32)    # 23 rows: 22.08 s at 0.96 s
  path = tmp_path / "Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6__vggish.npy"   # glob characters in the id
  np.save(path, rows)
  model = run.model
  encode = lambda features: jax.device_get(model.apply(
      {"params": run.params}, {"audio_features": features[None], "mask": np.ones((1, 8), bool)},
      method=model.encode_query)).segments[0]
  for clip_seconds in (0.96, 0.5):
    edges = np.linspace(0.0, 23 * clip_seconds, 9)
    expected = encode(overlap_mean(rows, clip_seconds, np.stack([edges[:-1], edges[1:]], -1)).astype(np.float32))
    query = search.QueryEncoder(run).audio_file(str(path), clip_seconds)
    np.testing.assert_allclose(query.segments[0], expected, atol=1e-4)
  # The command: --audio-clip-seconds reaches the encoder (0.5 s rows give another query than the default).
  argv = ["--workdir", run.workdir, "--gallery", records, "--audio", str(path), "--top-k", "6", "--no-cache"]
  default, half = run_json(capsys, argv)["hits"], run_json(capsys, argv + ["--audio-clip-seconds", "0.5"])["hits"]
  assert len(default) == len(half) == 6
  assert [h["score"] for h in default] != [h["score"] for h in half]


def test_audio_feature_queries_say_what_is_wrong(features_audio_setup, tmp_path, monkeypatch):
  """Bad and hostile .npy queries (made here): one QueryError naming the file, never numpy's or a temp name."""
  run, _ = features_audio_setup
  encoder = search.QueryEncoder(run)
  wav = fixtures.write_audio(tmp_path / "clip.wav", fixtures.tone_waveform(2.0))
  np.save(tmp_path / "narrow.npy", np.zeros((10, 7), np.float32))
  np.save(tmp_path / "nan.npy", np.full((10, 12), np.nan, np.float32))
  np.save(tmp_path / "crops.npy", np.zeros((10, 5, 12), np.float32))
  np.save(tmp_path / "huge_values.npy", np.full((10, 12), 1e38, np.float32))
  lying_npy(tmp_path / "huge_header.npy", (10 ** 12, 128))
  (tmp_path / "random.npy").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  Payload.marker = str(tmp_path / "unpickled")
  np.save(tmp_path / "pickle.npy", np.array([Payload()], dtype=object), allow_pickle=True)
  for path, message in [(wav, r"a \.npy array of them, \(N, 12\) rows"),
                        (tmp_path / "narrow.npy", "7-d audio features; the model's audio tower takes 12-d"),
                        (tmp_path / "nan.npy", "non-finite: .*nan.npy has 120 NaN"),
                        (tmp_path / "crops.npy", r"misshapen: .*crops.npy has shape \(10, 5, 12\)"),
                        (tmp_path / "huge_values.npy", r"out of range: values beyond float16 \(\|x\| > 65504\) in "),
                        (tmp_path / "huge_header.npy", r"truncated: its header says shape \(1000000000000, 128\)"),
                        (tmp_path / "random.npy", "not a .npy array file"),
                        (tmp_path / "pickle.npy", "holds Python objects")]:
    with pytest.raises(search.QueryError, match=message) as error:
      encoder.audio_file(str(path))
    assert "\n" not in str(error.value) and "allow_pickle" not in str(error.value)
  assert not os.path.exists(Payload.marker)
  # `name`: an upload's own name in every message, never the server's temp file.
  for path in (tmp_path / "huge_header.npy", tmp_path / "huge_values.npy", tmp_path / "narrow.npy"):
    with pytest.raises(search.QueryError) as error:
      encoder.audio_file(str(path), name="upload.npy")
    message = str(error.value)
    assert "upload.npy" in message and path.name not in message and str(tmp_path) not in message
  # What a query may allocate is bounded.
  np.save(tmp_path / "long.npy", np.zeros((40, 12), np.float32))        # 1,920 bytes
  monkeypatch.setattr(search, "QUERY_MAX_BYTES", 1000)
  with pytest.raises(search.QueryError, match=r"long.npy: too large: .* the limit is 1,000 bytes"):
    encoder.audio_file(str(tmp_path / "long.npy"))


def test_a_tower_that_overflows_is_refused_not_scored(features_audio_setup, tmp_path):
  """Values the tower turns into inf / NaN (finite input, e.g. within float16 but far from any feature the model
  saw, or a model damaged by training) are refused with the file's name, not scored as NaN."""
  run, _ = features_audio_setup
  np.save(tmp_path / "q.npy", np.ones((10, 12), np.float32))
  broken = jax.tree_util.tree_map(lambda x: np.full_like(x, np.inf) if np.issubdtype(x.dtype, np.floating) else x,
                                  run.params)
  with pytest.raises(search.QueryError, match="upload.npy: the model's audio tower gives non-finite values"):
    search.QueryEncoder(dataclasses.replace(run, params=broken)).audio_file(str(tmp_path / "q.npy"), name="upload.npy")


def test_the_command_refuses_hostile_queries_and_non_finite_scores_in_one_line(features_audio_setup, tmp_path, capsys):
  run, records = features_audio_setup
  argv = ["--workdir", run.workdir, "--gallery", records, "--top-k", "3"]
  lying_npy(tmp_path / "huge.npy", (10 ** 12, 128))
  with pytest.raises(SystemExit) as error:
    search.main(argv + ["--audio", str(tmp_path / "huge.npy")])
  assert str(error.value).startswith("varcmp search: audio features unreadable: ") and "huge.npy" in str(error.value)
  assert "\n" not in str(error.value)
  # A gallery whose cached embeddings went non-finite: no `nan` score is printed with exit status 0.
  np.save(tmp_path / "q.npy", np.ones((10, 12), np.float32))
  result = run_json(capsys, argv + ["--audio", str(tmp_path / "q.npy")])
  cache = result["gallery_cache"]
  with np.load(cache) as cached:
    fields = {k: cached[k] for k in cached.files}
  fields["frames"] = np.full_like(fields["frames"], np.nan)
  np.savez(cache, **fields)
  with pytest.raises(SystemExit) as error:
    search.main(argv + ["--audio", str(tmp_path / "q.npy")])
  assert "scores a non-finite value" in str(error.value) and f"the embeddings of {records}" in str(error.value)
  assert "nan" not in capsys.readouterr().out.lower()
