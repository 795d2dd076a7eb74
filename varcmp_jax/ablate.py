r"""`varcmp ablate`: train and evaluate config variants one after another, then tabulate them.

  varcmp ablate --config configs/synthetic.py --workdir runs/ablation \
      --sweep 'loss.levels.spatial=0,1' --sweep 'weighting.beta=0,0.5' \
      --variant 'video level only:loss.levels.frame=0,loss.levels.spatial=0' [--config.x.y=value ...]

Variants are the cartesian product of the sweeps plus each `--variant NAME:key=value,...` (`NAME:` alone is
the base config). Every variant trains in DIR/<name>/ with the same seed and data, so only the swept fields
differ. Sweeps are parsed, typed like the config field and validated (config.validate) for every variant
before any training starts. A variant whose eval.json exists is reused; an interrupted one resumes from its
checkpoints. The tables go to DIR/ablation.md and DIR/ablation.csv.
"""
import copy
import csv
import dataclasses
import io
import itertools
import json
import os
import re

import ml_collections
from absl import flags

from varcmp_jax import config as config_lib
from varcmp_jax import command_flags
from varcmp_jax.train import workdir as workdir_lib

METRICS = ("R1", "R5", "R10", "MdR")


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  overrides: tuple[tuple[str, object], ...]     # (dotted config key, typed value)

  @property
  def dirname(self) -> str:
    """A path-safe directory name: runs of characters other than letters, digits, . = + - become _."""
    return re.sub(r"[^A-Za-z0-9.=+\-]+", "_", self.name).strip("_") or "base"


# --- parsing -------------------------------------------------------------------------------------------


def parse_value(config: ml_collections.ConfigDict, key: str, text: str):
  """`text` typed like the config field `key` (bool, int, float or str)."""
  current = config_lib.lookup(config, key)
  text = text.strip()
  if isinstance(current, ml_collections.ConfigDict):
    raise ValueError(f"{key!r} is a group, not a field; sweep one of {key}.{{{', '.join(sorted(current.keys()))}}}")
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"{key}={text!r}: not a boolean (true/false)")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError(f"{key}={text!r}: not an integer (the field is {current!r})") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f"{key}={text!r}: not a number (the field is {current!r})") from None
  if isinstance(current, str):
    return text
  raise ValueError(f"{key}: cannot sweep a field of type {type(current).__name__} (value {current!r})")


def parse_sweep(config: ml_collections.ConfigDict, text: str) -> tuple[str, list]:
  """'loss.levels.spatial=0,1' -> ('loss.levels.spatial', [0.0, 1.0])."""
  key, sep, values = text.partition("=")
  key = key.strip()
  if not sep or not key or not values.strip():
    raise ValueError(f"--sweep {text!r}: expected KEY=VALUE[,VALUE...], e.g. 'weighting.beta=0,0.5'")
  parsed = [parse_value(config, key, v) for v in values.split(",")]
  if len(set(map(repr, parsed))) != len(parsed):
    raise ValueError(f"--sweep {text!r}: repeated value")
  return key, parsed


def parse_variant(config: ml_collections.ConfigDict, text: str) -> Variant:
  """'no weighting:weighting.beta=0,loss.mil=0' -> Variant; 'full:' is the base config."""
  name, sep, body = text.partition(":")
  if not sep or not name.strip():
    raise ValueError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...] (or NAME: for the base config)")
  overrides = []
  for item in filter(None, (s.strip() for s in body.split(","))):
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
      raise ValueError(f"--variant {text!r}: {item!r} is not KEY=VALUE")
    overrides.append((key.strip(), parse_value(config, key.strip(), value)))
  keys = [k for k, _ in overrides]
  if len(set(keys)) != len(keys):
    raise ValueError(f"--variant {text!r}: a key is set twice")
  return Variant(name.strip(), tuple(overrides))


