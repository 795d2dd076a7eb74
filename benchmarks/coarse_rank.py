"""How safe is int4's two-pass stage 2? Where the coarse pass ranks each query's exact top 10 among its K candidates.

  python benchmarks/search_scale.py --videos 100000 --snippets 256 --dim 512 --regions 4 --words 32 \
      --candidates 1000 --out /tmp/s100k --phase build
  python benchmarks/coarse_rank.py --videos 100000 --snippets 256 --dim 512 --regions 4 --words 32 \
      --candidates 1000 --out /tmp/s100k --queries 10

Takes search_scale.py's arguments (the same queries) and an index it built at --out. For each query: stage 1's K
candidates, their combined scores from the high planes alone (the coarse pass) and from both planes (exact int4),
and the worst coarse rank of the exact top 10. The search rescores the coarse top index.search.REFINE, so a worst
rank well below REFINE is the margin. Prints a line per query, then the maximum.
"""
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import search_scale  # pylint: disable=g-import-not-at-top
from varcmp_jax.index import search  # pylint: disable=g-import-not-at-top

# pylint: disable=protected-access


def main():
  args = search_scale.parse_args(sys.argv[1:])
  index = search.Index(args.out)
  if index.coarse_files == index.files:
    raise SystemExit(f"{args.out} is a {index.storage} index: it has no coarse pass")
  worst = []
  for q, query in enumerate(search_scale.queries(args)):
    query = index._check_query(query)
    rows, linear = index.stage1(query, args.candidates)
    coarse, _ = index._combine(linear, index._stage2(rows, query, index.coarse_files))
    exact, _ = index._combine(linear, index._stage2(rows, query))
    coarse_rank = np.argsort(np.argsort(-coarse, kind="stable"), kind="stable") + 1
    worst.append(int(coarse_rank[np.argsort(-exact, kind="stable")[:10]].max()))
    print(f"query {q + 1}/{args.queries}: the exact top 10 within the coarse top {worst[-1]} of {len(rows)} (the "
          f"search rescores the top {search.REFINE})", flush=True)
  print(f"worst over {len(worst)} queries: {max(worst)}")


if __name__ == "__main__":
  main()
