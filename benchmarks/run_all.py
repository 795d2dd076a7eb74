"""`make bench`: every benchmark at the size of the accelerator present, under a time budget, each run recorded.

  python benchmarks/run_all.py                           # full sizes on a GPU / TPU (budget 480 s), CPU sizes on a CPU
  python benchmarks/run_all.py --budget 900 --limit 240  # 15 minutes in all, at most 4 for each benchmark
  python benchmarks/run_all.py --only train_step_features,clip_step --no-record
  python benchmarks/run_all.py --benchmarks-md $OUT/BENCHMARKS.md --logs $OUT/bench   # on a lent machine

The convention every benchmark follows (this runner records what they print, and nothing else):
- Each phase is printed the moment it happens, with flush=True: data written, params ready, "<what>: compiled
  in X s" (the compilation or first call, always reported apart from step time; without "<what>: ", the last
  heading line, "<what>: ..." at column 0, names it), each timed step with its ms.
- Each result is a markdown table row (`| ... |`), printed the moment it is measured, after its table's header
  row and `| --- |` line. A comparison of peers is a ratio line, `<ours> / <peer>[ qualifier]: X.XXx ...`.
- Nothing waits for the end of the run: a benchmark stopped by its time limit keeps every row it printed.

Jobs run most important first: the train step (features regime, resident data and Grain; then frames), the
CLIP step, extraction, the input pipeline, then the rest. Each runs in its own process group (its own device
memory), its output streamed live to the terminal (each line prefixed with the job's name) and to
runs/bench/<time>/<job>.log. A job's limit is --limit, else its own default, never more than what is left of
--budget; past it the job is stopped (SIGTERM, then SIGKILL, to its whole process group: it may hold a GPU)
and the rows it printed are kept, marked "stopped at N s". Jobs the budget leaves no time for are listed as
not run. Each job becomes a row of the table under "## make bench" in BENCHMARKS.md as soon as it ends: date,
device, command, figures (its table rows, each cell with its column's name, and its ratio lines), compile
seconds, and the peer measured in the same run. Without an accelerator the CPU sizes run (they prove each
benchmark works; the input benchmark runs at its real size), and every row says the accelerator figures are owed.
"""
import argparse
import dataclasses
import math
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time

BENCHMARKS = pathlib.Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
SECTION = "## make bench"
COLUMNS = ("date", "device", "command", "figures", "compile s", "peer (same run)")
HEADER = "| " + " | ".join(COLUMNS) + " |"
ACCELERATOR_BUDGET_S = 480.0
KILL_GRACE_S = 5.0            # between SIGTERM and SIGKILL

SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
RATIO = re.compile(r"^[^\s|:][^|:]* / [^:]+: [\d.]+x\b")
COMPILED = re.compile(r"^\s*(?:\[[\d:]+\]\s*)?(.*?)\s*compiled in ([\d.]+) s")


@dataclasses.dataclass(frozen=True)
class Job:
  script: str                       # under benchmarks/ (or an absolute path)
  full: list[str] | None            # arguments at the accelerator's size; None: run on a CPU only
  cpu: list[str] | None             # the CPU sizes; None: run on an accelerator only
  peer: str                         # what the same run compares with
  limit: float | None = None        # default time limit, seconds (None: what is left of the budget)


EVAL_FULL = ["--queries", "800", "--gallery", "800", "--snippets", "256", "--regions", "4", "--words", "32",
             "--chunk", "64", "--compare", "96"]
EVAL_CPU = ["--queries", "96", "--gallery", "96", "--snippets", "32", "--regions", "4", "--words", "16",
            "--chunk", "16", "--compare", "48"]
TRAIN_CPU = ["--small", "--steps", "5"]

