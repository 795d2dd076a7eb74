"""`varcmp compile` (varcmp_jax/pod/): the train and eval steps compiled for a TPU slice, deviceless.

Against the compiler itself: the same train step compiled by hand here (jax.experimental.topologies, a mesh over
the topology's devices, ShapeDtypeStructs, `.compile().memory_analysis()`) gives the table's and the JSON's
numbers to the byte. Against hand-built inputs: an HLO text with known collectives, a fake "fits" for the --fit
search. And every wrong input a user may give ends in one line and exit status 2, never a traceback.
"""
import contextlib
import io
import json
import pathlib
import re
import sys

import jax
import numpy as np
import pytest

from varcmp_jax import command_flags
from varcmp_jax.pod import main, steps, targets
from varcmp_jax.pod.fit import fit_search

pytest.importorskip("libtpu", reason="deviceless TPU compilation needs libtpu: pip install -e '.[tpu]'")

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
TINY = f"{ROOT / 'configs' / 'tiny_text.py'}:features"


def compile_by_hand(config, topology: str, per_chip: int):
  """The train step's compiled program for `topology`, built here with jax's own API (not varcmp_jax.pod's)."""
  from jax.experimental import topologies
  from varcmp_jax.model.varcmp import VarCMP
  from varcmp_jax.train import sharding
  from varcmp_jax.train.step import Trainer, example_batch
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  config.train.batch_size = per_chip * len(devices)
  trainer = Trainer(VarCMP(config.model, task=config.task, regime=config.regime), config,
                    sharding.make_mesh(config.mesh, devices=devices))
  state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 trainer.abstract_state, trainer.state_shardings)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
           for k, v in example_batch(config, config.train.batch_size).items()}
  return trainer.train_step.trace(state, batch).lower().compile()


def total_bytes(stats) -> int:
  """memory_analysis()'s total as SPEC section 4 defines it."""
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes)


def run_command(capsys, *argv) -> tuple[int, str, str]:
  code = main.main(list(argv))
  out, err = capsys.readouterr()
  assert "Traceback" not in out + err
  return code, out, err


@pytest.fixture(scope="module")
def v5e_2x2(tmp_path_factory):
  """The command's JSON and table for the tiny features config on v5e:2x2 (train and eval steps)."""
  path = tmp_path_factory.mktemp("compile") / "report.json"
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main.main(["--config", TINY, "--topology", "v5e:2x2", "--per-chip-batch", "4",
                             "--config.model.max_words=8", "--config.eval.batch_size=12", "--json", str(path)])
  return code, json.loads(path.read_text()), out.getvalue(), err.getvalue()


def test_tiny_config_on_v5e_2x2_reports_the_compilers_memory_to_the_byte(v5e_2x2):
  code, report, table, err = v5e_2x2
  assert code == 0 and "Traceback" not in table + err
  assert (report["topology"], report["chips"], report["chip"]) == ("v5e:2x2", 4, "TPU v5 lite")
  assert (report["global_batch"], report["per_chip_batch"]) == (16, 4)
  config = command_flags.load_config_file(TINY, ["--config.model.max_words=8"])
  stats = compile_by_hand(config, "v5e:2x2", 4).memory_analysis()
  memory = report["memory_bytes"]
  assert memory["arguments"] == stats.argument_size_in_bytes
  assert memory["outputs"] == stats.output_size_in_bytes
  assert memory["aliased"] == stats.alias_size_in_bytes
  assert memory["temporaries"] == stats.temp_size_in_bytes
  assert memory["total"] == total_bytes(stats)
  assert memory["hbm"] == 16 * 2 ** 30 and report["fits"] is True and report["fit_batch"] is None
  # The printed table carries the same numbers, in full.
  for key, label in (("arguments", "arguments"), ("temporaries", "temporaries"), ("total", "total")):
    row = next(line for line in table.splitlines() if line.strip().startswith(label))
    assert f"{memory[key]:,} B" in row
  # The state is donated: the compiler aliases (nearly) all of the outputs with the arguments.
  assert 0 < memory["aliased"] <= min(memory["arguments"], memory["outputs"])
  assert report["executed_flops_per_chip"] > 0 and report["compile_seconds"] > 0
  assert "all-gather" in report["collectives"] and report["collectives"]["all-gather"]["count"] > 0


