"""`varcmp serve`: the API answers what `varcmp search --index --json` prints; keyframes, video ranges and bad
input (empty queries, k out of range or not ASCII digits, oversized, hostile or wrong uploads, paths out of
--videos or to files that are not media, Host headers of other sites, answers that would hold NaN); no answer
names a server path and the server logs no traceback; the page in Chromium, at desktop and phone widths.

The indexes are the tiny planted ones of tests/search_fixtures.py (a caption retrieves its own video). The text
index is served by the `varcmp serve` command itself (a subprocess on port 0, at the address it prints), the audio
index by the app in a thread (uvicorn on a free port). Half of the text records carry frames (the keyframes must be those pixels);
the others have none, so their keyframes are decoded from the videos under --videos, whose frame i is grey level
4 i (the keyframe must be the frame at the snippet's centre).
"""
import http.client
import io
import json
import logging
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np
import pytest
from PIL import Image

import browser_page
import media_fixtures
import search_fixtures
from varcmp_jax import search
from varcmp_jax.data import pipeline
from varcmp_jax.index import build as index_build
from varcmp_jax.serve import app as app_lib
from varcmp_jax.serve import main as serve_main
from varcmp_jax.serve import media

FPS = 4
MAX_UPLOAD = 1 << 20
# Six things in six colours: an untrained text tower tells them apart (captions differing in colour alone, it may not).
CAPTIONS = search_fixtures.captions(48)[::9]
LONG_NAME = "Bad.Boys.II.2003__#01.11.55_01.12.40_label_G.B2.B6_and_no_place_to_break_the_line_4.mp4"


class Site:
  """HTTP requests to a server on 127.0.0.1:port."""

  def __init__(self, port: int):
    self.port, self.url = port, f"http://127.0.0.1:{port}"

  def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict, bytes]:
    """`path` goes on the wire as given (no normalization of .. or %2e)."""
    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
    try:
      connection.request(method, path, body=body, headers=headers or {})
      response = connection.getresponse()
      return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
      connection.close()

  def json(self, path: str, method: str = "GET", **kwargs) -> tuple[int, dict]:
    status, headers, body = self.request(method, path, **kwargs)
    assert headers["content-type"].startswith("application/json"), (status, body[:200])
    return status, json.loads(body)

  def refused(self, path: str, method: str = "GET", **kwargs) -> tuple[int, str]:
    """(status, detail) of a request the server must refuse: a 4xx whose detail is one line and no traceback."""
    status, answer = self.json(path, method, **kwargs)
    detail = answer["detail"]
    assert 400 <= status < 500 and detail and "\n" not in detail and "Traceback" not in detail, (path, status, answer)
    return status, detail


class Command(Site):
  """`varcmp serve ARGV --port 0` in a subprocess, at the address it prints; its stderr (uvicorn's log) in a file."""

  def __init__(self, argv: list[str], log_path):
    self.log_path, self.log = log_path, open(log_path, "w")
    self.process = subprocess.Popen([sys.executable, "-m", "varcmp_jax.cli", "serve", *argv, "--port", "0"],
                                    stdout=subprocess.PIPE, stderr=self.log, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(self.process.stdout.readline()), daemon=True).start()
    try:
      line = lines.get(timeout=180)
    except queue.Empty:
      line = ""
    match = re.search(r"open http://127\.0\.0\.1:(\d+)/", line)
    if not match:
      self.close()
      raise AssertionError(f"varcmp serve did not start: {line!r}\n{open(log_path).read()[-3000:]}")
    super().__init__(int(match.group(1)))

  def assert_quiet_log(self):
    """Nothing the tests sent made the server log an exception."""
    log = open(self.log_path).read()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]

  def close(self):
    self.process.terminate()     # uvicorn shuts down on SIGTERM
    self.process.wait(timeout=30)
    self.log.close()


