"""The search page's web app (FastAPI): the page, the search API, keyframes and the videos.

  GET  /                          the page (static/index.html, app.js, style.css; no external resources)
  GET  /api/info                  what the index holds: task, videos, run, levels, whether videos can be played
  GET  /api/search?q=...&k=5      a text query: what `varcmp search --index INDEX --text q --json` prints
  POST /api/search?k=5            an audio query (multipart field `audio`): what `... --audio FILE --json` prints
  GET  /api/keyframe/{row}/{slot} PNG keyframe of a hit (`index` in the hit) at a snippet slot
  GET  /videos/{path}             a media file under --videos, with HTTP range requests (Starlette's FileResponse)

The model and the index are opened once (create_app); a query is one query-tower call and the index search, one
query at a time (each uses every core). Every refusal is a one-line JSON {"detail": message}, never a traceback:
bad input is a 4xx; the server's own faults are 5xx with a one-line log entry (index_fault): 503 for a file of
the index that cannot be read now (deleted, permission denied), 500 for a damaged index or non-finite scores.
Safety (SPEC 4b; the middleware is guards.py): a request whose Host header is not the bound address, a loopback
name or an --allow-host name is refused (DNS rebinding); /api/* refuses requests a browser marks as coming from
another origin, and every answer carries Cross-Origin-Resource-Policy: same-origin, so no other site's page can
query the index or embed its videos; only media files inside --videos are served; answers name the index, its
run and records by their folder names and files by the user's names, never by server paths; a request body is
bounded before it is read; numeric parameters are ASCII digits; NaN and infinity never reach an answer.
"""
import logging
import os
import tempfile
import threading

import fastapi
from fastapi import responses, staticfiles
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from varcmp_jax import hits as hits_lib
from varcmp_jax import search as search_lib
from varcmp_jax.index import search as index_search
from varcmp_jax.index.errors import IndexDamaged, IndexUnreadable, StoreError
from varcmp_jax.serve import guards, media

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DEFAULT_K = 5       # varcmp search --top-k
MAX_K = 100
MAX_QUERY_CHARS = 1000
DEFAULT_MAX_UPLOAD_BYTES = 50 << 20
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
NON_FINITE = ("the answer holds a number that is not finite (NaN or infinity), which the API never sends: the "
              "index or the model holds non-finite values (varcmp index --verify checks the index)")
# uvicorn's own logger: `varcmp serve` shows it on the console; a known fault is one line there, no traceback.
log = logging.getLogger("uvicorn.error")


class FiniteJSONResponse(responses.JSONResponse):
  """Starlette's JSONResponse, but an answer holding NaN or infinity (JSON has neither) is refused with a one-line
  500 (the server's data, not the request, is at fault): the last guard, behind the searcher's own check."""

  def render(self, content) -> bytes:
    try:
      return super().render(content)
    except ValueError:   # json.dumps(allow_nan=False): "Out of range float values are not JSON compliant"
      raise fastapi.HTTPException(500, NON_FINITE) from None


def _unreadable_cause(error: BaseException) -> OSError | None:
  """The FileNotFoundError or PermissionError that `error` is or was raised from (also behind `raise ... from
  None`, which only hides the context), or None."""
  seen = 0
  while error is not None and seen < 8:
    if isinstance(error, (FileNotFoundError, PermissionError)):
      return error
    error, seen = error.__cause__ or error.__context__, seen + 1
  return None


def index_fault(error: BaseException) -> tuple[int, str]:
  """(HTTP status, one-line reason) of an error met reading the index while answering: 503 when a file of it
  cannot be read now (deleted, permission denied), 500 when it is damaged (the server's data is at fault, not the
  request), 400 for another StoreError. Reasons name files by their server paths: answers pass them through
  hide_paths."""
  if isinstance(error, IndexUnreadable):
    return 503, str(error)
  cause = _unreadable_cause(error)
  if isinstance(cause, PermissionError):   # never "damaged ... rebuild": the fix is the file's permissions
    return 503, (f"permission denied reading {cause.filename or 'a file of the index'}: the server's user may not "
                 "read it (check its owner and mode)")
  if isinstance(cause, FileNotFoundError):
    return 503, (f"{cause.filename or 'a file of the index'}: missing (deleted or moved since the server opened the "
                 "index): restore it, or rebuild the index and restart varcmp serve")
  if isinstance(error, IndexDamaged):
    return 500, str(error)
  return 400, str(error)


def _folder_name(path: str) -> str:
  return os.path.basename(os.path.normpath(path))


