"""An HTTP file server on 127.0.0.1 that injects faults, for the remote-read tests.

`FaultServer(root)` serves the files under root. `faults[path]` (path as in the URL, e.g.
'/train/train-000000.tar', or '*' for every file) is a list of faults used up by the successive
GETs of that path; a GET with no fault left is served whole:

    'cut'    headers with the full Content-Length, then `cut_at` of the body, then the connection is closed
    '503'    HTTP 503 Service Unavailable
    'stall'  headers and `cut_at` of the body, then nothing until the server stops
    'alter'  the whole body with byte 700 changed (served for every GET while listed; not used up)
    'ok'     served whole (e.g. ['ok', '503', ...]: the probe passes, the reads then fail)

`honor_range`: answer `Range: bytes=N-` with 206 and the rest of the file (False: ignore it and
answer 200 with the whole body, as Python's http.server does). `requests` records (path, Range
header or None, status) of every GET.
"""
import http.server
import os
import threading
from typing import Optional


class FaultServer:
    def __init__(self, root: str, honor_range: bool = True, cut_at: float = 0.4):
        self.root, self.honor_range, self.cut_at = root, honor_range, cut_at
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, Optional[str], int]] = []
        self.release = threading.Event()  # stalled handlers wait on it
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server._serve(self)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a reader closing early resets the connection
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FaultServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def _fault(self, path: str) -> Optional[str]:
        with self.lock:
            for key in (path, "*"):
                todo = self.faults.get(key)
                if todo:
                    return todo[0] if todo[0] == "alter" else todo.pop(0)
        return None

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        rng = h.headers.get("Range")
        file = os.path.join(self.root, path.lstrip("/"))
        if not os.path.isfile(file):
            self._record(path, rng, 404)
            h.send_error(404)
            return
        fault = self._fault(path)
        if fault == "ok":
            fault = None
        if fault == "503":
            self._record(path, rng, 503)
            h.send_error(503)
            return
        data = open(file, "rb").read()
        if fault == "alter":
            data = data[:700] + bytes([data[700] ^ 0x01]) + data[701:]  # tar padding: the hash sees it, tar does not
        start = int(rng.partition("=")[2].partition("-")[0]) if rng and self.honor_range else 0
        status = 206 if start else 200
        self._record(path, rng, status)
        h.send_response(status)
        h.send_header("Content-Type", "application/x-tar")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        body = data[start:]
        if fault in ("cut", "stall"):
            h.wfile.write(body[: int(len(body) * self.cut_at)])
            h.wfile.flush()
            if fault == "stall":
                self.release.wait()
            h.close_connection = True
            return
        h.wfile.write(body)

    def _record(self, path: str, rng: Optional[str], status: int) -> None:
        with self.lock:
            self.requests.append((path, rng, status))

    def gets(self, status: Optional[int] = None) -> list:
        with self.lock:
            return [r for r in self.requests if status is None or r[2] == status]
