"""`varcmp serve`: the API answers what `varcmp search --index --json` prints; keyframes, video ranges and bad
input (empty queries, k out of range or not ASCII digits, oversized, hostile or wrong uploads, paths out of
--videos or to files that are not media, Host headers of other sites, requests from other origins, answers that
would hold NaN); the server's own faults (a deleted, unreadable or damaged index file) as 503/500 in one line; no
answer names a server path and the server logs no traceback; the page in Chromium, at desktop and phone widths,
with its y scales, without keyframes, and for an audio model (its hint, a failed upload).

The indexes are the tiny planted ones of tests/search_fixtures.py (a caption retrieves its own video). The text
index is served by the `varcmp serve` command itself (a subprocess on port 0, at the address it prints), the audio
index by the app in a thread (uvicorn on a free port). Half of the text records carry frames (the keyframes must be
those pixels); the others have none, so their keyframes are decoded from the videos under --videos, whose frame i
is grey level 4 i (the keyframe must be the frame at the snippet's centre).
"""
import errno
import http.client
import io
import json
import logging
import os
import queue
import re
import shutil
import socket
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
from varcmp_jax.index.errors import IndexDamaged, IndexUnreadable, StoreError
from varcmp_jax.serve import app as app_lib
from varcmp_jax.serve import guards
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
  assert keyframes.available                                        # the first record holds frames
  assert keyframes.png(0, 0)[:8] == b"\x89PNG\r\n\x1a\n"         # frames in the record
  with pytest.raises(LookupError, match="--videos"):
    keyframes.png(1, 0)
  index.manifest["sources"][0]["fingerprint"] = "0" * 64          # as if the records were rewritten since
  assert not media.Keyframes(index, None).available                 # so the page asks for none
  assert media.Keyframes(index, media.VideoFolder(str(text_site["videos"]))).available
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
  assert guards.host_name(header) == name


def test_requests_naming_another_host_are_refused(text_site):
  server = text_site["server"]
  port = server.port
  for host in ["evil.example.com", f"evil.example.com:{port}", "127.0.0.1.evil.example.com", "localhost.evil.com",
               "search.example.org.evil.com", "evil.com@127.0.0.1", "[::1]x", "ⅼocalhost".encode(), "0.0.0.0",
               # names that end with an allowed one: another site's subdomain, or a name that merely ends alike
               "x.search.example.org", "evil-search.example.org", "evil-localhost", f"evil-localhost:{port}",
               "evil127.0.0.1", "x.localhost"]:
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


def raw_http(port: int, request: bytes) -> tuple[int, bytes]:
  """(status, body) of `request` sent as is (http.client cannot speak HTTP/1.0)."""
  with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
    connection.sendall(request)
    data = b""
    while chunk := connection.recv(65536):
      data += chunk
  head, _, body = data.partition(b"\r\n\r\n")
  return int(head.split()[1]), body