class Thread(Site):
  """uvicorn serving `app` on a free port, in a thread of this process."""

  def __init__(self, app):
    import uvicorn  # pylint: disable=g-import-not-at-top
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 30
    while not self.server.started:
      assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
      time.sleep(0.02)
    super().__init__(self.server.servers[0].sockets[0].getsockname()[1])

  def close(self):
    self.server.should_exit = True
    self.thread.join(timeout=10)


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, dict]:
  boundary = "varcmpboundary7d3"
  body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
          f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
  return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def cli_json(capsys, argv: list[str]) -> dict:
  capsys.readouterr()
  assert search.main(argv + ["--json"]) == 0
  return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def text_site(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_text")
  config = search_fixtures.tiny_config("text")
  trainer, params = search_fixtures.save_run(root / "run", config)
  records = search_fixtures.planted_text_records(trainer, params, CAPTIONS)
  records[4]["video"] = LONG_NAME     # XD-Violence's names are this long: the narrow page must wrap it
  videos = root / "videos"
  videos.mkdir()
  rng = np.random.default_rng(0)
  for g, record in enumerate(records):
    n = len(record["times"])
    if g % 2 == 0:
      record["frames"] = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    grey = np.arange(int(n * search_fixtures.SNIPPET_SECONDS * FPS)) * 4
    frames = np.broadcast_to(grey.astype(np.uint8)[:, None, None, None], (len(grey), 32, 48, 3))
    media_fixtures.write_video(videos / record["video"], np.ascontiguousarray(frames), FPS)
  records_dir = search_fixtures.write_records(root / "records", records)
  index = str(root / "index")
  assert index_build.main(["--workdir", str(root / "run"), "--records", records_dir, "--out", index,
                           "--shard-size", "3"]) == 0
  (root / "secret.txt").write_text("not for the page")
  os.symlink(root / "secret.txt", videos / "escape.mp4")
  os.symlink(videos / "video_1.mp4", videos / "alias.mp4")
  # Files the page must not serve: not media, inside the folder; media in a sibling folder named like it.
  (videos / "captions.csv").write_text("video,caption\nvideo_1.mp4,not for the page\n")
  os.symlink(videos / "captions.csv", videos / "captions.mp4")
  (root / "videos_private").mkdir()
  (root / "videos_private" / "secret.mp4").write_text("not for the page")
  os.symlink(root / "videos_private" / "secret.mp4", videos / "leak.mp4")
  server = Command(["--index", index, "--videos", str(videos), "--max-upload-mb", str(MAX_UPLOAD / 2**20),
                    "--allow-host", "search.example.org"], root / "serve.log")
  yield {"server": server, "index": index, "records": records, "videos": videos, "root": root}
  server.close()


# --- the API is `varcmp search --index --json` ---------------------------------------------------------


def test_text_search_answers_what_the_cli_prints(text_site, capsys):
  server, index = text_site["server"], text_site["index"]
  for query, k, candidates in [(CAPTIONS[2], 3, None), ("a yellow thing near the door", 8, "all"),
                               (CAPTIONS[5], 5, "2")]:
    path = f"/api/search?q={urllib.parse.quote(query)}&k={k}" + (f"&candidates={candidates}" if candidates else "")
    status, answer = server.json(path)
    assert status == 200, answer
    argv = ["--index", index, "--text", query, "--top-k", str(k)] + (["--candidates", candidates] if candidates else [])
    # The same, but the index is named by its folder, not by its path on the server.
    assert answer == {**cli_json(capsys, argv), "index": "index"}
    assert len(answer["hits"]) == min(k, len(CAPTIONS))
  # Planted: a caption retrieves its own video, with a key segment.
  status, answer = server.json(f"/api/search?q={urllib.parse.quote(CAPTIONS[2])}")
  assert len(answer["hits"]) == 5 and answer["hits"][0]["video"] == "video_2.mp4"
  assert answer["hits"][0]["segments"]


@pytest.mark.parametrize("path, status, words", [
    ("/api/search", 400, "empty"),
    ("/api/search?q=%20%20", 400, "empty"),
    ("/api/search?q=car&k=0", 400, "k="),
    ("/api/search?q=car&k=101", 400, "k="),
    ("/api/search?q=car&k=ten", 400, "k="),
    ("/api/search?q=car&k=-3", 400, "k="),
    ("/api/search?q=car&candidates=0", 400, "candidates"),
    ("/api/search?q=" + "a" * 1001, 400, "characters"),
    # Numbers are ASCII digits: str.isdigit() takes the rest, and int() some of it.
    ("/api/search?q=car&k=%C2%B2", 400, "k='²'"),                    # superscript two
    ("/api/search?q=car&candidates=%E2%91%A0", 400, "candidates='①'"),   # circled one
    ("/api/search?q=car&k=%EF%BC%95", 400, "k='５'"),                 # fullwidth five
    ("/api/search?q=car&k=%D9%A3", 400, "k="),                       # Arabic-Indic three
    ("/api/search?q=car&candidates=%DB%B5%DB%B0", 400, "candidates"),  # Extended Arabic-Indic 50
    ("/api/search?q=car&k=%2B5", 400, "k='+5'"),
    ("/api/search?q=car&k=+5", 400, "k=' 5'"),                       # '+' is a space in a query string
    ("/api/search?q=car&k=5.0", 400, "k="),
    ("/api/search?q=car&k=1_0", 400, "k="),
    ("/api/search?q=car&candidates=" + "9" * 5000, 400, "candidates"),  # past int()'s 4300-digit limit
    ("/api/keyframe/999/0", 404, "no video 999"),
    ("/api/keyframe/0/99", 404, "no snippet 99"),
    ("/api/keyframe/x/0", 400, "row="),
    ("/api/keyframe/-1/0", 400, "row="),
    ("/api/keyframe/%EF%BC%90/0", 400, "row="),                       # fullwidth zero
    ("/api/keyframe/0/%C2%B9", 400, "slot="),                          # superscript one
])
def test_bad_queries_get_a_4xx_with_a_message(text_site, path, status, words):
  server = text_site["server"]
  got, detail = server.refused(path)
  assert got == status and words in detail, detail
  server.assert_quiet_log()


def test_a_padded_snippet_slot_has_no_keyframe(text_site):
  # video_0 stores 5 snippets; the batches hold 8, so slots 5-7 are padding.
  server, records = text_site["server"], text_site["records"]
  assert len(records[0]["times"]) == 5 and search_fixtures.tiny_config().data.snippets == 8
  assert server.request("GET", "/api/keyframe/0/4")[0] == 200
  for slot in (5, 7):
    status, detail = server.refused(f"/api/keyframe/0/{slot}")
    assert status == 404 and f"no snippet {slot}" in detail


def test_uploads_to_a_text_model_and_oversized_uploads_are_refused(text_site):
  server = text_site["server"]
  body, headers = multipart("audio", "clip.wav", b"RIFF" + bytes(1000))
  status, answer = server.json("/api/search", "POST", body=body, headers=headers)
  assert status == 400 and "text model" in answer["detail"]
  body, headers = multipart("audio", "big.wav", bytes(MAX_UPLOAD + 1))
  status, answer = server.json("/api/search", "POST", body=body, headers=headers)
  assert status == 413 and "larger than" in answer["detail"]
  server.assert_quiet_log()


@pytest.mark.parametrize("length", [str(10**12), "9" * 30])
def test_an_upload_is_refused_by_its_length_before_any_of_it_is_sent(text_site, length):
  # Only the headers go out: a server that waited for (or read) the body would time out here.
  connection = http.client.HTTPConnection("127.0.0.1", text_site["server"].port, timeout=10)
  try:
    connection.putrequest("POST", "/api/search")
    connection.putheader("Content-Type", "multipart/form-data; boundary=x")
    connection.putheader("Content-Length", length)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status in (400, 413), response.status    # h11 itself refuses a Content-Length past 20 digits
    if response.status == 413:
      assert "larger than" in json.loads(response.read())["detail"]
  finally:
    connection.close()
  text_site["server"].assert_quiet_log()


# --- keyframes and videos ------------------------------------------------------------------------------


def test_keyframes_are_the_records_frames_or_the_videos_frames(text_site):
  server, records = text_site["server"], text_site["records"]
  snippets = search_fixtures.tiny_config().data.snippets
  for g in (0, 1, 2, 5):
    record = records[g]
    n = len(record["times"])
    for slot in (0, min(n, snippets) - 1):
      status, headers, body = server.request("GET", f"/api/keyframe/{g}/{slot}")
      assert status == 200 and headers["content-type"] == "image/png"
      image = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
      snippet = pipeline.snippet_indices(n, snippets)[slot]
      if "frames" in record:
        np.testing.assert_array_equal(image, record["frames"][snippet])
      else:   # the last frame at or before the snippet's centre: grey 4 i
        centre = record["times"][snippet].mean()
        assert image.shape == (32, 48, 3)
        assert abs(image.mean() - 4 * int(np.floor(centre * FPS + 1e-6))) < 1.5, (g, slot, image.mean())


def test_keyframes_without_frames_or_videos_say_why(text_site):
  from varcmp_jax.index import search as index_search
  index = index_search.Index(text_site["index"])
  keyframes = media.Keyframes(index, None)
  assert keyframes.png(0, 0)[:8] == b"\x89PNG\r\n\x1a\n"         # frames in the record
  with pytest.raises(LookupError, match="--videos"):
    keyframes.png(1, 0)
  index.manifest["sources"][0]["fingerprint"] = "0" * 64          # as if the records were rewritten since
  with pytest.raises(LookupError, match="video_0.mp4.*--videos"):
    media.Keyframes(index, None).png(0, 0)


def test_videos_are_served_with_ranges_and_only_from_the_folder(text_site):
  server, videos = text_site["server"], text_site["videos"]
  data = (videos / "video_1.mp4").read_bytes()
  status, headers, body = server.request("GET", "/videos/video_1.mp4")
  assert status == 200 and body == data and headers["accept-ranges"] == "bytes"
  status, headers, body = server.request("GET", "/videos/video_1.mp4", headers={"Range": "bytes=100-199"})
  assert status == 206 and body == data[100:200] and headers["content-range"] == f"bytes 100-199/{len(data)}"
  status, headers, body = server.request("GET", "/videos/video_1.mp4", headers={"Range": f"bytes={len(data) - 50}-"})
  assert status == 206 and body == data[-50:]
  status, _, _ = server.request("GET", "/videos/video_1.mp4", headers={"Range": f"bytes={len(data) + 10}-"})
  assert status == 416
  status, _, body = server.request("GET", "/videos/alias.mp4")     # a symlink inside the folder
  assert status == 200 and body == data
  secret = b"not for the page"
  for path in ["/videos/../secret.txt", "/videos/%2e%2e/secret.txt", "/videos/..%2fsecret.txt",
               "/videos/%2E%2E%2Fsecret.txt", "/videos/video_1.mp4/../../secret.txt", "/videos/escape.mp4",
               "/videos//etc/passwd", "/videos/%2Fetc%2Fpasswd", "/videos/%00", "/videos/missing.mp4",
               # not media, though inside the folder (directly, or behind a media name)
               "/videos/captions.csv", "/videos/captions.mp4", "/videos/captions",
               # a sibling folder whose name starts with the folder's name
               "/videos/../videos_private/secret.mp4", "/videos/%2e%2e/videos_private/secret.mp4",
               "/videos/..%2Fvideos_private%2Fsecret.mp4", "/videos/leak.mp4"]:
    status, headers, body = server.request("GET", path)
    assert status == 404 and secret not in body and b"root:" not in body, (path, status, body[:200])
    assert json.loads(body)["detail"], path
  for path in ["/static/../app.py", "/static/%2e%2e/app.py"]:
    status, headers, body = server.request("GET", path)
    assert 400 <= status < 500 and b"import" not in body, (path, status)
  server.assert_quiet_log()


# --- Host headers (DNS rebinding), server paths, non-finite answers -----------------------------------


@pytest.mark.parametrize("header, name", [
    ("localhost", "localhost"), ("LocalHost:8000", "localhost"), ("127.0.0.1:80", "127.0.0.1"),
    ("[::1]:8000", "::1"), ("::1", "::1"), ("[::1]", "::1"), ("Search.Example.org.", "search.example.org."),
    ("evil.example.com:8000", "evil.example.com"), ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("", None), ("localhost:80:80", None), ("localhost:", None), ("[::1]x", None), ("evil.com@127.0.0.1", None),
    ("127.0.0.1/x", None), ("local host", None), ("ⅼocalhost", None), ("localhost:123456", None),
])
def test_host_name_of_a_host_header(header, name):
  assert app_lib.host_name(header) == name


def test_requests_naming_another_host_are_refused(text_site):
  server = text_site["server"]
  port = server.port
  for host in ["evil.example.com", f"evil.example.com:{port}", "127.0.0.1.evil.example.com", "localhost.evil.com",
               "search.example.org.evil.com", "evil.com@127.0.0.1", "[::1]x", "ⅼocalhost".encode(), "0.0.0.0"]:
    for path in ["/", "/api/info", "/api/search?q=car", "/api/keyframe/0/0", "/videos/video_1.mp4",
                 "/static/app.js"]:
      status, detail = server.refused(path, headers={"Host": host})
      assert status == 400 and "--allow-host" in detail, (host, path, detail)
  for host in ["127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", "[::1]", f"[::1]:{port}",
               "search.example.org", "Search.Example.ORG:443"]:         # the last two: --allow-host
    assert server.request("GET", "/api/info", headers={"Host": host})[0] == 200, host
  # Without a Host header, or with two: refused too (by h11 or by the app).
  for hosts in ([], ["127.0.0.1", "evil.example.com"]):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
      connection.putrequest("GET", "/api/info", skip_host=True)
      for host in hosts:
        connection.putheader("Host", host)
      connection.endheaders()
      assert connection.getresponse().status == 400, hosts
    finally:
      connection.close()
  server.assert_quiet_log()


def test_allow_host_must_be_a_host_name(text_site):
  with pytest.raises(SystemExit, match="--allow-host 'a b': not a host name"):
    serve_main.main(["--index", text_site["index"], "--port", "0", "--allow-host", "a b"])


def test_answers_name_no_server_path(text_site):
  server, root = text_site["server"], text_site["root"]
  status, info = server.json("/api/info")
  assert status == 200
  assert (info["index"], info["run"], info["sources"]) == ("index", {"name": "run", "step": 1},
                                                          [{"records": "records", "split": "test", "videos": 6}])
  bodies = [json.dumps(info), server.request("GET", "/api/search?q=a+red+car")[2].decode()]
  # A keyframe from a video FFmpeg cannot read: its error quotes the path, the page gets the folder's name only.
  video = text_site["videos"] / "video_3.mp4"
  data = video.read_bytes()
  try:
    video.write_bytes(b"not a video" * 100)
    status, detail = server.refused("/api/keyframe/3/2")
    assert status == 404 and "video_3.mp4" in detail, detail
    bodies.append(detail)
  finally:
    video.write_bytes(data)
  bodies += [server.refused(path)[1] for path in ["/videos/../secret.txt", "/videos/missing.mp4", "/api/keyframe/1/9"]]
  for body in bodies:
    assert str(root) not in body and os.path.realpath(root) not in body and tempfile.gettempdir() not in body, body


@pytest.fixture(scope="module")
def text_app(text_site):
  """The text index's app in this process, for tests that replace its searcher's parts; as if bound to 192.0.2.7
  (uvicorn listens on 127.0.0.1 here, but the app takes 192.0.2.7 for its address)."""
  app = app_lib.create_app(text_site["index"], warm_up=False, host="192.0.2.7")
  server = Thread(app)
  yield app, server
  server.close()


def test_the_bound_address_is_a_host_too(text_app):
  _, server = text_app
  for host, status in [("192.0.2.7", 200), ("192.0.2.7:8000", 200), ("localhost", 200), ("192.0.2.8", 400),
                       ("search.example.org", 400)]:        # --allow-host of the other server, not this one
    assert server.request("GET", "/api/info", headers={"Host": host})[0] == status, host


def errors_logged(caplog) -> list[str]:
  return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def test_non_finite_scores_are_refused_not_a_500(text_app, monkeypatch, caplog):
  app, server = text_app
  searcher = app.state.searcher
  real_search = searcher.index.search

  def nan_scores(*args, **kwargs):      # as an index holding a NaN row would score it
    hits = real_search(*args, **kwargs)
    hits[1]["levels"][next(iter(hits[1]["levels"]))] = float("nan")
    return hits

  monkeypatch.setattr(searcher.index, "search", nan_scores)
  status, detail = server.refused(f"/api/search?q={urllib.parse.quote(CAPTIONS[1])}")
  assert status == 400 and "not finite" in detail
  # The last guard: whatever the searcher answers, no NaN or infinity reaches the wire.
  for value in (float("nan"), float("inf"), -float("inf")):
    monkeypatch.setattr(searcher, "text", lambda *args, value=value: {"query": "q", "hits": [{"score": value}]})
    status, detail = server.refused("/api/search?q=a+car")
    assert status == 400 and "not finite" in detail, detail
  assert not errors_logged(caplog)


# --- audio: POST an audio file -------------------------------------------------------------------------


def test_audio_upload_answers_what_the_cli_prints(tmp_path, capsys, monkeypatch, caplog):
  config = search_fixtures.tiny_config("audio")
  search_fixtures.save_run(tmp_path / "run", config)
  records_dir = search_fixtures.write_records(tmp_path / "records", search_fixtures.random_audio_records(config, 6))
  index = str(tmp_path / "index")
  assert index_build.main(["--workdir", str(tmp_path / "run"), "--records", records_dir, "--out", index]) == 0
  monkeypatch.chdir(tmp_path)
  media_fixtures.level_video("query.mp4", seconds=3.0)
  server = Thread(app_lib.create_app(index, None, max_upload_bytes=MAX_UPLOAD))
  try:
    body, headers = multipart("audio", "query.mp4", open("query.mp4", "rb").read())
    status, answer = server.json("/api/search?k=4&candidates=all", "POST", body=body, headers=headers)
    assert status == 200, answer
    cli = cli_json(capsys, ["--index", index, "--audio", "query.mp4", "--top-k", "4", "--candidates", "all"])
    assert answer == {**cli, "index": "index"}
    assert answer["query"] == "audio of query.mp4" and len(answer["hits"]) == 4
    for data, words in [(b"", "empty"), (b"not audio at all" * 64, "query.mp4")]:
      body, headers = multipart("audio", "query.mp4", data)
      status, detail = server.refused("/api/search", "POST", body=body, headers=headers)
      assert status == 400 and words in detail and "tmp" not in detail, detail
    body, headers = multipart("audio", "big.wav", bytes(MAX_UPLOAD + 1))
    for chunked in (False, True):   # http.client sends an iterable chunked, without Content-Length
      status, answer = server.json("/api/search", "POST", body=iter([body]) if chunked else body, headers=headers)
      assert status == 413 and "larger than" in answer["detail"], answer
    status, answer = server.json("/api/search", "POST", body=b"x=1", headers={"Content-Type": "text/plain"})
    assert status == 400 and "multipart" in answer["detail"]
    status, answer = server.json("/api/search?q=a+dog+barks")
    assert status == 400 and "audio model" in answer["detail"]
  finally:
    server.close()
  assert not errors_logged(caplog)


def npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def test_feature_array_upload_for_a_model_on_audio_features(tmp_path, capsys, monkeypatch, caplog):
  config = search_fixtures.tiny_config("audio")
  config.model.audio.update(kind="features", feature_dim=12)      # e.g. VGGish (128) in the XD-Violence release
  search_fixtures.save_run(tmp_path / "run", config)
  records_dir = search_fixtures.write_records(tmp_path / "records", search_fixtures.random_audio_records(config, 6))
  index = str(tmp_path / "index")
  assert index_build.main(["--workdir", str(tmp_path / "run"), "--records", records_dir, "--out", index]) == 0
  monkeypatch.chdir(tmp_path)
  np.save("query__vggish.npy", np.random.default_rng(1).standard_normal((20, 12)).astype(np.float32))
  server = Thread(app_lib.create_app(index, None, max_upload_bytes=MAX_UPLOAD, audio_clip_seconds=0.5))
  try:
    assert server.json("/api/info")[1]["audio_input"] == "features"
    body, headers = multipart("audio", "query__vggish.npy", open("query__vggish.npy", "rb").read())
    status, answer = server.json("/api/search?k=4&candidates=all", "POST", body=body, headers=headers)
    assert status == 200, answer
    cli = cli_json(capsys, ["--index", index, "--audio", "query__vggish.npy", "--audio-clip-seconds", "0.5",
                            "--top-k", "4", "--candidates", "all"])
    assert answer == {**cli, "index": "index"}
    body, headers = multipart("audio", "clip.wav", b"RIFF" + bytes(1000))
    status, detail = server.refused("/api/search", "POST", body=body, headers=headers)
    assert status == 400 and ".npy array" in detail and "clip.wav" in detail, detail
    # Hostile arrays: each refused in one line that names the upload by the user's name, never the temp file.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 12)})
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for data, words in [(np.random.default_rng(2).bytes(4000), "not a .npy"),
                        (header.getvalue() + bytes(1024), "header says shape (1000000000000, 12)"),
                        (npy_bytes(np.full((20, 12), 1e38, np.float32)), "out of range"),
                        (npy_bytes(np.full((20, 12), np.nan, np.float32)), "non-finite"),
                        (pickled.getvalue(), "Python objects"),
                        (npy_bytes(np.zeros((20, 7), np.float32)), "7-d audio features")]:
      body, headers = multipart("audio", "query__vggish.npy", data)
      status, detail = server.refused("/api/search", "POST", body=body, headers=headers)
      assert status == 400 and words in detail and "query__vggish.npy" in detail, detail
      assert "tmp" not in detail and "allow_pickle" not in detail, detail
  finally:
    server.close()
  assert not errors_logged(caplog)


# --- the page in a real browser ------------------------------------------------------------------------


def test_page_in_chromium_finds_the_video_and_shows_its_keyframe(text_site):
  if browser_page.chromium_paths() is None:
    pytest.skip("no chromium + chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
  pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e '.[test]'")
  server = text_site["server"]
  with browser_page.chromium() as driver:
    hits = browser_page.search(driver, server.url, CAPTIONS[2])
    _, answer = server.json(f"/api/search?q={urllib.parse.quote(CAPTIONS[2])}&k=10")
    assert [h["name"] for h in hits] == [h["video"] for h in answer["hits"]]
    assert hits[0]["name"] == "video_2.mp4"
    assert all(h["thumbnail_width"] > 0 for h in hits), hits
    # Offline: everything the page loaded came from the server; no script errors.
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(server.url + "/") for url in loaded), loaded
    assert not [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    # A key segment starts the player there: the video is fetched by range requests and seeks.
    segment = answer["hits"][0]["segments"][0]
    driver.find_element("css selector", "#hits li.hit .segments button").click()
    from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "const v = document.getElementById('video'); return v.readyState >= 1 && !v.seeking && v.currentTime > 0"))
    current = driver.execute_script("return document.getElementById('video').currentTime")
    assert segment["start"] - 0.3 <= current <= segment["end"] + 1.0, (current, segment)
    # The thumbnails sit under their times on the chart, wide and at a phone's width, where nothing overflows.
    check_strips_under_their_times(browser_page.layout(driver), answer["hits"])
    driver.set_window_size(420, 900)
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return window.innerWidth") <= 420)
    page = browser_page.layout(driver)
    assert page["scroll_width"] <= page["inner_width"] <= 420, page
    check_strips_under_their_times(page, answer["hits"])


