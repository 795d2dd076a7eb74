"""HF checkpoint import/export: round trips, from_pretrained, the CLI, and clear errors on bad directories."""
import json
import os
import re

import flax
import jax
import numpy as np
import pytest
import torch
import transformers

from varcmp_jax import clip
from varcmp_jax import cli as varcmp_cli
from varcmp_jax.clip import cli

HF_CONFIG = dict(
    projection_dim=24,
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=16, patch_size=8),
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     vocab_size=1000, max_position_embeddings=77, bos_token_id=998, eos_token_id=999))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  torch.manual_seed(0)
  torch_model = transformers.CLIPModel(transformers.CLIPConfig(**HF_CONFIG)).eval()
  directory = str(tmp_path_factory.mktemp("hf_clip"))
  torch_model.save_pretrained(directory)
  return directory


def _flat(params):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


def _assert_trees_equal(a, b):
  a, b = _flat(a), _flat(b)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def _inputs():
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  ids = np.zeros((2, 77), np.int32)
  ids[:, 0], ids[0, 1:4], ids[0, 4], ids[1, 1:76], ids[1, 76] = 998, [5, 6, 7], 999, 3, 999
  return pixels, ids


def test_from_hf_matches_torch_outputs(hf_dir):
  model, params = clip.from_hf(hf_dir)
  pixels, ids = _inputs()
  torch_model = transformers.CLIPModel.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    ref_image = torch_model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    ref_text = torch_model.get_text_features(input_ids=torch.from_numpy(ids).long())
  image, text = jax.jit(model.apply)({"params": params}, pixels, ids)
  np.testing.assert_allclose(np.asarray(image), ref_image.pooler_output.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(text), ref_text.pooler_output.numpy(), atol=1e-5, rtol=0)
  # The raw weights, read independently of the mapping table (two layout cases checked by hand).
  with torch.no_grad():
    np.testing.assert_array_equal(np.asarray(params["visual_projection"]["kernel"]),
                                  torch_model.visual_projection.weight.numpy().T)
    np.testing.assert_array_equal(np.asarray(params["vision"]["patch_embedding"]["kernel"]),
                                  torch_model.vision_model.embeddings.patch_embedding.weight.numpy().transpose(2, 3, 1, 0))


def test_flax_to_hf_to_flax_is_bit_exact(tmp_path):
  config = clip.CLIPConfig.from_hf(transformers.CLIPConfig(**HF_CONFIG))
  model = clip.CLIP(config)
  pixels, ids = _inputs()
  params = jax.jit(model.init)(jax.random.key(1), pixels, ids)["params"]
  out = str(tmp_path / "exported")
  clip.to_hf(model, params, out)
  assert os.path.isfile(os.path.join(out, "model.safetensors"))
  torch_model, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  model2, params2 = clip.from_hf(out)
  assert model2.config == config
  _assert_trees_equal(params, params2)
  # And the exported torch model computes what the Flax model computes.
  with torch.no_grad():
    ref = torch_model.eval().get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, pixels, method=model.encode_image)),
                             ref.pooler_output.numpy(), atol=1e-5, rtol=0)


def test_save_params_and_load(hf_dir, tmp_path):
  model, params = clip.from_hf(hf_dir)
  out = str(tmp_path / "imported")
  clip.save_params(params, model.config, out)
  model2, params2 = clip.load(out)
  assert model2.config == model.config
  _assert_trees_equal(params, params2)
  model3, params3 = clip.load(hf_dir, dtype="bfloat16")   # a HF dir is accepted too
  assert model3.config.dtype == "bfloat16"
  _assert_trees_equal(params, params3)


def test_import_and_export_cli(hf_dir, tmp_path, capsys):
  imported, exported = str(tmp_path / "imported"), str(tmp_path / "exported")
  assert varcmp_cli.main(["import-clip", "--hf", hf_dir, "--out", imported]) == 0
  assert sorted(os.listdir(imported)) == ["config.json", "params.msgpack"]
  _, params = clip.load(imported)
  _assert_trees_equal(clip.from_hf(hf_dir)[1], params)
  assert varcmp_cli.main(["export", "--params", imported, "--out", exported]) == 0
  _, info = transformers.CLIPModel.from_pretrained(exported, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  _assert_trees_equal(clip.from_hf(exported)[1], params)
  assert cli.import_main(["--hf", str(tmp_path / "nowhere"), "--out", imported]) == 1
  assert str(tmp_path / "nowhere") in capsys.readouterr().err


def test_missing_or_malformed_directories(hf_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    clip.from_hf(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    clip.load(str(tmp_path / "nowhere"))

  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=re.escape(str(empty / "config.json"))):
    clip.load(str(empty))

  bad_json = tmp_path / "bad_json"
  bad_json.mkdir()
  (bad_json / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=re.escape(str(bad_json / "config.json"))):
    clip.from_hf(str(bad_json))

  not_clip = tmp_path / "not_clip"
  not_clip.mkdir()
  (not_clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="model_type"):
    clip.from_hf(str(not_clip))

  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  (no_weights / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
  with pytest.raises(FileNotFoundError, match=re.escape(str(no_weights / "model.safetensors"))):
    clip.from_hf(str(no_weights))

  truncated = tmp_path / "truncated"
  truncated.mkdir()
  (truncated / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
  (truncated / "model.safetensors").write_bytes(open(os.path.join(hf_dir, "model.safetensors"), "rb").read()[:100])
  with pytest.raises(ValueError, match=re.escape(str(truncated / "model.safetensors"))):
    clip.from_hf(str(truncated))

  imported = tmp_path / "imported"
  model, params = clip.from_hf(hf_dir)
  clip.save_params(params, model.config, str(imported))
  (imported / "params.msgpack").write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match=re.escape(str(imported / "params.msgpack"))):
    clip.load(str(imported))
  (imported / "params.msgpack").unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(str(imported / "params.msgpack"))):
    clip.load(str(imported))


def test_wrong_sizes_name_the_weight_file(hf_dir, tmp_path):
  """A config that disagrees with the weights is reported with the file and the parameter."""
  mismatched = tmp_path / "mismatched"
  mismatched.mkdir()
  config = json.loads(open(os.path.join(hf_dir, "config.json")).read())
  config["projection_dim"] = 16
  (mismatched / "config.json").write_text(json.dumps(config))
  (mismatched / "model.safetensors").write_bytes(open(os.path.join(hf_dir, "model.safetensors"), "rb").read())
  with pytest.raises(ValueError, match="model.safetensors.*projection"):
    clip.from_hf(str(mismatched))


def test_bf16_checkpoint_is_read_as_float32(hf_dir, tmp_path):
  torch_model = transformers.CLIPModel.from_pretrained(hf_dir).to(torch.bfloat16)
  torch_model.save_pretrained(str(tmp_path))
  _, params = clip.from_hf(str(tmp_path))
  kernel = params["text_projection"]["kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(kernel), torch_model.text_projection.weight.detach().float().numpy().T)
