"""Retrieval metrics of SPEC section 1: R@1/5/10 (%), MdR, MnR, SumR, in both directions.

A similarity matrix has queries as rows and the gallery as columns, ground truth on the diagonal.
Ranks are 1-based and optimistic under ties: rank = 1 + number of gallery items scoring strictly
higher than the ground truth. The other direction is the transpose.
"""
import numpy as np

from varcmp_jax import config as config_lib

RECALLS = (1, 5, 10)


def ground_truth_ranks(sim) -> np.ndarray:
  """(N,) 1-based optimistic rank of each row's diagonal entry."""
  sim = np.asarray(sim, dtype=np.float64)
  if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
    raise ValueError(f"retrieval metrics need a square (N, N) similarity matrix, got shape {sim.shape}")
  if not np.all(np.isfinite(sim)):
    raise ValueError(f"similarity matrix has {int(np.sum(~np.isfinite(sim)))} non-finite entries")
  truth = np.diagonal(sim)[:, None]
  return 1 + np.sum(sim > truth, axis=1)


def retrieval_metrics(sim) -> dict[str, float]:
  """{"R1", "R5", "R10", "MdR", "MnR"} of the row direction (queries = rows)."""
  ranks = ground_truth_ranks(sim)
  metrics = {f"R{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALLS}
  metrics["MdR"] = float(np.median(ranks))
  metrics["MnR"] = float(np.mean(ranks))
  return metrics


def sum_recalls(*direction_metrics: dict[str, float]) -> float:
  return float(sum(m[f"R{k}"] for m in direction_metrics for k in RECALLS))


def _both_directions(sim, task: str) -> dict:
  forward, backward = config_lib.TASK_DIRECTIONS[task]
  sim = np.asarray(sim)
  result = {forward: retrieval_metrics(sim), backward: retrieval_metrics(sim.T)}
  result["SumR"] = sum_recalls(result[forward], result[backward])
  return result


def report(sims: dict, task: str) -> dict:
  """Eval dict from {level: (N, N), ..., "combined": (N, N)}.

  -> {"<q>_to_video": {...}, "video_to_<q>": {...}, "SumR": float,   (of the combined score)
      "levels": {level: {"<q>_to_video": ..., "video_to_<q>": ..., "SumR": float}}}
  """
  if task not in config_lib.TASK_DIRECTIONS:
    raise ValueError(f"task {task!r} is not one of {tuple(config_lib.TASK_DIRECTIONS)}")
  if "combined" not in sims:
    raise ValueError(f"report needs the combined score under 'combined'; got {sorted(sims)}")
  unknown = [name for name in sims if name != "combined" and name not in config_lib.TASK_LEVELS[task]]
  if unknown:
    raise ValueError(f"report: {unknown} are not levels of task {task!r} {config_lib.TASK_LEVELS[task]}")
  result = _both_directions(sims["combined"], task)
  result["levels"] = {name: _both_directions(sims[name], task)
                      for name in config_lib.TASK_LEVELS[task] if name in sims}
  return result


def format_table(result: dict) -> str:
  """A fixed-width table: one row per score (combined first), both directions, SumR."""
  directions = [name for name in result if name not in ("SumR", "levels")]
  columns = ["R1", "R5", "R10", "MdR", "MnR"]
  header = f"{'score':<10}" + "".join(f" | {d:<39}" for d in directions) + " |   SumR"
  sub = f"{'':<10}" + "".join(" | " + " ".join(f"{c:>7}" for c in columns) for _ in directions) + " |"
  rows = [("combined", result)] + list(result.get("levels", {}).items())
  lines = [header, sub, "-" * len(header)]
  for name, entry in rows:
    cells = "".join(" | " + " ".join(f"{entry[d][c]:7.1f}" for c in columns) for d in directions)
    lines.append(f"{name:<10}{cells} | {entry['SumR']:6.1f}")
  return "\n".join(lines)
