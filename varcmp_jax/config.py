"""The default VarCMP configuration and its validation.

Config files under `configs/` start from `default_config()` and change what differs, big_vision style.
Every loss term, level weight and weighting switch lives here, so an ablation is a config change.
"""
import math

import ml_collections

TEXT_LEVELS = ("video", "frame", "spatial")
AUDIO_LEVELS = ("semantic", "temporal", "spatial")
TASK_LEVELS = {"text": TEXT_LEVELS, "audio": AUDIO_LEVELS}
# The coarse levels compare one vector per video with one per query (O(Q G D)); the fine-grained levels compare
# snippets or regions (O(Q G T R L D)), the ones loss.fine_candidates / loss.fine_snippets bound. COARSE_SELECTION is
# the coarse level whose similarity picks each video's hardest queries.
COARSE_LEVELS = {"text": ("video", "frame"), "audio": ("semantic",)}
COARSE_SELECTION = {"text": "video", "audio": "semantic"}
# Names of the two retrieval directions, query -> gallery first.
TASK_DIRECTIONS = {"text": ("text_to_video", "video_to_text"), "audio": ("audio_to_video", "video_to_audio")}


def clip_b16() -> ml_collections.ConfigDict:
  """CLIP ViT-B/16 tower sizes, with HF `CLIPConfig` field names."""
  return ml_collections.ConfigDict(dict(
      projection_dim=512,
      vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16),
      text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                vocab_size=49408, max_position_embeddings=77),
  ))


