"""The README check (tests/readme_commands.py): its reading of markdown blocks and shell lines against hand cases,
its reasons not to run a command, and, on the real README, that every `varcmp` command names flags its
subcommand has and that the cheap commands run as printed. The full run (make demo and everything after it) is
the script's own: python tests/readme_commands.py."""
import os
import pathlib
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import readme_commands as rc  # noqa: E402

# This environment's programs (varcmp) first, as `source .venv/bin/activate` puts them.
ENV = {"PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}

MARKDOWN = '''# Title

```bash
make demo   # a comment
varcmp prep --dataset folder --videos data/x \\
    --out data/y   # continued
```
Text.
- a list item:
  ```python
  import os
  print(os.getcwd(), undefined_name)
  ```
```
$ varcmp export --workdir runs/demo/run --out runs/demo/export
exported step 150 of runs/demo/run
```
```nginx
server { listen 443; }
```
```
query: a red triangle
rank    score
```
```
varcmp ablate --config synthetic --workdir runs/ab \\
    --variant 'full:'
```
'''


def test_blocks_and_steps_of_hand_written_markdown():
  blocks = rc.blocks(MARKDOWN)
  assert [(b.line, b.lang) for b in blocks] == [(3, "bash"), (10, "python"), (14, ""), (18, "nginx"), (21, ""),
                                                (25, "")]
  assert blocks[1].text == "import os\nprint(os.getcwd(), undefined_name)"        # the list item's indent removed
  steps = [s for b in blocks for s in rc.steps(b)]
  assert [(s.line, s.kind) for s in steps] == [(4, "shell"), (5, "shell"), (11, "python"), (15, "shell"),
                                               (19, "text"), (22, "text"), (26, "shell")]
  assert steps[1].code == "varcmp prep --dataset folder --videos data/x --out data/y   # continued"
  assert rc.words(steps[1].code) == ["varcmp", "prep", "--dataset", "folder", "--videos", "data/x", "--out", "data/y"]
  assert steps[3].code == "varcmp export --workdir runs/demo/run --out runs/demo/export"     # the $ line only
  assert steps[4].reason == "not a command: a file for nginx"
  assert steps[5].reason == "not a command: output, or a file for another program"
  assert rc.words(steps[6].code)[-2:] == ["--variant", "full:"]                     # an unlabeled command block


def test_reasons_not_to_run(tmp_path):
  reason = lambda command: rc.shell_reason(command, tmp_path, ENV)
  assert reason("varcmp --help") is None and reason("source .venv/bin/activate") is None
  assert reason("make test   # all of it").startswith("the whole test suite")
  assert reason('pip install -U "jax[cuda12]"') == "installs jax for a GPU or TPU"
  assert reason("pip install -e .").startswith("installs from the package registry")
  assert reason("varcmp prep ... --runner beam").startswith("elided arguments")
  assert reason("varcmp import-clip --hf /path/to/clip --out x") == (
      "needs the reader's own data or services (/path/to/ is a placeholder)")
  assert reason("varcmp prep --videos /nonexistent/Videos --out data/x") == (
      "needs files that are not here (/nonexistent/Videos)")
  assert reason(f"varcmp prep --visual-features '{tmp_path}/*/{{video}}.npy'") is None    # a pattern under a folder
  assert reason("curl -F audio=@clip.wav 'http://127.0.0.1:8000/api/search'") == (
      "needs clip.wav, a file of the reader's (not in the repository)")
  (tmp_path / "clip.wav").write_bytes(b"")
  assert reason("curl -F audio=@clip.wav 'http://127.0.0.1:8000/api/search'") is None
  assert reason("htpasswd-of-nowhere -c x alice") == "needs htpasswd-of-nowhere, not installed here"
  assert rc.python_reason("import os\nprint(os.sep)") is None
  assert rc.python_reason("x = 1\nprint(x + y)") == "a sketch: uses y, which it does not define"


def test_a_command_reading_what_a_command_not_run_writes_is_not_run(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text('''```bash
varcmp prep --captions /nonexistent/lists --out data/released
varcmp train --config synthetic --workdir runs/released --config.data.records=data/released
varcmp eval --workdir runs/released
curl 'http://127.0.0.1:8000/api/info'
varcmp train --config synthetic --workdir runs/other --config.data.records=data/other
```
''')
  planned = rc.plan(readme, tmp_path, ENV, skip=["runs/other"])
  assert [s.reason for s in planned] == [
      "needs files that are not here (/nonexistent/lists)", "reads what L2 writes, which is not run here",
      "reads what L3 writes, which is not run here", "needs a `varcmp serve` started before it", "skipped (--skip)"]


@pytest.fixture(scope="module")
def readme_copy(tmp_path_factory):
  copy = rc.repository_copy(tmp_path_factory.mktemp("copy"))
  return copy, rc.activated(copy)


def test_the_copy_links_the_environment_without_touching_it(readme_copy):
  copy, env = readme_copy
  assert (copy / "README.md").read_text() == (rc.ROOT / "README.md").read_text()
  assert (copy / ".venv" / "bin").resolve() == (rc.ROOT / ".venv" / "bin").resolve()
  assert not (copy / ".venv" / ".installed").is_symlink()
  assert env["PATH"].startswith(str(copy / ".venv" / "bin") + os.pathsep)


def test_every_varcmp_command_of_the_readme_names_real_flags_and_the_cheap_ones_run(readme_copy):
  copy, env = readme_copy
  planned = rc.plan(copy / "README.md", copy, env, skip=[])
  assert planned and all(s.kind == "text" or s.reason is None or s.reason for s in planned)
  cache, problems = {}, []
  for step in planned:
    if step.kind == "shell" and rc.words(step.code)[:1] == ["varcmp"]:
      problem = rc.check_flags(step.code, copy, env, cache)
      if problem:
        problems.append(f"L{step.line}: {problem}")
  assert not problems, problems
  cheap = [s for s in planned if s.reason is None and s.code.split("#")[0].strip() in (
      "varcmp --help", 'python -c "import jax; print(jax.devices())"')]
  assert len(cheap) == 2
  for step in cheap:
    rc.run_step(step, copy, env, rc.Server(), timeout=300)
    assert step.status == "ok", step.detail
