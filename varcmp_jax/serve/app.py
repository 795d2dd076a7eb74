"""The search page's web app (FastAPI): the page, the search API, keyframes and the videos.

  GET  /                          the page (static/index.html, app.js, style.css; no external resources)
  GET  /api/info                  what the index holds: task, videos, run, levels, whether videos can be played
  GET  /api/search?q=...&k=5      a text query: exactly what `varcmp search --index INDEX --text q --json` prints
  POST /api/search?k=5            an audio query (multipart field `audio`): what `... --audio FILE --json` prints
  GET  /api/keyframe/{row}/{slot} PNG keyframe of a hit (`index` in the hit) at a snippet slot
  GET  /videos/{path}             a file under --videos, with HTTP range requests (Starlette's FileResponse)

The model and the index are opened once (create_app); a query is one query-tower call and the index search, one
query at a time (each uses every core). Bad input is a 4xx with a one-line
JSON {"detail": message}: never a traceback, never a file outside --videos.
"""
import os
import tempfile
import threading

import fastapi
from fastapi import responses, staticfiles
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError

from varcmp_jax import search as search_lib
from varcmp_jax.index import search as index_search
from varcmp_jax.serve import media

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DEFAULT_K = 5       # varcmp search --top-k
MAX_K = 100
MAX_QUERY_CHARS = 1000
DEFAULT_MAX_UPLOAD_BYTES = 50 << 20


