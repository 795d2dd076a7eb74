"""Executed dot FLOPs of a compiled XLA program, from its HLO text, with loop trip counts applied.

`compiled.cost_analysis()` counts a loop body once, so for a step whose similarity levels run in chunks under
`lax.map` (or whose gradient accumulation runs under `lax.scan`) it reports a fraction of the work. Here each
dot is counted as often as it runs: the product of the known trip counts of the loops around it.

  report = hlo_flops.dot_report(jitted.lower(*args).compile().as_text())   # one device's module
  report["dot_flops"], report["similarity_dot_flops"], report["similarity_dots"]

Used by pod_scaling.py (per-device work on N devices) and train_step.py (the step's FLOPs at H100 speed).
"""
import math
import re

# The contractions of alignment/similarity.py, as they appear in the HLO's op_name metadata.
SIMILARITY_EINSUMS = ("gtkd,qld->gtkql", "gt,gtq->qg", "gt,gtd->gd", "qtd,gtd->qg", "gtkd,qtd->tgkq", "gt,tgq->qg")


def dot_report(hlo: str) -> dict:
  """Dots of a compiled per-device HLO module with how often each runs per call, and their FLOPs.

  Executions of a computation = sum over the instructions that call it (fusion, call, while body) of
  the caller's executions, times the loop's known trip count for a while body.
  """
  shapes, callers, dots, computation = {}, {}, [], None
  for line in hlo.splitlines():
    stripped = line.strip()
    header = re.match(r"(?:ENTRY )?%(\S+) .*\{$", stripped)
    if header and " = " not in stripped:
      computation = header.group(1)
      if stripped.startswith("ENTRY"):
        callers[computation] = []
      continue
    define = re.match(r"(?:ROOT )?%(\S+) = (\w+\[[\d,]*\])", stripped)
    if define:
      shapes[define.group(1)] = define.group(2)
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', stripped)
    for kind, callee in re.findall(r"(calls|to_apply|body)=%([\w.\-]+)", stripped):
      factor = int(trips.group(1)) if kind == "body" and trips else (math.nan if kind == "body" else 1)
      callers.setdefault(callee, []).append((computation, factor))
    dot = re.match(r"(?:ROOT )?%\S+ = (\w+\[[\d,]*\])\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", stripped)
    if dot:
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", stripped).group(1)
      op_name = re.search(r'op_name="([^"]*)"', stripped)
      einsum = next((e for e in SIMILARITY_EINSUMS if op_name and e in op_name.group(1)), "")
      dots.append(dict(computation=computation, out=dot.group(1), lhs=shapes.get(dot.group(2), "?"),
                       rhs=shapes.get(dot.group(3), "?"), einsum=einsum,
                       contracting=[int(d) for d in contracting.split(",") if d]))

  memo = {}
  def executions(name, seen=()):
    if name not in memo:
      memo[name] = 1 if callers.get(name) == [] else sum(
          executions(parent, seen + (name,)) * factor for parent, factor in callers.get(name, ()) if parent not in seen)
    return memo[name]

  dims = lambda shape: [int(d) for d in re.search(r"\[([\d,]*)\]", shape).group(1).split(",") if d]
  total = similarity = 0.0
  rows = {}
  for d in dots:
    runs = executions(d["computation"])
    lhs = dims(d["lhs"]) if d["lhs"] != "?" else []
    flops = 2.0 * math.prod(dims(d["out"])) * math.prod(lhs[i] for i in d["contracting"]) * runs if lhs else math.nan
    total += flops
    if d["einsum"] in SIMILARITY_EINSUMS:
      similarity += flops
      key = f"{d['einsum']}: {d['lhs']} x {d['rhs']} -> {d['out']}"
      rows[key] = rows.get(key, 0) + runs
  return dict(dot_flops=total, similarity_dot_flops=similarity,
              similarity_dots=[dict(dot=key, runs_per_step=runs) for key, runs in sorted(rows.items())])
