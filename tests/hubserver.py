"""A small in-process Hugging Face Hub server for tests that must not use the network.

It speaks the part of the Hub HTTP protocol that ``huggingface_hub`` 2.x uses to create a repo,
commit files and download them again, on ``127.0.0.1`` at a random port, in a background thread:

==========================================================  =============================================
request                                                     used by
==========================================================  =============================================
``POST /api/repos/create``                                  ``HfApi.create_repo``
``POST /api/validate-yaml``                                 ``create_commit`` (when README.md is added)
``POST /api/models/{repo}/preupload/{rev}``                 ``create_commit`` (always answers "regular")
``POST /api/models/{repo}/commit/{rev}``                    ``create_commit`` (NDJSON, base64 files)
``GET  /api/agent-harnesses``                              huggingface_hub's agent detection (empty)
``GET  /api/models/{repo}[/revision/{rev}]``                ``model_info`` / ``repo_info``
``GET  /api/models/{repo}/tree/{rev}[/{path}]``             ``list_repo_tree`` / ``list_repo_files``
``GET  /api/models/{repo}/refs``                            ``list_repo_refs``
``GET  /api/models/{repo}/commits/{rev}``                   ``list_repo_commits``
``HEAD|GET /{repo}/resolve/{rev}/{path}``                   ``hf_hub_download`` (metadata, then the file)
``HEAD|GET /__cdn/{blob}``                                  downloads redirected "off the Hub" (``cdn=True``)
==========================================================  =============================================

Revisions are branch names, tags or full commit shas. Repos keep every commit, so an old commit
still serves the files it had. Failures can be injected with :meth:`FakeHub.fail`, write access can
be restricted to one token with ``require_token``, and every request is logged in
:attr:`FakeHub.requests`.

With ``cdn=True``, ``resolve`` answers like the real Hub does for LFS files: a ``302`` whose
``Location`` points at another origin (``http://localhost:<port>/__cdn/<blob>``, a different
origin than ``127.0.0.1`` for the client) carrying ``X-Repo-Commit``, ``X-Linked-Etag`` and
``X-Linked-Size``; the client then downloads from that location.

Usage::

    with FakeHub() as hub:
        os.environ["HF_ENDPOINT"] = hub.url   # and huggingface_hub.constants.ENDPOINT, see the tests
        ...
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeHub", "git_blob_sha"]

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"


def git_blob_sha(content: bytes) -> str:
    """The git object id of a file's content (what the Hub sends as ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    files: dict[str, bytes]
    date: str


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if rev in self.commits:
            return rev
        return None