def clip_tiny(image_size: int = 32, patch_size: int = 8, width: int = 64, depth: int = 2) -> ml_collections.ConfigDict:
  """A tiny CLIP for tests and the CPU demo."""
  return ml_collections.ConfigDict(dict(
      projection_dim=width,
      vision=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                  num_attention_heads=max(1, width // 32), image_size=image_size, patch_size=patch_size),
      text=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                num_attention_heads=max(1, width // 32), vocab_size=49408, max_position_embeddings=77),
  ))


def default_config(task: str = "text", regime: str = "frames") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task            # "text" (video-text, UCFCrime-AR) | "audio" (video-audio, XDViolence-AR)
  c.regime = regime        # "frames" (pixels through the image tower) | "features" (pre-extracted g_t, r_tk)
  c.seed = 0
  # JAX's persistent compilation cache under $XDG_CACHE_HOME/varcmp/jax (else ~/.cache/varcmp/jax): a second run
  # of the same config (a resume, another seed, an evaluation) starts without recompiling. False: off.
  c.compilation_cache = True

  c.data = ml_collections.ConfigDict(dict(
      records="",                  # directory written by `varcmp prep` / `varcmp extract-features`
      train_split="train", eval_split="test",
      snippets=32,                 # T: batches are padded / cropped to this many snippets
      worker_count=0, prefetch=2,
      # Features regime: "on" places the split's arrays on the devices once and gathers every batch there;
      # "auto" does so when a device's share fits resident_max_gib; "off" (and the frames regime): Grain.
      resident="auto", resident_max_gib=8.0,
  ))

  c.model = ml_collections.ConfigDict(dict(
      clip=clip_b16(),
      clip_checkpoint="",          # HF CLIPModel directory or `varcmp import-clip` output; "" = random init
      dtype="bfloat16",            # compute dtype
      param_dtype="float32",
      attention_impl="auto",       # "auto" (cuDNN fused attention where it runs, else XLA) | "xla" | "cudnn"
      remat=False,
      region_grid=2,               # patch tokens pooled on a grid x grid layout: R = grid**2
      # Caption word budget: the text tower reads <BOS> + max_words words + <EOS> (not CLIP's 77 positions) and
      # the spatial level contracts over those words. A longer caption keeps its first max_words words (counted
      # and reported, never silently). 0: `varcmp train` sets it to the records' longest caption (manifest.json)
      # and writes the number into WORKDIR/config.json; a model built with 0 reads all 75.
      max_words=0,
      # Features regime: width of the stored visual features. 0 = already in the CLIP joint space
      # (clip.projection_dim: `varcmp extract-features`, CLIP frame-feature releases); else (e.g. 1024 for
      # I3D RGB) a learned projection LayerNorm -> Dense -> GELU -> Dense into the joint space.
      video_features=dict(dim=0),
      temporal=dict(num_layers=1, num_heads=8, mlp_ratio=4, max_len=256),
      anomaly_head=dict(hidden=256),
      audio=dict(
          kind="spectrogram",      # "spectrogram" (ViT over log-mel segments) | "features" (projection)
          feature_dim=128,         # input width of `features` audio (128 = VGGish)
          init_from_image=True,    # spectrogram ViT initialized from the image tower (RGB kernel averaged)
          mel_bins=64, mel_frames=96, patch_size=16,
      ),
      logit_scale_init=math.log(1 / 0.07),
      logit_scale_max=math.log(100.0),
  ))

  c.prior = ml_collections.ConfigDict(dict(source="head"))   # "head" | "external" | "mean"
  # stop_gradient: the weights use the prior as a constant, so the anomaly head learns from the MIL
  # loss only and the contrastive losses cannot reshape it into a retrieval attention.
  c.weighting = ml_collections.ConfigDict(dict(beta=0.5, tau=0.1, stop_gradient=True))

  c.loss = ml_collections.ConfigDict(dict(
      # lambda_g: weight of each similarity level in the loss and in the combined retrieval score.
      levels={name: 1.0 for name in TASK_LEVELS[task]},
      mil=1.0,
      chunk_size=64,               # block side of the spatial level in the loss (0: one block)
      # Operands of every similarity contraction in training, forward and backward: "bf16" (float32
      # accumulation; tensor-core speed), "tf32" (float32 operands at Precision.HIGH: TF32 on GPU, 3 bf16 passes
      # on TPU) or "highest" (exact float32). Evaluation, index and search always rank at "highest".
      precision="bf16",
      # The fine-grained levels (text: spatial; audio: temporal, spatial) at large batch (SPEC section 2). 0 = exact.
      # fine_candidates = M: each video's InfoNCE over its own query and its M - 1 hardest queries by the coarse
      # similarity (COARSE_SELECTION), each query's over the videos that chose it; work B x M pairs, not B x B.
      # fine_snippets = k: each video's k snippets of largest w_t (weights renormalized over them).
      fine_candidates=0,
      fine_snippets=0,
  ))
  # precision: of the ranking contractions (loss.precision's choices); "highest" ranks exactly.
  c.eval = ml_collections.ConfigDict(dict(chunk_size=64, batch_size=32, precision="highest"))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=64, num_steps=1000, grad_accum_steps=1,
      learning_rate=1e-4, warmup_steps=100, weight_decay=0.2, b1=0.9, b2=0.98, grad_clip_norm=1.0,
      # Per-tower learning-rate multipliers; 0 freezes the tower.
      lr_mult=dict(image=1.0, text=1.0, audio=1.0, heads=1.0),
      log_every=10, checkpoint_every=200, keep_checkpoints=3, eval_every=0,
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))   # -1: all remaining devices
  return c


def lookup(config: ml_collections.ConfigDict, key: str):
  """The value of dotted `key` ("loss.levels.spatial"); ValueError naming the group and its fields if unknown."""
  node, walked = config, []
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(walked) or "the config"
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise ValueError(f"unknown config key {key!r}: {where} has no field {part!r}"
                       + (f" (fields: {', '.join(known)})" if known else ""))
    node = node[part]
    walked.append(part)
  return node


def video_feature_dim(model_cfg) -> int:
  """config.model.video_features.dim (0 for configs written before the field existed)."""
  return int((model_cfg.get("video_features") or {}).get("dim", 0))


