"""The train step clamps every logit scale to logit_scale_max after the update (as OpenCLIP does).

That the loss keeps a gradient for a scale at or above the max is tested in test_losses.py."""
import jax
import numpy as np

from test_sharding import load_config, random_batches
from varcmp_jax.model.varcmp import VarCMP
from varcmp_jax.train import sharding
from varcmp_jax.train.step import Trainer


def test_logit_scales_are_clamped_after_the_update():
  config = load_config("tiny_text", "features")
  config.train.learning_rate, config.train.warmup_steps = 1e-2, 0
  config.mesh.data = 1
  trainer = Trainer(VarCMP(config.model, task=config.task, regime=config.regime), config,
                    sharding.make_mesh(config.mesh, jax.devices()[:1]))
  state = trainer.init_state(seed=0)
  top = config.model.logit_scale_max
  # An overshot scale (imported, or from before the clamp): 10 > ln 100.
  state["params"]["logit_scales"] = {name: jax.device_put(np.float32(10.0), s.sharding)   # placed: one compile
                                     for name, s in state["params"]["logit_scales"].items()}
  batch = trainer.shard_batch(random_batches(config, 1)[0])

  # The first update moves 10 by about the learning rate; the clamp puts every scale back at the max.
  state, _ = trainer.train_step(state, batch)
  np.testing.assert_array_equal([float(s) for s in state["params"]["logit_scales"].values()], np.float32(top))
  state, _ = trainer.train_step(state, batch)
  assert all(float(s) <= np.float32(top) for s in state["params"]["logit_scales"].values())
