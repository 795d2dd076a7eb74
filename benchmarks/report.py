"""What the benchmarks print, by run_all.py's convention: phases as they happen, table rows as they are measured,
timed steps with the compilation (first call) reported apart."""
import json
import statistics
import subprocess
import sys
import time

RESULT = "RESULT "    # a child process's line that carries its result as JSON


def phase(label: str, message: str):
  """One phase line, `  <label>: <message>`, printed at once."""
  print(f"  {label}: {message}", flush=True)


def time_steps(label: str, step, steps: int, warmup: int, compiles: bool = True) -> dict:
  """Calls step() warmup + steps times; step() must return only once its outputs are ready.

  The first call is timed apart and printed as "compiled in X s" (or "first call in X s" where nothing compiles,
  `compiles=False`), the rest of the warmup runs untimed, then each timed step is printed with its ms.
  Returns compile_s, step_s (the median timed step), step_times_s and the last step's return value.
  """
  start = time.perf_counter()
  value = step()
  compile_s = time.perf_counter() - start
  phase(label, f"compiled in {compile_s:.1f} s (first call)" if compiles else f"first call in {compile_s:.1f} s")
  start = time.perf_counter()
  for _ in range(warmup - 1):
    value = step()
  if warmup > 1:
    phase(label, f"{warmup - 1} more warmup steps in {time.perf_counter() - start:.1f} s")
  times = []
  for i in range(steps):
    start = time.perf_counter()
    value = step()
    times.append(time.perf_counter() - start)
    phase(label, f"step {i + 1}/{steps}: {1e3 * times[-1]:.1f} ms")
  return dict(compile_s=compile_s, step_s=statistics.median(times), step_times_s=times, value=value)


def run_child(command: list[str], label: str, env: dict | None = None) -> dict | None:
  """Runs a benchmark's child process (a peer in its own process), printing its lines as they come; returns the
  JSON of its `RESULT {...}` line (not printed), or None if it failed (then says so, with its last line)."""
  process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace")
  result, last = None, ""
  for line in process.stdout:
    if line.startswith(RESULT):
      result = json.loads(line[len(RESULT):])
    else:
      sys.stdout.write(line)
      sys.stdout.flush()
      last = line.strip() or last
  if process.wait() or result is None:
    phase(label, f"failed (exit {process.returncode}): {last[:300]}")
    return None
  return result


class Table:
  """A markdown table printed row by row as each is measured, its header before the first row."""

  def __init__(self, *columns: str):
    self.columns, self.started = columns, False

  def row(self, *cells):
    if not self.started:
      print("| " + " | ".join(self.columns) + " |\n" + "| --- " * len(self.columns) + "|", flush=True)
      self.started = True
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
