"""`varcmp serve`: a local web page over an index (SPEC section 4b).

  varcmp serve --index runs/demo/index --videos runs/demo/videos      # then open http://127.0.0.1:8000

A query box (text, or an audio file for an audio model), the top hits with keyframes, combined and per-level
scores, relevance and prior curves with the key segments marked, and with --videos a player that starts at a key
segment. The API (GET /api/search?q=...&k=..., POST /api/search with an audio file) answers what
`varcmp search --index INDEX --json` prints. Binds to 127.0.0.1 unless told otherwise: anyone who can reach the
port can query the index and watch the videos (there is no authentication: put a proxy with one in front). Requests
must name the bound address or a loopback name in their Host header, or a name given with --allow-host (a proxy's
public name), so that no web page the user opens can reach the server by DNS rebinding.
"""
import argparse
import ipaddress
import socket
import sys


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="varcmp serve", description=__doc__.split("\n")[0])
  parser.add_argument("--index", required=True, help="an index directory (`varcmp index` output)")
  parser.add_argument("--videos", default=None,
                      help="folder of the indexed videos: plays them and decodes keyframes for records without frames")
  parser.add_argument("--workdir", default=None, help="where the index's run lives when it has moved")
  parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                      help="also answer requests whose Host header names NAME (e.g. the name a reverse proxy or "
                           "the LAN reaches this machine by); repeatable. By default only --host and loopback names")
  parser.add_argument("--max-upload-mb", type=float, default=50, help="largest audio upload accepted")
  parser.add_argument("--audio-clip-seconds", type=float, default=0.96,
                      help="a model on pre-extracted audio features: the seconds a row of an uploaded .npy covers "
                           "(default %(default)s, VGGish)")
  args = parser.parse_args(argv)
  if not 0 <= args.port <= 65535:
    parser.error(f"--port {args.port}: not a TCP port (0-65535)")
  if not args.max_upload_mb > 0 or not args.audio_clip_seconds > 0:
    parser.error("--max-upload-mb and --audio-clip-seconds must be > 0")

  # Bind first: a busy port fails at once, before the model loads, and the printed address is the real one.
  listener = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
  listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    listener.bind((args.host, args.port))
    listener.listen(128)   # from here connections wait in the backlog until uvicorn accepts them
  except OSError as e:
    raise SystemExit(f"varcmp serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None

  import uvicorn  # pylint: disable=g-import-not-at-top
  from varcmp_jax.serve import app as app_lib  # pylint: disable=g-import-not-at-top
  try:
    app = app_lib.create_app(args.index, args.videos, args.workdir, int(args.max_upload_mb * 2**20),
                             audio_clip_seconds=args.audio_clip_seconds, host=args.host,
                             allow_hosts=tuple(args.allow_host))
  except (OSError, KeyError, ValueError) as e:   # index errors (index.errors) are ValueErrors, one line each
    listener.close()
    reason = f"cannot read {e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else e
    raise SystemExit(f"varcmp serve: {reason}") from None
  info = app.state.searcher.info()
  try:
    loopback = ipaddress.ip_address(args.host).is_loopback
  except ValueError:
    loopback = args.host == "localhost"
  if not loopback:
    allowed = ", ".join([args.host, *args.allow_host])
    print(f"note: serving on {args.host}: anyone who can reach port {args.port} can search the index"
          + (" and watch the videos" if args.videos else "") + f", with no password; requests must name "
          f"{allowed} or a loopback name as their Host (add others with --allow-host)", file=sys.stderr)
  host = f"[{args.host}]" if ":" in args.host else args.host
  print(f"varcmp serve: {info['videos']} videos ({info['task']} model, step {info['run']['step']}) from "
        f"{args.index}; open http://{host}:{listener.getsockname()[1]}/", flush=True)
  uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
  return 0
