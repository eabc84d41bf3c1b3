"""A plain static server for an app folder, on the local network (a phone on the same Wi-Fi).

    server = make_server('beans_app', host='0.0.0.0', port=8000)   # port 0: any free port
    print(urls(server))            # ['http://127.0.0.1:8000/', 'http://192.168.1.20:8000/']
    server.serve_forever()

Any static server works (`python3 -m http.server -d beans_app`); this one sets the WASM and
module MIME types on every Python version and `Cache-Control: no-cache`, so a rebuilt folder
reaches the browser at the next load. Browsers run the page's service worker (offline use,
"add to home screen") only on `localhost` or HTTPS: over plain HTTP on the local network the
page works while the server runs.
"""

from __future__ import annotations

import functools
import http.server
import os
import socket
import sys

MIME = {'.wasm': 'application/wasm', '.mjs': 'text/javascript', '.js': 'text/javascript',
        '.webmanifest': 'application/manifest+json', '.tflite': 'application/octet-stream',
        '.svg': 'image/svg+xml', '.json': 'application/json'}


class _Handler(http.server.SimpleHTTPRequestHandler):
  extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME}
  quiet = False

  def end_headers(self) -> None:
    self.send_header('Cache-Control', 'no-cache')
    super().end_headers()

  def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
    if not self.quiet:
      sys.stderr.write(f'{self.address_string()} {format % args}\n')


def make_server(folder: str | os.PathLike, host: str = '0.0.0.0', port: int = 8000,
                quiet: bool = False) -> http.server.ThreadingHTTPServer:
  """A threading HTTP server of `folder` bound to `(host, port)` (not yet serving).

  Raises:
    FileNotFoundError: `folder` has no index.html.
    OSError: the port cannot be bound (in use, no permission).
  """
  folder = os.fspath(folder)
  if not os.path.isfile(os.path.join(folder, 'index.html')):
    raise FileNotFoundError(f'{folder}: no index.html (build the app first: kdflax app)')
  handler = functools.partial(type('Handler', (_Handler,), {'quiet': quiet}),
                              directory=folder)
  return http.server.ThreadingHTTPServer((host, port), handler)


def lan_addresses() -> list[str]:
  """This machine's IPv4 addresses other machines may reach (best effort, no packet sent)."""
  found = []
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    try:
      s.connect(('10.255.255.255', 1))  # UDP connect picks the outgoing interface only
      found.append(s.getsockname()[0])
    except OSError:
      pass
  try:
    found += socket.gethostbyname_ex(socket.gethostname())[2]
  except OSError:
    pass
  return [a for a in dict.fromkeys(found) if not a.startswith('127.')]


def urls(server: http.server.HTTPServer) -> list[str]:
  """The addresses to open: loopback first, then the LAN ones when bound to all interfaces."""
  host, port = server.server_address[:2]
  if host in ('0.0.0.0', ''):
    return [f'http://127.0.0.1:{port}/'] + [f'http://{a}:{port}/' for a in lan_addresses()]
  return [f'http://{host}:{port}/']