def _short_keys(keys: list[str]) -> dict[str, str]:
  """The shortest dotted suffix of each key that no other key shares: loss.levels.spatial -> spatial."""
  short = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      suffix = ".".join(parts[-n:])
      if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
        break
    short[key] = suffix
  return short


def _format(value) -> str:
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return str(value)


def expand_sweeps(sweeps: list[tuple[str, list]]) -> list[Variant]:
  """The cartesian product of the sweeps, in the order given (the last sweep varies fastest)."""
  if not sweeps:
    return []
  keys = [key for key, _ in sweeps]
  if len(set(keys)) != len(keys):
    raise ValueError(f"a key is swept twice: {keys}")
  short = _short_keys(keys)
  variants = []
  for values in itertools.product(*(vals for _, vals in sweeps)):
    name = "_".join(f"{short[k]}={_format(v)}" for k, v in zip(keys, values))
    variants.append(Variant(name, tuple(zip(keys, values))))
  return variants


def variant_config(config: ml_collections.ConfigDict, variant: Variant) -> ml_collections.ConfigDict:
  """A copy of `config` with the variant's overrides; ValueError (naming the variant) if it is invalid."""
  config = copy.deepcopy(config)
  for key, value in variant.overrides:
    *groups, field = key.split(".")
    node = config
    for part in groups:
      node = node[part]
    node[field] = value
  try:
    config_lib.validate(config)
  except ValueError as e:
    raise ValueError(f"variant {variant.name!r}: {e}") from None
  return config


def plan(config: ml_collections.ConfigDict, sweeps: list[str], variants: list[str]):
  """[(Variant, its config)] for the sweep and variant arguments; every error is raised before training."""
  planned = expand_sweeps([parse_sweep(config, s) for s in sweeps]) + [parse_variant(config, v) for v in variants]
  if not planned:
    raise ValueError("nothing to run: give at least one --sweep KEY=V1,V2 or --variant NAME:KEY=V,...")
  dirs = [v.dirname for v in planned]
  repeated = sorted({d for d in dirs if dirs.count(d) > 1})
  if repeated:
    raise ValueError(f"two variants share the directory name(s) {repeated}; give --variant distinct names")
  return [(v, variant_config(config, v)) for v in planned]


# --- running -------------------------------------------------------------------------------------------


