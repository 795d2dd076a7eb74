"""`varcmp import-clip` (HF CLIPModel dir -> Flax params) and the tower part of `varcmp export`."""
import argparse
import sys

from varcmp_jax.clip import hf


def import_main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="varcmp import-clip",
      description="Convert a HF CLIPModel directory (save_pretrained) into Flax params for training.")
  parser.add_argument("--hf", required=True, help="HF CLIPModel directory (config.json + model.safetensors)")
  parser.add_argument("--out", required=True, help="output directory (config.json + params.msgpack)")
  args = parser.parse_args(argv)
  try:
    model, params = hf.from_hf(args.hf)
    hf.save_params(params, model.config, args.out)
  except (FileNotFoundError, ValueError) as e:
    print(f"varcmp import-clip: error: {e}", file=sys.stderr)
    return 1
  v, t = model.config.vision, model.config.text
  print(f"Imported CLIP (vision {v.hidden_size}x{v.num_hidden_layers} patch {v.patch_size} @ {v.image_size}, "
        f"text {t.hidden_size}x{t.num_hidden_layers}, D={model.config.projection_dim}) from {args.hf} to {args.out}")
  return 0


def export_main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="varcmp export --params",
      description="Write CLIP tower params (an import-clip directory) as a HF CLIPModel directory.")
  parser.add_argument("--params", required=True, help="`varcmp import-clip` output directory (or a HF dir)")
  parser.add_argument("--out", required=True, help="output HF CLIPModel directory (safetensors)")
  args = parser.parse_args(argv)
  try:
    model, params = hf.load(args.params)
    hf.to_hf(model, params, args.out)
  except (FileNotFoundError, ValueError) as e:
    print(f"varcmp export: error: {e}", file=sys.stderr)
    return 1
  print(f"Exported CLIP towers from {args.params} to {args.out} (load with CLIPModel.from_pretrained)")
  return 0
