"""`make bench`: every benchmark at the size of the accelerator present, each run appended to BENCHMARKS.md.

  python benchmarks/run_all.py                      # full sizes on a GPU / TPU, the CPU sizes on a CPU
  python benchmarks/run_all.py --only train_step,input_pipeline --no-record

Each benchmark runs in its own process (its own device memory and peak), its log kept in
runs/bench/<time>/<name>.log; its figures and the peer measured in the same run become one row of the table
under "## make bench" in BENCHMARKS.md: date, device, command, figures, peer. On a machine without an
accelerator the CPU sizes run (they prove each benchmark works, and the input benchmark runs at its real
size), and every row says that the accelerator figures are still owed.
"""
import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

BENCHMARKS = pathlib.Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
SECTION = "## make bench"
HEADER = ("| date | device | command | figures | peer (same run) |\n"
          "| --- | --- | --- | --- | --- |\n")
EVAL_FULL = ["--queries", "800", "--gallery", "800", "--snippets", "256", "--regions", "4", "--words", "32",
             "--chunk", "64", "--compare", "96"]
EVAL_CPU = ["--queries", "96", "--gallery", "96", "--snippets", "32", "--regions", "4", "--words", "16",
            "--chunk", "16", "--compare", "48"]


def lines(pattern: str):
  """Figures: the log's lines matching `pattern`, whitespace squeezed."""
  return lambda log, _: "; ".join(" ".join(line.split()) for line in log.splitlines() if re.search(pattern, line))


def clip_step_figures(log, _):
  rows = re.findall(r"^(ours|torch_eager|torch_compile)[ ]+(\S+)[ ]+\S+[ ]+(\S+)[ ]+(\S+)", log, re.M)
  ratios = re.findall(r"^ours / .*$", log, re.M)
  return "; ".join([f"{peer} {rate} samples/s, MFU {mfu}, {memory} GiB" for peer, rate, mfu, memory in rows] + ratios)


def train_step_figures(_, result):
  def one(r):
    step = "" if r["step_ms"] != r["step_ms"] else f"step {r['step_ms']:.1f} ms ({r['samples_per_s']:.1f} samples/s), "
    return (f"{r['regime']}/{r['feed']} B={r['batch']} T={r['snippets']}: {step}input {r['input_ms']:.2f} ms, "
            f"{r['executed_tflops_per_step']:.3g} TFLOP/step executed ({r['tflops_per_step']:.3g} by XLA), input "
            f"share at H100 **{r['input_share_at_h100']:.3g}**")
  return "; ".join(one(r) for r in result)


def input_pipeline_figures(_, r):
  workers = ", ".join(k.rsplit("_", 1)[1] for k in r if k.startswith("grain_batches_per_s_workers_"))
  return (f"T={r['snippets']} B={r['batch']} D={r['dim']} R={r['regions']}: grain {r['grain_batches_per_s']:.2f} "
          f"batches/s (best of workers {workers}), resident {r['resident_batches_per_s']:.1f} batches/s = "
          f"**{r['resident_over_grain']:.1f}x**, placed in {r['resident_load_s']:.1f} s")


def eval_figures(log, _):
  main = re.search(r"^\w+ Q=(\d+) .*?levels ([\d.]+) s.*?peak memory ([\d.]+) GiB", log, re.M)
  ratio = re.search(r"^chunked / unchunked .*$", log, re.M)
  return "; ".join(filter(None, [main and f"Q = G = {main[1]}: levels {main[2]} s, peak memory {main[3]} GiB",
                                 ratio and ratio[0]]))


# name -> script, full-size arguments (None: CPU only), CPU arguments, figures(log, json result), peer
JOBS = {
    "clip_step": ("clip_step.py", [], ["--model", "tiny", "--batch", "32", "--steps", "5", "--warmup", "2",
                                       "--peers", "ours,torch_eager"],
                  clip_step_figures,
                  "HF CLIPModel, PyTorch eager and torch.compile (CPU sizes: eager only; a cold torch.compile takes "
                  "minutes on 2 cores)"),
    "extract_features": ("extract_features.py", [], ["--model", "tiny", "--batch", "32", "--steps", "10",
                                                     "--skip-compile"],
                         lines(r"^\s+(ours|hf) .* frames/s"),
                         "HF CLIPVisionModelWithProjection, eager and torch.compile (CPU sizes: eager only)"),
    "train_step": ("train_step.py", ["--resident", "both"], ["--small", "--steps", "5", "--resident", "both"],
                   train_step_figures, "features: Grain vs resident data, same records; frames: Grain"),
    # CPU only (the full train_step above covers it on an accelerator): the full-size features step compiled
    # and its FLOPs counted, the input timed: would an H100 wait for its input?
    "train_step_input": ("train_step.py", None, ["--regime", "features", "--steps", "0", "--resident", "both"],
                         train_step_figures, "Grain vs resident data, same records"),
    "eval_similarity_text": ("eval_similarity.py", EVAL_FULL + ["--task", "text"], EVAL_CPU + ["--task", "text"],
                             eval_figures,
                             "the unchunked computation (chunk 0), each in its own process"),
    "eval_similarity_audio": ("eval_similarity.py", EVAL_FULL + ["--task", "audio"], EVAL_CPU + ["--task", "audio"],
                              eval_figures,
                              "the unchunked computation (chunk 0), each in its own process"),
    "input_pipeline": ("input_pipeline.py", ["--features", "--snippets", "256", "--batch", "128", "--workers",
                                             "0", "4", "8"],
                       ["--features", "--snippets", "256", "--batch", "128", "--batches", "10", "--workers", "0",
                        "2"],
                       input_pipeline_figures, "Grain (best worker count) vs device-resident gather, same records"),
}
JSON_OUTPUT = {"train_step", "train_step_input", "input_pipeline"}      # these write their results with --json FILE


