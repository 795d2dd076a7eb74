"""`varcmp serve`: the search page over an on-disk index (app: the FastAPI app; guards: its middleware; media: keyframes
and videos)."""