class BodyLimit:
  """ASGI middleware: a request body over `max_bytes` gets 413, by its Content-Length before anything is read,
  or as soon as a streamed body passes the limit."""

  def __init__(self, app, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
      response = responses.JSONResponse({"detail": self._message()}, status_code=413)
      return await response(scope, receive, send)
    received = 0

    async def limited_receive():
      nonlocal received
      message = await receive()
      received += len(message.get("body", b""))
      if received > self.max_bytes:
        raise fastapi.HTTPException(413, self._message())
      return message

    return await self.app(scope, limited_receive, send)

  def _message(self) -> str:
    return f"the upload is larger than {self.max_bytes / 2**20:g} MiB (varcmp serve --max-upload-mb)"


class Searcher:
  """The index and its run's query tower, opened once; `text(q, k, candidates)` / `audio(path, label, ...)`
  return the --json output of `varcmp search --index`."""

  def __init__(self, index_path: str, workdir: str | None = None,
               audio_clip_seconds: float = search_lib.VGGISH_CLIP_SECONDS):
    self.index = index_search.Index(index_path)
    self.encoder = search_lib.QueryEncoder.for_index(self.index, workdir)
    self.task = self.index.task
    self.audio_clip_seconds = audio_clip_seconds
    self.lock = threading.Lock()

  def info(self) -> dict:
    manifest = self.index.manifest
    # What an audio query uploads: a file with an audio track, or a .npy of features for a `features` tower.
    audio_input = (None if self.task != "audio" else
                   "features" if self.encoder.config.model.audio.kind == "features" else "file")
    return {"index": self.index.path, "task": self.task, "audio_input": audio_input, "videos": len(self.index),
            "run": manifest["run"],
            "levels": self.index.lambdas,
            "sources": [{"records": s["records"], "split": s["split"], "videos": s["videos"]}
                        for s in manifest["sources"]]}

  def text(self, text: str, top_k: int, candidates: int | None) -> dict:
    with self.lock:
      query = self.encoder.text(text)
      return {"query": text, **search_lib.index_output(self.index, query, top_k, candidates)}

  def audio(self, path: str, label: str, top_k: int, candidates: int | None) -> dict:
    with self.lock:
      query = self.encoder.audio_file(path, self.audio_clip_seconds)
      return {"query": label, **search_lib.index_output(self.index, query, top_k, candidates)}

  def warm_up(self, top_k: int = 10):
    """Compiles the text tower and the search for the page's default k, so the first visitor does not wait."""
    if self.task == "text":
      self.text("warm up", top_k, search_lib.DEFAULT_CANDIDATES)


def _candidates(value: str | None) -> int | None:
  if value is None:
    return search_lib.DEFAULT_CANDIDATES
  if value == "all":
    return None
  if not value.isdigit() or int(value) < 1:
    raise fastapi.HTTPException(400, f"candidates={value!r}: a number of videos >= 1, or 'all'")
  return int(value)


def _top_k(value: str | None) -> int:
  if value is None:
    return DEFAULT_K
  if not value.isdigit() or not 1 <= int(value) <= MAX_K:
    raise fastapi.HTTPException(400, f"k={value!r}: the number of hits, an integer from 1 to {MAX_K}")
  return int(value)


def create_app(index_path: str, videos: str | None = None, workdir: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, warm_up: bool = True,
               audio_clip_seconds: float = search_lib.VGGISH_CLIP_SECONDS) -> fastapi.FastAPI:
  """The app over the index at `index_path` (errors opening it are ValueError / FileNotFoundError, one line)."""
  folder = media.VideoFolder(videos) if videos else None
  searcher = Searcher(index_path, workdir, audio_clip_seconds)
  keyframes = media.Keyframes(searcher.index, folder)
  if warm_up:
    searcher.warm_up()

  app = fastapi.FastAPI(title="varcmp search", docs_url=None, redoc_url=None, openapi_url=None)
  app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
  app.state.searcher = searcher

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, error):
    first = error.errors()[0]
    where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
    return responses.JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

  @app.exception_handler(Exception)
  async def _crash(request, error):
    # The client gets one line (our ValueErrors, e.g. a damaged index, say what is wrong); uvicorn logs the
    # traceback on the server's console.
    what = str(error) if isinstance(error, ValueError) else f"internal error ({type(error).__name__})"
    return responses.JSONResponse({"detail": f"{what}; see the server's log"}, status_code=500)

  @app.get("/", include_in_schema=False)
  def page():
    return responses.FileResponse(os.path.join(STATIC, "index.html"))

  app.mount("/static", staticfiles.StaticFiles(directory=STATIC), name="static")

  @app.get("/api/info")
  def info():
    return {**searcher.info(), "player": folder is not None, "max_k": MAX_K,
            "max_upload_bytes": max_upload_bytes, "default_candidates": search_lib.DEFAULT_CANDIDATES}

  @app.get("/api/search")
  def search_text(q: str | None = None, k: str | None = None, candidates: str | None = None):
    top_k, kept = _top_k(k), _candidates(candidates)
    if searcher.task != "text":
      raise fastapi.HTTPException(400, "this index holds an audio model: POST an audio file to /api/search "
                                       "(multipart field 'audio'), not a text query")
    if q is None or not q.strip():
      raise fastapi.HTTPException(400, "the text query is empty: give the words to search for (?q=...)")
    if len(q) > MAX_QUERY_CHARS:
      raise fastapi.HTTPException(400, f"the text query is {len(q)} characters; at most {MAX_QUERY_CHARS}")
    try:
      return searcher.text(q, top_k, kept)
    except ValueError as e:
      raise fastapi.HTTPException(400, str(e)) from None

  @app.post("/api/search")
  async def search_audio(request: fastapi.Request, k: str | None = None, candidates: str | None = None):
    top_k, kept = _top_k(k), _candidates(candidates)
    if searcher.task != "audio":
      raise fastapi.HTTPException(400, "this index holds a text model: search it with GET /api/search?q=..., "
                                       "not an audio upload")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
      raise fastapi.HTTPException(400, "send the audio file as multipart/form-data in the field 'audio'")
    async with request.form(max_files=1, max_fields=4) as form:   # a malformed body: Starlette's 400
      upload = form.get("audio")
      if upload is None or isinstance(upload, str):
        raise fastapi.HTTPException(400, "no file in the multipart field 'audio'")
      name = os.path.basename(upload.filename or "upload")
      suffix = os.path.splitext(name)[1]
      with tempfile.NamedTemporaryFile(suffix=suffix if suffix[1:].isalnum() else "") as file:
        while chunk := await upload.read(1 << 20):
          file.write(chunk)
        file.flush()
        if not file.tell():
          raise fastapi.HTTPException(400, f"{name}: the uploaded file is empty")
        try:
          return await run_in_threadpool(searcher.audio, file.name, f"audio of {name}", top_k, kept)
        except ValueError as e:
          raise fastapi.HTTPException(400, str(e).replace(file.name, name)) from None

  @app.get("/api/keyframe/{row}/{slot}")
  def keyframe(row: int, slot: int):
    try:
      data = keyframes.png(row, slot)
    except LookupError as e:
      raise fastapi.HTTPException(404, str(e.args[0])) from None
    return fastapi.Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

  @app.get("/videos/{path:path}")
  def video(path: str):
    if folder is None:
      raise fastapi.HTTPException(404, "no videos folder: start the server with --videos DIR to play videos")
    try:
      file = folder.resolve(path)
    except media.OutsideFolder as e:
      raise fastapi.HTTPException(403, str(e)) from None
    if file is None:
      file = folder.find(path)
    if file is None:
      raise fastapi.HTTPException(404, f"{path}: no such video under the videos folder")
    return responses.FileResponse(file)   # Accept-Ranges; 206 for Range requests, so the player can seek

  return app
