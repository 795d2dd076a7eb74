"""The embedded default: the procedural surveillance benchmark (`varcmp synth`), frames regime.

  synthetic.py        (default) text -> video: the captions of the events and of the normal activity
  synthetic.py:audio  audio -> video: the video's own soundtrack (each event has a synchronized tone) through
                      a spectrogram ViT of the image tower's size, on `varcmp prep --task audio` records

A tiny CLIP trained from scratch on 32x32 frames, sized so `varcmp demo` trains and evaluates in a few
minutes on a 2-core CPU. `--config.data.records=DIR` points it at `varcmp prep` output.
"""
from varcmp_jax import config as config_lib


def get_config(arg: str | None = None):
  task = arg or "text"
  if task not in ("text", "audio"):
    raise ValueError(f"no variant {task!r}; the variants of synthetic are 'text' (the default) and 'audio'")
  c = config_lib.default_config(task=task, regime="frames")
  c.data.snippets = 16
  c.data.worker_count = 0
  c.model.clip = config_lib.clip_tiny(image_size=32, patch_size=8, width=64, depth=2)
  c.model.dtype = "float32"          # bf16 buys nothing on a CPU
  c.model.region_grid = 2
  c.model.temporal = dict(num_layers=1, num_heads=2, mlp_ratio=4, max_len=64)
  c.model.anomaly_head = dict(hidden=64)
  if task == "audio":
    # `varcmp prep`'s log-mel windows (64 bins x 96 frames of 10 ms), 16 x 16 patches: a 6 x 4 grid.
    c.model.audio.update(kind="spectrogram", mel_bins=64, mel_frames=96, patch_size=16, init_from_image=False)
  c.train.batch_size = 32
  c.train.num_steps = 150
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 15
  c.train.weight_decay = 0.01
  c.train.log_every = 10
  c.train.checkpoint_every = 50
  c.eval.batch_size = 32
  c.eval.chunk_size = 32
  return c
