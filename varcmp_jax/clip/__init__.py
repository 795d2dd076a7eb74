"""CLIP towers in Flax, HF checkpoint import/export and the offline tokenizer.

  model, params = clip.from_hf("hf_dir")          # or clip.load(hf_dir or import-clip dir)
  img = model.apply({"params": params}, pixels, method=model.encode_image)
  txt = model.apply({"params": params}, clip.tokenizer()(["a photo of a cat"]), method=model.encode_text)
  clip.to_hf(model, params, "out_dir")
"""
from varcmp_jax.clip.hf import from_hf, load, save_params, to_hf
from varcmp_jax.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig, normalize_pixels
from varcmp_jax.clip.tokenizer import tokenizer
