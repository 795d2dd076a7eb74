"""Retrieval metrics of SPEC section 1: R@1/5/10 (%), MdR, MnR, SumR, in both directions.

A similarity matrix has queries as rows and the gallery as columns, ground truth on the diagonal; the other
direction is the transpose. Ranks are 1-based.

Ties (SPEC section 4, "Metrics under ties") are broken at random, in expectation: with h gallery items
strictly above the ground truth and t others exactly equal to it, the expected rank is 1 + h + t/2 and the
probability that the ground truth lands in the top K is min(1, max(0, (K - h) / (t + 1))). So an all-equal
matrix (a collapsed model) scores R@1 = 100/N, and duplicate captions share their credit.
`ties="optimistic"` ranks the ground truth first among its ties (rank = 1 + h), as much published code does.
"""
import numpy as np

from varcmp_jax import config as config_lib

RECALLS = (1, 5, 10)
TIES = ("expected", "optimistic")


def _above_and_tied(sim, ties: str) -> tuple[np.ndarray, np.ndarray]:
  """(h, t) per row: gallery items strictly above the diagonal entry, and the others equal to it (t = 0 under
  ties="optimistic": the ground truth comes first among its ties)."""
  if ties not in TIES:
    raise ValueError(f"ties={ties!r}: must be one of {TIES}")
  sim = np.asarray(sim, dtype=np.float64)
  if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
    raise ValueError(f"retrieval metrics need a square (N, N) similarity matrix, got shape {sim.shape}")
  if not np.all(np.isfinite(sim)):
    raise ValueError(f"similarity matrix has {int(np.sum(~np.isfinite(sim)))} non-finite entries")
  truth = np.diagonal(sim)[:, None]
  above, tied = np.sum(sim > truth, axis=1), np.sum(sim == truth, axis=1) - 1
  return above, (tied if ties == "expected" else np.zeros_like(tied))


def _ranks(above: np.ndarray, tied: np.ndarray) -> np.ndarray:
  return 1.0 + above + tied / 2.0


def _recall(above: np.ndarray, tied: np.ndarray, k: int) -> float:
  return float(100.0 * np.mean(np.clip((k - above) / (tied + 1.0), 0.0, 1.0)))


def ground_truth_ranks(sim, ties: str = "expected") -> np.ndarray:
  """(N,) 1-based rank of each row's diagonal entry: 1 + h + t/2 (expected) or 1 + h (optimistic)."""
  return _ranks(*_above_and_tied(sim, ties))


def recall_at(sim, k: int, ties: str = "expected") -> float:
  """R@k in %: the mean over rows of P(ground truth in the top k)."""
  return _recall(*_above_and_tied(sim, ties), k)


def retrieval_metrics(sim, ties: str = "expected") -> dict[str, float]:
  """{"R1", "R5", "R10", "MdR", "MnR"} of the row direction (queries = rows)."""
  above, tied = _above_and_tied(sim, ties)
  ranks = _ranks(above, tied)
  metrics = {f"R{k}": _recall(above, tied, k) for k in RECALLS}
  metrics["MdR"] = float(np.median(ranks))
  metrics["MnR"] = float(np.mean(ranks))
  return metrics


def sum_recalls(*direction_metrics: dict[str, float]) -> float:
  return float(sum(m[f"R{k}"] for m in direction_metrics for k in RECALLS))


def _both_directions(sim, task: str, ties: str) -> dict:
  forward, backward = config_lib.TASK_DIRECTIONS[task]
  sim = np.asarray(sim)
  result = {forward: retrieval_metrics(sim, ties), backward: retrieval_metrics(sim.T, ties)}
  result["SumR"] = sum_recalls(result[forward], result[backward])
  return result


def report(sims: dict, task: str, ties: str = "expected") -> dict:
  """Eval dict from {level: (N, N), ..., "combined": (N, N)} (rows = queries, columns = videos).

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
  result = _both_directions(sims["combined"], task, ties)
  result["levels"] = {name: _both_directions(sims[name], task, ties)
                      for name in config_lib.TASK_LEVELS[task] if name in sims}
  return result


def directions(result: dict) -> list[str]:
  """The direction keys of an eval dict ("text_to_video", ...), whatever other keys it carries."""
  return [name for name, value in result.items() if isinstance(value, dict) and "R1" in value]


def format_table(result: dict) -> str:
  """A fixed-width table: one row per score (combined first), both directions, SumR."""
  names = directions(result)
  columns = ["R1", "R5", "R10", "MdR", "MnR"]
  header = f"{'score':<10}" + "".join(f" | {d:<39}" for d in names) + " |   SumR"
  sub = f"{'':<10}" + "".join(" | " + " ".join(f"{c:>7}" for c in columns) for _ in names) + " |"
  rows = [("combined", result)] + list(result.get("levels", {}).items())
  lines = [header, sub, "-" * len(header)]
  for name, entry in rows:
    cells = "".join(" | " + " ".join(f"{entry[d][c]:7.1f}" for c in columns) for d in names)
    lines.append(f"{name:<10}{cells} | {entry['SumR']:6.1f}")
  return "\n".join(lines)