def test_the_eval_step_compiles_on_the_same_mesh(v5e_2x2):
  _, report, table, _ = v5e_2x2
  evaluation = report["eval"]
  assert (evaluation["global_batch"], evaluation["per_chip_batch"]) == (12, 3)
  memory = evaluation["memory_bytes"]
  assert memory["total"] == memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
  assert memory["aliased"] == 0 and evaluation["fits"] is True     # nothing donated: params stay
  # Its arguments are the parameters (no optimizer state): fewer bytes than the train step's.
  assert 0 < memory["arguments"] < report["memory_bytes"]["arguments"]
  assert evaluation["model_flops_per_chip"] > 0
  assert re.search(r"train step\s+eval step", table)


def test_256_chips_v5e_16x16(capsys, tmp_path):
  code, out, _ = run_command(capsys, "--config", TINY, "--topology", "v5e:16x16", "--per-chip-batch", "1",
                             "--config.model.max_words=4", "--no-eval", "--json", str(tmp_path / "r.json"))
  report = json.loads((tmp_path / "r.json").read_text())
  assert code == 0 and (report["chips"], report["global_batch"]) == (256, 256)
  assert report["memory_bytes"]["total"] > 0 and "256 chips" in out


def test_per_chip_arguments_fall_as_fsdp_grows():
  target = targets.tpu_target("v5e:2x2")
  config = command_flags.load_config_file(TINY, ["--config.model.max_words=4"])
  arguments = {}
  for fsdp in (1, 4):
    config.mesh.fsdp = fsdp
    step = steps.compile_train(config, target, 2, None, "host batches")
    arguments[fsdp] = step.memory["arguments"]
  # The token embedding (49408 x 32 floats, with its two Adam moments) dominates the state: split 4 ways.
  assert arguments[4] < 0.5 * arguments[1]


def test_a_config_that_cannot_fit_says_so_with_the_numbers(capsys, tmp_path):
  code, out, err = run_command(capsys, "--config", TINY, "--topology", "v5e:2x2", "--per-chip-batch", "2",
                               "--config.model.max_words=4", "--hbm-bytes", "1000000", "--no-eval",
                               "--json", str(tmp_path / "r.json"))
  report = json.loads((tmp_path / "r.json").read_text())
  assert code == 1 and report["fits"] is False and report["memory_bytes"]["hbm"] == 1_000_000
  total = report["memory_bytes"]["total"]
  assert total > 1_000_000
  assert "does not fit" in err and f"{total:,} B" in err and len(err.strip().splitlines()) == 1
  assert "DOES NOT FIT" in out


def test_a_step_the_tpu_compiler_refuses_for_lack_of_hbm_does_not_fit(capsys):
  code, out, err = run_command(capsys, "--config", TINY, "--topology", "v5e:2x2", "--per-chip-batch", "65536",
                               "--config.model.max_words=4", "--no-eval")
  assert code == 1 and "does not fit" in err and "HBM" in err and "refused" in out


def test_fit_is_right_to_one_step(capsys, tmp_path):
  # An HBM of exactly the compiler's total at 16 per chip: 16 fits, 24 (the next step of 8) must not.
  config = command_flags.load_config_file(TINY, ["--config.model.max_words=4"])
  hbm = total_bytes(compile_by_hand(config, "v5e:2x2", 16).memory_analysis())
  code, out, _ = run_command(capsys, "--config", TINY, "--topology", "v5e:2x2", "--per-chip-batch", "8",
                             "--config.model.max_words=4", "--hbm-bytes", str(hbm), "--fit", "--fit-step", "8",
                             "--no-eval", "--json", str(tmp_path / "r.json"))
  report = json.loads((tmp_path / "r.json").read_text())
  fit = report["fit"]
  assert code == 0 and report["fit_batch"] == fit["batch"] == 16 and fit["next_step_does_not_fit"] == 24
  assert [b for b, _, _ in fit["tried"]] == [16, 32, 24] and fit["compiles"] == 3   # 8: the table's own compile
  assert total_bytes(compile_by_hand(config, "v5e:2x2", 24).memory_analysis()) > hbm
  assert "--fit: 16 per chip fits (global 64), 24 does not (step 8); 3 compiles" in out


