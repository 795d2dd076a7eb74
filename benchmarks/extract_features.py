"""Image-tower throughput (frames/s): our jitted Flax CLIP tower vs HF `CLIPVisionModelWithProjection`
in PyTorch eager and torch.compile, same weights, same device, same run.

  python benchmarks/extract_features.py                          # ViT-B/16, bf16, batch 512 (the GPU run)
  python benchmarks/extract_features.py --model tiny --batch 32  # CPU smoke size
Compute dtype --dtype (bfloat16 default, both sides; float32 for CPUs without fast bf16).

Rows:
  ours tower       model.image_tokens on CLIP-normalized pixels -> projected CLS and patch tokens
  ours extract     what `varcmp extract-features` runs per batch: uint8 frames -> normalize -> tower ->
                   region pooling -> storage dtype
  hf eager         CLIPVisionModelWithProjection(pixel_values), torch.inference_mode
  hf compile       the same under torch.compile
Inputs already sit on the device for every row; each timed step waits for its outputs.
"""
import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from data_prep.extract_features import make_embed_fn  # pylint: disable=g-import-not-at-top,wrong-import-position
from varcmp_jax import clip  # pylint: disable=g-import-not-at-top,wrong-import-position
from varcmp_jax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

MODELS = {"b16": config_lib.clip_b16, "tiny": lambda: config_lib.clip_tiny(image_size=64, patch_size=16, width=128)}


def timed(step, steps: int, warmup: int) -> float:
  """Mean seconds per call of step() (which must block until its outputs exist)."""
  for _ in range(warmup):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - start) / steps


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="b16")
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="compute dtype, both sides")
  parser.add_argument("--attention", choices=["xla", "cudnn"], default="xla", help="our attention kernel")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch CPU threads (0 = torch default); 1 avoids OpenMP oversubscription on a busy host")
  parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile row")
  args = parser.parse_args(argv)

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  sizes = MODELS[args.model]()
  torch.manual_seed(0)
  hf_config = clip.CLIPConfig.from_dict(sizes).to_hf()
  full = transformers.CLIPModel(hf_config)
  with tempfile.TemporaryDirectory() as tmp:
    full.save_pretrained(tmp)
    model, params = clip.load(tmp, dtype=args.dtype, attention_impl=args.attention)
  vision_config = hf_config.vision_config
  vision_config.projection_dim = hf_config.projection_dim
  hf = transformers.CLIPVisionModelWithProjection(vision_config)
  hf.vision_model.load_state_dict(full.vision_model.state_dict())
  hf.visual_projection.load_state_dict(full.visual_projection.state_dict())
  del full
  torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_dtype = getattr(torch, args.dtype)
  hf = hf.to(torch_device, torch_dtype).eval()

  size = sizes.vision.image_size
  frames = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
  pixels = clip.normalize_pixels(frames)

  results = {}

  pixels_jax = jax.device_put(jnp.asarray(pixels, args.dtype))
  tower = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.image_tokens))
  results["ours tower"] = timed(lambda: jax.block_until_ready(tower(params, pixels_jax)), args.steps, args.warmup)

  frames_jax = jax.device_put(frames)
  extract = make_embed_fn(model, params, region_grid=2, storage_dtype=np.float16)
  results["ours extract"] = timed(lambda: jax.block_until_ready(extract(frames_jax)), args.steps, args.warmup)

  pixels_torch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(torch_device, torch_dtype)
  sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)

  def hf_step(module):
    def step():
      with torch.inference_mode():
        out = module(pixel_values=pixels_torch)
        out.image_embeds.float().sum().item()   # wait for the result
      sync()
    return step

  results["hf eager"] = timed(hf_step(hf), args.steps, args.warmup)
  if not args.skip_compile:
    results["hf compile"] = timed(hf_step(torch.compile(hf)), args.steps, args.warmup)

  with torch.inference_mode():
    ref = hf(pixel_values=pixels_torch[:4]).image_embeds.float().cpu().numpy()
  ours = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))(
      params, pixels_jax[:4]), np.float32)
  agreement = float(np.abs(ours - ref).max() / np.abs(ref).max())

  device = jax.devices()[0]
  print(f"jax device: {device.device_kind} ({device.platform}); torch device: {torch_device}; "
        f"host {platform.node()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; jax {jax.__version__}, torch {torch.__version__}")
  print(f"model {args.model} (ViT {sizes.vision.hidden_size}x{sizes.vision.num_hidden_layers}, patch "
        f"{sizes.vision.patch_size} @ {size}), {args.dtype}, batch {args.batch}, {args.steps} timed steps")
  print(f"same weights: {args.dtype} image embeddings, ours vs hf, max |diff| / max |hf| = {agreement:.3g}")
  peer = results.get("hf compile", results["hf eager"])
  for name, seconds in results.items():
    print(f"  {name:13s} {args.batch / seconds:10.1f} frames/s   ({args.batch / seconds / (args.batch / peer):.2f}x "
          f"{'hf compile' if 'hf compile' in results else 'hf eager'})")
  print(json.dumps({name: args.batch / s for name, s in results.items()}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
