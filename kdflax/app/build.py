"""`build_app`: an exported `.tflite` -> a self-contained static folder that classifies photos
in the browser (MediaPipe Tasks for Web, WebAssembly, CPU delegate), offline once opened.

    summary = build_app('beans_int8.tflite', 'beans_app')    # -> {'out': ..., 'files': ...}

The folder (written beside `out` and swapped into place whole, `kdflax.atomic.replace_dir`):

    index.html app.js eval_view.js tflite_info.js style.css icon.svg   the page (web/)
    model.tflite  model.json                    the model as is, and what the page shows of it
    mediapipe/vision_bundle.mjs mediapipe/wasm/vision_wasm*_internal.{js,wasm}
    manifest.webmanifest  sw.js                 "add to home screen", offline cache

MediaPipe's files come from the pinned `@mediapipe/tasks-vision` in `web/package.json` /
`web/package-lock.json`, installed by `npm ci` in `web/` (run here when missing and npm is on
PATH; `npm ci` takes them from npm's cache when offline), or from `mediapipe_dir`. Nothing is
fetched when the page runs. The model must carry its class names in the standard TFLite
metadata (MediaPipe reads them only there): every file `kdflax export` writes does.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
from collections.abc import Callable

from kdflax import atomic

WEB = pathlib.Path(__file__).resolve().parent / 'web'
PACKAGE = '@mediapipe/tasks-vision'
PAGE_FILES = ('index.html', 'app.js', 'eval_view.js', 'tflite_info.js', 'style.css', 'icon.svg')
MEDIAPIPE_FILES = ('vision_bundle.mjs', 'wasm/vision_wasm_internal.js',
                   'wasm/vision_wasm_internal.wasm', 'wasm/vision_wasm_nosimd_internal.js',
                   'wasm/vision_wasm_nosimd_internal.wasm')
MODEL_FILE = 'model.tflite'
# What marks a folder as one build_app wrote (so an existing `out` is replaced only then).
_MARKERS = ('index.html', 'model.json', 'sw.js')


class AppError(ValueError):
  """The app cannot be built: a bad model, MediaPipe's files missing, a bad `out` (one line)."""


def pinned_version() -> str:
  """The exact `@mediapipe/tasks-vision` version `web/package.json` pins."""
  return json.loads((WEB / 'package.json').read_text())['dependencies'][PACKAGE]


def _installed_version(directory: pathlib.Path) -> str | None:
  try:
    return json.loads((directory / 'package.json').read_text()).get('version')
  except (OSError, ValueError):
    return None


def npm_ci(log: Callable[[str], None] = print) -> None:
  """Runs `npm ci` in `web/` (the pinned MediaPipe package into web/node_modules).

  Raises:
    AppError: npm is not on PATH, or `npm ci` failed (its last error line).
  """
  npm = shutil.which('npm')
  if not npm:
    raise AppError(f'{PACKAGE} {pinned_version()} is not installed and npm is not on PATH: '
                   f'install Node.js and npm, then run `npm ci` in {WEB}')
  log(f'npm ci in {WEB} ({PACKAGE} {pinned_version()})')
  proc = subprocess.run([npm, 'ci', '--no-audit', '--no-fund', '--loglevel=error'], cwd=WEB,
                        capture_output=True, text=True)
  if proc.returncode != 0:
    lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
    raise AppError(f'npm ci in {WEB} failed: {lines[-1] if lines else proc.returncode}')


def find_mediapipe(mediapipe_dir: str | os.PathLike | None = None, install: bool = True,
                   log: Callable[[str], None] = print) -> pathlib.Path:
  """The folder of the pinned `@mediapipe/tasks-vision` with every file the page needs.

  `mediapipe_dir` (a copy of the npm package) if given, else `web/node_modules/...`,
  installed with `npm ci` first when missing and `install`.

  Raises:
    AppError: missing files or another version than the pinned one (one line saying what to do).
  """
  given = mediapipe_dir is not None
  directory = pathlib.Path(mediapipe_dir) if given else WEB / 'node_modules' / PACKAGE
  missing = [f for f in MEDIAPIPE_FILES if not (directory / f).is_file()]
  if missing and not given and install:
    npm_ci(log)
    missing = [f for f in MEDIAPIPE_FILES if not (directory / f).is_file()]
  if missing:
    raise AppError(f'{directory}: no {missing[0]} ({PACKAGE} {pinned_version()} not installed: '
                   f'run `npm ci` in {WEB}, or pass --mediapipe DIR)')
  version = _installed_version(directory)
  if version != pinned_version():
    raise AppError(f'{directory}: {PACKAGE} {version} is installed but {pinned_version()} is '
                   f'pinned: run `npm ci` in {WEB}')
  return directory


