"""`varcmp export`: the towers a model lacks come from config.model.clip_checkpoint (or a random init, said so
in config.json); the export never writes into a workdir."""
import json

import flax
import jax
import numpy as np
import pytest

from varcmp_jax import clip
from varcmp_jax import config as config_lib
from varcmp_jax import export
from varcmp_jax.model.varcmp import VarCMP, clip_config

IMAGE, PATCH, WIDTH, SNIPPETS = 16, 8, 32, 3
IMAGE_PARTS, TEXT_PARTS = ("vision", "visual_projection"), ("text", "text_projection")


def tiny_config(task, regime):
  config = config_lib.default_config(task, regime)
  config.model.clip = config_lib.clip_tiny(image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=1)
  config.model.dtype = "float32"
  config.model.temporal = dict(num_layers=1, num_heads=2, mlp_ratio=2, max_len=8)
  config.model.anomaly_head.hidden = 8
  config.model.audio.update(kind="spectrogram", mel_frames=16, mel_bins=8, patch_size=PATCH)
  return config


def random_like(shapes, seed):
  """Random arrays of the given shape tree (no init to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def model_params(config, seed=1):
  model = VarCMP(config.model, task=config.task, regime=config.regime)
  batch = {"tokens": np.zeros((1, 77), np.int32), "mask": np.ones((1, SNIPPETS), bool), "label": np.zeros(1, np.int32),
           "frames": np.zeros((1, SNIPPETS, IMAGE, IMAGE, 3), np.uint8),
           "features": np.zeros((1, SNIPPETS, WIDTH), np.float32),
           "regions": np.zeros((1, SNIPPETS, config.model.region_grid ** 2, WIDTH), np.float32),
           "mel": np.zeros((1, SNIPPETS, 16, 8), np.float32)}
  return random_like(jax.eval_shape(model.init, jax.random.key(0), batch)["params"], seed)


def donor_checkpoint(config, path):
  """A whole CLIP (both towers) saved as a `varcmp import-clip` directory; returns its params."""
  cfg = clip_config(config.model)
  shapes = jax.eval_shape(clip.CLIP(cfg).init, jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 3), np.float32),
                          np.zeros((1, 77), np.int32))["params"]
  donor = random_like(shapes, seed=7)
  clip.save_params(donor, cfg, str(path))
  return donor


def flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parametrize("task,regime,missing,kept", [("text", "features", IMAGE_PARTS, TEXT_PARTS),
                                                      ("audio", "frames", TEXT_PARTS, IMAGE_PARTS)])
def test_missing_tower_is_filled_from_clip_checkpoint(tmp_path, task, regime, missing, kept):
  config = tiny_config(task, regime)
  params = model_params(config)
  assert not any(part in params["clip"] for part in missing)
  donor = donor_checkpoint(config, tmp_path / "donor")
  config.model.clip_checkpoint = str(tmp_path / "donor")

  full, provenance = export.complete_clip_params(config, params)
  tower = "image" if missing == IMAGE_PARTS else "text"
  other = "text" if tower == "image" else "image"
  assert provenance[tower].startswith(f"copied from config.model.clip_checkpoint={tmp_path / 'donor'}")
  assert provenance[other] == "trained"
  for part in missing:          # the donor's tower, exactly
    got, want = flat(full[part]), flat(donor[part])
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=f"{part}/{key}")
  for part in kept:             # the trained tower, not the donor's
    for key, value in flat(params["clip"][part]).items():
      np.testing.assert_array_equal(np.asarray(flat(full[part])[key]), value)

  # Through `export`: OUT/clip is a HF CLIPModel directory holding the donor's tower.
  out = tmp_path / "out"
  export.export(config, params, str(out), step=3)
  _, reloaded = clip.load(str(out / "clip"))
  part = missing[0]
  for key, value in flat(donor[part]).items():
    np.testing.assert_allclose(np.asarray(flat(reloaded[part])[key]), value, rtol=0, atol=0, err_msg=key)
  written = json.loads((out / "config.json").read_text())
  assert written["step"] == 3 and written["clip_towers"] == provenance


def test_without_clip_checkpoint_the_missing_tower_is_a_random_init_said_so():
  config = tiny_config("text", "features")
  params = model_params(config)
  full, provenance = export.complete_clip_params(config, params, seed=0)
  assert provenance == {"image": "random init (not used by this model)", "text": "trained",
                        "logit_scale": "trained"}
  assert full["visual_projection"]["kernel"].shape == (WIDTH, WIDTH)
  assert np.std(np.asarray(full["visual_projection"]["kernel"])) > 0
  np.testing.assert_array_equal(np.asarray(full["text_projection"]["kernel"]), params["clip"]["text_projection"]["kernel"])


def test_export_never_writes_into_a_workdir(tmp_path, capsys):
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text('{"the": "run config"}')
  other_run = tmp_path / "other_run"
  (other_run / "checkpoints").mkdir(parents=True)
  for out, message in [(workdir, "is the workdir"), (workdir / "export", "is inside the workdir"),
                       (workdir / "." / "checkpoints" / "..", "is the workdir"),
                       (other_run, "is a `varcmp train` workdir")]:
    with pytest.raises(SystemExit) as error:
      export.main(["--workdir", str(workdir), "--out", str(out)])
    assert message in str(error.value) and error.value.code not in (0, None), out
  assert (workdir / "config.json").read_text() == '{"the": "run config"}'
  assert not (workdir / "export").exists()
  assert sorted(p.name for p in other_run.iterdir()) == ["checkpoints"]
