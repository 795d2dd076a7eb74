"""What a request to the search page passes before any route sees it (ASGI middleware, SPEC 4b page safety).

  ResponseHeaders  every answer carries Cross-Origin-Resource-Policy: same-origin (a page on another site cannot
                   embed the videos, keyframes or answers: img, video, script and no-cors fetch are blocked by the
                   browser) and X-Content-Type-Options: nosniff (JSON is never run as a script).
  HostCheck        400 unless the Host header names this server (the bound address, a loopback name, --allow-host):
                   a page that rebinds its DNS name to this machine sends its own name.
  OriginCheck      403 for /api/* requests a browser marks as sent by a page of another origin (Origin,
                   Sec-Fetch-Site): another site's page, or another port on localhost, cannot run queries by fetch,
                   form posts or <img>/<script> tags.
  BodyLimit        413 for a body over the limit, before it is read.

Outermost first, as create_app stacks them: a refused request reaches nothing behind its refusal. Each refusal is
one line of JSON {"detail": ...}.
"""
import re

import fastapi
from fastapi import responses

# A Host header: a DNS name or IPv4 address, or an IPv6 address in brackets, then an optional port. ASCII only.
HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?", re.IGNORECASE | re.ASCII)
# An Origin header as browsers serialize it: scheme://host[:port], nothing else (no user, path or query).
ORIGIN = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::([0-9]{1,5}))?", re.IGNORECASE | re.ASCII)
DEFAULT_PORTS = {"http": 80, "https": 443}
# Sec-Fetch-Site values of requests this server's own page makes (same-origin) or the user makes by hand (none:
# typed into the address bar, a bookmark). 'same-site' is refused too: another port of localhost is same-site.
OWN_FETCH_SITES = ("same-origin", "none")
SECURITY_HEADERS = [(b"cross-origin-resource-policy", b"same-origin"), (b"x-content-type-options", b"nosniff")]


def host_name(value: str) -> str | None:
  """The lower-case host of a Host header or an address ('Example.org:8000' -> 'example.org', '[::1]:80' and
  '::1' -> '::1'), or None when it is not one."""
  host = host_and_port(value)
  return host[0] if host else None


def host_and_port(value: str) -> tuple[str, int | None] | None:
  """(lower-case host, port or None) of a Host header or an address, or None when it is not one."""
  if value.count(":") > 1 and not value.startswith("["):
    value = f"[{value}]"      # a bare IPv6 address, as --host and --allow-host take it
  match = HOST.fullmatch(value)
  if not match:
    return None
  return match.group(1).lower().strip("[]"), int(match.group(2)[1:]) if match.group(2) else None


def _header(scope, name: bytes) -> list[str]:
  return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


async def _refuse(scope, receive, send, status: int, detail: str):
  await responses.JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


class ResponseHeaders:
  """ASGI middleware: adds SECURITY_HEADERS to every answer, refusals included."""

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)

    async def send_with_headers(message):
      if message["type"] == "http.response.start":
        names = {key.lower() for key, _ in message.get("headers", [])}
        message = {**message, "headers": [*message.get("headers", []),
                                          *((k, v) for k, v in SECURITY_HEADERS if k not in names)]}
      await send(message)

    return await self.app(scope, receive, send_with_headers)


class HostCheck:
  """ASGI middleware: refuses (400) a request whose Host header does not name one of `allowed` (host names as
  host_name gives them), or that has none (HTTP/1.0 allows that) or several."""

  def __init__(self, app, allowed: set[str]):
    self.app, self.allowed = app, allowed

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http":
      hosts = _header(scope, b"host")
      if len(hosts) != 1:
        detail = ("the request has no Host header (an HTTP/1.0 client?): send one naming this server's address"
                  if not hosts else f"the request has {len(hosts)} Host headers: send one, naming this server")
        return await _refuse(scope, receive, send, 400, detail)
      if host_name(hosts[0]) not in self.allowed:
        detail = (f"Host {hosts[0][:100]!r} is not an address of this server: start varcmp serve with --allow-host "
                  "NAME to serve requests that name it")
        return await _refuse(scope, receive, send, 400, detail)
    return await self.app(scope, receive, send)


def origin_key(origin: str) -> tuple[str, str, int] | None:
  """(scheme, lower-case host, port) of an Origin header ('http://LocalHost:8000' -> ('http', 'localhost', 8000);
  the scheme's default port when none is given), or None when it is no http(s) origin ('null', a path, a user)."""
  match = ORIGIN.fullmatch(origin)
  if not match:
    return None
  scheme, host, port = match.group(1).lower(), match.group(2).lower().strip("[]"), match.group(3)
  return scheme, host, int(port) if port else DEFAULT_PORTS[scheme]


class OriginCheck:
  """ASGI middleware: refuses (403) a request under `prefix` that a browser marks as coming from a page of another
  origin. Browsers send Origin with every cross-origin fetch and every POST (form posts included), and
  Sec-Fetch-Site with every request (img and script tags, no-cors fetch, navigations); curl sends neither.

  A request passes when its Origin, if any, is the page's own origin and its Sec-Fetch-Site, if any, is
  same-origin or none. The page's own origin: the host and port of the request's Host header (what the browser
  loaded the page from; a Host without a port names the scheme's default), or a name of `allow_hosts` ((name,
  port or None) from --allow-host; with no port given any port, as a reverse proxy may drop the port from the Host
  it passes on).
  """

  def __init__(self, app, allow_hosts: tuple[tuple[str, int | None], ...] = (), prefix: str = "/api/"):
    self.app, self.allow_hosts, self.prefix = app, allow_hosts, prefix

  def refusal(self, scope) -> str | None:
    """Why the request is refused, or None when it passes."""
    site = next((s for s in _header(scope, b"sec-fetch-site") if s.strip().lower() not in OWN_FETCH_SITES), None)
    if site is not None:
      return (f"cross-origin request refused (Sec-Fetch-Site {site[:40]!r}): {self.prefix} answers this server's "
              "page only")
    for origin in _header(scope, b"origin"):
      key = origin_key(origin)
      if key is None or not self._own(key, _header(scope, b"host")):
        return (f"cross-origin request refused (Origin {origin[:100]!r} is not this server's page): {self.prefix} "
                "answers this server's page only")
    return None

  def _own(self, origin: tuple[str, str, int], hosts: list[str]) -> bool:
    scheme, name, port = origin
    host = host_and_port(hosts[0]) if len(hosts) == 1 else None
    if host is not None and host[0] == name and (DEFAULT_PORTS[scheme] if host[1] is None else host[1]) == port:
      return True
    return any(allowed == name and allowed_port in (None, port) for allowed, allowed_port in self.allow_hosts)

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith(self.prefix):
      detail = self.refusal(scope)
      if detail is not None:
        return await _refuse(scope, receive, send, 403, detail)
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
      return await _refuse(scope, receive, send, 413, self._message())
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
