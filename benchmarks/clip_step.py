"""CLIP contrastive train step: ours (Flax, jit) vs HF `CLIPModel` in PyTorch eager and torch.compile.

Both towers, symmetric InfoNCE with the learned logit scale, AdamW, bf16 compute (fp32 params and
optimizer state). Each peer runs in its own subprocess on the same device, so peak memory is per peer
and JAX's and PyTorch's allocators do not compete. Prints samples/s, achieved TFLOP/s (analytic matmul
FLOPs x 3 for forward + backward), MFU against a bf16 matmul peak measured on the device, peak memory.

  python benchmarks/clip_step.py                       # ViT-B/16, batch 256, all peers (GPU)
  python benchmarks/clip_step.py --model tiny --batch 32 --steps 5    # a CPU smoke run
  python benchmarks/clip_step.py --attention xla       # XLA attention for ours (auto = cuDNN fused on GPU)
"""
import argparse
import json
import os
import subprocess
import sys
import time

import peak_memory  # benchmarks/peak_memory.py

PEERS = ("ours", "torch_eager", "torch_compile")
SIZES = {  # HF CLIPConfig arguments
    "b16": dict(projection_dim=512,
                vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, image_size=224, patch_size=16),
                text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                 num_attention_heads=8)),
    "tiny": dict(projection_dim=128,
                 vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=64, patch_size=16),
                 text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=2)),
}
CONTEXT = 77


def train_flops_per_sample(size: dict) -> float:
  """Matmul FLOPs of one forward + backward (3x forward) for one image-text pair."""
  def tower(c, tokens, patch_in=0):
    w, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    per_token = layers * (8 * w * w + 4 * w * i + 4 * tokens * w)  # qkv+out, mlp, scores+values
    return tokens * per_token + 2 * (tokens - 1) * patch_in * w
  v, t = size["vision_config"], size["text_config"]
  patches = (v["image_size"] // v["patch_size"]) ** 2
  forward = (tower(v, patches + 1, 3 * v["patch_size"] ** 2) + tower(t, CONTEXT)
             + 2 * (v["hidden_size"] + t["hidden_size"]) * size["projection_dim"])
  return 3.0 * forward


def make_batch(batch, image_size, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  lengths = rng.integers(5, CONTEXT + 1, batch)
  ids = np.zeros((batch, CONTEXT), np.int32)
  for row, n in zip(ids, lengths):
    row[0], row[1:n - 1], row[n - 1] = 49406, rng.integers(1, 49406, n - 2), 49407
  return pixels, ids


def run_ours(args, size):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from varcmp_jax import clip  # pylint: disable=g-import-not-at-top

  import torch  # pylint: disable=g-import-not-at-top
  from varcmp_jax.clip import hf  # pylint: disable=g-import-not-at-top

  gpu = jax.devices()[0].platform == "gpu"
  attention = args.attention if args.attention != "auto" else ("cudnn" if gpu else None)
  hf_config = transformers.CLIPConfig(**size)
  config = dataclasses.replace(clip.CLIPConfig.from_hf(hf_config, dtype="bfloat16", param_dtype="float32",
                                                       attention_impl=attention), remat=args.remat)
  model = clip.CLIP(config)
  pixels, ids = make_batch(args.batch, size["vision_config"]["image_size"])
  pixels, ids = jax.device_put(pixels.astype(jnp.bfloat16)), jax.device_put(ids)
  # The same initial weights as the PyTorch peers (same seed, HF init), so the losses are comparable.
  torch.manual_seed(0)
  state = {k: v.numpy() for k, v in transformers.CLIPModel(hf_config).state_dict().items()}
  params = jax.device_put(hf.params_from_state_dict(state, config))
  del state
  optimizer = optax.adamw(1e-4, b1=0.9, b2=0.98, weight_decay=0.2)
  opt_state = jax.jit(optimizer.init)(params)

  def loss_fn(p, pixels, ids):
    image, text = model.apply({"params": p}, pixels, ids)
    image = image.astype(jnp.float32)
    text = text.astype(jnp.float32)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    logits = jnp.exp(p["logit_scale"]) * text @ image.T
    labels = jnp.arange(logits.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())

  def step(p, s, pixels, ids):
    loss, grads = jax.value_and_grad(loss_fn)(p, pixels, ids)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  step = jax.jit(step, donate_argnums=(0, 1))   # params and optimizer state are updated in place
  t0 = time.perf_counter()
  for _ in range(args.warmup):
    params, opt_state, loss = step(params, opt_state, pixels, ids)
  loss.block_until_ready()
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.steps):
    params, opt_state, loss = step(params, opt_state, pixels, ids)
  loss.block_until_ready()
  seconds = time.perf_counter() - t0
  device = jax.devices()[0]
  memory, memory_kind = peak_memory.jax_peak_bytes()
  return dict(seconds=seconds, warmup_s=warmup_s, loss=float(loss), device=device.device_kind,
              platform=device.platform, memory_bytes=memory, memory_kind=memory_kind,
              settings=f"jit+donate, bf16 compute, attention={config.attention_impl or 'auto'}, remat={args.remat}")


def run_torch(args, size, compiled):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = True
  model = transformers.CLIPModel(transformers.CLIPConfig(**size)).to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.2,
                                fused=cuda)
  pixels, ids = make_batch(args.batch, size["vision_config"]["image_size"])
  pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(device)
  ids = torch.from_numpy(ids).long().to(device)
  forward = torch.compile(model) if compiled else model

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16):
      loss = forward(input_ids=ids, pixel_values=pixels, return_loss=True).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  t0 = time.perf_counter()
  for _ in range(args.warmup):
    loss = step()
  sync()
  warmup_s = time.perf_counter() - t0
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  sync()
  seconds = time.perf_counter() - t0
  return dict(seconds=seconds, warmup_s=warmup_s, loss=float(loss),
              device=torch.cuda.get_device_name() if cuda else "cpu", platform=device.type,
              memory_bytes=torch.cuda.max_memory_allocated() if cuda else peak_memory.host_peak_bytes(),
              memory_kind="device peak" if cuda else "process peak RSS",
              settings=f"{'torch.compile' if compiled else 'eager'}, autocast bf16, "
                       f"attn={model.config._attn_implementation}, torch {torch.__version__}")


