"""Training: mesh and sharding, optimizer, the train step, checkpoints, the train loop."""