def check_strips_under_their_times(page: dict, hits: list[dict], px: float = 2.0):
  """Each hit's thumbnails, on its chart's time scale (x = axis left + t / duration x axis width): in time order,
  not overlapping, together spanning the snippets' times, each from one snippet's start to one snippet's end (within
  `px`), its keyframe's snippet under it."""
  assert [h["name"] for h in page["hits"]] == [h["video"] for h in hits]
  for shown, hit in zip(page["hits"], hits):
    (x0, x1), thumbnails = shown["axis"], shown["thumbnails"]
    x = lambda t: x0 + t / hit["duration"] * (x1 - x0)
    starts, ends = [x(t0) for t0, _ in hit["snippet_times"]], [x(t1) for _, t1 in hit["snippet_times"]]
    assert thumbnails and x1 - x0 > 100, shown
    assert abs(thumbnails[0]["left"] - starts[0]) <= px and abs(thumbnails[-1]["right"] - ends[-1]) <= px, shown
    for before, after in zip(thumbnails, thumbnails[1:]):
      assert before["right"] <= after["left"] + px, shown
    for thumbnail in thumbnails:
      assert min(abs(thumbnail["left"] - s) for s in starts) <= px, (thumbnail, starts)
      assert min(abs(thumbnail["right"] - e) for e in ends) <= px, (thumbnail, ends)
      t0, t1 = hit["snippet_times"][thumbnail["slot"]]
      assert thumbnail["left"] - px <= x((t0 + t1) / 2) <= thumbnail["right"] + px, (thumbnail, t0, t1)
