"""A local stand-in for the Hugging Face Hub, enough for huggingface_hub 2.x's real download and upload code paths.

`FakeHub(root)` serves dataset repos stored as plain folders `root/<namespace>/<name>/` over HTTP on 127.0.0.1 (random
port). It implements only the endpoints that `hf_hub_download`, `snapshot_download`, `HfApi.create_repo` and
`HfApi.upload_folder` call:

    HEAD/GET /datasets/{repo}/resolve/{revision}/{path}    file metadata (X-Repo-Commit, ETag, Content-Length) / body
    GET      /api/datasets/{repo}[/revision/{revision}]    repo info (the commit `sha`)
    GET      /api/datasets/{repo}/tree/{revision}[/{path}] tree listing (`?recursive=true`)
    POST     /api/repos/create                             create an (empty) repo; 409 (with its url) if it exists
    POST     /api/datasets/{repo}/preupload/{revision}     every file is "regular" (never LFS, never Xet)
    POST     /api/datasets/{repo}/commit/{revision}        NDJSON commit; "file" entries carry base64 contents

No Xet header (X-Xet-Hash, xet-auth links) and no LFS metadata is ever sent, so clients stay on plain HTTP. The commit
of a repo is the sha1 of its tree, so it changes exactly when the contents change. Every request is recorded in
`requests` as (method, path) (its Authorization header in `authorization`); requests to any other route get a 404 and are also recorded in `unexpected`."""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as `oid` / ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str]] = []
        self.authorization: list[str | None] = []  # the Authorization header of every request, in order
        self.unexpected: list[tuple[str, str]] = []
        self.created: list[dict] = []  # payloads of /api/repos/create
        self.commits: list[dict] = []  # {"repo", "header", "files", "oid"} per accepted commit
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="fake-hub", daemon=True)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "FakeHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # ---------------------------------------------------------------- repo content
    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def add_file(self, repo_id: str, path: str, data: bytes) -> None:
        target = self.repo_dir(repo_id) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def files(self, repo_id: str) -> dict[str, bytes]:
        base = self.repo_dir(repo_id)
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}

    def commit_sha(self, repo_id: str) -> str:
        tree = "".join(f"{path}\0{git_blob_sha(data)}\n" for path, data in self.files(repo_id).items())
        return hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest()

    def count(self, method: str, prefix: str = "") -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every response carries Content-Length

        def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean
            pass

        # ------------------------------------------------------------ plumbing
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                  content_type: str = "application/json", head: bool = False, length: int | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _json(self, status: int, payload, headers: dict | None = None, head: bool = False) -> None:
            self._send(status, json.dumps(payload).encode(), headers, head=head)

        def _error(self, status: int, code: str, message: str, headers: dict | None = None, head=False) -> None:
            self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message,
                                                    **(headers or {})}, head=head)

        def _repo(self, parts: list[str]) -> tuple[str | None, list[str]]:
            """Split `namespace/name/rest...`; None if the repo does not exist."""
            if len(parts) < 2:
                return None, []
            repo_id = f"{parts[0]}/{parts[1]}"
            return (repo_id if hub.repo_dir(repo_id).is_dir() else None), parts[2:]

        def _check_revision(self, repo_id: str, revision: str) -> bool:
            return revision in ("main", hub.commit_sha(repo_id))

        # ------------------------------------------------------------ dispatch
        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            with hub.lock:
                hub.requests.append((method, path))
                hub.authorization.append(self.headers.get("Authorization"))
            parts = [p for p in path.split("/") if p]
            try:
                if method in ("HEAD", "GET") and parts[:1] == ["datasets"] and "resolve" in parts:
                    return self._resolve(parts[1:], head=method == "HEAD")
                if method == "GET" and parts[:2] == ["api", "datasets"]:
                    repo_id, rest = self._repo(parts[2:])
                    if repo_id is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    if not rest or rest[0] == "revision":
                        return self._info(repo_id, "/".join(rest[1:]) or "main")
                    if rest[0] == "tree" and len(rest) >= 2:
                        return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
                if method == "POST" and parts == ["api", "repos", "create"]:
                    return self._create(json.loads(self._body()))
                if method == "POST" and parts[:2] == ["api", "datasets"]:
                    repo_id, rest = self._repo(parts[2:])
                    if repo_id is None:
                        self._body()
                        return self._error(404, "RepoNotFound", "Repository not found")
                    if len(rest) == 2 and rest[0] == "preupload":
                        return self._preupload(repo_id, rest[1], json.loads(self._body()))
                    if len(rest) == 2 and rest[0] == "commit":
                        return self._commit(repo_id, rest[1], self._body())
            except Exception as exc:  # a bug in the stand-in: make it loud on the client side
                with hub.lock:
                    hub.unexpected.append((method, f"{path} -> {exc!r}"))
                return self._error(500, "FakeHubError", repr(exc))
            if method == "POST":
                self._body()
            with hub.lock:
                hub.unexpected.append((method, path))
            self._error(404, "NotImplemented", f"fake hub does not serve {method} {path}", head=method == "HEAD")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        # ------------------------------------------------------------ endpoints
        def _resolve(self, parts: list[str], head: bool) -> None:
            # parts: namespace, name, "resolve", revision, *path
            repo_id, rest = self._repo(parts)
            if repo_id is None or len(rest) < 3 or rest[0] != "resolve":
                return self._error(404, "RepoNotFound", "Repository not found", head=head)
            revision, filename = rest[1], "/".join(rest[2:])
            if not self._check_revision(repo_id, revision):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            commit = hub.commit_sha(repo_id)
            target = hub.repo_dir(repo_id) / filename
            if not target.is_file():
                return self._error(404, "EntryNotFound", f"{filename} does not exist",
                                   {"X-Repo-Commit": commit}, head=head)
            data = target.read_bytes()
            self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha(data)}"',
                                   "Accept-Ranges": "bytes"}, content_type="application/octet-stream", head=head)

        def _info(self, repo_id: str, revision: str) -> None:
            if not self._check_revision(repo_id, revision):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            siblings = [{"rfilename": path} for path in hub.files(repo_id)]
            self._json(200, {"id": repo_id, "author": repo_id.split("/")[0], "sha": hub.commit_sha(repo_id),
                             "private": True, "disabled": False, "gated": False, "tags": [],
                             "siblings": siblings})

        def _tree(self, repo_id: str, revision: str, prefix: str, query: dict) -> None:
            if not self._check_revision(repo_id, revision):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            recursive = query.get("recursive", "false").lower() in ("1", "true")
            base = f"{prefix.strip('/')}/" if prefix else ""
            entries, folders = [], set()
            for path, data in hub.files(repo_id).items():
                if not path.startswith(base):
                    continue
                dirs = path[len(base):].split("/")[:-1]
                for depth in range(1, (len(dirs) if recursive else min(len(dirs), 1)) + 1):
                    folders.add(base + "/".join(dirs[:depth]))
                if recursive or not dirs:
                    entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)})
            listing = [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()}
                       for f in sorted(folders)]
            self._json(200, listing + entries)

        def _create(self, payload: dict) -> None:
            with hub.lock:
                hub.created.append(payload)
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            if payload.get("type") != "dataset":
                return self._error(400, "BadRequest", "the fake hub only holds dataset repos")
            url = f"{hub.url}/datasets/{repo_id}"
            if hub.repo_dir(repo_id).is_dir():  # the Hub's 409 still carries the url: create_repo(exist_ok) reads it
                message = "You already created this dataset repo"
                return self._json(409, {"error": message, "url": url}, {"X-Error-Message": message})
            hub.repo_dir(repo_id).mkdir(parents=True)
            self._json(200, {"url": url, "name": repo_id, "id": repo_id})

        def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
            if not self._check_revision(repo_id, unquote(revision)):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            current = hub.files(repo_id)
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                      "oid": git_blob_sha(current[f["path"]]) if f["path"] in current else None}
                     for f in payload["files"]]
            self._json(200, {"files": files, "commitOid": hub.commit_sha(repo_id)})

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            if revision != "main":
                return self._error(404, "RevisionNotFound", f"the fake hub only commits to main, not {revision}")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next((item["value"] for item in lines if item["key"] == "header"), None)
            written = []
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    continue
                if key == "file" and value.get("encoding") == "base64":
                    hub.add_file(repo_id, value["path"], base64.b64decode(value["content"]))
                    written.append(value["path"])
                elif key == "deletedFile":
                    (hub.repo_dir(repo_id) / value["path"]).unlink(missing_ok=True)
                else:  # lfsFile etc.: never requested by this server's preupload answers
                    return self._error(400, "BadRequest", f"unsupported commit operation {key}")
            oid = hub.commit_sha(repo_id)
            with hub.lock:
                hub.commits.append({"repo": repo_id, "header": header, "files": written, "oid": oid})
            self._json(200, {"success": True, "commitOid": oid, "pullRequestUrl": None,
                             "commitUrl": f"{hub.url}/datasets/{repo_id}/commit/{oid}"})

    return Handler


__all__ = ["FakeHub", "git_blob_sha"]
