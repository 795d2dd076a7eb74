"""Image-tower throughput (frames/s): our jitted Flax CLIP tower vs HF `CLIPVisionModelWithProjection`
in PyTorch eager and torch.compile, same weights, same device, same run.

  python benchmarks/extract_features.py                          # ViT-B/16, bf16, batch 512 (the GPU run)
  python benchmarks/extract_features.py --model tiny --batch 32  # CPU smoke size
Compute dtype --dtype (bfloat16 default, both sides; float32 for CPUs without fast bf16).

Rows, each printed when it is measured (every phase before it: weights ready, compiled, each timed step):
  ours tower      model.image_tokens on CLIP-normalized pixels -> projected CLS and patch tokens
  ours extract    what `varcmp extract-features` runs per batch: uint8 frames -> normalize -> tower ->
                  region pooling -> storage dtype
  torch_eager     HF CLIPVisionModelWithProjection(pixel_values), torch.inference_mode
  torch_compile   the same under torch.compile
then the ratio lines `ours tower / torch_compile: X.XXx` (and for ours extract, and against eager).
Inputs already sit on the device for every row; each step is timed alone, until its outputs are ready (the
median reported); the first call (compilation) is reported apart. FLOPs: varcmp_jax.flops of our jitted tower
(model FLOPs from the jaxpr, any backend); the HF tower does the same matmuls (less the patch tokens'
projection), so its TFLOP/s and MFU use the same count. MFU against the device's datasheet dense bf16 peak
(flops.device_peak; n/a on a CPU).
"""
import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

# JAX would otherwise take 75% of the GPU's memory at start, leaving the PyTorch rows of this process a quarter.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from data_prep.extract_features import make_embed_fn  # pylint: disable=g-import-not-at-top,wrong-import-position
from report import Table, phase, time_steps  # pylint: disable=g-import-not-at-top,wrong-import-position
from varcmp_jax import clip  # pylint: disable=g-import-not-at-top,wrong-import-position
from varcmp_jax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from varcmp_jax import flops  # pylint: disable=g-import-not-at-top,wrong-import-position

MODELS = {"b16": config_lib.clip_b16, "tiny": lambda: config_lib.clip_tiny(image_size=64, patch_size=16, width=128)}
COLUMNS = ("row", "frames/s", "step ms (median)", "compile s (first call)", "GFLOP/frame (model)", "TFLOP/s",
           "MFU (datasheet)")


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="b16")
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--steps", type=int, default=20, help="timed steps, each timed alone (median reported)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps, the first (compilation) included")
  parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="compute dtype, both sides")
  parser.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto",
                      help="our attention kernel, passed to the model (auto: a fused kernel where it runs)")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch CPU threads (0 = torch default); 1 avoids OpenMP oversubscription on a busy host")
  parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile row")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 1:
    parser.error("--steps and --warmup must be >= 1")

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  device = jax.devices()[0]
  torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  sizes = MODELS[args.model]()
  size = sizes.vision.image_size
  print(f"jax device: {device.device_kind} ({device.platform}); torch device: {torch_device}; host "
        f"{platform.node()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; jax {jax.__version__}, "
        f"torch {torch.__version__}", flush=True)
  print(f"model {args.model} (ViT {sizes.vision.hidden_size}x{sizes.vision.num_hidden_layers}, patch "
        f"{sizes.vision.patch_size} @ {size}), {args.dtype}, batch {args.batch}, attention {args.attention}; first "
        f"call and {args.warmup - 1} more untimed steps, then {args.steps} timed steps", flush=True)

  start = time.perf_counter()
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
  torch_dtype = getattr(torch, args.dtype)
  hf = hf.to(torch_device, torch_dtype).eval()
  frames = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
  pixels = clip.normalize_pixels(frames)
  phase("setup", f"the same weights ready for both (HF init, saved, loaded) in {time.perf_counter() - start:.1f} s")

  peak = flops.device_peak(device)
  rates, table = {}, Table(*COLUMNS)

  def measure(name: str, step, flops_per_batch: float, compiles: bool = True):
    result = time_steps(name, step, args.steps, args.warmup, compiles=compiles)
    rates[name] = args.batch / result["step_s"]
    mfu = flops.mfu(flops_per_batch, result["step_s"], peak)
    table.row(name, f"{rates[name]:.1f}", f"{1e3 * result['step_s']:.2f}", f"{result['compile_s']:.1f}",
              f"{flops_per_batch / args.batch / 1e9:.4g}", f"{flops_per_batch / result['step_s'] / 1e12:.3g}",
              "n/a" if mfu is None else f"{100 * mfu:.1f}%")
    if name.startswith("torch"):
      for ours in ("ours tower", "ours extract"):
        print(f"{ours} / {name}: {rates[ours] / rates[name]:.2f}x", flush=True)

  def counted(name: str, fn, *inputs) -> float:
    count = flops.count(fn, *inputs)
    phase(name, f"{count.model / args.batch / 1e9:.4g} GFLOP/frame model ({count.model / 1e12:.4g} TFLOP a batch), "
          f"{100 * count.bf16_share:.0f}% on bf16 operands")
    return count.model

  pixels_jax = jax.device_put(jnp.asarray(pixels, args.dtype))
  tower = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.image_tokens))
  tower_flops = counted("ours tower", tower, params, pixels_jax)   # the HF rows do the same matmuls
  measure("ours tower", lambda: jax.block_until_ready(tower(params, pixels_jax)), tower_flops)

  frames_jax = jax.device_put(frames)
  extract = make_embed_fn(model, params, region_grid=2, storage_dtype=np.float16)
  measure("ours extract", lambda: jax.block_until_ready(extract(frames_jax)),
          counted("ours extract", extract, frames_jax))

  pixels_torch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(torch_device, torch_dtype)
  sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)

  def hf_step(module):
    def step():
      with torch.inference_mode():
        out = module(pixel_values=pixels_torch)
        out.image_embeds.float().sum().item()   # wait for the result
      sync()
    return step

  with torch.inference_mode():
    ref = hf(pixel_values=pixels_torch[:4]).image_embeds.float().cpu().numpy()
  ours = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))(
      params, pixels_jax[:4]), np.float32)
  phase("check", f"same weights: {args.dtype} image embeddings, ours vs hf, max |diff| / max |hf| = "
        f"{float(np.abs(ours - ref).max() / np.abs(ref).max()):.3g}")
  measure("torch_eager", hf_step(hf), tower_flops, compiles=False)
  if not args.skip_compile:
    measure("torch_compile", hf_step(torch.compile(hf)), tower_flops)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
