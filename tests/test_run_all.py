"""benchmarks/run_all.py's job runner on tiny fake benchmarks: rows kept, limits and the budget enforced, recorded."""
import importlib.util
import pathlib
import re
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_all", REPO / "benchmarks" / "run_all.py")
run_all = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_all)

OLD_TABLE = """# Benchmarks

## make bench

Rows appended by `make bench`.

| date | device | command | figures | peer (same run) |
| --- | --- | --- | --- | --- |
| old date | old device | `old command` | old figures | old peer |

Notes on the old run.

## later section

Text of a later section.
"""


def script(tmp_path, name, body):
  path = tmp_path / f"{name}.py"
  path.write_text(textwrap.dedent(body))
  return str(path)


def dead(pid: int) -> bool:
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return True
  return state in ("Z", "X")    # a zombie waiting for its reaper has finished


def test_rows_kept_limit_and_budget_enforced_and_recorded(tmp_path, capsys):
  grandchild = tmp_path / "grandchild.pid"
  jobs = {
      "done": run_all.Job(script(tmp_path, "done", """\
          print("data written", flush=True)
          print("writing:  50%\\rwriting: 100%\\r       ", flush=True)   # a progress bar, redrawn after "\\r"
          print("fake model: compiled in 0.5 s", flush=True)
          print("| what | rate |\\n| --- | --- |", flush=True)
          print("| first | 1.0 |", flush=True)
          print("| second | 2.0 |", flush=True)
          print("| peer | ms |\\n| :-- | --: |", flush=True)     # a second table with its own header
          print("eager peer: B=16, heading its phases", flush=True)
          print("  [12:00:00] compiled in 2.0 s", flush=True)      # named by the heading above
          print("| eager | 3.0 |", flush=True)
          print("ours / eager: 1.50x", flush=True)
          print("| this | line | is not a row")
          """), None, [], "peer A"),
      "sleeper": run_all.Job(script(tmp_path, "sleeper", f"""\
          import subprocess, sys, time
          child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
          open({str(grandchild)!r}, "w").write(str(child.pid))
          print("| what | rate |\\n| --- | --- |\\n| slow | 4.0 |", flush=True)
          time.sleep(60)
          print("| never | 0 |", flush=True)
          """), None, [], "peer B", limit=2),
      "hog": run_all.Job(script(tmp_path, "hog", """\
          import time
          print("| what | rate |\\n| --- | --- |\\n| hog | 5.0 |", flush=True)
          time.sleep(60)
          """), None, [], "peer C"),
      "late": run_all.Job(script(tmp_path, "late", 'print("| what |\\n| --- |\\n| late |", flush=True)\n'), None, [],
                          "peer D"),
      "accelerator_only": run_all.Job("never.py", ["--x"], None, "peer E"),
  }
  md = tmp_path / "BENCHMARKS.md"
  md.write_text(OLD_TABLE)
  start = time.monotonic()
  rows = run_all.run_all(jobs, "test CPU", False, budget=4.0, limit=None, logs=tmp_path / "logs", benchmarks_md=md)
  assert time.monotonic() - start < 15
  assert len(rows) == 4       # the accelerator-only job is not a CPU job at all
  done, sleeper, hog, late = rows

  cells = done.strip("|").split(" | ")
  assert cells[3] == "what: first; rate: 1.0<br>what: second; rate: 2.0<br>peer: eager; ms: 3.0<br>ours / eager: 1.50x"
  assert cells[4:] == ["fake model 0.5 s; eager peer 2.0 s", "peer A "]
  assert "**accelerator figures owed**" in cells[1] and cells[2].endswith("done.py`")

  stopped = re.search(r"\*\*stopped at (\d+) s\*\* \(its limit of 2 s\): what: slow; rate: 4.0 \|", sleeper)
  assert stopped and int(stopped[1]) == 2, sleeper
  assert "never" not in sleeper
  deadline = time.monotonic() + 5     # the whole process group was stopped, the job's own child included
  while not dead(int(grandchild.read_text())) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert dead(int(grandchild.read_text()))

  assert re.search(r"\*\*stopped at \d+ s\*\* \(the budget of 4 s ran out\): what: hog; rate: 5.0", hog), hog
  assert "not run: the budget of 4 s was spent" in late and "late |" not in late.split("`")[-1]
  out = capsys.readouterr().out
  assert "[done] | first | 1.0 |" in out and "[sleeper] | slow | 4.0 |" in out    # streamed, prefixed
  assert "not run (the budget of 4 s was spent): late" in out
  assert "| slow | 4.0 |" in (tmp_path / "logs" / "sleeper.log").read_text()
  assert "[done] writing: 100%\n[done] fake model" in out and "50%" not in out    # the bar as last drawn
  assert not (tmp_path / "logs" / "late.log").exists()

  text = md.read_text()
  assert text.startswith(OLD_TABLE.split("## later section")[0].rstrip("\n"))     # the old rows untouched
  section, later = text.split("## later section")
  assert later == "\n\nText of a later section.\n"
  new_table = section[section.index(run_all.HEADER):].strip().splitlines()
  assert new_table[0] == run_all.HEADER and new_table[1].count("---") == len(run_all.COLUMNS)
  assert new_table[2:] == rows


