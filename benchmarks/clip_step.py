"""CLIP contrastive train step: ours (Flax, jit) vs HF `CLIPModel` in PyTorch eager and torch.compile, one run.

Both towers, symmetric InfoNCE with the learned logit scale, AdamW, bf16 compute (fp32 params and
optimizer state), the same initial weights (HF init, same seed). Each peer runs in its own subprocess on the
same device (its own peak memory; JAX's and PyTorch's allocators do not compete), its phases streamed here as
they happen: params ready, compiled (the first call, reported apart), each timed step with its ms. Each peer's
table row is printed when it is done, then the ratio lines `ours / torch_eager: X.XXx`, `ours / torch_compile: X.XXx`.

samples/s = batch / the median timed step (each step timed alone, until its outputs are ready). FLOPs per
step: varcmp_jax.flops of our jitted step (model FLOPs, forward + backward, from the jaxpr on any backend); the
peers run the same model, the same matmuls, so the same count gives their TFLOP/s and MFU. MFU is against the
device's datasheet dense bf16 peak (flops.device_peak; n/a on a CPU) and, in its own column, against a bf16
matmul peak measured in our process after its steps.

  python benchmarks/clip_step.py                       # ViT-B/16, batch 256, all peers (GPU)
  python benchmarks/clip_step.py --model tiny --batch 32 --steps 5 --peers ours,torch_eager   # a CPU smoke run
  python benchmarks/clip_step.py --attention xla       # our attention kernel (default auto: the model chooses)
"""
import argparse
import json
import os
import sys
import time

import peak_memory  # benchmarks/peak_memory.py
from report import RESULT, Table, phase, run_child, time_steps  # benchmarks/report.py

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
COLUMNS = ("peer", "samples/s", "step ms (median)", "compile s (first call)", "TFLOP/step (model)", "TFLOP/s",
           "MFU (datasheet)", "MFU (measured peak)", "peak mem GiB", "loss", "settings")


