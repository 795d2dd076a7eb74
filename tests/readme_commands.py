"""Every code block of README.md, run as a reader runs it, or listed with the reason it cannot run here.

  python tests/readme_commands.py                 # run every block that can run here, in README order
  python tests/readme_commands.py --list          # only say what would run and why the rest would not
  python tests/readme_commands.py --skip 'varcmp ablate' --report runs/readme_check.md

The blocks run in a copy of the repository's files (tracked and new ones, as `git ls-files` lists them) in a
temporary folder, with the environment activated as the README says (`source .venv/bin/activate`): the copy's
.venv is a folder of links to this checkout's .venv with its own install stamp, so `make demo` runs the demo
without reinstalling into (or changing) the shared environment. Commands run in README order, so `make demo`'s
runs/demo serves the commands after it; `varcmp serve` runs in the background until the next one or the end,
for the `curl` lines after it.

Not run, each with its reason: commands that need files or services that are not here (absolute paths that do
not exist, /path/to/ placeholders, gs://, a file to upload), elided arguments (`...`), installs from the package
registry or for a GPU/TPU, the whole test suite and the benchmarks (make test, make bench), programs that are not
installed (htpasswd, caddy), blocks that are output or a file for another program (nginx), and Python sketches
that use names they do not define. Those are still checked where it costs nothing: a `varcmp` command's flags
against its `--help`, a Python sketch's imports.

Exit status: 0 when everything that ran succeeded and every check passed, 1 otherwise.
"""
import argparse
import ast
import builtins
import dataclasses
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
SERVER = "http://127.0.0.1:8000"   # where `varcmp serve` listens by default, as the README's curl lines say
# Placeholders the README uses for what a reader brings: their data, their checkpoint, their cloud project.
PLACEHOLDERS = ("/path/to/", "gs://", "PROJECT", "REGION", "BUCKET", "IMAGE", "HOST:")
# An unlabeled block is a command when it starts with one of these (else it is output, or a file for another
# program).
PROGRAMS = ("varcmp", "make", "python", "pip", "curl")
SHELL_BUILTINS = ("source", ".", "cd", "export")
NOT_HERE = {   # the first words of commands that are not run, and why
    "make test": "the whole test suite (`make test`: about 7 minutes on 2 cores, run by CI)",
    "make bench": "the benchmarks (`make bench`: minutes; rows appended to BENCHMARKS.md)",
    "pip install": "installs from the package registry (`make` does this for the CPU)",
}


@dataclasses.dataclass
class Block:
  line: int             # of the opening fence, 1-based (the code starts on the next)
  lang: str
  text: str             # dedented to the fence


@dataclasses.dataclass
class Step:
  line: int             # README line of the command (or of the block's first line)
  kind: str             # "shell" | "python" | "text"
  code: str
  reason: str | None = None      # why it is not run; None: it runs
  status: str = "planned"        # planned | ok | FAILED | not run | skipped
  detail: str = ""
  seconds: float = 0.0


def blocks(text: str) -> list[Block]:
  """The fenced code blocks of a markdown text, an indented fence (a block inside a list item) included."""
  found, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    opening = re.match(r"^(\s*)```\s*([\w+-]*)\s*$", lines[i])
    if not opening:
      i += 1
      continue
    indent, body, j = len(opening.group(1)), [], i + 1
    while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
      body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
      j += 1
    found.append(Block(i + 1, opening.group(2).lower(), "\n".join(body)))
    i = j + 1
  return found


def logical_lines(block: Block) -> list[tuple[int, str]]:
  """(README line, text) of each line with its backslash continuations joined."""
  out, current, start = [], [], None
  for offset, line in enumerate(block.text.splitlines()):
    if start is None:
      start = block.line + 1 + offset
    current.append(line[:-1] if line.rstrip().endswith("\\") else line)
    if not line.rstrip().endswith("\\"):
      out.append((start, " ".join(part.strip() for part in current)))
      current, start = [], None
  if current:
    out.append((start, " ".join(part.strip() for part in current)))
  return out


def words(command: str) -> list[str]:
  """The shell words of a command, its comment dropped."""
  lexer = shlex.shlex(command, posix=True, punctuation_chars=False)
  lexer.whitespace_split, lexer.commenters = True, "#"
  try:
    return list(lexer)
  except ValueError:       # unbalanced quotes: the raw split
    return command.split()


