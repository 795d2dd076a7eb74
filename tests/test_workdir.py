"""Workdir safety (SPEC 4c): the writer lock against a second process, taking over a dead holder's lock, no
empty workdir left by a failure, the resume config check and its allow-list, full-disk errors."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import ml_collections
import pytest

from varcmp_jax.train import workdir
from varcmp_jax.train.workdir import RunError

HOLD = ("import sys, time\nfrom varcmp_jax.train import workdir\n"
        "with workdir.writer(sys.argv[1]):\n  print('held', flush=True)\n  time.sleep(120)\n")


def hold_in_another_process(path):
  process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "held"
  return process


def test_second_writer_fails_at_once_naming_the_holder_then_takes_over_a_dead_holders_lock(tmp_path, capsys):
  path = tmp_path / "run"
  holder = hold_in_another_process(path)
  try:
    with pytest.raises(RunError) as error:
      with workdir.writer(path):
        pass
    message = str(error.value)
    assert f"{path} is in use by another run" in message
    assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in message
    assert json.loads((path / workdir.LOCK_FILE).read_text())["pid"] == holder.pid   # the holder's info kept
  finally:
    holder.send_signal(signal.SIGKILL)       # dies holding the lock: its info stays in the file
    holder.wait()
  capsys.readouterr()
  with workdir.writer(path):
    assert f"taking over the lock of a run that ended without releasing it (pid {holder.pid}" in capsys.readouterr().err
    assert json.loads((path / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
    with workdir.writer(path):               # re-entrant in one process (ablate holds it around train)
      pass
  assert (path / workdir.LOCK_FILE).read_text() == ""     # released cleanly: nothing to take over
  with workdir.writer(path):
    assert "taking over" not in capsys.readouterr().err


def test_a_failed_command_leaves_no_empty_workdir(tmp_path):
  fresh = tmp_path / "a" / "fresh"
  with pytest.raises(ValueError):
    with workdir.writer(fresh):
      raise ValueError("the command failed before writing anything")
  assert not fresh.exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  with pytest.raises(ValueError):
    with workdir.writer(existing):
      raise ValueError("failed")
  assert existing.is_dir()                   # not ours to remove
  written = tmp_path / "written"
  with pytest.raises(ValueError):
    with workdir.writer(written):
      (written / "config.json").write_text("{}")
      raise ValueError("failed after writing")
  assert (written / "config.json").exists()


def test_unwritable_workdir_is_one_line(tmp_path):
  (tmp_path / "a_file").write_text("not a directory")
  with pytest.raises(RunError, match=f"cannot create the workdir {tmp_path / 'a_file' / 'run'}: Not a directory"):
    with workdir.writer(tmp_path / "a_file" / "run"):
      pass


def test_config_differences_and_the_resume_allow_list(tmp_path):
  saved = {"seed": 0, "train": {"learning_rate": 0.001, "log_every": 10, "num_steps": 100},
           "data": {"worker_count": 0, "records": "/r"}, "mesh": {"data": -1, "fsdp": 1},
           "model": {"temporal": {"num_layers": 1}}, "removed_field": 3}
  wanted = json.loads(json.dumps(saved))
  wanted["train"].update(log_every=1, learning_rate=0.5)
  wanted["data"]["worker_count"] = 4
  wanted["mesh"]["fsdp"] = 2
  wanted["model"]["temporal"]["num_layers"] = 2
  del wanted["removed_field"]
  wanted["new_field"] = 1                    # a field only one side has is not compared
  assert workdir.config_differences(saved, wanted) == [
      "model.temporal.num_layers: 1 -> 2", "train.learning_rate: 0.001 -> 0.5"]
  assert workdir.config_differences(saved, saved) == []
  assert workdir.model_differences(saved, wanted) == ["model.temporal.num_layers: 1 -> 2"]

  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = ml_collections.ConfigDict(wanted)
  with pytest.raises(RunError, match=r"cannot resume .* with a different config \(model.temporal.num_layers: 1 -> 2; "
                                     r"train.learning_rate: 0.001 -> 0.5\)\. Only train.log_every"):
    workdir.check_same_config(str(tmp_path), config)
  workdir.check_same_config(str(tmp_path / "no_config_yet"), config)       # nothing to compare with
  (tmp_path / "config.json").write_text('{"seed": ')
  with pytest.raises(RunError, match="config.json: cannot read the run's config"):
    workdir.check_same_config(str(tmp_path), config)


def test_out_of_space_is_recognized_however_it_is_raised():
  assert workdir.out_of_space(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
  assert workdir.out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded")) == "Disk quota exceeded"
  # TensorStore's write error inside an Orbax save, as it reaches the train loop (text as measured).
  orbax = ValueError('OUT_OF_RANGE: Error writing "a/0" in OCDBT database at local file "/w/checkpoints/2.orbax-'
                     'checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/w/d/ce7e": '
                     "Failed to write 220831 bytes to file 7: No space left on device [os_error_code='28']")
  assert workdir.out_of_space(orbax) == "No space left on device"
  try:
    try:
      raise OSError(errno.EFBIG, "File too large")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert workdir.out_of_space(outer) == "File too large"
  assert workdir.out_of_space(ValueError("shapes do not match")) is None
  assert workdir.out_of_space(OSError(errno.EACCES, "Permission denied")) is None
