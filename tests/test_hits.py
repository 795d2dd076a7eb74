"""What a search shows of its hits besides the ranking: the finiteness check, the `--plot` figure's legend and the
table's key segments (varcmp_jax.hits, varcmp_jax.search)."""
import math

import matplotlib.colors
import numpy as np
import pytest

from varcmp_jax import hits as hits_lib
from varcmp_jax import search


def make_hit(rank: int = 1, event=(3.0, 4.5), peak_at: int = 2) -> dict:
  """A hit of 8 snippets of 1.5 s whose relevance peaks at snippet `peak_at`."""
  relevance = np.full(8, 0.1, np.float32)
  relevance[peak_at] = 1.0
  times = np.stack([np.arange(8), np.arange(8) + 1], -1).astype(np.float32) * 1.5
  metadata = {"video": f"v{rank}.mp4", "caption": "a car", "label": 1, "duration": 12.0,
              "event": list(event) if event else [-1.0, -1.0]}
  return hits_lib.hit(rank, rank - 1, 1.5, {"video": 0.8, "frame": 0.7}, relevance, np.linspace(0, 1, 8),
                      np.ones(8, bool), times, metadata, 0.5)


@pytest.mark.parametrize("spoil", [
    lambda hit: hit.update(score=math.nan),
    lambda hit: hit.update(duration=math.inf),
    lambda hit: hit["levels"].update(frame=-math.inf),
    lambda hit: hit["relevance"].__setitem__(3, math.nan),
    lambda hit: hit["prior"].__setitem__(0, math.inf),
    lambda hit: hit["snippet_times"][2].__setitem__(1, math.nan),
    lambda hit: hit["segments"][0].update(peak=math.nan),
])
def test_finite_finds_any_non_finite_number(spoil):
  hit = make_hit()
  assert hits_lib.finite(hit) and hit["segments"]
  spoil(hit)
  assert not hits_lib.finite(hit)


def legend_of(fig) -> dict:
  """{label: legend handle} of the figure's one legend."""
  (legend,) = fig.legends
  return {text.get_text(): handle for text, handle in zip(legend.get_texts(), legend.legend_handles)}


def test_plot_legend_names_key_segments_and_the_ground_truth(tmp_path):
  hits = [make_hit(1), make_hit(2, event=None, peak_at=6)]
  fig = search.hits_figure(hits, "a car")
  legend = legend_of(fig)
  assert list(legend) == ["relevance w_t cos(f_t, q)", "anomaly prior", "key segment", "ground-truth event"]
  # Each legend entry looks like what it names in the first hit's axes: the shaded key segment, the hatched event.
  bars = list(fig.axes[0].containers[0])
  spans = [p for p in fig.axes[0].patches if not any(p is bar for bar in bars) and p.get_hatch() is None]
  events = [p for p in fig.axes[0].patches if p.get_hatch() == "//"]
  assert len(spans) == len(hits[0]["segments"]) == 1 and len(events) == 1
  assert matplotlib.colors.same_color(legend["key segment"].get_facecolor(), spans[0].get_facecolor())
  assert legend["ground-truth event"].get_hatch() == "//"
  assert matplotlib.colors.same_color(legend["ground-truth event"].get_edgecolor(), events[0].get_edgecolor())
  # A legend entry only for what is drawn: no event in these hits, no key segment in a flat one.
  flat = make_hit(1, event=None)
  flat["segments"] = []
  assert list(legend_of(search.hits_figure([flat], "q"))) == ["relevance w_t cos(f_t, q)", "anomaly prior"]
  search.plot([], "a car", str(tmp_path / "none.png"))             # an empty gallery: one empty chart
  search.plot(hits, "a car", str(tmp_path / "hits.png"))
  assert (tmp_path / "hits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_prints_the_strongest_key_segments_in_time_order():
  segments = [{"start": 9.0, "end": 10.5, "peak": 2.0, "peak_snippet": 6},      # strongest first, as hits gives
              {"start": 1.5, "end": 3.0, "peak": 1.5, "peak_snippet": 1},
              {"start": 4.5, "end": 6.0, "peak": 1.0, "peak_snippet": 3}]
  hit = {"rank": 1, "score": 1.5, "video": "v.mp4", "caption": "a car", "segments": segments}
  row = search.format_table([hit], "q").splitlines()[2]
  assert "1.5-3.0, 9.0-10.5 (+1)" in row, row
