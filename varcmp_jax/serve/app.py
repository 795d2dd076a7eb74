"""The search page's web app (FastAPI): the page, the search API, keyframes and the videos.

  GET  /                          the page (static/index.html, app.js, style.css; no external resources)
  GET  /api/info                  what the index holds: task, videos, run, levels, whether videos can be played
  GET  /api/search?q=...&k=5      a text query: what `varcmp search --index INDEX --text q --json` prints
  POST /api/search?k=5            an audio query (multipart field `audio`): what `... --audio FILE --json` prints
  GET  /api/keyframe/{row}/{slot} PNG keyframe of a hit (`index` in the hit) at a snippet slot
  GET  /videos/{path}             a media file under --videos, with HTTP range requests (Starlette's FileResponse)

The model and the index are opened once (create_app); a query is one query-tower call and the index search, one
query at a time (each uses every core). Bad input is a 4xx with a one-line JSON {"detail": message}, never a
traceback. Safety (SPEC 4b): a request whose Host header is not the bound address, a loopback name or an
--allow-host name is refused, so a web page the user opens cannot reach the server by DNS rebinding; only media
files inside --videos are served; answers name the index, its run and records by their folder names and files by
the user's names, never by server paths; a request body is bounded before it is read; numeric parameters are
ASCII digits; NaN and infinity never reach an answer.
"""
import os
import re
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
from varcmp_jax.serve import media

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DEFAULT_K = 5       # varcmp search --top-k
MAX_K = 100
MAX_QUERY_CHARS = 1000
DEFAULT_MAX_UPLOAD_BYTES = 50 << 20
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# A Host header: a DNS name or IPv4 address, or an IPv6 address in brackets, then an optional port. ASCII only.
HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?", re.IGNORECASE | re.ASCII)
NON_FINITE = ("the answer holds a number that is not finite (NaN or infinity), which the API never sends: the "
              "index or the model holds non-finite values (varcmp index --verify checks the index)")


def host_name(value: str) -> str | None:
  """The lower-case host of a Host header or an address ('Example.org:8000' -> 'example.org', '[::1]:80' and
  '::1' -> '::1'), or None when it is not one."""
  if value.count(":") > 1 and not value.startswith("["):
    value = f"[{value}]"      # a bare IPv6 address, as --host and --allow-host take it
  match = HOST.fullmatch(value)
  return match.group(1).lower().strip("[]") if match else None


class HostCheck:
  """ASGI middleware: refuses (400) a request whose Host header does not name one of `allowed` (host names as
  host_name gives them). A page on another site that rebinds its DNS name to this machine sends its own name."""

  def __init__(self, app, allowed: set[str]):
    self.app, self.allowed = app, allowed

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http":
      hosts = [value.decode("latin-1") for key, value in scope["headers"] if key == b"host"]
      if len(hosts) != 1 or host_name(hosts[0]) not in self.allowed:
        shown = repr(hosts[0][:100]) if len(hosts) == 1 else f"{len(hosts)} Host headers"
        detail = (f"Host {shown} is not an address of this server: start varcmp serve with --allow-host NAME to "
                  "serve requests that name it")
        return await responses.JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)
    return await self.app(scope, receive, send)


class BodyLimit:
  """ASGI middleware: a request body over `max_bytes` gets 413, by its Content-Length before anything is read,
  or as soon as a streamed body passes the limit."""

  def __init__(self, app, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and (not length.isdigit() or len(length) > 18 or int(length) > self.max_bytes):
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


class FiniteJSONResponse(responses.JSONResponse):
  """Starlette's JSONResponse, but an answer holding NaN or infinity (JSON has neither) is refused with a one-line
  400 rather than a 500: the last guard, behind the searcher's own check."""

  def render(self, content) -> bytes:
    try:
      return super().render(content)
    except ValueError:   # json.dumps(allow_nan=False): "Out of range float values are not JSON compliant"
      raise fastapi.HTTPException(400, NON_FINITE) from None


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
    # What an audio query uploads: a file with an audio track, or a .npy of features for a `features` tower.
    audio_input = (None if self.task != "audio" else
                   "features" if self.encoder.config.model.audio.kind == "features" else "file")
    return {"index": self.name, "task": self.task, "audio_input": audio_input, "videos": len(self.index),
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
    if bad is not None:
      raise ValueError(f"{bad['video']}: its scores for this query are not finite (NaN or infinity): the index or "
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
  """The app over the index at `index_path` (errors opening it are ValueError / FileNotFoundError, one line).

  host: the address the server binds; requests must name it, a loopback name or one of `allow_hosts` in their
  Host header (ValueError for a name that is no host name).
  """
  if bad := [name for name in (host, *allow_hosts) if host_name(name) is None]:
    raise ValueError(f"--allow-host {bad[0]!r}: not a host name (a DNS name or an IP address, optionally :port)")
  allowed = {host_name(name) for name in (host, *LOOPBACK_NAMES, *allow_hosts)}
  folder = media.VideoFolder(videos) if videos else None
  searcher = Searcher(index_path, workdir, audio_clip_seconds)
  keyframes = media.Keyframes(searcher.index, folder)
  private = searcher.paths | ({videos, os.path.abspath(videos), folder.root} if folder else set())
  if warm_up:
    searcher.warm_up()

  app = fastapi.FastAPI(title="varcmp search", docs_url=None, redoc_url=None, openapi_url=None,
                        default_response_class=FiniteJSONResponse)
  app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
  app.add_middleware(HostCheck, allowed=allowed)     # the outermost: a refused Host reaches nothing else
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

  @app.exception_handler(Exception)
  async def _crash(request, error):
    # The client gets one line (our ValueErrors, e.g. a damaged index, say what is wrong); uvicorn logs the
    # traceback on the server's console.
    what = str(error) if isinstance(error, ValueError) else f"internal error ({type(error).__name__})"
    return refusal(500, f"{what}; see the server's log")

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
          return await run_in_threadpool(searcher.audio, file.name, name, top_k, kept)
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