def make_batch(batch, image_size, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  lengths = rng.integers(5, CONTEXT + 1, batch)
  ids = np.zeros((batch, CONTEXT), np.int32)
  for row, n in zip(ids, lengths):
    row[0], row[1:n - 1], row[n - 1] = 49406, rng.integers(1, 49406, n - 2), 49407
  return pixels, ids


def measure_peak_flops(on_accelerator: bool) -> float:
  """bf16 matmul FLOP/s of the device, measured with JAX (best of a few square sizes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  best = 0.0
  matmul = jax.jit(lambda a, b: a @ b)
  for n in ((4096, 8192, 16384) if on_accelerator else (512, 1024, 2048)):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    matmul(a, b).block_until_ready()
    reps = 20 if on_accelerator else 3
    start = time.perf_counter()
    for _ in range(reps):
      c = matmul(a, b)
    c.block_until_ready()
    best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
  return best


def attention_kernels(config, hf_config) -> str:
  """What `config.attention_impl` resolves to for each tower on this device (the model's own rule)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.extend import backend as jax_backend  # pylint: disable=g-import-not-at-top
  from varcmp_jax.clip import model as clip_model  # pylint: disable=g-import-not-at-top
  backend = jax_backend.get_backend()
  platform = "cuda" if "cuda" in backend.platform_version else backend.platform   # as the model tells them apart
  capability = jax.local_devices()[0].compute_capability if platform == "cuda" else None
  v, t = hf_config.vision_config, hf_config.text_config
  towers = {"vision": ((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size // v.num_attention_heads),
            "text": (CONTEXT, t.hidden_size // t.num_attention_heads)}
  plans = []
  for tower, (length, head_dim) in towers.items():
    kernel, padded = clip_model.attention_plan(config.attention_impl, platform, length, head_dim, config.dtype,
                                               capability)
    plans.append(f"{tower} {kernel}" + (f" ({length} padded to {padded})" if padded != length else ""))
  return ", ".join(plans)


def run_ours(args, size) -> dict:
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from varcmp_jax import clip, flops  # pylint: disable=g-import-not-at-top
  from varcmp_jax.clip import hf  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  hf_config = transformers.CLIPConfig(**size)
  config = dataclasses.replace(clip.CLIPConfig.from_hf(hf_config, dtype="bfloat16", param_dtype="float32",
                                                       attention_impl=args.attention), remat=args.remat)
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
  kernels = attention_kernels(config, hf_config)
  phase("ours", f"params ready in {time.perf_counter() - start:.1f} s (HF init, converted); attention "
        f"{args.attention}: {kernels}")

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
  start = time.perf_counter()
  count = flops.count(step, params, opt_state, pixels, ids)
  phase("ours", f"FLOPs counted in {time.perf_counter() - start:.1f} s: {count.model / 1e12:.4g} TFLOP/step model, "
        f"{count.executed / 1e12:.4g} executed, {100 * count.bf16_share:.0f}% on bf16 operands")

  def one_step():
    nonlocal params, opt_state
    params, opt_state, loss = step(params, opt_state, pixels, ids)
    return loss

  result = time_steps("ours", lambda: one_step().block_until_ready(), args.steps, args.warmup)
  memory, memory_kind = peak_memory.jax_peak_bytes()
  device = jax.devices()[0]
  measured = measure_peak_flops(device.platform != "cpu") if args.measure_peak else None
  if measured:
    phase("ours", f"measured bf16 matmul peak: {measured / 1e12:.4g} TFLOP/s")
  peak = flops.device_peak(device)
  return dict(result, loss=float(result.pop("value")), model_flops=count.model, memory_bytes=memory,
              memory_kind=memory_kind, datasheet_flops=peak.flops if peak else None, measured_flops=measured,
              settings=f"jit+donate, bf16 compute, attention={args.attention} ({kernels}), remat={args.remat}, "
                       f"jax {jax.__version__} on {device.device_kind}")


def run_torch(args, size, compiled: bool) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  peer = "torch_compile" if compiled else "torch_eager"
  start = time.perf_counter()
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
  phase(peer, f"model ready in {time.perf_counter() - start:.1f} s (HF init)")

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16):
      loss = forward(input_ids=ids, pixel_values=pixels, return_loss=True).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  def synced_step():
    loss = step()
    if cuda:
      torch.cuda.synchronize()
    return loss.item()

  result = time_steps(peer, synced_step, args.steps, args.warmup, compiles=compiled)
  memory = torch.cuda.max_memory_allocated() if cuda else peak_memory.host_peak_bytes()
  return dict(result, loss=result.pop("value"), memory_bytes=memory,
              memory_kind="device peak" if cuda else "process peak RSS",
              settings=f"{'torch.compile' if compiled else 'eager'}, autocast bf16, "
                       f"attn={model.config._attn_implementation}, torch {torch.__version__}")


def cells(peer: str, r: dict | None, flops_per_step: float | None, datasheet: float | None,
          measured: float | None) -> tuple:
  if r is None:
    return (peer, "failed") + ("",) * (len(COLUMNS) - 2)
  rate = 1.0 / r["step_s"]
  tflops = flops_per_step * rate / 1e12 if flops_per_step else None
  percent = lambda peak: f"{100 * tflops * 1e12 / peak:.1f}%" if tflops and peak else "n/a"
  return (peer, f"{r['batch'] * rate:.4g}", f"{1e3 * r['step_s']:.1f}", f"{r['compile_s']:.1f}",
          f"{flops_per_step / 1e12:.4g}" if flops_per_step else "n/a", f"{tflops:.3g}" if tflops else "n/a",
          percent(datasheet), percent(measured), f"{r['memory_bytes'] / 2 ** 30:.2f} ({r['memory_kind']})",
          f"{r['loss']:.3f}", r["settings"])


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=sorted(SIZES), default="b16")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20, help="timed steps, each timed alone (median reported)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps, the first (compilation) included")
  parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {PEERS}")
  parser.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                      help="our attention kernel, passed to the model (auto: a fused kernel where it runs)")
  parser.add_argument("--remat", action="store_true", help="remat the transformer blocks (ours)")
  parser.add_argument("--no-measured-peak", dest="measure_peak", action="store_false",
                      help="leave out the measured bf16 matmul peak (a few seconds in our process)")
  parser.add_argument("--peer", help=argparse.SUPPRESS)   # internal: run one peer in this process
  args = parser.parse_args(argv)
  peers = args.peers.split(",")
  if set(peers) - set(PEERS) or args.steps < 1 or args.warmup < 1:
    parser.error(f"--peers must name some of {PEERS}; --steps and --warmup must be >= 1")
  size = SIZES[args.model]
  if args.peer:
    result = run_ours(args, size) if args.peer == "ours" else run_torch(args, size, args.peer == "torch_compile")
    print(RESULT + json.dumps(dict(result, batch=args.batch)), flush=True)
    return 0

  print(f"CLIP {args.model} train step, batch {args.batch}: first call (compilation) and {args.warmup - 1} more "
        f"untimed steps, then {args.steps} timed steps; peers {', '.join(peers)}", flush=True)
  table, rates, flops_per_step, datasheet, measured = Table(*COLUMNS), {}, None, None, None
  for peer in sorted(peers, key=PEERS.index):    # ours first: its FLOP count and peaks serve every row
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    r = run_child([sys.executable, os.path.abspath(__file__), *argv, "--peer", peer], peer, env)
    if peer == "ours" and r:
      flops_per_step, datasheet, measured = r["model_flops"], r["datasheet_flops"], r["measured_flops"]
    table.row(*cells(peer, r, flops_per_step, datasheet, measured))
    if r:
      rates[peer] = 1.0 / r["step_s"]
    if peer != "ours" and "ours" in rates and peer in rates:
      print(f"ours / {peer}: {rates['ours'] / rates[peer]:.2f}x", flush=True)
  if "ours" not in peers:
    print("(no FLOP count without ours: TFLOP/s and MFU are n/a)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