# Most important first: a short session measures these in this order.
JOBS = {
    "train_step_features": Job("train_step.py", ["--regime", "features", "--resident", "both"],
                               TRAIN_CPU + ["--regime", "features", "--resident", "both"],
                               "Grain vs device-resident data, same records", limit=240),
    "train_step_frames": Job("train_step.py", ["--regime", "frames"], TRAIN_CPU + ["--regime", "frames"],
                             "the features rows (same step, precomputed features)", limit=240),
    # CPU only (the two above cover it on an accelerator): the full-size features step compiled and its FLOPs
    # counted, the input timed: would an H100 wait for its input?
    "train_step_input": Job("train_step.py", None, ["--regime", "features", "--steps", "0", "--resident", "both"],
                            "Grain vs resident data, same records; the H100 roofline", limit=420),
    "clip_step": Job("clip_step.py", [], ["--model", "tiny", "--batch", "32", "--steps", "5", "--warmup", "2",
                                          "--peers", "ours,torch_eager"],
                     "HF CLIPModel, PyTorch eager and torch.compile (CPU sizes: eager only; a cold torch.compile "
                     "takes minutes on 2 cores)", limit=300),
    "extract_features": Job("extract_features.py", [], ["--model", "tiny", "--batch", "32", "--steps", "10",
                                                        "--skip-compile"],
                            "HF CLIPVisionModelWithProjection, eager and torch.compile (CPU sizes: eager only)",
                            limit=240),
    "input_pipeline": Job("input_pipeline.py", ["--features", "--snippets", "256", "--batch", "128", "--workers",
                                                "0", "4", "8"],
                          ["--features", "--snippets", "256", "--batch", "128", "--batches", "10", "--workers",
                           "0", "2"],
                          "Grain (each worker count) vs device-resident gather, same records", limit=180),
    "step_flops": Job("step_flops.py", [], [], "the step before loss.precision and the word budget (traced)",
                      limit=240),
    "eval_similarity_text": Job("eval_similarity.py", EVAL_FULL + ["--task", "text"], EVAL_CPU + ["--task", "text"],
                                "the unchunked computation (chunk 0), each in its own process", limit=120),
    "eval_similarity_audio": Job("eval_similarity.py", EVAL_FULL + ["--task", "audio"],
                                 EVAL_CPU + ["--task", "audio"],
                                 "the unchunked computation (chunk 0), each in its own process", limit=120),
}


