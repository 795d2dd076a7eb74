"""Workdir safety (SPEC section 4c): one writer per workdir, resume only with the same config, full disks.

  with workdir.writer(path):          # creates the directory, takes WORKDIR/writer.lock, RunError if busy
    workdir.check_same_config(path, config)   # RunError naming the fields that differ from config.json

The lock is an advisory `flock` on WORKDIR/writer.lock, which also names its holder (pid, host, start time,
command). The kernel drops the lock when the holder dies, however it dies, so a lock left by a killed run is
simply taken over (with a note naming that run); the file is emptied on a clean exit.
"""
import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time

LOCK_FILE = "writer.lock"

# Fields a resumed run may change: logging, checkpoint and eval cadence, worker counts, and settings that
# change only speed or memory (the same math), including the mesh, since checkpoints restore onto any mesh.
# data.resident and data.resident_max_gib too: resident data and Grain give different batch orders, so the
# path they pick is checked against the checkpoint instead (its "sampler" or "data" item): "auto" follows
# the checkpoint, an explicit choice that contradicts it is refused (data/resident.py: decide).
# Every other field shapes the parameters, the data order or the optimization, so it must match.
RESUME_MAY_CHANGE = (
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
    "data.worker_count", "data.prefetch", "data.resident", "data.resident_max_gib",
    "eval.batch_size", "eval.chunk_size", "loss.chunk_size", "model.remat", "model.attention_impl",
    "mesh.data", "mesh.fsdp", "compilation_cache",
)

OUT_OF_SPACE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                       errno.EFBIG: "File too large"}


class RunError(Exception):
  """A problem with the run's inputs or workdir that the user can fix; commands print it as one line."""


# ---- one writer ---------------------------------------------------------------------------------------

_held: dict[str, int] = {}     # workdir -> nesting depth in this process (ablate holds it around train)


def _holder_text(info: dict) -> str:
  return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
          + (f" ({info['command']})" if info.get("command") else ""))


def _read_holder(fd: int) -> dict | None:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 65536).decode("utf-8", "replace").strip()
  if not text:
    return None
  try:
    info = json.loads(text)
  except json.JSONDecodeError:
    return {"pid": "?", "host": "?", "started": f"? (unreadable lock file: {text[:80]!r})"}
  return info if isinstance(info, dict) else {}


