"""metrics.jsonl on resume (torn last line dropped, bad lines named) and the synchronous TensorBoard writer
(events read back with a TFRecord reader written here; a failed write raises instead of hanging)."""
import errno
import json
import struct

import pytest
from tensorboardX import record_writer
from tensorboardX.proto import event_pb2

from varcmp_jax.train import metrics_log
from varcmp_jax.train.workdir import RunError


def read_events(logdir):
  """Every Event of every events file in logdir (TFRecord: u64 length, u32 crc, data, u32 crc)."""
  events = []
  for path in sorted(logdir.iterdir()):
    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12:offset + 12 + length])
      events.append(event)
      offset += 12 + length + 4
  return events


def test_torn_last_line_is_dropped_and_a_bad_line_is_named(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert metrics_log.read_jsonl(str(path)) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
  assert f"{path}:3: dropping a torn last line" in capsys.readouterr().err
  metrics_log.keep_through(str(path), 1)
  assert path.read_text() == '{"step": 1, "loss": 2.0}\n'
  path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
  with pytest.raises(RunError, match=f"{path}:2: not a metrics line"):
    metrics_log.read_jsonl(str(path))
  path.write_text('{"step": 1}\n\0\0\0\0')      # a crash can leave NUL bytes where the last line was
  assert metrics_log.read_jsonl(str(path)) == [{"step": 1}]
  assert metrics_log.read_jsonl(str(tmp_path / "absent.jsonl")) == []


def test_resume_drops_rows_after_the_restored_step(tmp_path):
  log = metrics_log.MetricsLog(str(tmp_path), 0)
  for step in (1, 2, 3):
    log.write(step, {"loss": 1.0 / step})
  log.write_eval(2, {"text_to_video": {"R1": 50.0}, "SumR": 50.0, "levels": {}})
  log.close()
  log = metrics_log.MetricsLog(str(tmp_path), 1)     # resumed from the step-1 checkpoint
  log.write(2, {"loss": 0.25})
  log.close()
  assert [(r["step"], r["loss"]) for r in metrics_log.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [(1, 1.0), (2, 0.25)]
  assert metrics_log.read_jsonl(str(tmp_path / "eval_history.jsonl")) == []
  events = read_events(tmp_path / "tensorboard")
  scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
  assert scalars == [(1, "train/loss", 1.0), (2, "train/loss", 0.5), (3, "train/loss", pytest.approx(1 / 3)),
                     (2, "eval/combined/text_to_video/R1", 50.0), (2, "eval/combined/SumR", 50.0),
                     (2, "train/loss", 0.25)]
  # The resumed file starts with TensorBoard's purge marker: events of step >= 2 written before are hidden.
  starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [2]


def test_a_failed_tensorboard_write_raises_in_the_caller(tmp_path, monkeypatch):
  """tensorboardX's SummaryWriter would hang on its queue after its writer thread died of ENOSPC."""
  log = metrics_log.MetricsLog(str(tmp_path), 0)
  def full_disk(self, data):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk)
  with pytest.raises(OSError) as error:
    log.write(1, {"loss": 1.0})
  assert error.value.errno == errno.ENOSPC
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 1.0}


def test_throughput_rides_with_the_metrics(tmp_path, monkeypatch):
  """Per step over the steps since the last row: wall time without paused spans, input wait, samples/s, TFLOP/s;
  into metrics.jsonl and TensorBoard's throughput/ tags. A fake clock: 3 steps in 7 s, 2 s of them an eval."""
  clock = iter([0.0,                  # restart
                1.0, 1.5,             # waiting: 0.5 s
                3.0, 5.0,             # paused: 2 s (an eval)
                6.0, 6.25,            # waiting: 0.25 s
                7.0,                  # report
                7.0])                 # the restart after the report
  monkeypatch.setattr(metrics_log.time, "perf_counter", lambda: next(clock))
  meter = metrics_log.Throughput(batch_size=10, flops_per_step=2e12)
  with meter.waiting():
    meter.stepped()
  with meter.paused():
    pass
  with meter.waiting():
    meter.stepped()
  meter.stepped()
  figures = meter.report()
  assert figures == {"step_time_s": pytest.approx(5 / 3), "input_wait_s": pytest.approx(0.75 / 3),
                     "samples_per_s": pytest.approx(10 * 3 / 5), "tflops_per_s": pytest.approx(2 * 3 / 5)}
  log = metrics_log.MetricsLog(str(tmp_path), 0)
  log.write(3, {"loss": 1.0}, figures)
  log.close()
  assert metrics_log.read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"step": 3, "loss": 1.0, **figures}]
  tags = {v.tag for e in read_events(tmp_path / "tensorboard") for v in e.summary.value}
  assert tags == {"train/loss", "throughput/step_time_s", "throughput/input_wait_s", "throughput/samples_per_s",
                  "throughput/tflops_per_s"}


def test_mfu_is_model_flops_per_second_against_every_devices_peak(monkeypatch):
  # 4 devices of 1 TFLOP/s peak, 2 TFLOP a step, 2 steps in 1 s: 4 TFLOP/s of 4 -> MFU 1.0; 8 devices: 0.5.
  from varcmp_jax import flops
  for devices, mfu in ((4, 1.0), (8, 0.5)):
    clock = iter([0.0, 1.0, 1.0])
    monkeypatch.setattr(metrics_log.time, "perf_counter", lambda: next(clock))
    meter = metrics_log.Throughput(batch_size=1, flops_per_step=2e12, peak=flops.Peak(1e12, 1e12), devices=devices)
    meter.stepped()
    meter.stepped()
    assert meter.report()["mfu"] == pytest.approx(mfu)
  clock = iter([0.0, 1.0, 1.0])
  assert "mfu" not in metrics_log.Throughput(batch_size=1, flops_per_step=2e12).report()   # no peak (a CPU)