@dataclass
class _Failure:
    status: int
    method: str | None
    path: re.Pattern | None
    times: int | None  # None: forever
    message: str


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class FakeHub:
    """An in-process Hub server (see the module docstring).

    Args:
        cdn: serve files through a redirect to another origin (like LFS files on the real Hub).
        require_token: if set, write requests must carry ``Authorization: Bearer <token>``.

    Attributes:
        url: the endpoint, ``http://127.0.0.1:<port>`` (set by :meth:`start`).
        requests: ``(method, path)`` of every request received, in order.
    """

    def __init__(self, *, cdn: bool = False, require_token: str | None = None) -> None:
        self.cdn = cdn
        self.require_token = require_token
        self.requests: list[tuple[str, str]] = []
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        self.url = ""
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls -----------------------------------------------------------------------------
    def fail(
        self,
        status: int = 500,
        *,
        method: str | None = None,
        path: str | None = None,
        times: int | None = None,
        message: str = "Internal Error - injected by the test server",
    ) -> None:
        """Answer matching requests (``method``; ``path``: a regex searched in the URL path) with
        ``status`` (``times`` times, default: until :meth:`clear_failures`)."""
        with self._lock:
            self._failures.append(
                _Failure(status, method.upper() if method else None, re.compile(path) if path else None, times, message)
            )

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def head(self, repo_id: str, branch: str = "main") -> str:
        """The commit sha a branch points to."""
        with self._lock:
            return self._repos[repo_id].branches[branch]

    def file(self, repo_id: str, revision: str, path: str) -> bytes:
        """A file's content at a revision."""
        with self._lock:
            repo = self._repos[repo_id]
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(revision)
            return repo.commits[oid].files[path]

    def commit_count(self, repo_id: str) -> int:
        with self._lock:
            return len(self._repos[repo_id].commits)

    def create_tag(self, repo_id: str, tag: str, revision: str = "main") -> None:
        with self._lock:
            repo = self._repos[repo_id]
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(revision)
            repo.tags[tag] = oid

    # -- state changes -----------------------------------------------------------------------------
    def _new_oid(self, *parts: bytes) -> str:
        self._counter += 1
        h = hashlib.sha1(str(self._counter).encode())
        for p in parts:
            h.update(p)
        return h.hexdigest()

    def _create_repo(self, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_id, private, _now())
        files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        oid = self._new_oid(repo_id.encode())
        repo.commits[oid] = _Commit(oid, None, "initial commit", "", files, _now())
        repo.branches["main"] = oid
        self._repos[repo_id] = repo
        for content in files.values():
            self._blobs[git_blob_sha(content)] = content
        return repo

    def _commit(self, repo: _Repo, branch: str, header: dict, ops: list[tuple[str, str, bytes | None]]) -> _Commit:
        parent_oid = repo.branches[branch]
        if header.get("parentCommit") and header["parentCommit"] != parent_oid:
            raise _HttpError(412, f"A commit has happened since. Please refresh and try again (head is {parent_oid}).")
        files = dict(repo.commits[parent_oid].files)
        for kind, path, content in ops:
            if kind == "file":
                assert content is not None
                files[path] = content
                self._blobs[git_blob_sha(content)] = content
            elif kind == "deletedFile":
                if path not in files:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif kind == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
        digest = json.dumps({p: git_blob_sha(c) for p, c in sorted(files.items())}).encode()
        oid = self._new_oid(parent_oid.encode(), digest, json.dumps(header).encode())
        commit = _Commit(oid, parent_oid, header.get("summary", ""), header.get("description", ""), files, _now())
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub
    server_version = "FakeHub/1.0"

    # -- plumbing ----------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass  # keep test output clean; requests are in hub.requests

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head: bool = False) -> None:
        self.send_response(status)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        hdrs.setdefault("Content-Length", str(len(body)))
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers, head=self.command == "HEAD")

    def _error(self, err: _HttpError) -> None:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        body = json.dumps({"error": err.message, **err.extra}).encode()
        self._send(err.status, body, headers, head=self.command == "HEAD")

    def _dispatch(self) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        with hub._lock:
            hub.requests.append((self.command, split.path))
            failure = None
            for f in hub._failures:
                if (f.method is None or f.method == self.command) and (f.path is None or f.path.search(split.path)):
                    failure = f
                    break
            if failure is not None and failure.times is not None:
                failure.times -= 1
                if failure.times <= 0:
                    hub._failures.remove(failure)
        body = self._body() if self.command in ("POST", "PUT", "PATCH", "DELETE") else b""
        if failure is not None:
            self._error(_HttpError(failure.status, failure.message))
            return
        try:
            self._route(split.path, parse_qs(split.query), body)
        except _HttpError as e:
            self._error(e)
        except Exception as e:  # a bug in the test server: answer 500 with the reason
            self._error(_HttpError(500, f"test server error: {type(e).__name__}: {e}"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- helpers -------------------------------------------------------------------------------------
    def _check_write(self) -> None:
        want = self.hub.require_token
        if want is not None and self.headers.get("Authorization") != f"Bearer {want}":
            raise _HttpError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> _Repo:
        repo = self.hub._repos.get(repo_id)
        if repo is None:
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def _rev(self, repo: _Repo, rev: str) -> str:
        oid = repo.resolve(rev)
        if oid is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return oid

    # -- routes --------------------------------------------------------------------------------------
    def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        m = self.command
        if path == "/api/repos/create" and m == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and m == "POST":
            return self._json(200, {"errors": [], "warnings": []})
        if path == "/api/agent-harnesses" and m == "GET":  # huggingface_hub's agent registry (best effort)
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})
        api = re.fullmatch(rf"/api/models/({_REPO_PART})/({_REPO_PART})(/.*)?", path)
        if api:
            repo_id = f"{unquote(api.group(1))}/{unquote(api.group(2))}"
            rest = api.group(3) or ""
            return self._api(repo_id, rest, query, body)
        if path.startswith("/api/"):
            raise _HttpError(404, f"unsupported endpoint {m} {path} (only model repos are served)")
        cdn = re.fullmatch(r"/__cdn/([0-9a-f]{40})", path)
        if cdn and m in ("GET", "HEAD"):
            return self._serve_blob(cdn.group(1), {})
        res = re.fullmatch(rf"/({_REPO_PART})/({_REPO_PART})/resolve/([^/]+)/(.+)", path)
        if res and m in ("GET", "HEAD"):
            repo_id = f"{unquote(res.group(1))}/{unquote(res.group(2))}"
            return self._resolve(repo_id, unquote(res.group(3)), unquote(res.group(4)))
        raise _HttpError(404, f"unsupported endpoint {m} {path}")

    def _create_repo(self, payload: dict) -> None:
        self._check_write()
        name, org = payload.get("name"), payload.get("organization")
        if payload.get("type") not in (None, "model"):
            raise _HttpError(400, "this test server only hosts model repos")
        if not name or not org:
            raise _HttpError(400, "repo ids must have the form org/name here")
        repo_id = f"{org}/{name}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub._repos:
                # like the Hub: a 409 that still carries the repo url (create_repo(exist_ok=True) reads it)
                raise _HttpError(409, "You already created this model repo", extra={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub._create_repo(repo_id, private)
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _api(self, repo_id: str, rest: str, query: dict[str, list[str]], body: bytes) -> None:
        m = self.command
        with self.hub._lock:
            repo = self._repo(repo_id)
            pre = re.fullmatch(r"/preupload/([^/]+)", rest)
            if pre and m == "POST":
                self._check_write()
                oid = self._rev(repo, unquote(pre.group(1)))
                files = repo.commits[oid].files
                payload = json.loads(body)
                answer = [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None,
                    }
                    for f in payload["files"]
                ]
                return self._json(200, {"files": answer, "commitOid": oid})
            com = re.fullmatch(r"/commit/([^/]+)", rest)
            if com and m == "POST":
                self._check_write()
                return self._commit(repo, unquote(com.group(1)), query, body)
            if rest == "" and m == "GET":
                return self._info(repo, repo.branches["main"])
            rev = re.fullmatch(r"/revision/([^/]+)", rest)
            if rev and m == "GET":
                return self._info(repo, self._rev(repo, unquote(rev.group(1))))
            tree = re.fullmatch(r"/tree/([^/]+)(/.*)?", rest)
            if tree and m == "GET":
                oid = self._rev(repo, unquote(tree.group(1)))
                sub = unquote(tree.group(2) or "").strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._tree(repo.commits[oid], sub, recursive)
            if rest == "/refs" and m == "GET":
                def ref(kind: str, name: str, oid: str) -> dict:
                    return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

                return self._json(
                    200,
                    {
                        "branches": [ref("heads", n, o) for n, o in repo.branches.items()],
                        "tags": [ref("tags", n, o) for n, o in repo.tags.items()],
                        "converts": [],
                        "pullRequests": [],
                    },
                )
            commits = re.fullmatch(r"/commits/([^/]+)", rest)
            if commits and m == "GET":
                oid: str | None = self._rev(repo, unquote(commits.group(1)))
                out = []
                while oid is not None:
                    c = repo.commits[oid]
                    out.append({"id": c.oid, "title": c.title, "message": c.message,
                                "authors": [{"user": "tester"}], "date": c.date})
                    oid = c.parent
                return self._json(200, out)
        raise _HttpError(404, f"unsupported endpoint {m} /api/models/{repo_id}{rest}")

    def _commit(self, repo: _Repo, branch: str, query: dict[str, list[str]], body: bytes) -> None:
        if query.get("create_pr", ["0"])[0] not in ("0", ""):
            raise _HttpError(400, "pull requests are not supported by this test server")
        if branch not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        header: dict = {}
        ops: list[tuple[str, str, bytes | None]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HttpError(400, f"unsupported encoding {value.get('encoding')!r}")
                ops.append(("file", value["path"], base64.b64decode(value["content"])))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, value["path"], None))
            elif key == "lfsFile":
                raise _HttpError(400, "LFS uploads are not supported by this test server (preupload says 'regular')")
            else:
                raise _HttpError(400, f"unknown commit operation {key!r}")
        if not header.get("summary"):
            raise _HttpError(400, "the commit needs a summary")
        commit = self.hub._commit(repo, branch, header, ops)
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{commit.oid}",
                "hookOutput": "",
            },
        )

    def _info(self, repo: _Repo, oid: str) -> None:
        c = repo.commits[oid]
        self._json(
            200,
            {
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "lastModified": c.date,
                "createdAt": repo.created,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(c.files)],
            },
        )

    def _tree(self, commit: _Commit, sub: str, recursive: bool) -> None:
        prefix = sub + "/" if sub else ""
        entries: dict[str, dict] = {}
        for p, content in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):]
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                                "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entries[p] = {"type": "file", "oid": git_blob_sha(content), "size": len(content), "path": p}
        if sub and not entries:
            raise _HttpError(404, f"{sub} does not exist", "EntryNotFound")
        self._json(200, list(entries.values()))

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        with self.hub._lock:
            repo = self._repo(repo_id)
            oid = self._rev(repo, rev)
            files = repo.commits[oid].files
            if path not in files:
                raise _HttpError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": oid})
            content = files[path]
        blob = git_blob_sha(content)
        headers = {"X-Repo-Commit": oid, "ETag": f'"{blob}"'}
        if self.hub.cdn:
            headers.update(
                {
                    "Location": f"http://localhost:{self.hub.port}/__cdn/{blob}",
                    "X-Linked-Etag": f'"{blob}"',
                    "X-Linked-Size": str(len(content)),
                }
            )
            self._send(302, b"", headers, head=self.command == "HEAD")
            return
        self._serve_blob(blob, headers)

    def _serve_blob(self, blob: str, headers: dict[str, str]) -> None:
        with self.hub._lock:
            content = self.hub._blobs.get(blob)
        if content is None:
            raise _HttpError(404, "no such blob")
        headers = {"ETag": f'"{blob}"', **headers, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        status, body = 200, content
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng:
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else len(content) - 1
            body = content[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(content)}"
        self._send(status, body, headers, head=self.command == "HEAD")


if __name__ == "__main__":  # manual use: python tests/hubserver.py
    with FakeHub() as h:
        print(f"fake Hub at {h.url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
