"""`varcmp compile`: will the train step fit on the pod? The real step, compiled for a TPU slice on any machine.

  varcmp compile --config ucfcrime_ar:features --topology v5e:2x2 --per-chip-batch 128
  varcmp compile --config ucfcrime_ar:frames --topology v5p:2x2x1 --fit --json fit.json
  varcmp compile --config synthetic                 # a GPU / TPU machine: its own devices, no --topology

What is compiled is what `varcmp train` runs: the config's `Trainer.train_step` (both regimes, both tasks, gradient
accumulation and remat as configured) over the config's (data, fsdp) mesh built from the topology's chips, at
global batch = per-chip batch x chips, and the evaluation step (the jitted embedding of an eval batch,
evaluate._batch_encoder's function, at eval.batch_size over the same mesh). With --topology it is JAX's deviceless
ahead-of-time compilation (jax.experimental.topologies, libtpu installed: the `tpu` extra); without it, the local
GPUs or TPUs.

The input of the train step. `varcmp train` feeds host batches (Grain), or in the features regime may hold the
whole split on the devices (config.data.resident; train/feed.py's ResidentFeed): then the step's arguments are the
split's arrays and the batch's row numbers. Without config.data.records this command compiles the host-batch step
(the table says so); with the records given it asks the same question train asks (data/resident.py decide) and,
when the split would be resident, compiles the resident step: the split's bytes are then part of the arguments.
The eval step is always compiled on host batches (float32).

The numbers: memory per chip is the compiled program's own `memory_analysis()` (arguments, outputs, aliased (the
donated state), temporaries; total = arguments + outputs - aliased + temporaries), compared with the chip's
datasheet HBM (varcmp_jax.flops.PEAKS; --hbm-bytes to compare with another figure). It fits when the compiler
accepted the program (a TPU compile that runs out of HBM fails, and its message is shown) and the total is within
the HBM. Collectives are read from the compiled HLO: each collective instruction once (a loop body once), the
bytes of its result shape per chip. FLOPs are varcmp_jax.flops' count of the same trace as compiled for the
platform (loop trip counts, remat), divided by the chips; the roofline step time is flops.roofline_seconds at the
chip's datasheet peak and bandwidth. XLA's cost_analysis() is not used: on TPU it counts a loop body once.

--fit: the largest per-chip batch that fits, a multiple of --fit-step (default 8, and of grad_accum_steps):
doubling from the per-chip batch until one does not fit, then bisection until the batch that fits and the next
step up (shown not to fit) are --fit-step apart. It says how many compiles it took.

Exit status: 0 fits, 1 does not fit (the numbers are printed), 2 a bad argument, config or topology (one line).

The modules: targets.py (the chips: a TPU slice, deviceless, or this machine's accelerators), steps.py (the train and
eval steps compiled for them, their memory, collectives and FLOPs), fit.py (--fit's search), report.py (the table and
the JSON), main.py (the command).
"""


class CompileError(Exception):
  """A problem with the arguments, the config or the topology: one line for the user."""