def test_record_creates_the_section_and_appends_to_its_table(tmp_path):
  md = tmp_path / "BENCHMARKS.md"
  run_all.record(md, "| a | b | c | d | e | f |")
  run_all.record(md, "| g | h | i | j | k | l |")
  lines = md.read_text().splitlines()
  assert lines[0] == "# Benchmarks" and run_all.SECTION in lines
  assert lines[-4:] == [run_all.HEADER, "| --- " * 6 + "|", "| a | b | c | d | e | f |", "| g | h | i | j | k | l |"]


def test_cells_escape_pipes_and_bad_flags_are_refused():
  assert run_all.table_row("a|b", "c\nd") == "| a\\|b | c d |"
  for argv in (["--only", "nope"], ["--budget", "0"], ["--limit", "-3"]):
    with pytest.raises(SystemExit) as error:
      run_all.main(argv)
    assert error.value.code == 2


def test_report_helpers_print_by_the_convention(tmp_path, capsys):
  """benchmarks/report.py (what the benchmarks print with) read back by run_all's parser."""
  spec = importlib.util.spec_from_file_location("report", REPO / "benchmarks" / "report.py")
  report = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(report)
  calls = []

  def step():    # the n-th call takes n x 10 ms and returns n
    calls.append(None)
    time.sleep(0.01 * len(calls))
    return len(calls)

  result = report.time_steps("fake", step, steps=3, warmup=2)
  assert len(calls) == 5 and result["value"] == 5 and len(result["step_times_s"]) == 3
  assert result["step_s"] == sorted(result["step_times_s"])[1] >= 0.04       # the median of the timed steps 3..5
  table = report.Table("peer", "ms")
  table.row("fake", f"{1e3 * result['step_s']:.1f}")
  table.row("other", 2)
  child = script(tmp_path, "child", 'print("  child: working", flush=True)\nprint("RESULT {\\"x\\": 1}")\n')
  assert report.run_child([sys.executable, child], "child") == {"x": 1}
  failing = script(tmp_path, "failing", 'print("bad input: no such file", flush=True)\nraise SystemExit(3)\n')
  assert report.run_child([sys.executable, failing], "failing") is None

  out = capsys.readouterr().out
  assert "RESULT" not in out and "  child: working\n" in out and out.count("| peer | ms |\n| --- | --- |\n") == 1
  assert "  failing: failed (exit 3): bad input: no such file" in out
  assert re.search(r"  fake: step 3/3: \d+\.\d ms\n", out) and "  fake: 1 more warmup steps" in out
  outcome = run_all.Outcome()
  for line in out.splitlines():
    outcome.read(line)
  assert re.fullmatch(r"fake 0\.0 s", outcome.compiles[0]) and len(outcome.compiles) == 1
  assert outcome.figures() == f"peer: fake; ms: {1e3 * result['step_s']:.1f}<br>peer: other; ms: 2"
