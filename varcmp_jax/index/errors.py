"""What can go wrong with an index, in the words the commands and the page use.

  StoreError      the index cannot be opened, resumed or extended as asked (no index there, another writer,
                  another model): the user's choice to fix; `varcmp search` exits 1 with the line, the page
                  answers 400.
  IndexDamaged    what was read is not what was written (a checksum, a header, a truncated file, non-finite
                  rows): the message names the file and the command that rebuilds it; the page answers 500.
  IndexUnreadable a file the index needs cannot be read now (deleted, or permission denied): the message says
                  which and why, never "rebuild" when the fix is permissions; the page answers 503.
Each message is one line that names the file. `damaged` and `unreadable` word them.
"""
import errno
import os


class StoreError(ValueError):
  """An index that cannot be opened, resumed or extended as asked; the message names the path."""


class IndexDamaged(StoreError):
  """Bytes of the index that do not match what was written; the message names the file and the rebuild."""


class IndexUnreadable(StoreError):
  """A file of the index that cannot be read now (missing, permission denied); the message says which and why."""


def damaged(file: str, problem: str, rebuild: str) -> IndexDamaged:
  """`file` holds what was not written there (`problem`); `rebuild`: the commands that rebuild the index."""
  return IndexDamaged(f"{file}: {problem}; the index is damaged: rebuild it: {rebuild}")


def unreadable(file: str, error: OSError, rebuild: str) -> IndexUnreadable:
  """`file` could not be opened or read (`error`); `rebuild`: the commands that rebuild the index, offered only
  where the file is gone (a permission is fixed where it is)."""
  if isinstance(error, PermissionError):
    return IndexUnreadable(f"{file}: permission denied: this process (uid {os.geteuid()}) may not read it; give it "
                           "read access to the index's files (chmod/chown) or run as a user who has it")
  if isinstance(error, FileNotFoundError) or error.errno in (errno.ENOENT, errno.ENOTDIR):
    return IndexUnreadable(f"{file}: missing (deleted or moved since the index was written); put it back, or "
                           f"rebuild the index: {rebuild}")
  return IndexUnreadable(f"{file}: cannot be read ({error.strerror or error}); if the disk is sound, "
                         f"`varcmp index --verify` checks the index, and this rebuilds it: {rebuild}")
