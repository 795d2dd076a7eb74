"""BENCHMARKS.md "Pods": `varcmp compile` rows, ViT-B/16, deviceless TPU compilation on any machine.

  python benchmarks/pod_compile.py --rows topologies          # features and frames on v5e:2x2, v5p:2x2x1, v6e:2x2, v4
  python benchmarks/pod_compile.py --rows topologies --fit --fit-step 32
  python benchmarks/pod_compile.py --rows scaling             # weak scaling: 4, 16, 64, 256 v5e chips at 128 per chip
  python benchmarks/pod_compile.py --rows scaling --override loss.fine_candidates=64   # the same table, another loss

Rows (each one `varcmp compile` run in its own process, its command printed with its row):
- topologies: the features step (ucfcrime_ar:features, B/chip 128, T = 256, captions <= 40 words) and the frames
  step (ucfcrime_ar:frames, B/chip 16, T = 16, its remat and 2-way gradient accumulation) on each --topologies:
  per-chip memory (memory_analysis total), fits, the --fit batch and its compile count, per-chip executed FLOPs,
  the roofline step time, compile seconds.
- scaling: the features step at 128 per chip on v5e:2x2, 4x4, 8x8, 16x16 (global 512 ... 32,768), train step only:
  per-chip executed FLOPs, per-chip memory, collectives (count and bytes of results).
--override x.y=v (repeatable) goes to every row as --config.x.y=v. Markdown rows are printed as each run ends.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

FEATURES = ("ucfcrime_ar:features", 128, ["--config.model.max_words=40"])
FRAMES = ("ucfcrime_ar:frames", 16, ["--config.data.snippets=16"])
SCALING = ("v5e:2x2", "v5e:4x4", "v5e:8x8", "v5e:16x16")


def run(config: str, topology: str, per_chip: int, extra: list[str], args, log) -> tuple[dict | None, str, float]:
  """(the JSON report or None, the command, wall seconds) of one `varcmp compile` run, its output into `log`."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  command = ["varcmp", "compile", "--config", config, "--topology", topology, "--per-chip-batch", str(per_chip),
             *extra, *[f"--config.{o}" for o in args.override]]
  if args.fit and "--no-eval" not in extra:
    command += ["--fit", "--fit-step", str(args.fit_step)]
  shown = " ".join(command)
  start = time.perf_counter()
  print(f"  running: {shown}", flush=True)
  with open(log, "a", encoding="utf-8") as f:
    f.write(f"$ {shown}\n")
    f.flush()
    code = subprocess.call([sys.executable, "-m", "varcmp_jax.cli", *command[1:], "--json", out], stdout=f,
                           stderr=subprocess.STDOUT, timeout=args.timeout)
  seconds = time.perf_counter() - start
  try:
    with open(out, encoding="utf-8") as f:
      result = json.load(f)
  except (OSError, ValueError):
    print(f"  failed (exit {code}): see {log}", flush=True)
    result = None
  finally:
    if os.path.exists(out):
      os.unlink(out)
  return result, shown, seconds


def gib(n) -> str:
  return "-" if n is None else f"{n / 2 ** 30:.2f}"


def topology_row(name: str, r: dict, shown: str) -> str:
  fit = r.get("fit")
  fit_text = f"{fit['batch']} ({fit['compiles']} compiles; {fit['next_step_does_not_fit']} does not)" if fit else "-"
  eval_ = r["eval"]
  eval_text = gib(eval_["memory_bytes"]["total"]) if "memory_bytes" in eval_ else "-"
  roofline = f"{1e3 * r['roofline_seconds']:.1f}" if r.get("roofline_seconds") else "-"
  return (f"| {name} | {r['topology']} ({r['chips']} x {r['chip']}) | {r['per_chip_batch']} / {r['global_batch']:,} | "
          f"{gib(r['memory_bytes']['total'])} of {gib(r['memory_bytes']['hbm'])} | "
          f"{'yes' if r['train_fits'] else 'no'} | {fit_text} | {r['executed_flops_per_chip'] / 1e12:.2f} | "
          f"{roofline} | {eval_text} | {r['compile_seconds']:.0f} | `{shown}` |")


def scaling_row(r: dict, shown: str) -> str:
  kinds = r["collectives"]
  count = sum(v["count"] for v in kinds.values())
  moved = sum(v["bytes"] for v in kinds.values())
  detail = ", ".join(f"{k} {v['count']} / {gib(v['bytes'])}" for k, v in kinds.items())
  memory = r["memory_bytes"]
  total = gib(memory["total"]) if memory["total"] is not None else f"refused: {r['compiler_refused']}"
  return (f"| {r['chips']} | {r['global_batch']:,} | {r['executed_flops_per_chip'] / 1e12:.2f} | "
          f"{r['model_flops_per_chip'] / 1e12:.2f} | {total} | {'yes' if r['train_fits'] else 'no'} | "
          f"{gib(memory['temporaries'])} | {count} | {gib(moved)} | "
          f"{detail} | {r['compile_seconds']:.0f} | `{shown}` |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", choices=("topologies", "scaling", "all"), default="all")
  p.add_argument("--topologies", default="v5e:2x2,v5p:2x2x1,v6e:2x2,v4:2x2x1")
  p.add_argument("--regimes", default="features,frames")
  p.add_argument("--scaling", default=",".join(SCALING), help="the weak-scaling topologies")
  p.add_argument("--fit", action="store_true", help="--fit on the topology rows")
  p.add_argument("--fit-step", type=int, default=32)
  p.add_argument("--override", action="append", default=[], help="x.y=v, given to every row as --config.x.y=v")
  p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
  p.add_argument("--log", default="runs/bench/pod_compile.log")
  args = p.parse_args(argv)
  pathlib.Path(args.log).parent.mkdir(parents=True, exist_ok=True)
  overrides = f" (overrides: {', '.join(args.override)})" if args.override else ""
  if args.rows in ("topologies", "all"):
    print(f"per topology, ViT-B/16{overrides}: memory per chip (GiB, memory_analysis total of HBM), fits, --fit "
          "per-chip batch, executed TFLOP per chip, roofline ms, eval step GiB, compile s", flush=True)
    print("| step | topology | B per chip / global | train GiB per chip | fits | --fit batch per chip | TFLOP per chip "
          "| roofline ms | eval GiB | compile s | command |\n|" + " --- |" * 11, flush=True)
    regimes = {"features": FEATURES, "frames": FRAMES}
    for topology in args.topologies.split(","):
      for regime in args.regimes.split(","):
        config, per_chip, extra = regimes[regime]
        result, shown, _ = run(config, topology, per_chip, extra, args, args.log)
        if result:
          print(topology_row(regime, result, shown), flush=True)
  if args.rows in ("scaling", "all"):
    config, per_chip, extra = FEATURES
    print(f"weak scaling, features step at {per_chip} per chip{overrides}, train step only", flush=True)
    print("| chips | global batch | executed TFLOP per chip | model TFLOP per chip | GiB per chip | fits | "
          "temporaries GiB | collectives | collective GiB (results) | by kind (count / GiB) | compile s | command |\n|"
          + " --- |" * 12,
          flush=True)
    for topology in args.scaling.split(","):
      result, shown, _ = run(config, topology, per_chip, extra + ["--no-eval"], args, args.log)
      if result:
        print(scaling_row(result, shown), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
