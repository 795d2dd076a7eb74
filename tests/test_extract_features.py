"""extract-features against the HF PyTorch tower on a tiny random CLIP; manifest; resume; pipeline read-back."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data_prep import extract_features
from varcmp_jax import config as config_lib
from varcmp_jax.data import pipeline
from varcmp_jax.data.records import decode_record, encode_record

IMAGE, PATCH, WIDTH, PROJ = 32, 8, 32, 24
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      vision_config=dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         image_size=IMAGE, patch_size=PATCH),
      text_config=dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
      projection_dim=PROJ)
  model = transformers.CLIPModel(config).eval()
  path = tmp_path_factory.mktemp("clip")
  model.save_pretrained(path)
  return model, str(path)


def frame_record(i, num_snippets, rng):
  return dict(video=f"v{i}.mp4", caption=f"caption {i}", tokens=np.arange(77, dtype=np.int32), label=np.int32(i % 2),
              split="x", duration=np.float32(num_snippets), times=np.zeros((num_snippets, 2), np.float32),
              event=np.array([-1, -1], np.float32), prior=rng.uniform(size=num_snippets).astype(np.float32),
              mel=rng.normal(size=(num_snippets, 4, 3)).astype(np.float16),
              frames=rng.integers(0, 256, (num_snippets, IMAGE, IMAGE, 3)).astype(np.uint8))


@pytest.fixture(scope="module")
def frame_records(tmp_path_factory):
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("frames")
  layout = {"train": [[3, 5], [2]], "test": [[6, 1, 4]]}   # snippets per record, per shard
  splits, recs, i = {}, {}, 0
  for split, shards in layout.items():
    names = []
    for s, lengths in enumerate(shards):
      name = f"{split}-{s:05d}.array_record"
      writer = ArrayRecordWriter(str(root / name), "group_size:1")
      for n in lengths:
        record = frame_record(i, n, rng)
        recs[record["video"]] = record
        writer.write(encode_record(record))
        i += 1
      writer.close()
      names.append(name)
    splits[split] = {"records": sum(map(len, shards)), "shards": names,
                     "shapes": {"frames": [3, IMAGE, IMAGE, 3], "mel": [3, 4, 3]},
                     "dtypes": {"frames": "uint8", "mel": "float16"}}
  (root / "manifest.json").write_text(json.dumps({"splits": splits, "skipped": [{"video": "bad.mp4", "reason": "x"}]}))
  return root, recs


def reference_tower(hf_model, frames):
  """HF PyTorch: projected CLS (= get_image_features) and projected post-LN patch tokens, 2x2 block means."""
  pixels = (frames.astype(np.float32) / 255.0 - MEAN) / STD
  with torch.no_grad():
    hidden = hf_model.vision_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state
    tokens = hf_model.visual_projection(hf_model.vision_model.post_layernorm(hidden)).numpy()
  grid = IMAGE // PATCH
  patches = tokens[:, 1:].reshape(len(frames), grid, grid, PROJ)
  regions = np.zeros((len(frames), 2, 2, PROJ), np.float32)
  for i in range(2):
    for j in range(2):
      regions[:, i, j] = patches[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
  return tokens[:, 0], regions.reshape(len(frames), 4, PROJ)


def read_all(path):
  reader = ArrayRecordReader(str(path))
  out = [decode_record(b) for b in reader.read_all()]
  reader.close()
  return out


@pytest.mark.parametrize("dtype,compute,tol", [("float16", "float32", 2e-3), ("bfloat16", "bfloat16", 6e-2)])
def test_features_match_hf_tower(hf_clip, frame_records, tmp_path, dtype, compute, tol):
  hf_model, clip_dir = hf_clip
  root, recs = frame_records
  out = tmp_path / "features"
  rc = extract_features.main(["--records", str(root), "--clip", clip_dir, "--out", str(out), "--batch", "4",
                              "--dtype", dtype, "--compute-dtype", compute, "--region-grid", "2"])
  assert rc == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["splits"]["train"]["records"] == 3 and manifest["splits"]["test"]["records"] == 3
  assert manifest["splits"]["test"]["shards"] == ["test-00000.array_record"]
  assert manifest["splits"]["train"]["shapes"] == {"features": [3, PROJ], "regions": [3, 4, PROJ], "mel": [3, 4, 3]}
  assert manifest["splits"]["train"]["dtypes"] == {"features": dtype, "regions": dtype, "mel": "float16"}
  assert manifest["skipped"] == [{"video": "bad.mp4", "reason": "x"}]
  assert manifest["features"]["dim"] == PROJ and manifest["features"]["regions"] == 4
  assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

  seen = []
  for split in ("train", "test"):
    for name in manifest["splits"][split]["shards"]:
      for record in read_all(out / name):
        source = recs[record["video"]]
        seen.append(record["video"])
        assert "frames" not in record
        for key in set(source) - {"frames"}:
          np.testing.assert_array_equal(record[key], source[key], err_msg=key)
        expected_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
        assert record["features"].dtype == expected_dtype and record["regions"].dtype == expected_dtype
        g, r = reference_tower(hf_model, source["frames"])
        assert record["features"].shape == g.shape and record["regions"].shape == r.shape
        scale = np.abs(g).max()
        np.testing.assert_allclose(record["features"].astype(np.float32), g, atol=tol * scale, rtol=0)
        np.testing.assert_allclose(record["regions"].astype(np.float32), r, atol=tol * scale, rtol=0)
  assert sorted(seen) == sorted(recs)

  # The Grain pipeline reads them back as a features-regime split, float32 (a config of their width and T).
  config = config_lib.default_config("text", "features")
  config.data.records, config.data.snippets, config.model.clip.projection_dim = str(out), 3, PROJ
  batch = next(iter(pipeline.make_eval_iterator(config, "test", 3)))
  assert batch["features"].dtype == np.float32 and batch["regions"].shape == (3, 3, 4, PROJ)


def test_rerun_keeps_finished_shards(hf_clip, frame_records, tmp_path):
  _, clip_dir = hf_clip
  root, _ = frame_records
  out = tmp_path / "features"
  args = ["--records", str(root), "--clip", clip_dir, "--out", str(out), "--batch", "8", "--compute-dtype", "float32"]
  assert extract_features.main(args) == 0
  done = out / "train-00000.array_record"
  before = done.stat().st_mtime_ns
  os.remove(out / "test-00000.array_record")             # as if killed before this shard was renamed
  (out / "test-00000.array_record.tmp").write_bytes(b"partial")
  assert extract_features.main(args) == 0
  assert done.stat().st_mtime_ns == before
  assert len(read_all(out / "test-00000.array_record")) == 3
  assert not (out / "test-00000.array_record.tmp").exists()


def test_bad_inputs_fail_with_the_file_named(hf_clip, tmp_path, capsys):
  _, clip_dir = hf_clip
  assert extract_features.main(["--records", str(tmp_path), "--clip", clip_dir, "--out", str(tmp_path / "o")]) == 1
  assert "manifest.json" in capsys.readouterr().err
  writer = ArrayRecordWriter(str(tmp_path / "s.array_record"), "group_size:1")
  record = frame_record(0, 2, np.random.default_rng(0))
  record["frames"] = record["frames"][:, :16]
  writer.write(encode_record(record))
  writer.close()
  (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": {"records": 1, "shards": ["s.array_record"]}}}))
  assert extract_features.main(["--records", str(tmp_path), "--clip", clip_dir, "--out", str(tmp_path / "o"),
                                "--compute-dtype", "float32"]) == 1
  err = capsys.readouterr().err
  assert "s.array_record" in err and "v0.mp4" in err


def test_batches_span_videos_in_order():
  """Packing frames of several videos into shared batches returns each video's rows, in order."""
  calls = []

  def embed(frames):
    calls.append(len(frames))
    return frames.reshape(len(frames), -1).sum(1, keepdims=True), frames[:, :2]

  rng = np.random.default_rng(1)
  videos = [(k, rng.integers(0, 9, (n, 3, 3, 3)).astype(np.uint8)) for k, n in enumerate([3, 7, 1, 2, 9])]
  results = list(extract_features.embed_videos(embed, videos, 4))
  assert [k for k, _, _ in results] == [0, 1, 2, 3, 4]
  assert calls == [4] * 6   # 22 frames -> 6 full-size calls, the last zero-padded
  for (k, frames), (_, g, r) in zip(videos, results):
    np.testing.assert_array_equal(g[:, 0], frames.reshape(len(frames), -1).sum(1))
    np.testing.assert_array_equal(r, frames[:, :2])