def as_recorded(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` as training records it in WORKDIR/config.json: model.max_words = 0 ("size it from the records")
  resolved from the records, as `varcmp train` resolves it, so that rerunning the same command finds its own
  finished runs. Records that cannot be read leave the config as given (training names the problem)."""
  from varcmp_jax.train import train as train_lib      # jax is imported here, not started
  try:
    return train_lib.resolve_word_budget(config)[0]
  except (OSError, ValueError, KeyError):
    return config


def run_variant(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if interrupted) and evaluates one variant, holding its workdir's lock throughout;
  returns its eval.json contents."""
  eval_path = os.path.join(workdir, "eval.json")
  if not os.path.exists(eval_path):
    from varcmp_jax import evaluate as evaluate_lib          # jax starts only when something trains
    from varcmp_jax.train import train as train_lib
    with workdir_lib.writer(workdir):
      train_lib.train(config, workdir)
      evaluate_lib.evaluate(config, workdir)
  return read_eval(eval_path)


def read_eval(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found")
  try:
    with open(path) as f:
      result = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(result, dict) or "SumR" not in result:
    raise ValueError(f"{path}: not an eval.json (no SumR)")
  return result


# --- tables --------------------------------------------------------------------------------------------


def table_rows(config: ml_collections.ConfigDict, results: list[tuple[Variant, dict]]):
  """(header, rows): variant, the value of every overridden key, R@1/R@5/R@10/MdR per direction, SumR."""
  keys = list(dict.fromkeys(k for v, _ in results for k, _ in v.overrides))
  short = _short_keys(keys)
  directions = config_lib.TASK_DIRECTIONS[config.task]
  header = ["variant"] + [short[k] for k in keys]
  header += [f"{d}/{m}" for d in directions for m in METRICS] + ["SumR"]
  rows = []
  for variant, result in results:
    values = dict(variant.overrides)
    row = [variant.name] + [_format(values.get(k, config_lib.lookup(config, k))) for k in keys]
    for d in directions:
      if d not in result:
        raise ValueError(f"variant {variant.name!r}: eval.json has no {d!r} results (keys: {sorted(result)})")
      row += [f"{float(result[d][m]):.1f}" for m in METRICS]
    rows.append(row + [f"{float(result['SumR']):.1f}"])
  return header, rows


def to_csv(header, rows) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  return out.getvalue()


def to_markdown(header, rows, config: ml_collections.ConfigDict) -> str:
  """A paper-style table: the two directions as column groups named in the first header line."""
  query, gallery = config_lib.TASK_DIRECTIONS[config.task]
  names = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "MdR": "MdR"}
  labels = [h if "/" not in h else f"{'q→v' if h.startswith(query) else 'v→q'} {names[h.split('/')[1]]}"
            for h in header]
  lines = [f"Ablation ({config.task} task, {config.regime} regime; q→v = {query}, v→q = {gallery}; "
           "recalls in %, MdR = median rank)", "",
           "| " + " | ".join(labels) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def write_tables(config, results, workdir: str) -> tuple[str, str]:
  header, rows = table_rows(config, results)
  md, csv_path = os.path.join(workdir, "ablation.md"), os.path.join(workdir, "ablation.csv")
  markdown = to_markdown(header, rows, config)
  with open(md, "w") as f:
    f.write(markdown)
  with open(csv_path, "w") as f:
    f.write(to_csv(header, rows))
  print(markdown)
  return md, csv_path


# --- command line --------------------------------------------------------------------------------------


USAGE = ("usage: varcmp ablate --config configs/<name>.py[:arg] --workdir DIR --sweep KEY=V1,V2 [--sweep ...] "
         "[--variant NAME:KEY=V,...] [--config.x.y=value ...]")


def _parse(argv: list[str]):
  def define_sweeps(values):
    flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: a config field and its values (repeatable; the "
                              "variants are the cartesian product)", flag_values=values)
    flags.DEFINE_multi_string("variant", [], "NAME:KEY=V,KEY=V: one extra named variant (NAME: = base config)",
                              flag_values=values)
  return command_flags.parse_flags(argv, "varcmp ablate", USAGE, define_sweeps)


def main(argv: list[str]) -> int:
  if any(a in ("-h", "--help") for a in argv):
    print(__doc__.strip() + "\n\n" + USAGE)
    return 0
  values = _parse(argv)
  config, workdir = values.config, values.workdir
  try:
    planned = plan(config, values.sweep, values.variant)
    for variant, variant_cfg in planned:   # a rerun with another config fails before any training
      workdir_lib.check_same_config(os.path.join(workdir, variant.dirname), as_recorded(variant_cfg), "reuse")
  except (ValueError, workdir_lib.RunError) as e:
    raise SystemExit(f"varcmp ablate: {e}") from None
  try:
    created = workdir_lib.make_dir(workdir)
  except workdir_lib.RunError as e:
    raise SystemExit(f"varcmp ablate: {e}") from None
  print(f"{len(planned)} variants: {', '.join(v.name for v, _ in planned)}", flush=True)
  results = []
  for i, (variant, variant_cfg) in enumerate(planned):
    finished = os.path.exists(os.path.join(workdir, variant.dirname, "eval.json"))
    print(f"[{i + 1}/{len(planned)}] {variant.name}" + (" (finished: reusing its eval.json)" if finished else ""),
          flush=True)
    try:
      results.append((variant, run_variant(variant_cfg, os.path.join(workdir, variant.dirname))))
    except workdir_lib.RunError as e:
      if created:
        workdir_lib.remove_if_unused(workdir)
      raise SystemExit(f"varcmp ablate: variant {variant.name!r}: {e}") from None
  write_tables(config, results, workdir)
  return 0
