"""Retrieval metrics on hand cases and against a brute-force reference: ties broken at random, in expectation
(SPEC section 4), the optimistic rule kept behind ties="optimistic", both directions, the report's shape."""
import itertools

import numpy as np
import pytest

from varcmp_jax import metrics

# Row direction. row 0: first. row 1: two others tie with it -> rank 1 + 0 + 2/2 = 2, R@1 = 1/3.
# row 2: two strictly above, one tie -> rank 3.5. row 3: three above -> 4.
SIM = np.array([[0.9, 0.1, 0.2, 0.3],
                [0.5, 0.5, 0.5, 0.1],
                [0.8, 0.7, 0.6, 0.6],
                [0.9, 0.8, 0.7, 0.1]])


def brute_force(sim, ks=(1, 5, 10)):
  """Every order of the gallery, ranked by a stable sort: the exact expectation over random tie-breaking."""
  n = sim.shape[0]
  ranks = np.zeros(n)
  hits = {k: np.zeros(n) for k in ks}
  orders = list(itertools.permutations(range(n)))
  for order in orders:
    order = np.asarray(order)
    for q in range(n):
      ranked = order[np.argsort(-sim[q, order], kind="stable")]
      rank = 1 + int(np.flatnonzero(ranked == q)[0])
      ranks[q] += rank / len(orders)
      for k in ks:
        hits[k][q] += (rank <= k) / len(orders)
  out = {f"R{k}": 100 * float(np.mean(hits[k])) for k in ks}
  return out | {"MdR": float(np.median(ranks)), "MnR": float(np.mean(ranks))}, ranks


def test_expected_ranks_under_ties_hand_case():
  np.testing.assert_allclose(metrics.ground_truth_ranks(SIM), [1, 2, 3.5, 4])
  m = metrics.retrieval_metrics(SIM)
  assert m == pytest.approx({"R1": 100 * (1 + 1 / 3) / 4, "R5": 100.0, "R10": 100.0, "MdR": 2.75, "MnR": 2.625})
  assert all(type(v) is float for v in m.values())


def test_column_direction_is_the_transpose():
  # col 0: 0.9 ties with row 3 -> 1.5; col 1: 0.7, 0.8 above 0.5 -> 3; col 2: 0.7 above 0.6 -> 2;
  # col 3: 0.3, 0.6 above 0.1 and row 1's 0.1 ties -> 3.5.
  np.testing.assert_allclose(metrics.ground_truth_ranks(SIM.T), [1.5, 3, 2, 3.5])
  assert metrics.retrieval_metrics(SIM.T) == pytest.approx(
      {"R1": 12.5, "R5": 100.0, "R10": 100.0, "MdR": 2.5, "MnR": 2.5})


def test_optimistic_rule_is_kept():
  np.testing.assert_array_equal(metrics.ground_truth_ranks(SIM, ties="optimistic"), [1, 1, 3, 4])
  assert metrics.retrieval_metrics(SIM, ties="optimistic") == {"R1": 50.0, "R5": 100.0, "R10": 100.0,
                                                               "MdR": 2.0, "MnR": 2.25}
  assert metrics.retrieval_metrics(SIM.T, ties="optimistic") == {"R1": 25.0, "R5": 100.0, "R10": 100.0,
                                                                 "MdR": 2.5, "MnR": 2.25}
  with pytest.raises(ValueError, match="ties='random'"):
    metrics.retrieval_metrics(SIM, ties="random")


@pytest.mark.parametrize("n", [7, 290])
def test_all_equal_matrix_scores_chance(n):
  """A collapsed model: every query ties with the whole gallery -> R@K = 100 K/N, rank (N + 1)/2."""
  m = metrics.retrieval_metrics(np.zeros((n, n)))
  assert m["R1"] == pytest.approx(100 / n) and m["R5"] == pytest.approx(100 * min(5, n) / n)
  assert m["R10"] == pytest.approx(100 * min(10, n) / n)
  assert m["MdR"] == m["MnR"] == pytest.approx((n + 1) / 2)
  assert metrics.retrieval_metrics(np.zeros((n, n)), ties="optimistic")["R1"] == 100.0


def test_recall_between_bounds_of_a_tie_group():
  """h = 3 above, t = 4 tied: R@5 = (5 - 3) / (4 + 1) = 0.4 of a hit; R@1 = 0; R@10 = 1; rank 1 + 3 + 2."""
  sim = np.eye(10)
  sim[0] = [0.5, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1]
  assert metrics.ground_truth_ranks(sim)[0] == 6.0
  m = metrics.retrieval_metrics(sim)
  assert m["R1"] == pytest.approx(90.0) and m["R5"] == pytest.approx(94.0) and m["R10"] == 100.0


def test_duplicate_captions_share_their_credit():
  """Two identical queries (rows 0, 1) score videos 0 and 1 alike: each video finds its caption half the time."""
  sim = np.array([[0.9, 0.9, 0.1],
                  [0.9, 0.9, 0.1],
                  [0.0, 0.2, 0.8]])
  assert metrics.retrieval_metrics(sim.T)["R1"] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)
  assert metrics.retrieval_metrics(sim.T, ties="optimistic")["R1"] == 100.0


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_over_tie_orders(seed):
  rng = np.random.default_rng(seed)
  sim = rng.integers(0, 3, (6, 6)).astype(np.float64)      # few distinct values: many ties
  expected, ranks = brute_force(sim, ks=(1, 2, 5))
  np.testing.assert_allclose(metrics.ground_truth_ranks(sim), ranks)
  for k in (1, 2, 5):
    assert metrics.recall_at(sim, k) == pytest.approx(expected[f"R{k}"])
  got = metrics.retrieval_metrics(sim)
  assert got["MdR"] == pytest.approx(expected["MdR"]) and got["MnR"] == pytest.approx(expected["MnR"])


def test_recall_at_k_counts_ranks_up_to_k():
  # 12 x 12, no ties: row i has i items strictly above its ground truth.
  n = 12
  sim = np.zeros((n, n))
  for i in range(n):
    sim[i, :i] = 2.0
    sim[i, i] = 1.0
    sim[i, i + 1:] = -1.0
  m = metrics.retrieval_metrics(sim)
  assert m["R1"] == pytest.approx(100 / 12) and m["R5"] == pytest.approx(500 / 12)
  assert m["R10"] == pytest.approx(1000 / 12) and m["MdR"] == 6.5 and m["MnR"] == 6.5


def test_report_structure_and_sumr():
  sims = {"combined": SIM, "video": SIM.T, "spatial": np.eye(4)}
  rep = metrics.report(sims, "text")
  assert set(rep) == {"text_to_video", "video_to_text", "SumR", "levels"}
  assert rep["text_to_video"] == metrics.retrieval_metrics(SIM)         # rows are the text queries
  assert rep["video_to_text"] == metrics.retrieval_metrics(SIM.T)
  assert rep["SumR"] == pytest.approx(100 * (1 + 1 / 3) / 4 + 200 + 12.5 + 200)
  assert list(rep["levels"]) == ["video", "spatial"]               # config.TASK_LEVELS order
  assert rep["levels"]["video"]["text_to_video"] == rep["video_to_text"]
  assert rep["levels"]["spatial"]["SumR"] == 600.0
  assert metrics.report(sims, "text", ties="optimistic")["SumR"] == 50 + 100 + 100 + 25 + 100 + 100
  table = metrics.format_table({"step": 3, "split": "test", **rep})    # extra keys of eval.json are not columns
  assert "combined" in table and "spatial" in table and f"{rep['SumR']:6.1f}" in table and "step" not in table


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