@pytest.mark.parametrize("answers, start, step, expected, compiles", [
    (lambda b: b <= 100, 8, 8, (96, 104), 8),     # 8 16 32 64 128, then 96 112 104
    (lambda b: b <= 100, 128, 8, (96, 104), 5),   # 128, 64, then 96 112 104
    (lambda b: b <= 5, 8, 8, (0, 8), 1),          # not even one step: 0, and 8 shown not to fit
    (lambda b: b <= 24, 24, 8, (24, 32), 3),      # 24 48, then 32
])
def test_fit_search_by_hand(answers, start, step, expected, compiles):
  asked = []

  def fits_at(batch):
    asked.append(batch)
    return answers(batch), batch

  fit = fit_search(fits_at, start, step)
  assert (fit.batch, fit.too_big) == expected
  assert answers(fit.batch) or fit.batch == 0
  assert not answers(fit.too_big) and fit.too_big - fit.batch == step
  assert len(asked) == len(set(asked)) == fit.compiles == compiles


def test_fit_search_reuses_what_was_compiled():
  fit = fit_search(lambda b: (b <= 40, b), 16, 8, known={16: (True, 16)})
  assert (fit.batch, fit.too_big) == (40, 48) and 16 not in [b for b, _, _ in fit.tried]


def test_collectives_are_read_from_the_hlo_text():
  hlo = "\n".join([
      "ENTRY %main {",
      "  %all-gather.7 = f32[8,75,32]{1,2,0:T(8,128)} all-gather(%p0), channel_id=1, dimensions={0}",
      "  %ar = (f32[16]{0:T(128)}, bf16[32,16]{0,1:T(8,128)}) all-reduce(%a, %b), to_apply=%add",
      "  %rs = f32[2,75,32]{1,2,0} reduce-scatter(%f), dimensions={0}, to_apply=%add",
      "  %ags = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%x), dimensions={0}",
      "  %agd = bf16[16,8]{1,0} all-gather-done(%ags)",
      "  %cps = (f32[10]{0}, f32[10]{0}, u32[], u32[]) collective-permute-start(%y), source_target_pairs={{0,1}}",
      "  ROOT %pm = pred[4,2]{1,0} all-reduce(%m), to_apply=%or",
      "  %fusion = f32[8]{0} fusion(%all-gather.7), kind=kLoop, calls=%fused",
      "}"])
  assert steps.collectives(hlo) == {
      "all-gather": {"count": 2, "bytes": 8 * 75 * 32 * 4 + 16 * 8 * 2},
      "all-reduce": {"count": 2, "bytes": 16 * 4 + 32 * 16 * 2 + 4 * 2},
      "collective-permute": {"count": 1, "bytes": 10 * 4},
      "reduce-scatter": {"count": 1, "bytes": 2 * 75 * 32 * 4},
  }


def test_topology_options_follow_the_hardware():
  options = targets.topology_options
  assert options("v4:2x2x1")["chip_config_name"] == "megacore"
  assert options("v5p:4x4x8")["wrap"] == (True, True, True)       # whole cubes: wraparound links
  assert options("v5p:2x2x4")["wrap"] == (False, False, False)
  assert options("v5e:16x16")["wrap"] == (True, True, False)
  assert options("v5e:8x16")["wrap"] == (False, True, False)
  assert options("v5e:1x1")["chips_per_host_bounds"] == (1, 1, 1)