def describe_device() -> tuple[str, bool]:
  """(what runs the benchmarks, whether it is an accelerator), asked of jax in a subprocess (this process
  must not hold the accelerator's memory)."""
  code = "import jax; d = jax.devices(); print(jax.default_backend(), len(d), d[0].device_kind, sep='|')"
  backend, count, kind = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1].split("|")
  if backend != "cpu":
    return f"{count} x {kind}", True
  return f"{os.cpu_count()}-core CPU ({kind})", False


def run(name: str, accelerator: bool, logs: pathlib.Path) -> dict:
  script, full, cpu, figures, peer = JOBS[name]
  argv = list(full if accelerator else cpu)
  with tempfile.TemporaryDirectory() as tmp:
    result_path = pathlib.Path(tmp) / "result.json"
    extra = ["--json", str(result_path)] if name in JSON_OUTPUT else []
    command = f"python benchmarks/{script} {' '.join(argv)}".strip()
    print(f"== {name}: {command}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv, *extra], cwd=BENCHMARKS,
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    log = done.stdout + ("\n" + done.stderr if done.returncode else "")
    (logs / f"{name}.log").write_text(f"$ {command}\n{done.stdout}\n--- stderr ---\n{done.stderr}")
    if done.returncode:
      text = f"failed (exit {done.returncode}): {' '.join(done.stderr.strip().splitlines()[-1:])[:300]}"
    else:
      result = json.loads(result_path.read_text()) if extra else None
      text = figures(log, result) or "(no figures found in the log)"
  print(f"   {text}\n   ({seconds:.0f} s; log: {logs / (name + '.log')})", flush=True)
  return {"command": command, "figures": text, "peer": peer, "ok": done.returncode == 0}


def record(path: pathlib.Path, rows: list[str]) -> None:
  """Appends `rows` to the table under SECTION (created at the end of the file if missing)."""
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  if SECTION not in text:
    text = text.rstrip("\n") + (f"\n\n{SECTION}\n\nRows appended by `make bench` (benchmarks/run_all.py): every "
                                "benchmark at the size of the accelerator present, its figures and the peer of "
                                "the same run.\n\n" + HEADER)
  lines_ = text.splitlines(keepends=True)
  start = next(i for i, line in enumerate(lines_) if line.strip() == SECTION)
  table = next(i for i in range(start, len(lines_)) if lines_[i].startswith("| date |"))
  end = table
  while end < len(lines_) and lines_[end].startswith("|"):
    end += 1
  if not lines_[end - 1].endswith("\n"):
    lines_[end - 1] += "\n"
  path.write_text("".join(lines_[:end] + [row + "\n" for row in rows] + lines_[end:]))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default=",".join(JOBS), help=f"comma-separated subset of {', '.join(JOBS)}")
  p.add_argument("--no-record", action="store_true", help="print the rows, leave BENCHMARKS.md alone")
  p.add_argument("--benchmarks-md", default=str(ROOT / "BENCHMARKS.md"))
  args = p.parse_args(argv)
  names = args.only.split(",")
  unknown = sorted(set(names) - set(JOBS))
  if unknown:
    raise SystemExit(f"run_all: unknown benchmarks {unknown}; known: {', '.join(JOBS)}")
  device, accelerator = describe_device()
  print(f"device: {device}")
  logs = ROOT / "runs" / "bench" / time.strftime("%Y%m%d-%H%M%S")
  logs.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in names:
    if accelerator and JOBS[name][1] is None:
      continue
    r = run(name, accelerator, logs)
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    where = device if accelerator else (f"{device}, load average {os.getloadavg()[0]:.1f} (shared); CPU sizes: "
                                        "**accelerator figures owed**")
    rows.append(f"| {date} | {where} | `{r['command']}` | {r['figures'].replace('|', '/')} | {r['peer']} |")
  if not args.no_record:
    record(pathlib.Path(args.benchmarks_md), rows)
    print(f"{len(rows)} rows appended to {args.benchmarks_md}")
  else:
    print("\n".join(rows))
  if not accelerator:
    print("no accelerator here: these are the CPU sizes; the accelerator figures are still owed (run `make bench` "
          "on the GPU machine)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
