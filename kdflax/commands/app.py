"""`kdflax app`: an exported `.tflite` -> a static web app that classifies photos on a phone.

    kdflax app --model beans_int8.tflite --out beans_app           # write the folder
    kdflax app --out beans_app --serve                             # serve it on the local network
    kdflax app --model beans_int8.tflite --out beans_app --serve   # both

The folder (`kdflax.app.build`) holds the page, the model and MediaPipe Tasks for Web's
bundle and WASM (the pinned `@mediapipe/tasks-vision`, installed by `npm ci` in
kdflax/app/web when missing): any static server can serve it, nothing is downloaded when it
runs. `--serve` prints the addresses to open on a phone on the same Wi-Fi. Exit status: 0,
1 the server could not start, 2 bad usage or a model/folder the app cannot be built from
(one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser(prog: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0])
  p.add_argument('--model', help='exported .tflite (labels in its metadata); omit with --serve '
                 'to serve a folder built before')
  p.add_argument('--out', required=True, help='the app folder to write (or serve)')
  p.add_argument('--title', default='', help='page heading and app name (default: from the model)')
  p.add_argument('--serve', action='store_true', help='serve the folder on the local network')
  p.add_argument('--host', default='0.0.0.0', help='address to bind with --serve (0.0.0.0: all)')
  p.add_argument('--port', type=int, default=8000, help='port with --serve (0: any free one)')
  p.add_argument('--mediapipe', metavar='DIR', help='a copy of the @mediapipe/tasks-vision npm '
                 'package to take the bundle and WASM from (default: kdflax/app/web/node_modules)')
  p.add_argument('--no-install', '--no_install', dest='install', action='store_false',
                 help='never run npm ci; fail if MediaPipe is not installed')
  return p


def _serve(folder: str, host: str, port: int) -> int:
  from kdflax.app.serve import make_server, urls
  try:
    server = make_server(folder, host, port)
  except FileNotFoundError as e:
    print(f'kdflax app: error: {e}', file=sys.stderr)
    return 2
  except OSError as e:
    print(f'kdflax app: error: cannot serve on {host}:{port}: {e.strerror or e}', file=sys.stderr)
    return 1
  print(f'serving {folder} (Ctrl-C to stop); open on a phone on the same network:', flush=True)
  for url in urls(server):
    print(f'  {url}', flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


def main(argv: list[str]) -> int:
  """`argv[0]` is the command name. Returns the exit status (see the module docstring)."""
  parser = _parser(f'kdflax {argv[0] if argv else "app"}')
  try:
    args = parser.parse_args(argv[1:])
    if not args.model and not args.serve:
      parser.error('give --model (build the app), --serve (serve --out), or both')
  except SystemExit as e:
    return int(e.code or 0)
  if args.model:
    from kdflax.app.build import AppError, build_app
    try:
      summary = build_app(args.model, args.out, title=args.title, mediapipe_dir=args.mediapipe,
                          install=args.install, log=lambda line: print(line, file=sys.stderr))
    except (AppError, FileNotFoundError) as e:
      print(f'kdflax app: error: {e}', file=sys.stderr)
      return 2
    except OSError as e:
      from kdflax.atomic import os_error_line
      print(f'kdflax app: error: {os_error_line(e)}', file=sys.stderr)
      return 2
    model = summary['model']
    print(json.dumps({'out': summary['out'], 'model': model['name'],
                      'precision': model['precision'], 'image_size': model['image_size'],
                      'labels': model['labels'], 'files': len(summary['files']),
                      'mb': round(summary['bytes'] / 1e6, 2)}, indent=2), flush=True)
  if args.serve:
    return _serve(args.out, args.host, args.port)
  return 0


if __name__ == '__main__':
  sys.exit(main(['app', *sys.argv[1:]]))
