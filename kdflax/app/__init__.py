"""A static web app that runs an exported `.tflite` classifier in the browser (MediaPipe Tasks
for Web, WebAssembly, CPU), on a phone or a laptop, offline once opened.

    from kdflax.app.build import build_app
    build_app('beans_int8.tflite', 'beans_app')      # index.html, app.js, model, MediaPipe WASM
    from kdflax.app.serve import serve
    serve('beans_app', port=8000)                    # the folder on the local network

`build` writes the folder; `serve` is a plain static server; `web/` holds the page's sources
and the pinned `@mediapipe/tasks-vision` (package.json / package-lock.json, `npm ci`).
"""
