# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The DDPM reference authors
"""`ddpm web`: the page of web/ (an exported .onnx file sampled with onnxruntime-web) served with a model on
127.0.0.1, for a person to open or for one run in a headless Chromium.

The server sends the headers that cross-origin isolation needs (so that onnxruntime-web's wasm runs on threads) and
the right MIME types; it serves web/'s page at /, the model at /model.onnx and onnxruntime-web's files (the npm
package of web/package.json, installed by `make web`) at /ort/. The page posts what it sampled, or the error it
shows, to /result; run_headless reads it from there."""
from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

PAGE = Path(__file__).resolve().parent / "web"
ORT_DIST = PAGE / "node_modules" / "onnxruntime-web" / "dist"
PAGE_FILES = ("index.html", "app.js", "plan.js", "random.js", "sampler.js")
MIME = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
        ".mjs": "text/javascript; charset=utf-8", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class WebError(Exception):
    """What stops the page from being served or run: a missing npm package or browser, a browser that fails."""


def check_installed() -> None:
    if not (ORT_DIST / "ort.wasm.min.mjs").is_file():
        raise WebError(f"the page needs onnxruntime-web: run `make web` (or `npm ci --prefix {PAGE}`)")


def browser() -> str:
    """The Chromium to run headless: $DDPM_BROWSER, else the first of BROWSERS on the PATH."""
    given = os.environ.get("DDPM_BROWSER")
    if given and not shutil.which(given):
        raise WebError(f"DDPM_BROWSER={given} is not an executable")
    found = given or next(filter(None, map(shutil.which, BROWSERS)), None)
    if not found:
        raise WebError("no Chromium found: install Debian's chromium package (apt-get install chromium, or `make web` "
                       "as root) or set DDPM_BROWSER to a Chromium executable")
    return found


class Server:
    """The page and `model` served on 127.0.0.1:port (0: any free port) in a thread, while in a `with` block.
    url: the page's address with the model; results: the queue of what the page posts to /result; progress(k): called
    with each network call the page posts to /progress."""

    def __init__(self, model: str, port: int = 0, progress=None):
        check_installed()
        self.model, self.results, self.progress = Path(model), queue.Queue(), progress
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                path = urllib.parse.urlsplit(self.path).path.lstrip("/") or "index.html"
                ort_file = path.startswith("ort/") and "/" not in path[4:] and path[4:] not in ("", ".", "..")
                file = (server.model if path == "model.onnx" else PAGE / path if path in PAGE_FILES else
                        ORT_DIST / path[4:] if ort_file else None)
                if file is None or not file.is_file():
                    return self.send_error(404)
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", MIME.get(file.suffix, "application/octet-stream"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = urllib.parse.urlsplit(self.path).path
                if path == "/result":
                    server.results.put(json.loads(body))
                elif path == "/progress" and server.progress:
                    server.progress(json.loads(body)["row"])
                elif path != "/progress":
                    return self.send_error(404)
                self.send_response(204)
                self.end_headers()

            def end_headers(self):
                for key, value in {**ISOLATION, "Cache-Control": "no-store"}.items():
                    self.send_header(key, value)
                super().end_headers()

            def log_message(self, *args):
                pass

        class Http(http.server.ThreadingHTTPServer):
            def handle_error(self, request, address):  # a browser that closed while a file was on its way
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, address)

        try:
            self.http = Http(("127.0.0.1", port), Handler)
        except OSError as e:
            raise WebError(f"cannot serve on 127.0.0.1:{port} ({e.strerror or e})") from None
        self.port = self.http.server_address[1]

    def url(self, **query) -> str:
        """The page's address, its controls set by `query` (None values left out)."""
        query = {"model": "model.onnx", **{k: v for k, v in query.items() if v is not None}}
        return f"http://127.0.0.1:{self.port}/?{urllib.parse.urlencode(query)}"

    def __enter__(self):
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.http.shutdown()
        self.http.server_close()


def run_headless(model: str, timeout: float = 600, progress=None, **query) -> dict:
    """Open the page on `model` once in a headless Chromium with the controls of `query` (the page's field names),
    sample, and return what the page posted: {"ok": True, "samples": float32 [n, C, H, W], "calls", "seconds",
    "network_seconds", "provider", "threads", "isolated", ...}, or {"ok": False, "error": the message the page
    shows}. progress(): called once per network call. WebError when the browser fails or the page does not answer
    within `timeout` seconds."""
    done = 0

    def advance(row: int) -> None:
        nonlocal done
        for _ in range(row - done):
            progress()
        done = max(done, row)
    profile = tempfile.mkdtemp(prefix="ddpm-web-")
    command = [browser(), "--headless=new", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
               f"--user-data-dir={profile}"] + (["--no-sandbox"] if os.geteuid() == 0 else [])
    # WebGPU in headless Chromium: on the GPU, or, where there is none, on Chromium's software Vulkan (SwiftShader)
    command += ["--enable-unsafe-webgpu", "--enable-unsafe-swiftshader"] if query.get("provider") == "webgpu" else \
        ["--disable-gpu"]
    try:
        with Server(model, progress=progress and advance) as server, open(os.path.join(profile, "log"), "w+") as log:
            # a session of its own: the browser's helper processes are stopped with it
            process = subprocess.Popen([*command, server.url(run=1, report=1, **query)], stdout=log, stderr=log,
                                       start_new_session=True)
            try:
                result = _answer(server, process, log, command[0], timeout)
            finally:
                _stop(process)
    finally:
        for _ in range(50):  # the helpers may still be closing their files
            shutil.rmtree(profile, ignore_errors=True)
            if not os.path.exists(profile):
                break
            time.sleep(0.1)
    if result.get("ok"):
        samples = np.frombuffer(base64.b64decode(result["samples"]), dtype=np.float32)
        result["samples"] = samples.reshape(result["shape"])
    return result


def _answer(server: Server, process, log, name: str, timeout: float) -> dict:
    """What the page posts to /result, or WebError when the browser exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return server.results.get(timeout=0.2)
        except queue.Empty:
            if process.poll() is not None:
                log.seek(0)
                raise WebError(f"{name} exited ({process.returncode}) before the page answered: "
                               f"{log.read()[-500:].strip()}") from None
            if time.monotonic() > deadline:
                raise WebError(f"the page did not answer within {timeout:g} s") from None


def _stop(process) -> None:
    """The browser and its helper processes (its process group) stopped."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