def steps(block: Block) -> list[Step]:
  """A block as steps: each command of a shell block, each `$ ` line of a transcript, a Python block whole."""
  if block.lang == "python":
    return [Step(block.line + 1, "python", block.text)]
  if block.lang in ("bash", "sh", "shell", "console"):
    return [Step(line, "shell", text) for line, text in logical_lines(block) if words(text)]
  transcript = [(line, text[2:]) for line, text in logical_lines(block) if text.startswith("$ ")]
  if transcript:
    return [Step(line, "shell", text) for line, text in transcript]
  if not block.lang and words(block.text.split("\n", 1)[0])[:1] and words(block.text)[0] in PROGRAMS:
    return [Step(line, "shell", text) for line, text in logical_lines(block) if words(text)]
  what = f"a file for {block.lang}" if block.lang else "output, or a file for another program"
  return [Step(block.line + 1, "text", block.text, reason=f"not a command: {what}")]


def path_in(word: str) -> str:
  """The path a shell word names: itself, or the value of --flag=VALUE, or FILE of KEY=@FILE (curl -F)."""
  if word.startswith("-") and "=" in word:
    return word.split("=", 1)[1]
  return word.split("=@", 1)[1] if "=@" in word else word


def outputs(command: str) -> list[str]:
  """What a command writes that later commands read: its --out and --workdir folders."""
  argv = words(command)
  found = [argv[i + 1] for i, w in enumerate(argv[:-1]) if w in ("--out", "--workdir")]
  return found + [w.split("=", 1)[1] for w in argv if w.startswith(("--out=", "--workdir="))]


def reads_from(command: str, folders: dict[str, int]) -> int | None:
  """The README line of the not-run command whose output (`folders`: folder -> line) this command names."""
  for word in words(command)[1:]:
    path = path_in(word).rstrip("/")
    for folder, line in folders.items():
      if path == folder or path.startswith(folder + "/"):
        return line
  return None


def shell_reason(command: str, cwd: pathlib.Path, env: dict) -> str | None:
  """Why a shell command cannot run here, or None."""
  argv = words(command)
  head = " ".join(argv[:2])
  for start, why in NOT_HERE.items():
    if head.startswith(start):
      if "jax[cuda" in command or "jax[tpu]" in command:
        return "installs jax for a GPU or TPU"
      return why
  if "..." in argv or command.lstrip().startswith("..."):
    return "elided arguments (`...`): a variant of the command before it"
  placeholder = next((p for p in PLACEHOLDERS if p in command), None)
  if placeholder:
    return f"needs the reader's own data or services ({placeholder.rstrip(':')} is a placeholder)"
  if argv[0] not in SHELL_BUILTINS and shutil.which(argv[0], path=env["PATH"]) is None:
    return f"needs {argv[0]}, not installed here"
  for word in argv[1:]:
    path = path_in(word)
    if path.startswith("/"):
      fixed = re.split(r"[*?\[{]", path)[0]
      if not os.path.exists(fixed) and not os.path.exists(os.path.dirname(fixed)):
        return f"needs files that are not here ({path})"
    if "=@" in word and not (cwd / path).exists():
      return f"needs {path}, a file of the reader's (not in the repository)"
  return None


def python_reason(code: str) -> str | None:
  """Why a Python block cannot run as a program: the names it uses but never defines, or placeholder paths."""
  tree = ast.parse(code)
  bound = set(dir(builtins))
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
      bound.add(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      bound.add(node.name)
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
  free = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound)
  placeholder = next((p for p in PLACEHOLDERS if p.lstrip("/") in code), None)
  parts = []
  if free:
    parts.append(f"uses {', '.join(free)}, which it does not define")
  if placeholder:
    parts.append(f"reads {placeholder.strip('/:')}/... placeholders")
  return "a sketch: " + "; ".join(parts) if parts else None


def imports_of(code: str) -> str:
  """The import statements of a Python block, as a program."""
  tree = ast.parse(code)
  return "\n".join(ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))


# ---- checks of what does not run ----------------------------------------------------------------------


