"""HF `CLIPModel` checkpoints <-> Flax CLIP params, and the `import-clip` checkpoint format.

One table, `param_table(config)`, lists every parameter as (Flax path, torch key, kind); both directions
read it, so import and export cannot drift apart. Kinds: "dense" (torch Linear weight = kernel.T),
"conv" (torch OIHW = Flax HWIO transposed), "copy".
"""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from varcmp_jax.clip import model as clip_model

# `varcmp import-clip` output: config.json (this marker + the sizes) and params.msgpack.
FORMAT = "varcmp-clip"
PARAMS_FILE = "params.msgpack"
CONFIG_FILE = "config.json"
# Non-persistent buffers that older HF checkpoints still carry.
_IGNORED_TORCH_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def param_table(config: clip_model.CLIPConfig) -> list[tuple[str, str, str]]:
  """(Flax path joined by "/", torch state-dict key, kind) for every CLIP parameter."""
  rows = []
  for tower, prefix, cfg in (("vision", "vision_model", config.vision), ("text", "text_model", config.text)):
    for i in range(cfg.num_hidden_layers):
      src, dst = f"{tower}/layers_{i}", f"{prefix}.encoder.layers.{i}"
      for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rows += [(f"{src}/self_attn/{proj}/kernel", f"{dst}.self_attn.{proj}.weight", "dense"),
                 (f"{src}/self_attn/{proj}/bias", f"{dst}.self_attn.{proj}.bias", "copy")]
      for fc in ("fc1", "fc2"):
        rows += [(f"{src}/mlp/{fc}/kernel", f"{dst}.mlp.{fc}.weight", "dense"),
                 (f"{src}/mlp/{fc}/bias", f"{dst}.mlp.{fc}.bias", "copy")]
      for norm in ("layer_norm1", "layer_norm2"):
        rows += [(f"{src}/{norm}/scale", f"{dst}.{norm}.weight", "copy"),
                 (f"{src}/{norm}/bias", f"{dst}.{norm}.bias", "copy")]
  for path, key in (("vision/pre_layrnorm", "vision_model.pre_layrnorm"),
                    ("vision/post_layernorm", "vision_model.post_layernorm"),
                    ("text/final_layer_norm", "text_model.final_layer_norm")):
    rows += [(f"{path}/scale", f"{key}.weight", "copy"), (f"{path}/bias", f"{key}.bias", "copy")]
  rows += [
      ("vision/patch_embedding/kernel", "vision_model.embeddings.patch_embedding.weight", "conv"),
      ("vision/class_embedding", "vision_model.embeddings.class_embedding", "copy"),
      ("vision/position_embedding", "vision_model.embeddings.position_embedding.weight", "copy"),
      ("text/token_embedding/embedding", "text_model.embeddings.token_embedding.weight", "copy"),
      ("text/position_embedding/embedding", "text_model.embeddings.position_embedding.weight", "copy"),
      ("visual_projection/kernel", "visual_projection.weight", "dense"),
      ("text_projection/kernel", "text_projection.weight", "dense"),
      ("logit_scale", "logit_scale", "copy"),
  ]
  return rows


def _to_flax(x, kind):
  return {"dense": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0), "copy": lambda a: a}[kind](x)


def _to_torch(x, kind):
  return {"dense": lambda a: a.T, "conv": lambda a: a.transpose(3, 2, 0, 1), "copy": lambda a: a}[kind](x)


def params_from_state_dict(state: dict, config: clip_model.CLIPConfig, source: str = "state dict"):
  """torch-named numpy arrays -> the Flax params tree (in config.param_dtype). `source` names the file."""
  extra = set(state) - {key for _, key, _ in param_table(config)} - set(_IGNORED_TORCH_KEYS)
  if extra:
    raise ValueError(f"{source}: unexpected CLIP weights {sorted(extra)[:8]}")
  flat = {}
  for path, key, kind in param_table(config):
    if key not in state:
      raise ValueError(f"{source}: missing CLIP weight {key!r}")
    flat[tuple(path.split("/"))] = jnp.asarray(_to_flax(np.asarray(state[key]), kind), config.param_dtype)
  params = flax.traverse_util.unflatten_dict(flat)
  _check_shapes(params, config, source)
  return params