class Searcher:
  """The index and its run's query tower, opened once; `text(q, k, candidates)` / `audio(path, name, ...)` return
  the --json output of `varcmp search --index`, with the index named by its folder name."""

  def __init__(self, index_path: str, workdir: str | None = None,
               audio_clip_seconds: float = search_lib.VGGISH_CLIP_SECONDS):
    self.index = index_search.Index(index_path)
    self.encoder = search_lib.QueryEncoder.for_index(self.index, workdir)
    self.task = self.index.task
    self.name = _folder_name(index_path)
    self.audio_clip_seconds = audio_clip_seconds
    self.lock = threading.Lock()
    manifest = self.index.manifest
    # Where the server's files are: no answer shows these paths (hide_paths).
    self.paths = {index_path, os.path.abspath(index_path), os.path.realpath(index_path),
                  manifest["run"]["workdir"], *(s["records"] for s in manifest["sources"])}
    if workdir:
      self.paths |= {workdir, os.path.abspath(workdir)}

  def info(self) -> dict:
    manifest = self.index.manifest
    # What an audio query uploads: a file with an audio track, or a .npy of features for a `features` tower:
    # (N, audio_feature_dim) rows of audio_clip_seconds each.
    audio = self.encoder.config.model.audio
    features = self.task == "audio" and audio.kind == "features"
    audio_input = None if self.task != "audio" else "features" if features else "file"
    return {"index": self.name, "task": self.task, "audio_input": audio_input,
            "audio_feature_dim": int(audio.feature_dim) if features else None,
            "audio_clip_seconds": self.audio_clip_seconds if features else None, "videos": len(self.index),
            "run": {"name": _folder_name(manifest["run"]["workdir"]), "step": manifest["run"]["step"]},
            "levels": self.index.lambdas,
            "sources": [{"records": _folder_name(s["records"]), "split": s["split"], "videos": s["videos"]}
                        for s in manifest["sources"]]}

  def text(self, text: str, top_k: int, candidates: int | None) -> dict:
    with self.lock:
      return self._answer(text, self.encoder.text(text), top_k, candidates)

  def audio(self, path: str, name: str, top_k: int, candidates: int | None) -> dict:
    """`path`: the uploaded file; `name`: the user's name for it, the only one errors and the answer show."""
    with self.lock:
      query = self.encoder.audio_file(path, self.audio_clip_seconds, name=name)
      return self._answer(f"audio of {name}", query, top_k, candidates)

  def _answer(self, label: str, query, top_k: int, candidates: int | None) -> dict:
    answer = {"query": label, **search_lib.index_output(self.index, query, top_k, candidates), "index": self.name}
    bad = next((hit for hit in answer["hits"] if not hits_lib.finite(hit)), None)
    if bad is not None:   # the server's data (index or model) is at fault, not the request: a 500
      raise IndexDamaged(f"{bad['video']}: its scores for this query are not finite (NaN or infinity): the index or "
                         f"the model holds non-finite values (varcmp index --verify checks the index)")
    return answer

  def warm_up(self, top_k: int = 10):
    """Compiles the text tower and the search for the page's default k, so the first visitor does not wait."""
    if self.task == "text":
      self.text("warm up", top_k, search_lib.DEFAULT_CANDIDATES)


def hide_paths(text: str, paths) -> str:
  """`text` with each of the server's `paths` replaced by its last component (longest first, so a path inside
  another is named by its own folder)."""
  for path in sorted(filter(None, paths), key=len, reverse=True):
    text = text.replace(path, _folder_name(path))
  return text


def _number(name: str, value: str, low: int, high: int | None, what: str) -> int:
  """`value` as an integer in [low, high] (high None: no bound), or a 400 naming `name`. ASCII digits only:
  str.isdigit() and int() also take '²', '①', fullwidth '１' or Arabic-Indic '٣'."""
  number = int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else -1
  if number < low or (high is not None and number > high):
    raise fastapi.HTTPException(400, f"{name}={value[:40]!r}: {what}")
  return number


def _candidates(value: str | None) -> int | None:
  if value is None:
    return search_lib.DEFAULT_CANDIDATES
  if value == "all":
    return None
  return _number("candidates", value, 1, None, "a number of videos >= 1 in digits 0-9, or 'all'")


def _top_k(value: str | None) -> int:
  if value is None:
    return DEFAULT_K
  return _number("k", value, 1, MAX_K, f"the number of hits, an integer from 1 to {MAX_K} in digits 0-9")