def check_model(path: str | os.PathLike) -> dict:
  """`.tflite` path -> what the page shows of it (`model.json`): name, precision, labels...

  Raises:
    FileNotFoundError: no such file.
    AppError: a corrupt or foreign file, a batch other than 1, or no class names in the
      standard metadata.
  """
  from kdflax.export.flatbuffer import ModelFileError, read_tflite
  from kdflax.export.interpreter import TFLiteClassifier
  path = os.fspath(path)
  try:
    read_tflite(path)
    clf = TFLiteClassifier(path)
  except (ModelFileError, ValueError, RuntimeError) as e:
    message = '; '.join(line.strip() for line in str(e).splitlines() if line.strip())
    raise AppError(message if path in message else f'{path}: {message}') from None
  standard = clf.standard
  if standard is None or not standard.labels:
    raise AppError(f'{path}: no class names in its standard TFLite metadata (MediaPipe reads '
                   'labels only there): export the model with labels (kdflax export)')
  if clf.batch != 1:
    raise AppError(f'{path}: the input batch is {clf.batch}; MediaPipe runs batch-1 models '
                   '(kdflax export --batch 1, the default)')
  meta = clf.metadata
  name = meta.get('model') or standard.name or os.path.basename(path)
  return {'file': MODEL_FILE, 'name': name, 'precision': meta.get('precision', ''),
          'image_size': clf.image_size, 'labels': list(standard.labels),
          'bytes': os.path.getsize(path), 'source': os.path.basename(path),
          'mediapipe': f'{PACKAGE} {pinned_version()}'}


def _check_out(out: pathlib.Path) -> None:
  if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                            and not all((out / m).is_file() for m in _MARKERS))):
    raise AppError(f'{out}: exists and is not a folder kdflax app wrote; choose another --out')


def _manifest(title: str) -> dict:
  return {'name': title, 'short_name': title[:12], 'start_url': './', 'scope': './',
          'display': 'standalone', 'background_color': '#f6f7f4', 'theme_color': '#2e6b30',
          'icons': [{'src': 'icon.svg', 'sizes': 'any', 'type': 'image/svg+xml'}]}


def _digest(folder: pathlib.Path, files: list[str]) -> str:
  h = hashlib.sha256()
  for name in sorted(files):
    h.update(name.encode() + b'\0' + (folder / name).read_bytes())
  return h.hexdigest()[:16]


def build_app(model: str | os.PathLike, out: str | os.PathLike, title: str = '',
              mediapipe_dir: str | os.PathLike | None = None, install: bool = True,
              log: Callable[[str], None] = print) -> dict:
  """Writes the app folder for `model` at `out` (see the module docstring).

  Args:
    model: an exported `.tflite` with labels in its standard metadata.
    out: the folder to write; replaced if it is one this function wrote before.
    title: the page's heading and the installed app's name (default: from the model's name).
    mediapipe_dir, install: where MediaPipe's files come from (`find_mediapipe`).
    log: progress lines.

  Returns:
    `{'out', 'model', 'files', 'bytes', 'version'}`: the folder, what `model.json` says, the
    relative paths written, their total size and the service worker's cache version.

  Raises:
    FileNotFoundError, AppError: see `check_model`, `find_mediapipe`; `out` not ours.
  """
  out = pathlib.Path(out).expanduser().absolute()
  about = check_model(model)
  about['title'] = title or f'{about["name"]} classifier'
  _check_out(out)
  mediapipe = find_mediapipe(mediapipe_dir, install, log)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f'.{out.name}.partial-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    (tmp / 'mediapipe' / 'wasm').mkdir(parents=True)
    for name in PAGE_FILES:
      shutil.copyfile(WEB / name, tmp / name)
    for name in MEDIAPIPE_FILES:
      shutil.copyfile(mediapipe / name, tmp / 'mediapipe' / name)
    shutil.copyfile(model, tmp / MODEL_FILE)
    (tmp / 'model.json').write_text(json.dumps(about, indent=2) + '\n')
    (tmp / 'manifest.webmanifest').write_text(json.dumps(_manifest(about['title']), indent=2))
    files = [*PAGE_FILES, MODEL_FILE, 'model.json', 'manifest.webmanifest',
             *(f'mediapipe/{name}' for name in MEDIAPIPE_FILES)]
    version = _digest(tmp, files)
    cached = ['./', *files]  # the nosimd WASM too: the page picks by the browser's support
    worker = (WEB / 'sw.js').read_text().replace('__VERSION__', version)
    (tmp / 'sw.js').write_text(worker.replace('__FILES__', json.dumps(cached)))
    files.append('sw.js')
    atomic.replace_dir(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  total = sum((out / f).stat().st_size for f in files)
  return {'out': str(out), 'model': about, 'files': files, 'bytes': total, 'version': version}