def test_an_http_1_0_request_without_a_host_header_is_told_so(text_site):
  # HTTP/1.0 allows no Host header (h11 passes it on): the refusal says what is missing, in one line.
  server = text_site["server"]
  status, body = raw_http(server.port, b"GET /api/info HTTP/1.0\r\n\r\n")
  detail = json.loads(body)["detail"]
  assert status == 400 and "no Host header" in detail and "\n" not in detail, detail
  status, body = raw_http(server.port, f"GET /api/info HTTP/1.0\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
  assert status == 200 and json.loads(body)["index"] == "index"
  server.assert_quiet_log()


# --- cross-origin requests -----------------------------------------------------------------------------


def multipart_upload() -> tuple[bytes, dict]:
  return multipart("audio", "clip.wav", b"RIFF" + bytes(1000))


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example.com"},
    {"Origin": "null"},                                   # a sandboxed frame, a file:// page, a data: URL
    {"Origin": "http://127.0.0.1:1"},                     # another server on this machine: another port
    {"Origin": "https://127.0.0.1"},                      # the same host, the default port
    {"Origin": "http://127.0.0.1:{port}.evil.example.com"},
    {"Origin": "http://evil@127.0.0.1:{port}"},           # no browser sends a user: not an origin
    {"Origin": "http://127.0.0.1:{port}/"},
    {"Origin": "http://x.search.example.org"},            # a subdomain of the --allow-host name
    {"Sec-Fetch-Site": "cross-site"},                     # <img src>, <script src>, no-cors fetch, a link
    {"Sec-Fetch-Site": "same-site"},                      # e.g. another port of localhost
    {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "cross-site"},
])
def test_api_requests_from_another_origin_are_refused(text_site, headers):
  server = text_site["server"]
  headers = {key: value.format(port=server.port) for key, value in headers.items()}
  body, form = multipart_upload()
  for method, path, extra in [("GET", f"/api/search?q={urllib.parse.quote(CAPTIONS[2])}", {}),
                              ("GET", "/api/info", {}), ("GET", "/api/keyframe/0/0", {}),
                              ("POST", "/api/search", {"body": body})]:
    status, detail = server.refused(path, method, headers={**headers, **(form if method == "POST" else {})}, **extra)
    assert status == 403 and "cross-origin request refused" in detail, (method, path, headers, detail)
  server.assert_quiet_log()


