"""`varcmp serve`: the API answers what `varcmp search --index --json` prints; keyframes, video ranges and bad
input (empty queries, k out of range, oversized or wrong uploads, paths out of --videos); the page in Chromium.

The indexes are the tiny planted ones of tests/search_fixtures.py (a caption retrieves its own video). The text
index is served by the `varcmp serve` command itself (a subprocess on port 0, at the address it prints), the audio
index by the app in a thread (uvicorn on a free port). Half of the text records carry frames (the keyframes must be those pixels);
the others have none, so their keyframes are decoded from the videos under --videos, whose frame i is grey level
4 i (the keyframe must be the frame at the snippet's centre).
"""
import http.client
import io
import json
import os
import queue
import re
import subprocess
import sys
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
from varcmp_jax.serve import media

FPS = 4
MAX_UPLOAD = 1 << 20
# Six things in six colours: an untrained text tower tells them apart (captions differing in colour alone, it may not).
CAPTIONS = search_fixtures.captions(48)[::9]


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


class Command(Site):
  """`varcmp serve ARGV --port 0` in a subprocess, at the address it prints."""

  def __init__(self, argv: list[str], log_path):
    self.log = open(log_path, "w")
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
  server = Command(["--index", index, "--videos", str(videos), "--max-upload-mb", str(MAX_UPLOAD / 2**20)],
                   root / "serve.log")
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
    assert answer == cli_json(capsys, argv)
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
    ("/api/keyframe/999/0", 404, "no video 999"),
    ("/api/keyframe/0/99", 404, "no snippet 99"),
    ("/api/keyframe/x/0", 422, "row"),
])
def test_bad_queries_get_a_4xx_with_a_message(text_site, path, status, words):
  got, answer = text_site["server"].json(path)
  assert got == status and words in answer["detail"], answer
  assert "Traceback" not in answer["detail"]


def test_uploads_to_a_text_model_and_oversized_uploads_are_refused(text_site):
  server = text_site["server"]
  body, headers = multipart("audio", "clip.wav", b"RIFF" + bytes(1000))
  status, answer = server.json("/api/search", "POST", body=body, headers=headers)
  assert status == 400 and "text model" in answer["detail"]
  body, headers = multipart("audio", "big.wav", bytes(MAX_UPLOAD + 1))
  status, answer = server.json("/api/search", "POST", body=body, headers=headers)
  assert status == 413 and "larger than" in answer["detail"]


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
               "/static/../app.py", "/static/%2e%2e/app.py"]:
    status, headers, body = server.request("GET", path)
    assert 400 <= status < 500 and secret not in body and b"root:" not in body and b"import" not in body, (path, status)
    if path.startswith("/videos/"):
      assert json.loads(body)["detail"], path


# --- audio: POST an audio file -------------------------------------------------------------------------


def test_audio_upload_answers_what_the_cli_prints(tmp_path, capsys, monkeypatch):
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
    assert answer == cli_json(capsys, ["--index", index, "--audio", "query.mp4", "--top-k", "4", "--candidates", "all"])
    assert answer["query"] == "audio of query.mp4" and len(answer["hits"]) == 4
    for data, words in [(b"", "empty"), (b"not audio at all" * 64, "query.mp4")]:
      body, headers = multipart("audio", "query.mp4", data)
      status, answer = server.json("/api/search", "POST", body=body, headers=headers)
      assert status == 400 and words in answer["detail"], answer
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


def test_feature_array_upload_for_a_model_on_audio_features(tmp_path, capsys, monkeypatch):
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
    assert answer == cli_json(capsys, ["--index", index, "--audio", "query__vggish.npy", "--audio-clip-seconds", "0.5",
                                       "--top-k", "4", "--candidates", "all"])
    body, headers = multipart("audio", "clip.wav", b"RIFF" + bytes(1000))
    status, answer = server.json("/api/search", "POST", body=body, headers=headers)
    assert status == 400 and ".npy array" in answer["detail"] and "clip.wav" in answer["detail"], answer
  finally:
    server.close()


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
