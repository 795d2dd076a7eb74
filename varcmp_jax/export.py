"""`varcmp export`: a trained workdir -> a PyTorch-ready directory.

  varcmp export --workdir runs/demo --out exported [--step N]
  varcmp export --params clip_flax --out hf_clip      # towers only: a `varcmp import-clip` dir -> HF dir

  OUT/clip/                     HF CLIPModel (save_pretrained, safetensors): CLIPModel.from_pretrained(OUT/clip)
  OUT/varcmp_heads.safetensors  every other trained param (temporal adapters, anomaly head, audio tower,
                                logit scales) under the parameter names of varcmp_jax.torch_export.VarCMPTorch
  OUT/config.json               {"format", "step", "config": the training config, "clip_towers": provenance}

  model = varcmp_jax.torch_export.VarCMPTorch.from_pretrained("exported")

A model that does not use a CLIP tower (the features regime has no image tower, the audio task no text
tower) still exports a complete CLIPModel: the missing tower comes from config.model.clip_checkpoint when
that is set (the tower that extracted the features), else it is randomly initialized; config.json says which.
"""
import argparse
import json
import os


CLIP_PARTS = {"image": ("vision", "visual_projection"), "text": ("text", "text_projection"), "logit_scale": ("logit_scale",)}


def complete_clip_params(config, params, seed: int = 0):
  """(full clip.CLIP params, {tower: provenance}) from params["clip"], filling the towers the model lacks."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from varcmp_jax import clip  # pylint: disable=g-import-not-at-top
  trained = dict(params.get("clip", {}))
  missing = [tower for tower, parts in CLIP_PARTS.items() if not all(p in trained for p in parts)]
  provenance = {tower: "trained" for tower in CLIP_PARTS if tower not in missing}
  if not missing:
    return trained, provenance
  checkpoint = config.model.clip_checkpoint
  if checkpoint:
    _, source = clip.load(checkpoint)
    origin = f"copied from config.model.clip_checkpoint={checkpoint} (not used by this model)"
  else:
    cfg = clip.CLIPConfig.from_dict(config.model.clip)
    v = cfg.vision
    pixels = jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32)
    ids = jnp.zeros((1, cfg.text.max_position_embeddings), jnp.int32)
    source = jax.jit(clip.CLIP(cfg).init)(jax.random.key(seed), pixels, ids)["params"]
    origin = "random init (not used by this model)"
  for tower in missing:
    for part in CLIP_PARTS[tower]:
      trained[part] = source[part]
    provenance[tower] = origin
  return trained, provenance


def export(config, params, out_dir: str, step: int | None = None) -> str:
  """Writes OUT/clip, OUT/varcmp_heads.safetensors and OUT/config.json for `params` of a VarCMP `config`."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from varcmp_jax import clip  # pylint: disable=g-import-not-at-top
  from varcmp_jax import torch_export  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  clip_params, provenance = complete_clip_params(config, params, config.seed)
  tower = clip.CLIP(clip.CLIPConfig.from_dict(config.model.clip))
  clip.to_hf(tower, clip_params, os.path.join(out_dir, torch_export.CLIP_DIR))
  heads = torch_export.heads_state_dict(params)
  safetensors.numpy.save_file(heads, os.path.join(out_dir, torch_export.HEADS_FILE), metadata={"format": "pt"})
  exported = {"format": torch_export.FORMAT, "step": step, "clip_towers": provenance,
              "config": json.loads(config.to_json_best_effort())}
  with open(os.path.join(out_dir, torch_export.CONFIG_FILE), "w") as f:
    json.dump(exported, f, indent=2)
  return out_dir


def out_dir_problem(out: str, workdir: str) -> str | None:
  """Why `out` may not receive an export of `workdir`, or None: export never writes into a run's workdir
  (OUT/config.json would replace the run's own), this one or another."""
  out, workdir = os.path.realpath(out), os.path.realpath(workdir)
  if os.path.commonpath([out, workdir]) == workdir:
    return f"is {'the' if out == workdir else 'inside the'} workdir {workdir}; export to a directory outside it"
  if os.path.isdir(os.path.join(out, "checkpoints")):
    return "is a `varcmp train` workdir (it has checkpoints/); export to another directory"
  return None


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="varcmp export", description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a `varcmp train` workdir")
  source.add_argument("--params", help="towers only: a `varcmp import-clip` output (or HF) directory")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest that restores)")
  args = parser.parse_args(argv)
  if args.params:
    from varcmp_jax.clip import cli as clip_cli  # pylint: disable=g-import-not-at-top
    return clip_cli.export_main(["--params", args.params, "--out", args.out])
  problem = out_dir_problem(args.out, args.workdir)
  if problem:
    raise SystemExit(f"varcmp export: --out {args.out}: {problem}")
  from varcmp_jax import trained  # pylint: disable=g-import-not-at-top
  try:
    run = trained.load(args.workdir, args.step)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"varcmp export: {e}") from None
  try:
    export(run.config, run.params, args.out, run.step)
  except OSError as e:
    raise SystemExit(f"varcmp export: cannot write {e.filename or args.out}: {e.strerror or e}") from None
  sizes = {name: os.path.getsize(os.path.join(args.out, name)) for name in ("varcmp_heads.safetensors", "config.json")}
  clip_dir = os.path.join(args.out, "clip")
  clip_bytes = sum(os.path.getsize(os.path.join(clip_dir, f)) for f in os.listdir(clip_dir))
  print(f"exported step {run.step} of {args.workdir} to {args.out}: clip/ ({clip_bytes / 2**20:.1f} MiB), "
        f"varcmp_heads.safetensors ({sizes['varcmp_heads.safetensors'] / 2**20:.2f} MiB), config.json\n"
        f"load it with: varcmp_jax.torch_export.VarCMPTorch.from_pretrained({args.out!r})")
  return 0