def stored_video_width(model_cfg) -> int:
  """The width of the visual features the features regime reads: video_features.dim, else the joint space."""
  return video_feature_dim(model_cfg) or int(model_cfg["clip"]["projection_dim"])


def uses_regions(config) -> bool:
  """Whether the config needs region tokens r_tk: only the spatial level reads them."""
  return float(config.loss.levels.get("spatial", 0.0)) != 0.0


def fine_candidates(config) -> int:
  """loss.fine_candidates (0 for configs written before the field)."""
  return int(config.loss.get("fine_candidates", 0))


def fine_snippets(config) -> int:
  """loss.fine_snippets (0 for configs written before the field)."""
  return int(config.loss.get("fine_snippets", 0))


PRIOR_SOURCES = ("head", "external", "mean")
AUDIO_KINDS = ("spectrogram", "features")
RESIDENT = ("auto", "on", "off")
DTYPES = ("float32", "bfloat16", "float16")
LOSS_PRECISIONS = ("bf16", "tf32", "highest")    # alignment.similarity.PRECISIONS
MAX_WORDS = 75                                   # CLIP's 77 token positions less <BOS> and <EOS>


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ValueError naming every bad field, so a typo fails before any compilation or data reading.

  `num_devices`: when given, also checks that the mesh fits and that the batch divides over it.
  """
  errors = []

  def check(ok, message):
    if not ok:
      errors.append(message)

  check(config.task in TASK_LEVELS, f"task={config.task!r}: must be one of {sorted(TASK_LEVELS)}")
  check(config.regime in ("frames", "features"), f"regime={config.regime!r}: must be 'frames' or 'features'")
  check(config.prior.source in PRIOR_SOURCES, f"prior.source={config.prior.source!r}: must be one of {PRIOR_SOURCES}")
  check(config.model.audio.kind in AUDIO_KINDS, f"model.audio.kind={config.model.audio.kind!r}: must be one of {AUDIO_KINDS}")
  for field in ("dtype", "param_dtype"):
    check(config.model[field] in DTYPES, f"model.{field}={config.model[field]!r}: must be one of {DTYPES}")
  check(config.model.attention_impl in ("auto", "xla", "cudnn"), f"model.attention_impl={config.model.attention_impl!r}: must be 'auto', 'xla' or 'cudnn'")
  check(config.model.region_grid >= 1, f"model.region_grid={config.model.region_grid}: must be >= 1")
  video_dim = video_feature_dim(config.model)
  check(video_dim >= 0, f"model.video_features.dim={video_dim}: must be >= 0 (0 = CLIP joint-space features)")
  check(video_dim == 0 or config.regime == "features",
        f"model.video_features.dim={video_dim}: only the features regime reads stored visual features "
        f"(regime={config.regime!r}); set it to 0")

  beta, tau = config.weighting.beta, config.weighting.tau
  check(0.0 <= beta <= 1.0, f"weighting.beta={beta}: must lie in [0, 1]")
  check(tau > 0, f"weighting.tau={tau}: must be > 0")

  levels = TASK_LEVELS.get(config.task, ())
  for name, weight in config.loss.levels.items():
    check(name in levels, f"loss.levels.{name}: unknown level for task {config.task!r}; levels are {levels}")
    check(weight >= 0, f"loss.levels.{name}={weight}: weights must be >= 0")
  check(any(w > 0 for w in config.loss.levels.values()), "loss.levels: at least one level needs a weight > 0")
  check(config.loss.mil >= 0, f"loss.mil={config.loss.mil}: must be >= 0")
  candidates, snippets = fine_candidates(config), fine_snippets(config)
  check(candidates == 0 or candidates >= 2, f"loss.fine_candidates={candidates}: must be 0 (every video of the batch) "
        "or >= 2 (a video's own query and at least one negative)")
  check(snippets >= 0, f"loss.fine_snippets={snippets}: must be >= 0 (0: every snippet)")
  for group in ("loss", "eval"):
    precision = config[group].get("precision", "highest")
    check(precision in LOSS_PRECISIONS, f"{group}.precision={precision!r}: must be one of {LOSS_PRECISIONS}")
  max_words = config.model.get("max_words", 0)
  check(0 <= max_words <= MAX_WORDS, f"model.max_words={max_words}: must lie in [0, {MAX_WORDS}] (0: sized from the "
        "records' longest caption)")

  t = config.train
  for field in ("batch_size", "num_steps", "grad_accum_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    check(t[field] >= 1, f"train.{field}={t[field]}: must be >= 1")
  for field in ("learning_rate", "weight_decay", "grad_clip_norm", "warmup_steps", "eval_every"):
    check(t[field] >= 0, f"train.{field}={t[field]}: must be >= 0")
  check(0 <= t.b1 < 1 and 0 <= t.b2 < 1, f"train.b1={t.b1}, train.b2={t.b2}: must lie in [0, 1)")
  check(t.warmup_steps <= t.num_steps, f"train.warmup_steps={t.warmup_steps} > train.num_steps={t.num_steps}")
  for name, mult in t.lr_mult.items():
    check(name in ("image", "text", "audio", "heads"), f"train.lr_mult.{name}: unknown tower; towers are image, text, audio, heads")
    check(mult >= 0, f"train.lr_mult.{name}={mult}: must be >= 0 (0 freezes the tower)")
  if t.grad_accum_steps >= 1:
    check(t.batch_size % t.grad_accum_steps == 0,
          f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}")
  check(config.data.snippets >= 1, f"data.snippets={config.data.snippets}: must be >= 1")
  check(config.data.snippets <= config.model.temporal.max_len,
        f"data.snippets={config.data.snippets} exceeds model.temporal.max_len={config.model.temporal.max_len} "
        "(the temporal adapter's learned positions)")
  check(config.eval.batch_size >= 1 and config.eval.chunk_size >= 1, "eval.batch_size and eval.chunk_size must be >= 1")
  resident = config.data.get("resident", "auto")    # configs written before the field: auto
  check(resident in RESIDENT, f"data.resident={resident!r}: must be one of {RESIDENT}")
  check(resident != "on" or config.regime == "features",
        "data.resident='on' needs regime='features' (frames stay on the Grain pipeline); set it to auto or off")
  check(config.data.get("resident_max_gib", 8.0) > 0,
        f"data.resident_max_gib={config.data.get('resident_max_gib')}: must be > 0")

  data_axis, fsdp_axis = config.mesh.data, config.mesh.fsdp
  check(fsdp_axis >= 1, f"mesh.fsdp={fsdp_axis}: must be >= 1")
  check(data_axis == -1 or data_axis >= 1, f"mesh.data={data_axis}: must be >= 1, or -1 for all remaining devices")
  if num_devices is not None and fsdp_axis >= 1 and (data_axis == -1 or data_axis >= 1):
    if data_axis == -1:
      check(num_devices % fsdp_axis == 0, f"mesh.fsdp={fsdp_axis} does not divide the {num_devices} devices")
      mesh_size = num_devices
    else:
      mesh_size = data_axis * fsdp_axis
      check(mesh_size == num_devices, f"mesh data={data_axis} x fsdp={fsdp_axis} = {mesh_size} != {num_devices} devices")
    if t.grad_accum_steps >= 1 and t.batch_size % t.grad_accum_steps == 0:
      micro = t.batch_size // t.grad_accum_steps
      check(micro % mesh_size == 0,
            f"micro-batch train.batch_size/grad_accum_steps={micro} is not divisible by the {mesh_size} mesh devices")
    check(config.eval.batch_size % mesh_size == 0,
          f"eval.batch_size={config.eval.batch_size} is not divisible by the {mesh_size} mesh devices")

  if errors:
    raise ValueError("Bad config:\n  " + "\n  ".join(errors))