def test_v4_compiles_one_megacore_device_per_chip_with_the_chips_hbm(capsys):
  target = targets.tpu_target("v4:2x2x1")
  assert target.chips == 4 and target.kind == "TPU v4" and target.hbm == 32 * 2 ** 30
  code, out, err = run_command(capsys, "--config", TINY, "--topology", "v5e:1x1", "--per-chip-batch", "2",
                               "--config.model.max_words=4", "--no-eval")
  assert code == 0 and "(1 chips, TPU v5 lite" in out


def test_the_resident_step_with_the_records_given(capsys, tmp_path):
  sys.path.insert(0, str(TESTS))
  from test_checkpoint import write_feature_records   # pylint: disable=g-import-not-at-top
  records = write_feature_records(tmp_path / "records")      # 32 train records: 8 per chip on 4 chips
  code, out, _ = run_command(capsys, "--config", TINY, "--topology", "v5e:2x2", "--per-chip-batch", "2",
                             f"--config.data.records={records}", "--no-eval", "--json", str(tmp_path / "r.json"))
  report = json.loads((tmp_path / "r.json").read_text())
  assert code == 0 and report["input"].startswith("the split resident on the devices")
  from varcmp_jax.data import pipeline   # pylint: disable=g-import-not-at-top
  config = command_flags.load_config_file(TINY, [f"--config.data.records={records}"])
  example = pipeline.decode_and_fit(config, cast=False).map(pipeline.IndexedSource(str(records), "train")[0])
  per_row = sum(np.asarray(v).nbytes for v in example.values())
  memory = report["memory_bytes"]
  assert memory["resident_split_logical"] == 8 * per_row
  assert memory["arguments"] >= memory["state_logical"] + memory["resident_split_logical"]
  assert "caption words" in out


@pytest.mark.parametrize("argv, expected", [
    (["--topology", "v5e:3x3"], "examples: v5e:2x2"),
    (["--topology", "nope"], "not a TPU slice"),
    (["--topology", "v5e:4x4"], "does not divide over the 16 chips"),     # tiny_text: batch 8
    (["--topology", "v5e:2x2", "--per-chip-batch", "0"], "must be >= 1"),
    (["--topology", "v5e:2x2", "--config.train.nope=3"], "nope"),
    (["--topology", "v5e:2x2", "--config.mesh.fsdp=3"], "mesh.fsdp=3"),
    (["--topology", "v5e:2x2", "--config.train.grad_accum_steps=4", "--per-chip-batch", "2"], "grad_accum_steps=4"),
    (["--topology", "v5e:2x2", "--config.data.records=/nonexistent"], "config.data.records"),
    (["--topology", "v5e:2x2", "--fit-step", "0"], "--fit-step"),
    (["--topology", "v5e:2x2", "--json", "/nonexistent/folder/r.json"], "/nonexistent/folder is not a folder"),
    (["--topology", "v5e:2x2", "--per-chip-batch", "two"], "invalid int value"),
    (["--topology", "v5e:2x2", "--config.train.batch_size=abc"], "train.batch_size=abc"),
    ([], "no GPU or TPU here"),
])
def test_wrong_inputs_give_one_line(capsys, argv, expected):
  code, out, err = run_command(capsys, "--config", TINY, *argv)
  assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_wrong_config_and_missing_libtpu_give_one_line(capsys, monkeypatch):
  code, _, err = run_command(capsys, "--config", "nonexistent_config.py", "--topology", "v5e:2x2")
  assert code == 2 and "--config nonexistent_config.py" in err and len(err.strip().splitlines()) == 1
  real = targets.importlib.util.find_spec
  monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None if name == "libtpu" else real(name))
  code, _, err = run_command(capsys, "--config", TINY, "--topology", "v5e:2x2")
  assert code == 2 and f"pip install 'jax[tpu]=={jax.__version__}'" in err and len(err.strip().splitlines()) == 1
