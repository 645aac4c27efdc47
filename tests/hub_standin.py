"""A stand-in for the Hugging Face hub's HTTP API on 127.0.0.1, with what huggingface_hub calls to resolve a revision
and fetch files: GET /api/models/{repo}/revision/{rev} (the commit sha and the file list) and HEAD or GET, with or
without a Range, on /{repo}/resolve/{rev}/{file}, with the headers huggingface_hub reads (X-Repo-Commit, ETag,
Content-Length, Content-Range, X-Error-Code). It counts the body bytes it serves of each file, by range."""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
CDN = re.compile(r"^/cdn/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"refs": {name: sha}, "commits": {sha: {file: bytes}}}
        self.served: list[tuple[str, str, int, int]] = []  # (repo id, file, first byte, end) of each body sent
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers)
        self.fail: dict[tuple[str, str], int] = {}  # (repo id, file or "api") -> HTTP status to answer
        self.fail_get: dict[tuple[str, str], int] = {}  # the same, for GET only (a HEAD still answers)
        self.ignore_range = False  # as some proxies do: answer 200 with the whole file
        self.redirect_lfs = False  # as the hub does: *.safetensors resolve to a CDN (here: localhost, another origin)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "HubStandIn":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def push(self, repo_id: str, files: dict[str, bytes] | Path, ref: str = "main") -> str:
        """A new commit of `files` (a dict, or every file of a folder) on branch or tag `ref`; returns its sha."""
        if isinstance(files, Path):
            files = {p.name: p.read_bytes() for p in sorted(files.iterdir()) if p.is_file()}
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        h = hashlib.sha1(repo_id.encode() + str(len(repo["commits"])).encode())
        for name, data in sorted(files.items()):
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        sha = h.hexdigest()
        repo["commits"][sha] = dict(files)
        repo["refs"][ref] = sha
        return sha

    def bytes_served(self, repo_id: str, filename: str) -> int:
        return sum(end - start for r, f, start, end in self.served if (r, f) == (repo_id, filename))

    def ranges_served(self, repo_id: str, filename: str) -> list[tuple[int, int]]:
        return [(start, end) for r, f, start, end in self.served if (r, f) == (repo_id, filename)]

    def files_served(self) -> set[tuple[str, str]]:
        return {(r, f) for r, f, _, _ in self.served}

    def resolve(self, repo_id: str, rev: str):
        repo = self.repos[repo_id]
        sha = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
        return sha, repo["commits"].get(sha)


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._answer(head=True)

        def do_GET(self):
            self._answer(head=False)

        def _error(self, status: int, code: str | None = None, sha: str | None = None, message: str = "error"):
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            if sha:
                self.send_header("X-Repo-Commit", sha)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _answer(self, head: bool):
            path = urlsplit(self.path).path
            with hub.lock:
                hub.requests.append((self.command, path, dict(self.headers)))
            api, resolve, cdn = API.match(path), RESOLVE.match(path), CDN.match(path)
            if cdn:
                repo_id, sha, filename = cdn.group(1), cdn.group(2), unquote(cdn.group(3))
                return self._file(repo_id, filename, hub.repos[repo_id]["commits"][sha][filename], {}, head)
            if api:
                repo_id, rev, filename = api.group(1), unquote(api.group(2) or "main"), "api"
            elif resolve:
                repo_id, rev, filename = resolve.group(1), unquote(resolve.group(2)), unquote(resolve.group(3))
            else:
                return self._error(404, message="no such endpoint")
            status = hub.fail.get((repo_id, filename)) or (not head and hub.fail_get.get((repo_id, filename)))
            if status:  # a status, or (status, X-Error-Code)
                status, code = status if isinstance(status, tuple) else (status, None)
                return self._error(status, code, message="the stand-in was told to fail")
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound", message="Repository not found")
            sha, files = hub.resolve(repo_id, rev)
            if files is None:
                return self._error(404, "RevisionNotFound", message=f"Invalid rev id: {rev}")
            if api:
                siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())]
                return self._send(200, json.dumps({"id": repo_id, "sha": sha, "siblings": siblings}).encode(),
                                  {"Content-Type": "application/json"}, head)
            data = files.get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", sha, message="Entry not found")
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            if hub.redirect_lfs and filename.endswith(".safetensors"):
                where = f"http://localhost:{hub.server.server_address[1]}/cdn/{repo_id}/{sha}/{filename}"
                return self._send(302, b"", {"Location": where, "X-Repo-Commit": sha, "X-Linked-Etag": etag,
                                             "X-Linked-Size": str(len(data))}, head)
            self._file(repo_id, filename, data, {"X-Repo-Commit": sha, "ETag": etag}, head)

        def _file(self, repo_id: str, filename: str, data: bytes, headers: dict, head: bool):
            headers = {**headers, "Accept-Ranges": "bytes"}
            start, end, status = 0, len(data), 200
            m = None if hub.ignore_range else RANGE.match(self.headers.get("Range", ""))
            if m:
                start = int(m.group(1))
                if start >= len(data):
                    return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"}, head)
                end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            if not head:
                with hub.lock:
                    hub.served.append((repo_id, filename, start, end))
            self._send(status, data[start:end], headers, head)

        def _send(self, status: int, body: bytes, headers: dict, head: bool):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler
