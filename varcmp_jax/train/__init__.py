"""Training and evaluation: mesh and sharding, optimizer, checkpoints, the train loop, eval, the demo."""