def measure_peak_tflops(args):
  """bf16 matmul peak of the device, measured with JAX (best of a few square sizes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  gpu = jax.devices()[0].platform != "cpu"
  best = 0.0
  for n in ((4096, 8192, 16384) if gpu else (512, 1024, 2048)):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    reps = 20 if gpu else 3
    t0 = time.perf_counter()
    for _ in range(reps):
      c = matmul(a, b)
    c.block_until_ready()
    best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12)
  return dict(peak_tflops=best, device=jax.devices()[0].device_kind)


def run_peer(args):
  size = SIZES[args.model]
  if args.peer == "peak":
    result = measure_peak_tflops(args)
  elif args.peer == "ours":
    result = run_ours(args, size)
  else:
    result = run_torch(args, size, compiled=args.peer == "torch_compile")
  print("RESULT " + json.dumps(result), flush=True)


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=sorted(SIZES), default="b16")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
  parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {PEERS}")
  parser.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                      help="jax.nn.dot_product_attention implementation for ours; auto = cudnn on GPU, else XLA")
  parser.add_argument("--remat", action="store_true", help="remat the transformer blocks (ours)")
  parser.add_argument("--peer", help=argparse.SUPPRESS)   # internal: run one peer in this process
  args = parser.parse_args(argv)
  if args.peer:
    run_peer(args)
    return 0

  def spawn(peer):
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--peer", peer]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(f"[{peer}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
      return None
    return json.loads(lines[-1][len("RESULT "):])

  peak = spawn("peak")
  flops = train_flops_per_sample(SIZES[args.model])
  print(f"CLIP {args.model} train step, batch {args.batch}, {args.steps} timed steps after {args.warmup} warmup; "
        f"{flops / 1e9:.4g} GFLOP per sample (fwd+bwd matmuls)")
  if peak:
    print(f"device: {peak['device']}; measured bf16 matmul peak {peak['peak_tflops']:.2f} TFLOP/s")
  header = f"{'peer':<14} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak mem GiB':>12} {'warmup s':>9} {'loss':>7}  settings"
  print(header)
  print("-" * len(header))
  rows = {}
  for peer in args.peers.split(","):
    r = spawn(peer)
    if r is None:
      print(f"{peer:<14} failed")
      continue
    rate = args.batch * args.steps / r["seconds"]
    tflops = rate * flops / 1e12
    mfu = f"{100 * tflops / peak['peak_tflops']:.3g}%" if peak else "n/a"
    rows[peer] = rate
    print(f"{peer:<14} {rate:>10.4g} {tflops:>8.3g} {mfu:>6} {r['memory_bytes'] / 2**30:>12.2f} "
          f"{r['warmup_s']:>9.1f} {r['loss']:>7.3f}  {r['settings']}; memory = {r['memory_kind']}")
  for peer in ("torch_eager", "torch_compile"):
    if "ours" in rows and peer in rows:
      print(f"ours / {peer}: {rows['ours'] / rows[peer]:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