def create_app(index_path: str, videos: str | None = None, workdir: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, warm_up: bool = True,
               audio_clip_seconds: float = search_lib.VGGISH_CLIP_SECONDS, host: str = "127.0.0.1",
               allow_hosts: tuple[str, ...] = ()) -> fastapi.FastAPI:
  """The app over the index at `index_path` (errors opening it are ValueError / OSError, one line).

  host: the address the server binds; requests must name it, a loopback name or one of `allow_hosts` in their
  Host header (ValueError for a name that is no host name), and /api/* requests from a browser must come from the
  page itself (guards.OriginCheck).
  """
  if bad := [name for name in (host, *allow_hosts) if guards.host_name(name) is None]:
    raise ValueError(f"--allow-host {bad[0]!r}: not a host name (a DNS name or an IP address, optionally :port)")
  allowed = {guards.host_name(name) for name in (host, *LOOPBACK_NAMES, *allow_hosts)}
  folder = media.VideoFolder(videos) if videos else None
  searcher = Searcher(index_path, workdir, audio_clip_seconds)
  keyframes = media.Keyframes(searcher.index, folder)
  private = searcher.paths | ({videos, os.path.abspath(videos), folder.root} if folder else set())
  if warm_up:
    searcher.warm_up()

  app = fastapi.FastAPI(title="varcmp search", docs_url=None, redoc_url=None, openapi_url=None,
                        default_response_class=FiniteJSONResponse)
  # Starlette runs the last added outermost: headers on every answer, then Host, Origin, body size.
  app.add_middleware(guards.BodyLimit, max_bytes=max_upload_bytes)
  app.add_middleware(guards.OriginCheck, allow_hosts=tuple(guards.host_and_port(name) for name in allow_hosts))
  app.add_middleware(guards.HostCheck, allowed=allowed)
  app.add_middleware(guards.ResponseHeaders)
  app.state.searcher = searcher

  def refusal(status: int, detail: str, headers=None):
    return responses.JSONResponse({"detail": hide_paths(detail, private)}, status_code=status, headers=headers)

  @app.exception_handler(StarletteHTTPException)
  async def _refused(request, error):
    return refusal(error.status_code, str(error.detail), error.headers)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, error):
    first = error.errors()[0]
    where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
    return refusal(422, f"{where}: {first.get('msg', 'invalid')}")

  @app.exception_handler(StoreError)
  @app.exception_handler(FileNotFoundError)
  @app.exception_handler(PermissionError)
  async def _index_fault(request, error):
    # A known fault of the server's index: one line to the client and one to the log, no traceback.
    status, detail = index_fault(error)
    if status >= 500:
      log.error("%s %s: %d %s", request.method, request.url.path, status, detail)
    return refusal(status, detail)

  @app.exception_handler(Exception)
  async def _crash(request, error):
    # Anything else is a bug: the client gets one line, uvicorn logs the traceback on the server's console.
    what = str(error) if isinstance(error, ValueError) else f"internal error ({type(error).__name__})"
    return refusal(500, f"{what}; see the server's log")

  @app.get("/", include_in_schema=False)
  def page():
    return responses.FileResponse(os.path.join(STATIC, "index.html"))

  app.mount("/static", staticfiles.StaticFiles(directory=STATIC), name="static")

  @app.get("/api/info")
  def info():
    return {**searcher.info(), "player": folder is not None, "keyframes": keyframes.available,
            "max_k": MAX_K, "max_upload_bytes": max_upload_bytes,
            "default_candidates": search_lib.DEFAULT_CANDIDATES}

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
    except StoreError:
      raise                   # the index's fault: _index_fault answers
    except ValueError as e:   # the query's (search.QueryError)
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
          return await run_in_threadpool(searcher.audio, file.name, name, top_k, kept)
        except StoreError:
          raise
        except ValueError as e:   # errors name the upload as `name`; the temp file's name never leaves either way
          detail = str(e).replace(file.name, name).replace(os.path.basename(file.name), name)
          raise fastapi.HTTPException(400, detail) from None

  @app.get("/api/keyframe/{row}/{slot}")
  def keyframe(row: str, slot: str):
    row_number = _number("row", row, 0, None, "a video's number in the index (a hit's 'index')")
    slot_number = _number("slot", slot, 0, None, "a snippet slot of the video, from 0")
    try:
      data = keyframes.png(row_number, slot_number)
    except LookupError as e:
      raise fastapi.HTTPException(404, str(e.args[0])) from None
    return fastapi.Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

  @app.get("/videos/{path:path}")
  def video(path: str):
    if folder is None:
      raise fastapi.HTTPException(404, "no videos folder: start the server with --videos DIR to play videos")
    try:
      file = folder.resolve(path) or folder.find(path)
    except media.OutsideFolder as e:    # 404 as for a missing file: nothing says what exists outside the folder
      raise fastapi.HTTPException(404, str(e)) from None
    if file is None:
      raise fastapi.HTTPException(404, f"{path}: no such video under the videos folder")
    return responses.FileResponse(file)   # Accept-Ranges; 206 for Range requests, so the player can seek

  return app