def flags_of(subcommand: str, cwd: pathlib.Path, env: dict, cache: dict) -> set[str] | None:
  """The --flags `varcmp SUBCOMMAND --help` names (None: no such command)."""
  if subcommand not in cache:
    done = subprocess.run(["varcmp", subcommand, "--help"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    cache[subcommand] = set(re.findall(r"--[a-z][a-z0-9-]*", done.stdout)) if done.returncode == 0 else None
  return cache[subcommand]


def check_flags(command: str, cwd: pathlib.Path, env: dict, cache: dict) -> str | None:
  """A problem with a `varcmp` command's subcommand or flags (not its values), or None."""
  argv = words(command)
  if argv[:1] != ["varcmp"] or len(argv) < 2:
    return None
  known = flags_of(argv[1], cwd, env, cache)
  if known is None:
    return f"`varcmp {argv[1]} --help` fails: no such command?"
  unknown = [w.split("=")[0] for w in argv[2:] if w.startswith("--") and not w.startswith("--config.")
             and w.split("=")[0] not in known]
  if unknown:
    return f"flags that `varcmp {argv[1]} --help` does not name: {', '.join(unknown)}"
  if any(w.startswith("--config.") for w in argv) and "--config" in known:
    from varcmp_jax import command_flags    # the override fields, against the config the command names
    try:
      return command_flags.unknown_override(argv[2:])
    except (ValueError, OSError) as e:
      return f"--config: {e}"
  return None


# ---- running ----------------------------------------------------------------------------------------


def repository_copy(into: pathlib.Path) -> pathlib.Path:
  """The repository's files (tracked and new, not ignored) copied with their times; .venv: links to this
  checkout's, with a fresh install stamp (nothing is installed into, or changed in, the shared one)."""
  listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                          check=True).stdout.decode().split("\0")
  for name in filter(None, listed):
    source = ROOT / name
    if source.is_file():
      (into / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(source, into / name)
  venv = into / ".venv"
  venv.mkdir()
  for entry in (ROOT / ".venv").iterdir():
    if entry.name != ".installed":
      (venv / entry.name).symlink_to(entry)
  (venv / ".installed").touch()
  return into


def activated(copy: pathlib.Path) -> dict:
  """The environment `source .venv/bin/activate` gives a shell in the copy."""
  env = dict(os.environ, VIRTUAL_ENV=str(copy / ".venv"))
  env["PATH"] = os.pathsep.join([str(copy / ".venv" / "bin"), env.get("PATH", "")])
  env.pop("PYTHONHOME", None)
  return env


class Server:
  """The `varcmp serve` started last, in the background, and stopped before the next one or at the end."""

  def __init__(self):
    self.process, self.log = None, None

  def start(self, command: str, cwd: pathlib.Path, env: dict, timeout: float) -> str | None:
    """Starts it and waits until it answers /api/info; the problem, or None."""
    self.stop()
    if self._answers():
      return f"something else answers at {SERVER} already"
    self.log = tempfile.TemporaryFile(mode="w+")
    self.process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=self.log,
                                    stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self.process.poll() is not None:
        self.log.seek(0)
        return f"exited with status {self.process.returncode}: {self.log.read()[-600:]}"
      if self._answers():
        return None
      time.sleep(1)
    return f"did not answer {SERVER}/api/info within {timeout:.0f} s"

  @staticmethod
  def _answers() -> bool:
    try:
      with urllib.request.urlopen(f"{SERVER}/api/info", timeout=5) as response:
        return response.status == 200
    except OSError:
      return False

  def stop(self):
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.process = None


def tail(text: str, lines: int = 6, width: int = 600) -> str:
  """The last `lines` lines of a command's output, on one line, at most `width` characters."""
  joined = " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])
  return joined if len(joined) <= width else joined[:width - 3] + "..."


def run_step(step: Step, copy: pathlib.Path, env: dict, server: Server, timeout: float):
  start = time.time()
  if step.kind == "python":
    done = subprocess.run(["python", "-c", step.code], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=timeout)
  elif words(step.code)[:2] == ["varcmp", "serve"]:
    problem = server.start(step.code, copy, env, timeout)
    step.seconds = time.time() - start
    step.status, step.detail = ("FAILED", problem) if problem else ("ok", f"answers {SERVER}, left running")
    return
  else:
    done = subprocess.run(["bash", "-c", step.code], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=timeout)
  step.seconds = time.time() - start
  if done.returncode == 0:
    step.status, step.detail = "ok", tail(done.stdout, 1, width=200)
  else:
    step.status, step.detail = "FAILED", f"exit {done.returncode}: {tail(done.stderr or done.stdout)}"


def plan(readme: pathlib.Path, copy: pathlib.Path, env: dict, skip: list[str]) -> list[Step]:
  """Every step of the README with its reason not to run (None: it runs)."""
  planned = [s for block in blocks(readme.read_text()) for s in steps(block)]
  server_started, unmade = False, {}       # unmade: the folders that not-run commands would write -> their line
  for step in planned:
    if step.kind == "text":
      continue
    if step.kind == "python":
      step.reason = python_reason(step.code)
      continue
    source = reads_from(step.code, unmade)
    step.reason = shell_reason(step.code, copy, env)
    if step.reason is None and source is not None:
      step.reason = f"reads what L{source} writes, which is not run here"
    if step.reason is None and words(step.code)[:1] == ["curl"] and not server_started:
      step.reason = "needs a `varcmp serve` started before it"
    if step.reason is None and any(re.search(pattern, step.code) for pattern in skip):
      step.reason, step.status = "skipped (--skip)", "skipped"
    if step.reason is None:
      server_started = server_started or words(step.code)[:2] == ["varcmp", "serve"]
    else:
      unmade.update({folder.rstrip("/"): step.line for folder in outputs(step.code)})
  return planned


def check_unrun(step: Step, copy: pathlib.Path, env: dict, cache: dict):
  """What is checked of a step that does not run: a varcmp command's flags, a Python sketch's imports."""
  problem = None
  if step.kind == "shell":
    problem = check_flags(step.code, copy, env, cache)
    step.detail = "" if problem else ("flags checked against --help" if words(step.code)[:1] == ["varcmp"] else "")
  elif step.kind == "python":
    done = subprocess.run(["python", "-c", imports_of(step.code)], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=300)
    problem = None if done.returncode == 0 else f"its imports fail: {tail(done.stderr, 1)}"
    step.detail = "" if problem else "imports checked"
  step.status = "FAILED" if problem else (step.status if step.status == "skipped" else "not run")
  if problem:
    step.detail = problem


def first_line(code: str, width: int = 110) -> str:
  line = " ".join(code.split())
  return line if len(line) <= width else line[:width - 3] + "..."


def report(planned: list[Step]) -> str:
  lines = []
  for s in planned:
    what = f"{s.status:8} L{s.line:<4} {first_line(s.code)}"
    if s.status == "ok":
      what += f"  ({s.seconds:.0f} s)"
    notes = "; ".join(filter(None, [s.reason, s.detail]))
    lines.append(what + (f"\n{'':14}{notes}" if notes else ""))
  counts = {status: sum(s.status == status for s in planned)
            for status in ("ok", "would run", "FAILED", "not run", "skipped")}
  lines.append(", ".join(f"{n} {status}" for status, n in counts.items()) +
               f" ({len(planned)} steps, {sum(s.seconds for s in planned):.0f} s of commands)")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--readme", default=str(ROOT / "README.md"))
  parser.add_argument("--list", action="store_true", help="plan only: what would run, and why the rest would not")
  parser.add_argument("--skip", action="append", default=[], help="a regex: matching commands are not run")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per command")
  parser.add_argument("--keep", help="run in this folder (kept afterwards) instead of a temporary one")
  parser.add_argument("--report", help="also write the report to this file")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="readme_commands_") as scratch:
    copy = pathlib.Path(args.keep or scratch).resolve()
    copy.mkdir(parents=True, exist_ok=True)
    if any(copy.iterdir()):
      parser.error(f"--keep {copy}: not empty")
    repository_copy(copy)
    env = activated(copy)
    planned = plan(pathlib.Path(args.readme), copy, env, args.skip)
    server, cache = Server(), {}
    try:
      for step in planned:
        if step.kind == "text":
          step.status = "not run"
        elif step.reason:
          check_unrun(step, copy, env, cache)
        elif args.list:
          step.status = "would run"
        else:
          print(f"running L{step.line}: {first_line(step.code)}", flush=True)
          try:
            run_step(step, copy, env, server, args.timeout)
          except subprocess.TimeoutExpired:
            step.status, step.detail = "FAILED", f"still running after {args.timeout:.0f} s"
    finally:
      server.stop()
  text = report(planned)
  print(text)
  if args.report:
    pathlib.Path(args.report).write_text(text + "\n")
  return 1 if any(s.status == "FAILED" for s in planned) else 0


if __name__ == "__main__":
  sys.exit(main())