def test_a_cross_origin_upload_is_refused_before_its_body_is_read(text_site):
  # A form post from another site: 403 on its headers alone (a server that read the body would time out here).
  connection = http.client.HTTPConnection("127.0.0.1", text_site["server"].port, timeout=10)
  try:
    connection.putrequest("POST", "/api/search")
    for key, value in [("Origin", "http://evil.example.com"), ("Content-Type", "multipart/form-data; boundary=x"),
                       ("Content-Length", str(MAX_UPLOAD // 2))]:
      connection.putheader(key, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 403 and "cross-origin" in json.loads(response.read())["detail"]
  finally:
    connection.close()


@pytest.mark.parametrize("headers", [
    {},                                                   # curl, scripts: no Origin, no Sec-Fetch-Site
    {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},    # the page itself
    {"Origin": "http://LOCALHOST:{port}", "Host": "localhost:{port}"},         # the page, opened as localhost
    {"Origin": "http://[::1]:{port}", "Host": "[::1]:{port}"},
    {"Sec-Fetch-Site": "none"},                           # typed into the address bar, a bookmark
    {"Origin": "https://search.example.org", "Host": "search.example.org"},    # behind a proxy (--allow-host)
    {"Origin": "https://search.example.org:8443", "Host": "search.example.org"},   # a proxy that drops the port
])
def test_api_requests_from_the_page_itself_pass(text_site, headers):
  server = text_site["server"]
  headers = {key: value.format(port=server.port) for key, value in headers.items()}
  status, answer = server.json(f"/api/search?q={urllib.parse.quote(CAPTIONS[2])}&k=2", headers=headers)
  assert status == 200 and answer["hits"][0]["video"] == "video_2.mp4", answer
  body, form = multipart_upload()     # a POST too: refused for the text model, not for its origin
  status, answer = server.json("/api/search", "POST", body=body, headers={**headers, **form})
  assert status == 400 and "text model" in answer["detail"]


def origin_refusal(headers: dict, allow_hosts=(), path: str = "/api/search") -> str | None:
  scope = {"type": "http", "path": path,
           "headers": [(key.lower().encode(), value.encode("latin-1")) for key, value in headers.items()]}
  return guards.OriginCheck(None, allow_hosts).refusal(scope)


@pytest.mark.parametrize("headers, allow_hosts, passes", [
    ({"Host": "localhost", "Origin": "http://localhost"}, (), True),          # port 80 on both sides
    ({"Host": "localhost", "Origin": "http://localhost:80"}, (), True),
    ({"Host": "localhost", "Origin": "http://localhost:9000"}, (), False),    # another local server
    ({"Host": "localhost:8000", "Origin": "http://localhost"}, (), False),
    ({"Host": "search.lan", "Origin": "https://search.lan"}, (), True),        # a TLS proxy passing the Host on
    ({"Host": "127.0.0.1:8000", "Origin": "https://search.lan:8443"}, (("search.lan", 8443),), True),
    ({"Host": "127.0.0.1:8000", "Origin": "https://search.lan:9000"}, (("search.lan", 8443),), False),
    ({"Host": "127.0.0.1:8000", "Origin": "https://search.lan:9000"}, (("search.lan", None),), True),
    ({"Host": "127.0.0.1:8000", "Origin": "https://x.search.lan"}, (("search.lan", None),), False),
    ({"Host": "127.0.0.1:8000", "Origin": "ftp://127.0.0.1:8000"}, (), False),
    ({"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "Same-Origin"}, (), True),
])
def test_the_pages_own_origin(headers, allow_hosts, passes):
  assert (origin_refusal(headers, allow_hosts) is None) == passes


def test_every_answer_carries_cross_origin_resource_policy(text_site):
  # A page on another site cannot embed the videos or keyframes (<video>, <img>) nor read an answer: the browser
  # drops a no-cors response marked same-origin. Refusals carry it too. Only /api/* checks the Origin: the page
  # and the videos answer a link from anywhere, and CORP keeps other pages from embedding them.
  server = text_site["server"]
  hostile = {"Origin": "http://evil.example.com", "Sec-Fetch-Site": "cross-site"}
  for path, status in [("/videos/video_1.mp4", 200), ("/api/keyframe/0/0", 200), ("/api/info", 200), ("/", 200),
                       ("/static/app.js", 200), ("/videos/missing.mp4", 404), ("/api/keyframe/999/0", 404)]:
    got, headers, _ = server.request("GET", path, headers={} if path.startswith("/api/") else hostile)
    assert got == status, path
    assert headers["cross-origin-resource-policy"] == "same-origin", (path, headers)
    assert headers["x-content-type-options"] == "nosniff", path
  got, headers, _ = server.request("GET", "/api/info", headers={"Host": "evil.example.com"})
  assert got == 400 and headers["cross-origin-resource-policy"] == "same-origin"


def test_allow_host_must_be_a_host_name(text_site):
  with pytest.raises(SystemExit, match="--allow-host 'a b': not a host name"):
    serve_main.main(["--index", text_site["index"], "--port", "0", "--allow-host", "a b"])


def test_hide_paths_hides_the_longest_path_first():
  # A path inside another (the index inside its run's folder) is named by its own folder, whatever the order.
  paths = ["/data", "/data/index", "/data/index/shards", "/srv"]
  for ordered in (paths, paths[::-1]):
    assert app_lib.hide_paths("/data/index/shards/000001/frames.npy: missing; see /data/run and /srv/x",
                              ordered) == "shards/000001/frames.npy: missing; see data/run and srv/x"
  assert app_lib.hide_paths("/data/index/manifest.json", {"/data", "/data/index", None, ""}) == "index/manifest.json"


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


def one_line_errors(caplog) -> list[str]:
  """The ERROR records logged, each checked to be one line with no traceback attached."""
  records = [record for record in caplog.records if record.levelno >= logging.ERROR]
  for record in records:
    assert record.exc_info is None and "\n" not in record.getMessage(), record.getMessage()
  return [record.getMessage() for record in records]


def nan_in_second_hit(real_search):
  def search(*args, **kwargs):      # as an index holding a NaN row would score it
    hits = real_search(*args, **kwargs)
    hits[1]["levels"][next(iter(hits[1]["levels"]))] = float("nan")
    return hits
  return search


def test_the_searcher_refuses_non_finite_scores_naming_the_video(text_app, monkeypatch):
  # The searcher's own check, not the JSON guard behind it: its error names the video.
  searcher = text_app[0].state.searcher
  second = searcher.text(CAPTIONS[1], 5, None)["hits"][1]["video"]
  monkeypatch.setattr(searcher.index, "search", nan_in_second_hit(searcher.index.search))
  with pytest.raises(IndexDamaged, match=re.escape(second) + ": its scores for this query are not finite"):
    searcher.text(CAPTIONS[1], 5, None)


def test_non_finite_scores_are_a_server_fault_in_one_line(text_app, monkeypatch, caplog):
  app, server = text_app
  searcher = app.state.searcher
  second = searcher.text(CAPTIONS[1], 5, None)["hits"][1]["video"]
  monkeypatch.setattr(searcher.index, "search", nan_in_second_hit(searcher.index.search))
  status, answer = server.json(f"/api/search?q={urllib.parse.quote(CAPTIONS[1])}")
  assert status == 500 and answer["detail"].startswith(f"{second}: its scores") and "\n" not in answer["detail"]
  # The last guard: whatever the searcher answers, no NaN or infinity reaches the wire.
  for value in (float("nan"), float("inf"), -float("inf")):
    monkeypatch.setattr(searcher, "text", lambda *args, value=value: {"query": "q", "hits": [{"score": value}]})
    status, answer = server.json("/api/search?q=a+car")
    assert status == 500 and answer["detail"] == app_lib.NON_FINITE, answer
  assert len(one_line_errors(caplog)) == 1      # the searcher's fault, logged in one line; the guard's is a 500


# --- the server's own faults: an index file deleted, unreadable or damaged while the page runs -----------


@pytest.fixture(scope="module")
def fault_site(text_site, tmp_path_factory):
  """A copy of the text index served in this process (the tests below delete and damage its files)."""
  index = tmp_path_factory.mktemp("serve_faults") / "index"
  shutil.copytree(text_site["index"], index)
  app = app_lib.create_app(str(index), warm_up=False)
  server = Thread(app)
  yield {"app": app, "server": server, "index": index, "root": index.parent}
  server.close()


def shard_file(index, name: str, shard: int = 0):
  return index / "shards" / sorted(os.listdir(index / "shards"))[shard] / name


def assert_fault(site, caplog, path: str, status: int, words: list[str]) -> str:
  """The answer to `path` is `status` with a one-line detail holding `words` and no server path; the log has one
  line for it and no traceback."""
  caplog.clear()
  got, answer = site["server"].json(path)
  detail = answer["detail"]
  assert got == status and "\n" not in detail and all(w in detail for w in words), (got, answer)
  assert str(site["root"]) not in detail and "Traceback" not in detail, detail
  logged = one_line_errors(caplog)
  assert len(logged) == (status >= 500), logged
  return detail


def test_a_shard_file_deleted_while_the_page_runs_is_a_503(fault_site, caplog):
  query = f"/api/search?q={urllib.parse.quote(CAPTIONS[2])}&candidates=all"
  assert fault_site["server"].json(query)[0] == 200
  for name in ("times.npy", "metadata.jsonl"):
    file = shard_file(fault_site["index"], name, shard=1)
    aside = file.with_suffix(".aside")
    file.rename(aside)
    try:
      relative = os.path.relpath(file, fault_site["root"])          # index/shards/000001/times.npy
      assert_fault(fault_site, caplog, query, 503, [relative])
      if name == "times.npy":   # a keyframe reads its video's times: video 4 is in shard 1
        assert_fault(fault_site, caplog, "/api/keyframe/4/0", 503, [relative])
    finally:
      aside.rename(file)
    assert fault_site["server"].json(query)[0] == 200                 # back: the page answers again


def permission_denied(path):
  return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def raised_from(error: OSError, wrapper: StoreError) -> StoreError:
  """`wrapper` as a reader raises it while handling `error` (`raise wrapper from None`)."""
  try:
    try:
      raise error
    except OSError:
      raise wrapper from None
  except StoreError as raised:
    return raised


def test_server_faults_while_answering_are_5xx_in_one_line(fault_site, monkeypatch, caplog):
  # The reader's errors, as it raises them (root reads a chmod 000 file, so permission errors are raised here).
  index = fault_site["index"]
  vectors = shard_file(index, "frames.npy")
  relative = os.path.relpath(vectors, fault_site["root"])
  query = f"/api/search?q={urllib.parse.quote(CAPTIONS[2])}"
  searcher = fault_site["app"].state.searcher
  cases = [
      (permission_denied(vectors), 503, [f"permission denied reading {relative}"]),
      # today's reader: a header it may not read, reported as damaged; the fix is permissions, not a rebuild
      (raised_from(permission_denied(vectors), StoreError(f"{vectors}: not a readable .npy file (its header is "
                                                          "damaged or truncated)")), 503, ["permission denied"]),
      (raised_from(FileNotFoundError(errno.ENOENT, "No such file", str(vectors)), StoreError(f"{vectors}: missing")),
       503, [relative, "missing"]),
      (IndexUnreadable(f"{vectors}: cannot be read now (EIO)"), 503, [relative, "cannot be read now"]),
      (IndexDamaged(f"{vectors}: checksum of rows 0-2 differs from the one written; rebuild it"), 500,
       [relative, "checksum"]),
      (StoreError(f"{index}: built from another model"), 400, ["index: built from another model"]),
  ]
  for error, status, words in cases:
    def fail(*args, error=error, **kwargs):
      raise error
    monkeypatch.setattr(searcher.index, "search", fail)
    detail = assert_fault(fault_site, caplog, query, status, words)
    if "permission" in detail:
      assert "damaged" not in detail and "rebuild" not in detail, detail

  def unreadable_times(*args, **kwargs):
    raise permission_denied(shard_file(index, "times.npy", 1))

  monkeypatch.setattr(searcher.index.store, "read", unreadable_times)     # the keyframes read the same store
  assert_fault(fault_site, caplog, "/api/keyframe/5/1", 503, ["permission denied reading index/shards/"])


def flip_a_data_bit(path):
  """Flips the lowest bit of the last byte of an .npy file's data: a value changes, stays finite."""
  data = bytearray(path.read_bytes())
  data[-1] ^= 1
  path.write_bytes(bytes(data))


def test_a_damaged_shard_is_a_500_naming_the_file(fault_site, caplog):
  file = shard_file(fault_site["index"], "frames.npy", shard=1)
  saved = file.read_bytes()
  try:
    flip_a_data_bit(file)
    relative = os.path.relpath(file, fault_site["root"])
    assert_fault(fault_site, caplog, f"/api/search?q={urllib.parse.quote(CAPTIONS[4])}&candidates=all", 500,
                 [relative])
  finally:
    file.write_bytes(saved)


def test_a_damaged_pooled_file_never_answers_silently(text_site, tmp_path, caplog):
  index = tmp_path / "index"
  shutil.copytree(text_site["index"], index)
  flip_a_data_bit(index / "pooled.npy")
  try:   # refused when the index opens, or answered with a 500
    app = app_lib.create_app(str(index), warm_up=False)
  except IndexDamaged as e:
    assert "pooled.npy" in str(e) and "\n" not in str(e)
    return
  server = Thread(app)
  try:
    assert_fault({"server": server, "root": tmp_path}, caplog, "/api/search?q=a+red+car", 500, ["pooled.npy"])
  finally:
    server.close()


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


FEATURE_DIM = 12     # the audio tower's feature width (VGGish's 128 in the XD-Violence release)


@pytest.fixture(scope="module")
def features_site(tmp_path_factory):
  """An index of a model on pre-extracted audio features (records without frames, so no keyframes: served without
  --videos), its app in a thread, and a query .npy (20, FEATURE_DIM) beside it."""
  root = tmp_path_factory.mktemp("serve_features")
  config = search_fixtures.tiny_config("audio")
  config.model.audio.update(kind="features", feature_dim=FEATURE_DIM)
  search_fixtures.save_run(root / "run", config)
  records_dir = search_fixtures.write_records(root / "records", search_fixtures.random_audio_records(config, 6))
  index = str(root / "index")
  assert index_build.main(["--workdir", str(root / "run"), "--records", records_dir, "--out", index]) == 0
  np.save(root / "query__vggish.npy", np.random.default_rng(1).standard_normal((20, FEATURE_DIM)).astype(np.float32))
  server = Thread(app_lib.create_app(index, None, max_upload_bytes=MAX_UPLOAD, audio_clip_seconds=0.5))
  yield {"server": server, "index": index, "root": root}
  server.close()


def test_feature_array_upload_for_a_model_on_audio_features(features_site, capsys, monkeypatch, caplog):
  server, index = features_site["server"], features_site["index"]
  monkeypatch.chdir(features_site["root"])
  status, info = server.json("/api/info")
  assert (info["audio_input"], info["audio_feature_dim"], info["audio_clip_seconds"]) == ("features", 12, 0.5)
  assert info["keyframes"] is False         # no frames in the records, no --videos
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
  assert not errors_logged(caplog)


# --- the page in a real browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
  """One headless Chromium for the page's tests (each sets its window size)."""
  if browser_page.chromium_paths() is None:
    pytest.skip("no chromium + chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
  pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e '.[test]'")
  with browser_page.chromium() as driver:
    yield driver


def test_page_in_chromium_finds_the_video_and_shows_its_keyframe(text_site, browser):
  server, driver = text_site["server"], browser
  driver.set_window_size(1200, 900)
  driver.get_log("browser")        # from here on: this test's messages
  hits = browser_page.search(driver, server.url, CAPTIONS[2])
  _, answer = server.json(f"/api/search?q={urllib.parse.quote(CAPTIONS[2])}&k=10")
  assert [h["name"] for h in hits] == [h["video"] for h in answer["hits"]]
  assert hits[0]["name"] == "video_2.mp4"
  assert all(h["thumbnail_width"] > 0 for h in hits), hits
  # Offline: everything the page loaded came from the server (its /api requests passed the origin check); no
  # script errors.
  loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
  assert loaded and all(url.startswith(server.url + "/") for url in loaded), loaded
  assert not [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
  check_y_scales(browser_page.charts(driver), answer["hits"])
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
  check_y_scales(browser_page.charts(driver), answer["hits"])


def check_y_scales(charts: list[dict], hits: list[dict], px: float = 1.0):
  """Each chart's y scales say what its bars and line show: relevance labels 0, s, 2s, ... up from the time axis
  to a top at or above the largest relevance of all hits (one scale), a grid line at each; a bar of relevance r
  reaches the height of r on that scale; the prior's labels 0, 0.5, 1 and its line at the height of each prior."""
  largest = max(max(hit["relevance"]) for hit in hits)
  assert len(charts) == len(hits)
  scales = set()
  for chart, hit in zip(charts, hits):
    labels = [(float(text), y) for text, y in chart["relevance_ticks"]]
    values = [value for value, _ in labels]
    step = values[1]
    assert values[0] == 0 and 2 <= len(values) <= 5 and np.allclose(np.diff(values), step, rtol=1e-6), labels
    assert values[-2] < largest <= values[-1] + 1e-9, (values, largest)
    scales.add(tuple(values))
    bottom, top = chart["axis"], chart["grid"][-1]
    assert len(chart["grid"]) == len(values) - 1 and top < bottom - 40, chart
    at = lambda share: bottom + (top - bottom) * share
    for (value, y), grid in zip(labels, [bottom, *chart["grid"]]):
      assert abs(grid - at(value / values[-1])) <= px and abs(y - grid) <= 3, (value, y, grid)
    assert len(chart["bars"]) == len(hit["relevance"])
    for (bar_top, bar_bottom), relevance in zip(chart["bars"], hit["relevance"]):
      assert abs(bar_bottom - bottom) <= px and abs(bar_top - at(max(relevance, 0) / values[-1])) <= px, relevance
    assert [text for text, _ in chart["prior_ticks"]] == ["0", "0.5", "1"], chart["prior_ticks"]
    for (text, y) in chart["prior_ticks"]:
      assert abs(y - at(float(text))) <= 3, (text, y)
    assert len(chart["prior"]) == len(hit["prior"])
    for y, prior in zip(chart["prior"], hit["prior"]):
      assert abs(y - at(prior)) <= px, (y, prior)
  assert len(scales) == 1, scales          # one relevance scale for every hit


def test_page_without_keyframes_shows_empty_boxes_not_broken_images(text_app, browser):
  # No --videos: the records with frames (even rows) give keyframes, the others have none to give.
  app, server = text_app
  driver = browser
  driver.set_window_size(1200, 8000)      # every strip in view: lazy images load
  browser_page.search(driver, server.url, CAPTIONS[3])
  _, answer = server.json(f"/api/search?q={urllib.parse.quote(CAPTIONS[3])}&k=10")
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  WebDriverWait(driver, 30).until(lambda d: all(box["shown"] or box["empty"] for boxes in browser_page.keyframes(d)
                                                for box in boxes))
  pages = browser_page.keyframes(driver)
  assert len(pages) == len(answer["hits"]) == len(CAPTIONS)
  for boxes, hit in zip(pages, answer["hits"]):
    has_frames = hit["index"] % 2 == 0
    assert len(boxes) == 1 + min(8, len(hit["snippet_times"]))
    assert all(box["shown"] == has_frames and box["empty"] != has_frames for box in boxes), (hit["video"], boxes)
    assert not any(box["overflows"] for box in boxes), boxes
    assert (boxes[0]["width"], boxes[0]["height"]) == (160, 120)     # the main box keeps its place, empty or not
  assert driver.execute_script(
      "return getComputedStyle(document.querySelector('.thumb.no-keyframe'), '::after').content") == '"no keyframe"'


def test_audio_page_hints_at_its_input_and_clears_hits_after_a_failed_upload(features_site, browser):
  server, driver = features_site["server"], browser
  driver.set_window_size(1200, 900)
  browser_page.open_page(driver, server.url)
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  status = lambda: driver.find_element(By.ID, "status")
  # The empty state says what to upload: the model's feature width, from /api/info.
  assert f".npy of per-snippet audio features, shape (N, {FEATURE_DIM})" in status().text, status().text
  assert "0.5 s" in status().text and "error" not in status().get_attribute("class")
  upload = driver.find_element(By.ID, "audio")
  upload.send_keys(str(features_site["root"] / "query__vggish.npy"))
  driver.find_element(By.ID, "go").click()
  hits = browser_page.wait_for_hits(driver, "“audio of query__vggish.npy”")
  assert len(hits) == 6 and all(h["thumbnail_width"] == 0 for h in hits)
  # No keyframes in this index: none asked for, an empty box in place of each main keyframe, no strip.
  assert not driver.find_elements(By.CSS_SELECTOR, "#hits img, #hits .strip")
  assert len(driver.find_elements(By.CSS_SELECTOR, "#hits .thumb.no-keyframe")) == 6
  loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
  assert not [url for url in loaded if "/api/keyframe/" in url], loaded
  # A failed upload: its error, and none of the previous query's hits under it.
  bad = features_site["root"] / "narrow.npy"
  np.save(bad, np.zeros((20, 7), np.float32))
  upload.send_keys(str(bad))
  driver.find_element(By.ID, "go").click()
  WebDriverWait(driver, 30).until(lambda d: "error" in status().get_attribute("class"))
  assert "narrow.npy: 7-d audio features" in status().text, status().text
  assert not driver.find_elements(By.CSS_SELECTOR, "#hits > *")
  assert not driver.find_element(By.ID, "legend").is_displayed()


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
