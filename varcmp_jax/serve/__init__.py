"""`varcmp serve`: the search page over an on-disk index (app: the FastAPI app; media: keyframes and videos)."""
