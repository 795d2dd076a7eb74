"""What `varcmp compile` prints (one table) and writes (--json: SPEC section 4's fields and more)."""
from varcmp_jax import flops
from varcmp_jax.pod.fit import Fit
from varcmp_jax.pod.steps import Step
from varcmp_jax.pod.targets import Target

def _gib(n) -> str:
  return f"{n / 2 ** 30:.2f} GiB"


def _bytes(n) -> str:
  return f"{n:,} B ({_gib(n)})"


def _flop(n) -> str:
  unit, scale = next(((u, x) for u, x in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)) if n >= x), ("MFLOP", 1e6))
  return f"{n / scale:.4g} {unit}"


def report(target: Target, config_name: str, train: Step, eval_: Step | None, eval_note: str | None,
           fit: Fit | None) -> dict:
  """The JSON report (SPEC section 4's fields and more)."""
  def step_json(s: Step) -> dict:
    memory = dict(s.memory or {}) if s.memory else {k: None for k in ("arguments", "temporaries", "outputs",
                                                                      "aliased", "total", "generated_code")}
    memory["hbm"] = target.hbm
    memory.update({f"{k}_logical": v for k, v in s.logical.items()})
    roofline = _roofline(s, target)
    return {"global_batch": s.global_batch, "per_chip_batch": s.per_chip_batch, "input": s.input,
            "memory_bytes": memory, "fits": s.fits(target.hbm), "compiler_refused": s.refused,
            "executed_flops_per_chip": s.count.executed / target.chips,
            "model_flops_per_chip": s.count.model / target.chips,
            "roofline_seconds": roofline, "collectives": s.collectives,
            "lowering_seconds": round(s.lowering_seconds, 3), "compile_seconds": round(s.compile_seconds, 3)}

  out = {"topology": target.name, "chips": target.chips, "chip": target.kind, "platform": target.platform,
         "config": config_name, "hbm_source": target.hbm_source,
         "peak_flops": target.peak.flops if target.peak else None,
         "hbm_bandwidth": target.peak.hbm_bytes if target.peak else None}
  out.update(step_json(train))
  out["fits"] = train.fits(target.hbm) and (eval_ is None or eval_.fits(target.hbm))
  out["train_fits"] = train.fits(target.hbm)
  out["fit_batch"] = fit.batch if fit else None
  if fit:
    out["fit"] = {"batch": fit.batch, "next_step_does_not_fit": fit.too_big, "step": fit.step,
                  "compiles": fit.compiles, "tried": [list(t) for t in fit.tried]}
  out["eval"] = step_json(eval_) if eval_ else {"skipped": eval_note}
  return out


def _roofline(s: Step, target: Target) -> float | None:
  return flops.roofline_seconds(s.count, target.peak, target.chips) if target.peak else None


def table(target: Target, config_name: str, train: Step, eval_: Step | None, eval_note: str | None,
          fit: Fit | None) -> str:
  """The one table the command prints."""
  steps = [train] + ([eval_] if eval_ else [])
  where = ("deviceless" if target.name != "local" else "this machine's devices")
  lines = [f"varcmp compile: {config_name} on {target.name} ({target.chips} chips, {target.kind}; {where})",
           f"  input (train): {train.input}"]
  rows = [("", [f"{s.name} step" for s in steps])]
  rows.append(("batch: global / per chip", [f"{s.global_batch:,} / {s.per_chip_batch:,}" for s in steps]))
  rows.append(("memory per chip (memory_analysis)", ["" for _ in steps]))
  for key, label in (("arguments", "  arguments"), ("outputs", "  outputs"), ("aliased", "  aliased (donated)"),
                     ("temporaries", "  temporaries"), ("total", "  total = args + out - aliased + temp"),
                     ("generated_code", "  generated code (not in total)")):
    rows.append((label, [_bytes(s.memory[key]) if s.memory else "-" for s in steps]))
  for key, label in (("state", "  arguments' state (shardings)"), ("resident_split", "  arguments' resident split"),
                     ("batch", "  arguments' batch (shardings)")):
    if any(key in s.logical for s in steps):
      rows.append((label, [_bytes(s.logical[key]) if key in s.logical else "-" for s in steps]))
  rows.append(("HBM per chip", [_bytes(target.hbm) for _ in steps]))
  rows.append(("margin", [(_bytes(target.hbm - s.memory["total"]) if s.memory else "-") for s in steps]))
  rows.append(("fits", ["yes" if s.fits(target.hbm) else "DOES NOT FIT" for s in steps]))
  kinds = sorted({k for s in steps for k in s.collectives})
  rows.append(("collectives (count, bytes of results)", ["" for _ in steps]))
  for kind in kinds:
    rows.append((f"  {kind}", [f"{s.collectives[kind]['count']:,}, {_bytes(s.collectives[kind]['bytes'])}"
                               if kind in s.collectives else "-" for s in steps]))
  if not kinds:
    rows.append(("  (none)", ["" for _ in steps]))
  rows.append(("FLOPs per chip: executed", [_flop(s.count.executed / target.chips) for s in steps]))
  rows.append(("FLOPs per chip: model", [_flop(s.count.model / target.chips) for s in steps]))
  if target.peak:
    rows.append(("roofline step time", [f"{1e3 * _roofline(s, target):.4g} ms" for s in steps]))
  rows.append(("lowering / compile", [f"{s.lowering_seconds:.1f} s / {s.compile_seconds:.1f} s" for s in steps]))
  width = max(len(label) for label, _ in rows) + 2
  cols = [max(len(r[1][i]) for r in rows) + 2 for i in range(len(steps))]
  for label, cells in rows:
    lines.append("  " + label.ljust(width) + "".join(c.ljust(w) for c, w in zip(cells, cols)).rstrip())
  lines.append(f"  HBM: {target.hbm_source}")
  if target.peak:
    lines.append(f"  roofline at {target.peak.flops / 1e12:g} TFLOP/s bf16 and {target.peak.hbm_bytes / 1e9:g} GB/s "
                 "per chip (flops.roofline_seconds); FLOPs: varcmp_jax.flops, as compiled for " + target.platform)
  lines.append("  collectives: each instruction of the compiled program once (a loop body once), bytes per chip")
  for s in steps:
    if s.refused:
      lines.append(f"  {s.name} step: the compiler refused it: {s.refused}")
  if eval_note:
    lines.append(f"  eval step: {eval_note}")
  if fit:
    tried = ", ".join(f"{b} {'fits' if ok else 'no'}" for b, ok, _ in fit.tried)
    reused = " (and the step above)" if train.per_chip_batch % fit.step == 0 else ""
    lines.append(f"  --fit: {fit.batch} per chip fits (global {fit.batch * target.chips:,}), {fit.too_big} does not "
                 f"(step {fit.step}); {fit.compiles} compiles{reused}: {tried}")
  return "\n".join(lines)


def verdict(target: Target, train: Step, eval_: Step | None) -> str:
  parts = []
  for s in [train] + ([eval_] if eval_ else []):
    if s.refused:
      parts.append(f"the {s.name} step: the compiler refused it ({s.refused})")
    elif not s.fits(target.hbm):
      total = s.memory["total"]
      parts.append(f"the {s.name} step needs {_bytes(total)} per chip, {_bytes(total - target.hbm)} more than the "
                   f"{_bytes(target.hbm)} of HBM of a {target.kind} ({target.hbm_source.split(':')[0]})")
  return "; ".join(parts)
