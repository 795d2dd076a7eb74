"""Retrieval metrics on hand cases, ties included (optimistic ranks), both directions, report shape."""
import numpy as np
import pytest

from varcmp_jax import metrics

# Ranks of the diagonal, row direction: row 0 -> 1; row 1: ties with the diagonal do not count -> 1;
# row 2: two strictly higher -> 3; row 3: three higher -> 4.
SIM = np.array([[0.9, 0.1, 0.2, 0.3],
                [0.5, 0.5, 0.5, 0.1],
                [0.8, 0.7, 0.6, 0.6],
                [0.9, 0.8, 0.7, 0.1]])


def test_ranks_are_optimistic_under_ties():
  np.testing.assert_array_equal(metrics.ground_truth_ranks(SIM), [1, 1, 3, 4])


def test_row_direction_hand_case():
  m = metrics.retrieval_metrics(SIM)
  assert m == {"R1": 50.0, "R5": 100.0, "R10": 100.0, "MdR": 2.0, "MnR": 2.25}
  assert all(type(v) is float for v in m.values())


def test_column_direction_is_the_transpose():
  # Columns: col 0: 0.9 top -> 1; col 1: 0.7, 0.8 > 0.5 -> 3; col 2: 0.6 vs 0.2, 0.5, 0.7 -> 2; col 3: 0.3, 0.6 > 0.1 -> 3.
  m = metrics.retrieval_metrics(SIM.T)
  assert m == {"R1": 25.0, "R5": 100.0, "R10": 100.0, "MdR": 2.5, "MnR": 2.25}


def test_recall_at_k_counts_ranks_up_to_k():
  # 12 x 12, ground truth rank of row i is i + 1 (i items strictly above it).
  n = 12
  sim = np.zeros((n, n))
  for i in range(n):
    sim[i, :i] = 2.0
    sim[i, i] = 1.0
  m = metrics.retrieval_metrics(sim)
  assert m["R1"] == pytest.approx(100 / 12) and m["R5"] == pytest.approx(500 / 12)
  assert m["R10"] == pytest.approx(1000 / 12) and m["MdR"] == 6.5 and m["MnR"] == 6.5


def test_report_structure_and_sumr():
  sims = {"combined": SIM, "video": SIM.T, "spatial": np.eye(4)}
  rep = metrics.report(sims, "text")
  assert set(rep) == {"text_to_video", "video_to_text", "SumR", "levels"}
  assert rep["text_to_video"] == metrics.retrieval_metrics(SIM)
  assert rep["video_to_text"] == metrics.retrieval_metrics(SIM.T)
  assert rep["SumR"] == 50 + 100 + 100 + 25 + 100 + 100
  assert list(rep["levels"]) == ["video", "spatial"]               # config.TASK_LEVELS order
  assert rep["levels"]["video"]["text_to_video"] == rep["video_to_text"]
  assert rep["levels"]["spatial"]["SumR"] == 600.0
  table = metrics.format_table(rep)
  assert "combined" in table and "spatial" in table and "475.0" in table


def test_report_audio_directions():
  rep = metrics.report({"combined": np.eye(3), "temporal": np.eye(3)}, "audio")
  assert {"audio_to_video", "video_to_audio"} <= set(rep) and set(rep["levels"]) == {"temporal"}


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="square"):
    metrics.retrieval_metrics(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="non-finite"):
    metrics.retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]))
  with pytest.raises(ValueError, match="combined"):
    metrics.report({"video": np.eye(2)}, "text")
  with pytest.raises(ValueError, match="not levels"):
    metrics.report({"combined": np.eye(2), "temporal": np.eye(2)}, "text")
