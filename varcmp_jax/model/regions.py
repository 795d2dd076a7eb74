"""Region tokens r_{t,k}: patch tokens average-pooled onto a region_grid x region_grid layout.

Bins follow adaptive average pooling (row bin i covers patch rows floor(i*H/G) .. ceil((i+1)*H/G) - 1), so
any grid from 1 up to the full patch grid works, also when G does not divide the patch grid; when it does,
the bins are the plain non-overlapping blocks.
"""
import jax.numpy as jnp
import numpy as np


def _bins(size: int, num_bins: int) -> np.ndarray:
  """(num_bins, size) 0/1 matrix of which positions fall in each adaptive-pooling bin."""
  member = np.zeros((num_bins, size), np.float32)
  for i in range(num_bins):
    member[i, (i * size) // num_bins: -((-(i + 1) * size) // num_bins)] = 1.0
  return member


def membership(patch_grid: tuple[int, int], region_grid: int) -> np.ndarray:
  """(R, K) 0/1 matrix: which of the K = rows*cols row-major patches fall in each of R = region_grid**2 regions."""
  rows, cols = patch_grid
  if not 1 <= region_grid <= min(rows, cols):
    raise ValueError(f"config.model.region_grid={region_grid} must be between 1 and the patch grid "
                     f"{rows}x{cols}")
  member = np.einsum("ih,jw->ijhw", _bins(rows, region_grid), _bins(cols, region_grid))
  return member.reshape(region_grid * region_grid, rows * cols)


def pool_regions(patches, patch_grid: tuple[int, int], region_grid: int):
  """(..., K, D) patch tokens (row-major over patch_grid) -> (..., R, D) float32 region tokens."""
  if patches.shape[-2] != patch_grid[0] * patch_grid[1]:
    raise ValueError(f"pool_regions: {patches.shape[-2]} patch tokens do not fill the {patch_grid} patch grid")
  member = membership(patch_grid, region_grid)
  # Sum with 0/1 weights (exact in bf16), accumulate and divide in float32.
  sums = jnp.einsum("rk,...kd->...rd", jnp.asarray(member, patches.dtype), patches,
                    preferred_element_type=jnp.float32)
  return sums / jnp.asarray(member.sum(axis=1), jnp.float32)[:, None]