@dataclasses.dataclass
class Outcome:
  """What one job printed and how it ended."""
  tables: list = dataclasses.field(default_factory=list)   # [(header cells, [row cells, ...]), ...]
  ratios: list = dataclasses.field(default_factory=list)   # ratio lines as printed
  compiles: list = dataclasses.field(default_factory=list)  # "<what> X s"
  heading: str = ""                                         # <what> of the last "<what>: ..." line at column 0
  last_line: str = ""
  returncode: int | None = None
  seconds: float = 0.0
  stopped: str = ""                                         # why it was stopped ("" if it ended by itself)

  def read(self, line: str):
    """Takes one printed line: rows, ratio lines and compile times by the convention above."""
    if line.startswith("|") and line.endswith("|"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      if SEPARATOR.match(line):
        if self.tables and self.tables[-1][1]:     # the line before was a header, not a row
          self.tables.append((self.tables[-1][1].pop(), []))
      elif self.tables:
        self.tables[-1][1].append(cells)
      else:
        self.tables.append(([], [cells]))
      return
    if RATIO.match(line):
      self.ratios.append(" ".join(line.split()))
    compiled = COMPILED.search(line)
    if compiled:
      self.compiles.append(f"{compiled[1].strip(' :') or self.heading} {compiled[2]} s".strip())
    elif line[:1].strip() and ": " in line:
      self.heading = line.split(": ", 1)[0]
    if line.strip():
      self.last_line = line.strip()

  def figures(self) -> str:
    """The rows as `column: value; ...`, one per line (<br>), then the ratio lines; why it ended, if not itself."""
    rows = []
    for header, body in self.tables:
      for cells in body:
        named = [f"{name}: {value}" if name else value for name, value in zip(header + [""] * len(cells), cells)]
        rows.append("; ".join(named))
    text = "<br>".join(rows + self.ratios) or "(no rows printed)"
    if self.stopped:
      return f"**stopped at {self.seconds:.0f} s** ({self.stopped}): {text}"
    if self.returncode:
      return f"failed (exit {self.returncode}: {self.last_line[:300]}): {text}"
    return text


def _stop(process: subprocess.Popen):
  """SIGTERM, then SIGKILL after a grace period, to the job's whole process group (its peers, its workers)."""
  for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
    try:
      os.killpg(process.pid, sig)
    except ProcessLookupError:
      return
    try:
      process.wait(timeout=wait)
      return
    except subprocess.TimeoutExpired:
      continue


def run_job(name: str, command: list[str], limit: float | None, log_path: pathlib.Path,
            limit_reason: str = "") -> Outcome:
  """Runs one job in its own process group, streaming its output live; stops it after `limit` seconds."""
  outcome = Outcome()
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  start = time.monotonic()
  process = subprocess.Popen(command, cwd=BENCHMARKS, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
  lines = queue.Queue()

  def read_pipe():
    for raw in process.stdout:    # bytes, split at "\n" only
      # A progress bar redraws its line after each "\r": keep what a terminal would show last.
      shown = [part for part in raw.decode(errors="replace").rstrip("\r\n").split("\r") if part.strip()]
      lines.put(shown[-1] if shown else "")
    lines.put(None)

  reader = threading.Thread(target=read_pipe, daemon=True)
  reader.start()
  deadline = None if limit is None else start + limit
  ended = False                # the job closed its output (it exits, or is about to)
  with open(log_path, "w") as log:
    log.write(f"$ {' '.join(command)}\n")
    try:
      while True:
        try:
          line = lines.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if line is None:
          ended = True
          break
        print(f"[{name}] {line}", flush=True)
        log.write(line + "\n")
        log.flush()
        outcome.read(line)
      if ended:
        try:
          process.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          ended = False
      if not ended:
        outcome.stopped = limit_reason or f"limit {limit:.0f} s"
    finally:   # also when this runner is interrupted: never leave a job holding the device
      outcome.seconds = time.monotonic() - start
      if process.poll() is None:
        _stop(process)
    reader.join(timeout=KILL_GRACE_S)
    while not lines.empty():    # lines printed before the stop but not read yet
      line = lines.get()
      if line is not None:
        log.write(line + "\n")
        outcome.read(line)
    if outcome.stopped:
      log.write(f"--- stopped at {outcome.seconds:.0f} s ({outcome.stopped})\n")
  outcome.returncode = process.returncode
  return outcome


def describe_device() -> tuple[str, bool]:
  """(what runs the benchmarks, whether it is an accelerator), asked of jax in a subprocess (this process
  must not hold the accelerator's memory)."""
  code = "import jax; d = jax.devices(); print(jax.default_backend(), len(d), d[0].device_kind, sep='|')"
  backend, count, kind = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1].split("|")
  if backend != "cpu":
    return f"{count} x {kind}", True
  return f"{os.cpu_count()}-core CPU ({kind})", False


def record(path: pathlib.Path, row: str) -> None:
  """Appends `row` to the table with HEADER under SECTION; a new table at the end of the section (the section at
  the end of the file) where there is none."""
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  if SECTION not in text:
    text = text.rstrip("\n") + f"\n\n{SECTION}\n"
  lines = text.splitlines(keepends=True)
  start = next(i for i, line in enumerate(lines) if line.strip() == SECTION)
  end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
  table = next((i for i in range(start, end) if lines[i].strip() == HEADER), None)
  if table is None:
    while end > start + 1 and not lines[end - 1].strip():
      end -= 1
    lines[end - 1] = lines[end - 1].rstrip("\n") + "\n"
    lines[end:end] = ["\nRows appended by `make bench` (benchmarks/run_all.py, under a time budget): figures are the "
                      "benchmarks' own table rows and ratio lines, compile seconds apart, the peer of the same "
                      "run.\n\n",
                      HEADER + "\n", "| --- " * len(COLUMNS) + "|\n"]
    table = end + 1
  last = table + 1
  while last + 1 < len(lines) and lines[last + 1].startswith("|"):
    last += 1
  lines[last] = lines[last].rstrip("\n") + "\n"
  lines.insert(last + 1, row + "\n")
  path.write_text("".join(lines))


def table_row(*cells: str) -> str:
  return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def run_all(jobs: dict[str, Job], device: str, accelerator: bool, budget: float, limit: float | None,
            logs: pathlib.Path, benchmarks_md: pathlib.Path | None) -> list[str]:
  """Runs `jobs` in order within `budget` seconds; returns (and records, unless benchmarks_md is None) their rows."""
  logs.mkdir(parents=True, exist_ok=True)
  start = time.monotonic()
  rows, not_run = [], []
  for name, job in jobs.items():
    argv = job.full if accelerator else job.cpu
    if argv is None:
      continue
    script = BENCHMARKS / job.script
    command = f"python {script.relative_to(ROOT) if script.is_relative_to(ROOT) else script} {' '.join(argv)}".strip()
    where = device if accelerator else (f"{device}, load average {os.getloadavg()[0]:.1f} (shared); CPU sizes: "
                                        "**accelerator figures owed**")
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    left = budget - (time.monotonic() - start)
    if left <= 0:
      not_run.append(name)
      print(f"== {name}: not run, the budget of {budget:.0f} s is spent ({command})", flush=True)
      row = table_row(date, where, f"`{command}`", f"not run: the budget of {budget:.0f} s was spent", "", job.peer)
    else:
      own = limit if limit is not None else job.limit
      chosen = min(own if own is not None else math.inf, left)
      reason = f"the budget of {budget:.0f} s ran out" if chosen == left else f"its limit of {chosen:.0f} s"
      print(f"== {name}: {command}" + ("" if math.isinf(chosen) else f" (limit {chosen:.0f} s)"), flush=True)
      outcome = run_job(name, [sys.executable, str(script), *argv],
                        None if math.isinf(chosen) else chosen, logs / f"{name}.log", reason)
      ending = f"stopped ({outcome.stopped})" if outcome.stopped else f"exit {outcome.returncode}"
      print(f"== {name}: {ending} after {outcome.seconds:.0f} s; log {logs / (name + '.log')}", flush=True)
      row = table_row(date, where, f"`{command}`", outcome.figures(), "; ".join(outcome.compiles), job.peer)
    rows.append(row)
    if benchmarks_md is not None:    # as each job ends: a session that ends early keeps the rows so far
      record(benchmarks_md, row)
  if not_run:
    print(f"not run (the budget of {budget:.0f} s was spent): {', '.join(not_run)}", flush=True)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default=",".join(JOBS), help=f"comma-separated subset of {', '.join(JOBS)} (in this order)")
  p.add_argument("--budget", type=float, default=None,
                 help=f"seconds for all the jobs together (default {ACCELERATOR_BUDGET_S:.0f} on an accelerator, "
                      "unlimited on a CPU)")
  p.add_argument("--limit", type=float, default=None,
                 help="seconds for each job (default: its own default limit, else what is left of the budget)")
  p.add_argument("--no-record", action="store_true", help="print the rows, leave BENCHMARKS.md alone")
  p.add_argument("--benchmarks-md", default=str(ROOT / "BENCHMARKS.md"))
  p.add_argument("--logs", default=None, help="folder for the jobs' logs (default runs/bench/<time>)")
  args = p.parse_args(argv)
  names = args.only.split(",")
  unknown = sorted(set(names) - set(JOBS))
  if unknown:
    p.error(f"unknown benchmarks {unknown}; known: {', '.join(JOBS)}")
  for flag in ("budget", "limit"):
    if getattr(args, flag) is not None and not getattr(args, flag) > 0:
      p.error(f"--{flag} must be a positive number of seconds, got {getattr(args, flag)}")
  # A SIGTERM (a session's own time limit) stops the running job too: run_job's cleanup runs on SystemExit.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  device, accelerator = describe_device()
  budget = args.budget or (ACCELERATOR_BUDGET_S if accelerator else math.inf)
  print(f"device: {device}; budget " + ("unlimited" if math.isinf(budget) else f"{budget:.0f} s")
        + (f", limit {args.limit:.0f} s a job" if args.limit else ""), flush=True)
  logs = pathlib.Path(args.logs) if args.logs else ROOT / "runs" / "bench" / time.strftime("%Y%m%d-%H%M%S")
  md = None if args.no_record else pathlib.Path(args.benchmarks_md)
  rows = run_all({name: JOBS[name] for name in JOBS if name in names}, device, accelerator, budget, args.limit,
                 logs, md)
  print("\n".join(rows) if md is None else f"{len(rows)} rows appended to {md}")
  if not accelerator:
    print("no accelerator here: these are the CPU sizes; the accelerator figures are still owed (run `make bench` "
          "on the GPU machine)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
