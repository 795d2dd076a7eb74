"""--fit: the largest per-chip batch that fits, by doubling then bisection, each probe a compile."""
import dataclasses

from varcmp_jax.pod import CompileError

_MAX_PER_CHIP = 2 ** 20           # --fit stops doubling here


@dataclasses.dataclass
class Fit:
  batch: int                  # the largest per-chip batch that fits (0: not even one step)
  too_big: int                # the next step up, shown not to fit
  step: int
  compiles: int
  tried: list                 # [(per-chip batch, fits, total bytes or None)] in the order compiled


def fit_search(fits_at, start: int, step: int, known: dict | None = None) -> Fit:
  """The largest multiple of `step` for which fits_at(batch) -> (fits, total bytes) holds: doubling from `start`
  (rounded down to a multiple of step), then bisection down to one step. `known`: {batch: (fits, total)} already
  compiled (not counted again)."""
  results = dict(known or {})
  tried = []

  def probe(batch):
    if batch not in results:
      results[batch] = fits_at(batch)
      tried.append((batch, *results[batch]))
    return results[batch][0]

  batch = max(step, start // step * step)
  lo, hi = 0, None
  if probe(batch):
    lo = batch
    while hi is None:
      if batch * 2 > _MAX_PER_CHIP:
        raise CompileError(f"--fit: {batch} per chip still fits; stopped doubling at {_MAX_PER_CHIP}")
      batch *= 2
      if probe(batch):
        lo = batch
      else:
        hi = batch
  else:
    hi = batch
    while lo == 0 and hi > step:
      batch = max(step, hi // 2 // step * step)
      if probe(batch):
        lo = batch
      else:
        hi = batch
  while hi - lo > step:
    mid = lo + (hi - lo) // step // 2 * step
    if probe(mid):
      lo = mid
    else:
      hi = mid
  return Fit(lo, hi, step, len(tried), tried)