def make_dir(path: str) -> bool:
  """Creates `path` (and parents) if needed; True if this call created it. RunError if it cannot be written."""
  created = not os.path.isdir(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise RunError(f"cannot create the workdir {path}: {e.strerror or e}") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise RunError(f"the workdir {path} is not writable (permission denied)")
  return created


def remove_if_unused(path: str) -> None:
  """Removes `path` if it holds nothing but (its own) lock file and empty directories."""
  for root, _, files in os.walk(path):
    if any(not (root == path and name == LOCK_FILE) for name in files):
      return
  shutil.rmtree(path, ignore_errors=True)


def _acquire(path: str) -> int:
  """Opens and flocks WORKDIR/writer.lock, writes this process into it; returns the fd. RunError if busy."""
  lock_path = os.path.join(path, LOCK_FILE)
  try:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise RunError(f"cannot write the lock file {lock_path}: {e.strerror or e}") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read_holder(fd)
    os.close(fd)
    raise RunError(f"{path} is in use by another run ({_holder_text(holder or {})}); wait for it to end or "
                   f"stop it, or use another --workdir (lock: {lock_path})") from None
  except OSError as e:    # a filesystem without locks (some network mounts): warn, go on unguarded
    print(f"warning: cannot lock {lock_path} ({e.strerror or e}); nothing stops a second run from writing "
          "into this workdir at the same time", file=sys.stderr)
  previous = _read_holder(fd)
  if previous:
    print(f"note: taking over the lock of a run that ended without releasing it ({_holder_text(previous)}): "
          f"{lock_path}", file=sys.stderr)
  mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
          "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300] if sys.argv else ""}
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
  except OSError as e:
    os.close(fd)
    raise RunError(f"cannot write the lock file {lock_path}: {e.strerror or e}") from None
  return fd


@contextlib.contextmanager
def writer(path: str):
  """Holds WORKDIR/writer.lock for the block; RunError at once if another process holds it.

  Creates the workdir; if the block fails and the workdir was created here and nothing but the lock was
  written into it, the workdir is removed again (a failed command leaves no empty workdir behind).
  Re-entrant within one process.
  """
  path = os.path.abspath(path)
  if path in _held:
    _held[path] += 1
    try:
      yield
    finally:
      _held[path] -= 1
    return
  created = make_dir(path)
  try:
    fd = _acquire(path)
  except RunError:
    if created:
      remove_if_unused(path)
    raise
  _held[path], failed = 1, True
  try:
    yield
    failed = False
  finally:
    del _held[path]
    with contextlib.suppress(OSError):
      os.ftruncate(fd, 0)           # released cleanly: the next run has nothing to take over
    os.close(fd)                    # drops the flock
    if failed and created:
      remove_if_unused(path)


# ---- the same config on resume ------------------------------------------------------------------------


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def config_differences(saved: dict, wanted: dict, may_change=RESUME_MAY_CHANGE) -> list[str]:
  """'field: saved -> wanted' for every field set in both (JSON trees) that differs and may not change.

  A field only one side has (added or removed by a newer version of the code) is not compared.
  """
  a, b = flatten(saved), flatten(wanted)
  return [f"{key}: {a[key]!r} -> {b[key]!r}" for key in sorted(set(a) & set(b))
          if a[key] != b[key] and key not in may_change]


# Fields that may differ between a run and an evaluation of it: speed, memory and precision of the forward pass.
EVAL_MAY_CHANGE = ("model.remat", "model.attention_impl", "model.dtype", "model.clip_checkpoint", "compilation_cache")


def model_differences(saved: dict, wanted: dict) -> list[str]:
  """config_differences restricted to what shapes the parameters (task, regime, model.*): an evaluation may
  change the data, the scoring and the cadence, not the model whose checkpoint it restores."""
  return [d for d in config_differences(saved, wanted, may_change=EVAL_MAY_CHANGE)
          if d.startswith(("task:", "regime:", "model."))]


def read_saved_config(workdir: str) -> dict | None:
  """WORKDIR/config.json as a JSON tree, None if there is none; RunError if it cannot be read."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise RunError(f"{path}: cannot read the run's config ({e})") from None
  if not isinstance(saved, dict):
    raise RunError(f"{path}: not a config (a JSON object)")
  return saved


def check_same_config(workdir: str, config, what: str = "resume") -> None:
  """RunError naming the fields if `config` differs from WORKDIR/config.json beyond RESUME_MAY_CHANGE."""
  saved = read_saved_config(workdir)
  if saved is None:
    return
  differences = config_differences(saved, json.loads(config.to_json_best_effort()))
  if differences:
    shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
    raise RunError(f"cannot {what} {workdir} with a different config ({shown}). Only "
                   f"{', '.join(RESUME_MAY_CHANGE)} may change; use another --workdir for a new run")


def write_atomically(path: str, text: str) -> None:
  """`text` into `path` under a temporary name, then renamed: readers never see half a file, and a failed
  write (a full disk) leaves the old file and no temporary one."""
  partial = f"{path}.tmp{os.getpid()}"
  try:
    with open(partial, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(partial, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(partial)
    raise


def write_config(workdir: str, config) -> None:
  write_atomically(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


# ---- full disks ---------------------------------------------------------------------------------------


def out_of_space(error: BaseException) -> str | None:
  """The reason if `error` (or an exception it chains) is a full disk / quota / file-size limit, else None.

  Python raises OSError with the errno; Orbax's TensorStore writes raise ValueError whose text ends with
  "[os_error_code='28']" (ENOSPC).
  """
  seen = 0
  while error is not None and seen < 10:
    if isinstance(error, OSError) and error.errno in OUT_OF_SPACE_ERRNOS:
      return OUT_OF_SPACE_ERRNOS[error.errno]
    text = str(error)
    for code, reason in OUT_OF_SPACE_ERRNOS.items():
      if f"os_error_code='{code}'" in text or reason in text:
        return reason
    error, seen = error.__cause__ or error.__context__, seen + 1
  return None

