"""AdamW with linear warmup + cosine decay, per-tower learning-rate multipliers and freezing.

Towers are named by parameter-path prefix (contract of the VarCMP param tree):
  image = clip/vision + clip/visual_projection, text = clip/text + clip/text_projection,
  audio = audio, heads = everything else (temporal adapter, anomaly head, logit scales).
A multiplier of 0 freezes the tower: its gradient is zeroed before clipping (so frozen towers do not
shrink the clipped update of the others) and it gets no optimizer state.
"""
import jax
import ml_collections
import optax

from varcmp_jax.train.sharding import path_str

TOWERS = ("image", "text", "audio", "heads")
_PREFIXES = (
    ("clip/vision/", "image"), ("clip/visual_projection/", "image"),
    ("clip/text/", "text"), ("clip/text_projection/", "text"),
    ("audio/", "audio"),
)


def tower_of(path: str) -> str:
  return next((tower for prefix, tower in _PREFIXES if (path + "/").startswith(prefix)), "heads")


def tower_labels(params):
  """The tower name of every parameter leaf."""
  return jax.tree_util.tree_map_with_path(lambda p, _: tower_of(path_str(p)), params)


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """The base schedule (multiplier 1): 0 -> learning_rate over warmup_steps, then cosine to 0."""
  t = train_config
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=max(t.num_steps, t.warmup_steps + 1), end_value=0.0)


def _decay_mask(params):
  # Decay matrices only; biases, norms, embeddings' scales and the logit scales are not decayed.
  return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)


def make_optimizer(train_config: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  t = train_config
  schedule = learning_rate_schedule(t)
  labels = tower_labels(params)
  frozen = {tower for tower in TOWERS if t.lr_mult.get(tower, 1.0) == 0}

  def adamw(mult):
    return optax.adamw(lambda step: mult * schedule(step), b1=t.b1, b2=t.b2,
                       weight_decay=t.weight_decay, mask=_decay_mask)

  per_tower = {tower: optax.set_to_zero() if tower in frozen else adamw(t.lr_mult.get(tower, 1.0))
               for tower in TOWERS}
  frozen_mask = jax.tree_util.tree_map(lambda label: label in frozen, labels)
  return optax.chain(
      optax.masked(optax.set_to_zero(), frozen_mask),
      optax.clip_by_global_norm(t.grad_clip_norm) if t.grad_clip_norm > 0 else optax.identity(),
      optax.multi_transform(per_tower, labels),
  )