def state_dict_from_params(params, config: clip_model.CLIPConfig) -> dict[str, np.ndarray]:
  """The Flax params tree -> torch-named float32 numpy arrays (contiguous, torch layout)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return {key: np.array(_to_torch(np.asarray(flat[path], np.float32), kind), order="C")  # a writable copy
          for path, key, kind in param_table(config)}


def _check_shapes(params, config, source):
  model = clip_model.CLIP(config)
  v = config.vision
  pixels = jax.ShapeDtypeStruct((1, *clip_model._pair(v.image_size), v.num_channels), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, config.text.max_position_embeddings), jnp.int32)
  expected = jax.eval_shape(model.init, jax.random.key(0), pixels, ids)["params"]
  want = flax.traverse_util.flatten_dict(expected, sep="/")
  got = flax.traverse_util.flatten_dict(params, sep="/")
  for path, spec in want.items():
    if got[path].shape != spec.shape:
      raise ValueError(f"{source}: {path} has shape {got[path].shape}, the config needs {spec.shape}")


def _read_json(path):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: malformed JSON ({e})") from e


def _read_hf_weights(directory):
  """The state dict of a HF save_pretrained dir: model.safetensors (maybe sharded) or pytorch_model.bin."""
  import safetensors.flax  # pylint: disable=g-import-not-at-top  (the numpy loader cannot read bf16)
  single = os.path.join(directory, "model.safetensors")
  index = os.path.join(directory, "model.safetensors.index.json")
  legacy = os.path.join(directory, "pytorch_model.bin")
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' object")
    files = [os.path.join(directory, f) for f in sorted(set(weight_map.values()))]
  elif os.path.isfile(legacy):
    import torch  # pylint: disable=g-import-not-at-top
    try:
      state = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt pickle
      raise ValueError(f"{legacy}: cannot read the PyTorch weights ({e})") from e
    return {k: v.float().numpy() for k, v in state.items()}, legacy
  else:
    raise FileNotFoundError(f"{single}: not found (nor {index} or {legacy}); is {directory} a CLIPModel "
                            "save_pretrained directory?")
  state = {}
  for f in files:
    try:
      with jax.default_device(jax.devices("cpu")[0]):   # host memory: the arrays are converted right away
        state.update(safetensors.flax.load_file(f))
    except Exception as e:  # safetensors raises SafetensorError / OSError for truncated or foreign files
      raise ValueError(f"{f}: cannot read safetensors weights ({e})") from e
  return state, files[0] if len(files) == 1 else index


def _config_from_hf_json(path, **run_settings):
  import transformers  # pylint: disable=g-import-not-at-top
  d = _read_json(path)
  if d.get("model_type") != "clip":
    raise ValueError(f"{path}: model_type is {d.get('model_type')!r}, expected 'clip' (a HF CLIPModel)")
  try:
    hf_config = transformers.CLIPConfig.from_dict(d)
  except Exception as e:  # HF strict dataclasses raise several types on bad fields
    raise ValueError(f"{path}: not a valid CLIPConfig ({e})") from e
  return clip_model.CLIPConfig.from_hf(hf_config, **run_settings)


def from_hf(directory: str, **run_settings):
  """A HF `CLIPModel.save_pretrained` directory -> (CLIP module, params).

  run_settings: dtype, param_dtype, attention_impl, remat (see `CLIPConfig.from_dict`).
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such HF CLIP directory")
  config = _config_from_hf_json(os.path.join(directory, CONFIG_FILE), **run_settings)
  state, source = _read_hf_weights(directory)
  return clip_model.CLIP(config), params_from_state_dict(state, config, source)


def to_hf(model: clip_model.CLIP, params, out_dir: str) -> str:
  """Write `params` as a HF `CLIPModel` directory (save_pretrained, safetensors); returns out_dir."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = model.config
  state = {k: torch.from_numpy(v) for k, v in state_dict_from_params(params, config).items()}
  with torch.device("meta"):   # no random init of weights that are replaced right away
    hf_model = transformers.CLIPModel(config.to_hf())
  hf_model.load_state_dict(state, strict=True, assign=True)
  hf_model.save_pretrained(out_dir, safe_serialization=True)
  return out_dir


def save_params(params, config: clip_model.CLIPConfig, out_dir: str) -> str:
  """Write the `import-clip` format: config.json (sizes) + params.msgpack (the Flax tree, as stored)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump({"format": FORMAT, "clip": config.to_dict()}, f, indent=2)
  tree = flax.core.unfreeze(params)
  blob = flax.serialization.msgpack_serialize(flax.traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}))
  with open(os.path.join(out_dir, PARAMS_FILE), "wb") as f:
    f.write(blob)
  return out_dir


def load(path: str, **run_settings):
  """(CLIP module, params) from a HF CLIPModel directory or an `import-clip` directory.

  Params are cast to run_settings["param_dtype"] (default float32).
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such CLIP checkpoint directory")
  config_path = os.path.join(path, CONFIG_FILE)
  d = _read_json(config_path)
  if d.get("format") != FORMAT:
    return from_hf(path, **run_settings)
  try:
    config = clip_model.CLIPConfig.from_dict(d["clip"], **run_settings)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{config_path}: bad {FORMAT} config ({e})") from e
  params_path = os.path.join(path, PARAMS_FILE)
  if not os.path.isfile(params_path):
    raise FileNotFoundError(f"{params_path}: not found")
  with open(params_path, "rb") as f:
    try:
      tree = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several types on truncated data
      raise ValueError(f"{params_path}: cannot decode msgpack params ({e})") from e
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  expected = {path for path, _, _ in param_table(config)}
  if set(flat) != expected:
    raise ValueError(f"{params_path}: parameter names differ from the config; missing "
                     f"{sorted(expected - set(flat))[:5]}, unexpected {sorted(set(flat) - expected)[:5]}")
  params = flax.traverse_util.unflatten_dict(
      {tuple(k.split("/")): jnp.asarray(v, config.param_dtype) for k, v in flat.items()})
  _check_shapes(params, config, params_path)
  return clip_model.CLIP(config), params
