"""Git servers on loopback for issue 16's pull-step tests: flow code cloned by Prefect's
`git_clone` step over smart HTTP(S) and over SSH, against real git, with real refusals.

- `make_bare_repo()` builds a bare repository from a dict of files (one commit per branch) and
  returns each branch's commit SHA, so a test can clone a branch or a commit.
- `GitHttpServer` serves bare repositories with Debian git's `git http-backend` (CGI) behind a
  `ThreadingHTTPServer` on 127.0.0.1. A repository may be private: then it answers 401 with
  `WWW-Authenticate: Basic` unless the Basic password (or the username, for the
  `https://TOKEN@host/...` form Prefect's `access_token` produces) equals its token. Unknown
  repositories answer 404. With `tls=True` it serves HTTPS with a self-signed certificate
  (`ca_file`): Prefect puts `access_token` into the URL only for `https://` repositories.
- `SshGitServer` runs Debian's `sshd` on 127.0.0.1 with a host key of its own, public key only,
  for a dedicated user (`dwgit`, shell `git-shell`) whose authorized key is one the rig
  generates; `client_dir` holds that private key and a `known_hosts`, ready to bind-mount.

Everything listens on 127.0.0.1 only and is removed (processes, temp dirs) on exit.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .prefect_rig import REPO_DIR, free_port
from .service import Service

LOOPBACK = "127.0.0.1"
GIT_CLONE = "prefect.deployments.steps.git_clone"  # the pull step that clones from these
GIT_IMAGE = "dockerworker/prefect-git:3.9.1-local"  # Prefect 3.9.1 + git, ssh, s3fs
SSH_USER = "dwgit"
_GIT_ENV = {  # commits that do not depend on the host's git config or clock
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "dockerworker tests",
    "GIT_AUTHOR_EMAIL": "tests@dockerworker.invalid",
    "GIT_COMMITTER_NAME": "dockerworker tests",
    "GIT_COMMITTER_EMAIL": "tests@dockerworker.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}

Files = Mapping[str, str | bytes]


def _git(*args: str, cwd: Path | None = None) -> str:
    """Run git with a clean config; raise with its stderr when it fails (loud, not silent)."""
    env = {**os.environ, **_GIT_ENV}
    done = subprocess.run(["git", *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout.strip()


def _write_files(work: Path, files: Files) -> None:
    for name, content in files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def make_bare_repo(
    path: Path,
    files: Files,
    branch: str = "main",
    extra_branches: Mapping[str, Files] | None = None,
) -> dict[str, str]:
    """Create the bare repository `path` whose `branch` (its HEAD) has one commit of `files`;
    each of `extra_branches` is one more commit on top of it adding/replacing its files.
    Returns {branch: commit SHA} for every branch."""
    shas: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="dw-gitwork-") as tmp:
        work = Path(tmp)
        _git("init", "-q", "-b", branch, str(work))
        _write_files(work, files)
        _git("add", "-A", cwd=work)
        _git("commit", "-q", "-m", f"{branch}: {len(files)} files", cwd=work)
        shas[branch] = _git("rev-parse", "HEAD", cwd=work)
        for name, more in (extra_branches or {}).items():
            _git("checkout", "-q", "-b", name, branch, cwd=work)
            _write_files(work, more)
            _git("add", "-A", cwd=work)
            _git("commit", "-q", "-m", f"{name}: {len(more)} files", cwd=work)
            shas[name] = _git("rev-parse", "HEAD", cwd=work)
        path.parent.mkdir(parents=True, exist_ok=True)
        _git("init", "-q", "--bare", "-b", branch, str(path))
        _git("push", "-q", str(path), *(f"refs/heads/{b}:refs/heads/{b}" for b in shas), cwd=work)
    return shas


# --- smart HTTP ------------------------------------------------------------------------------


@dataclass
class _Repo:
    token: str | None
    shas: dict[str, str]


@dataclass
class HttpRequestRecord:
    """One request the HTTP server answered (for assertions: was auth offered, what status)."""

    method: str
    path: str
    status: int
    authorized_as: str | None = None
    content_encoding: str | None = None  # "gzip" when git compressed the request body
    chunked: bool = False  # git sends bodies larger than http.postBuffer chunked


def _read_chunked(rfile: object) -> bytes:
    """Decode a chunked request body (git sends one for large POSTs when it cannot gzip)."""
    body = bytearray()
    while True:
        line = rfile.readline()  # type: ignore[attr-defined]
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):  # type: ignore[attr-defined]
                pass  # trailers
            return bytes(body)
        body += rfile.read(size)  # type: ignore[attr-defined]
        rfile.readline()  # type: ignore[attr-defined]  # the CRLF after each chunk


def _parse_cgi(output: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Split a CGI answer into (status, headers, body); `Status: 404 Not Found` sets status."""
    sep = min((i for i in (output.find(b"\r\n\r\n"), output.find(b"\n\n")) if i >= 0), default=-1)
    if sep < 0:
        raise ValueError(f"no CGI header block in {output[:200]!r}")
    head, body = output[:sep], output[sep:].lstrip(b"\r\n")
    status, headers = 200, []
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.strip().split()[0])
        elif name:
            headers.append((name.strip(), value.strip()))
    return status, headers, body


class GitHttpServer(Service):
    """Smart-HTTP git on 127.0.0.1 (a context manager). `add_repo()` adds a repository (with
    an optional token); `url(name)` is its clone URL. `requests` records what was answered."""

    def __init__(self, tls: bool = False, refuse_status: int = 401) -> None:
        """`tls`: serve HTTPS with a self-signed certificate for 127.0.0.1 (`ca_file`).
        `refuse_status`: the answer to a wrong token (401, or 403 like some forges)."""
        self.tls = tls
        self.refuse_status = refuse_status
        self.root = Path(tempfile.mkdtemp(prefix="dw-githttp-"))
        self.repos: dict[str, _Repo] = {}
        self.requests: list[HttpRequestRecord] = []
        self.ca_file: Path | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    def url(self, name: str) -> str:
        """Clone URL of repository `name` (e.g. "flows.git")."""
        return f"{self.base_url}/{name}"

    def add_repo(self, name: str, files: Files, branch: str = "main",
                 extra_branches: Mapping[str, Files] | None = None,
                 token: str | None = None) -> dict[str, str]:
        """Create bare repository `name` (must end in .git); private when `token` is given.
        Returns {branch: commit SHA}."""
        if not name.endswith(".git") or ".." in name or name.startswith("/"):
            raise ValueError(f"repository name must be a relative path ending in .git: {name!r}")
        shas = make_bare_repo(self.root / name, files, branch, extra_branches)
        self.repos[name] = _Repo(token=token, shas=shas)
        return shas

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive framing

            def log_message(self, format: str, *args: object) -> None:
                pass  # the record in `requests` is the log

            def do_GET(self) -> None:
                server._handle(self)

            def do_POST(self) -> None:
                server._handle(self)

        self._httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._httpd.daemon_threads = True
        if self.tls:
            self._httpd.socket = self._tls_context().wrap_socket(
                self._httpd.socket, server_side=True)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name=f"git-http-{self.port}")
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        shutil.rmtree(self.root, ignore_errors=True)

    def _tls_context(self) -> ssl.SSLContext:
        """A self-signed certificate for IP 127.0.0.1; clients trust it via `ca_file`."""
        cert, key = self.root / "tls-cert.pem", self.root / "tls-key.pem"
        done = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={LOOPBACK}", "-addext", f"subjectAltName=IP:{LOOPBACK}",
             "-keyout", str(key), "-out", str(cert)], check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"openssl could not make a certificate: {done.stderr}")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.ca_file = cert
        return context

    def _repo_of(self, path: str) -> str | None:
        """The registered repository a request path is under (longest match)."""
        path = path.lstrip("/")
        found = [name for name in self.repos if path == name or path.startswith(name + "/")]
        return max(found, key=len) if found else None

    def _check_auth(self, repo: _Repo, header: str | None) -> tuple[bool, bool, str | None]:
        """(allowed, credentials_offered, who) for a request's Authorization header."""
        if repo.token is None:
            return True, header is not None, None
        if not header or not header.lower().startswith("basic "):
            return False, False, None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False, True, None
        for candidate in (password, user):
            if candidate and hmac.compare_digest(unquote(candidate), repo.token):
                return True, True, user
        return False, True, None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        split = urlsplit(handler.path)
        path = unquote(split.path)
        name = self._repo_of(path)
        record = HttpRequestRecord(
            handler.command, handler.path, 0,
            content_encoding=handler.headers.get("Content-Encoding"),
            chunked="chunked" in handler.headers.get("Transfer-Encoding", "").lower())
        self.requests.append(record)
        try:
            if name is None:
                record.status = 404
                self._plain(handler, 404, "repository not found\n")
                return
            allowed, offered, who = self._check_auth(self.repos[name],
                                                     handler.headers.get("Authorization"))
            if not allowed:
                record.status = self.refuse_status if offered else 401
                headers = [("WWW-Authenticate", 'Basic realm="dockerworker-tests"')]
                if record.status == 401:
                    self._plain(handler, 401, "authentication required\n", headers)
                else:
                    self._plain(handler, record.status, "forbidden\n")
                return
            record.authorized_as = who
            body = self._body(handler)
            status, headers, out = self._cgi(handler, path, split.query, body, who)
            record.status = status
            handler.send_response(status)
            for key, value in headers:
                handler.send_header(key, value)
            handler.send_header("Content-Length", str(len(out)))
            handler.end_headers()
            handler.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to answer

    @staticmethod
    def _plain(handler: BaseHTTPRequestHandler, status: int, text: str,
               headers: list[tuple[str, str]] | None = None) -> None:
        data = text.encode()
        handler.send_response(status)
        for key, value in headers or []:
            handler.send_header(key, value)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def _body(handler: BaseHTTPRequestHandler) -> bytes:
        """The request body as sent (still gzip-encoded if it was: http-backend inflates it)."""
        if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
            return _read_chunked(handler.rfile)
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length else b""

    def _cgi(self, handler: BaseHTTPRequestHandler, path: str, query: str, body: bytes,
             who: str | None) -> tuple[int, list[tuple[str, str]], bytes]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REQUEST_METHOD": handler.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REMOTE_ADDR": handler.client_address[0],
            "CONTENT_TYPE": handler.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
        }
        if who:
            env["REMOTE_USER"] = who
        for header in ("Content-Encoding", "Git-Protocol", "Accept"):
            value = handler.headers.get(header)
            if value:
                env["HTTP_" + header.upper().replace("-", "_")] = value
        done = subprocess.run(["git", "http-backend"], check=False, input=body, env=env,
                              capture_output=True, timeout=60)
        if done.returncode != 0 and not done.stdout:
            return 500, [("Content-Type", "text/plain")], done.stderr
        return _parse_cgi(done.stdout)


# --- SSH -------------------------------------------------------------------------------------


def ensure_test_tools() -> None:
    """Install what the rigs need on the host (openssh-server, git) when missing, with the
    same script `make test` runs; loud when it cannot."""
    script = REPO_DIR / "scripts" / "ensure-test-tools.sh"
    done = subprocess.run(["bash", str(script)], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed ({done.returncode}): {done.stdout}{done.stderr}")


def _git_shell() -> str:
    for candidate in ("/usr/bin/git-shell", shutil.which("git-shell")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("git-shell not found (Debian package git)")


def ensure_ssh_user(user: str = SSH_USER) -> pwd.struct_passwd:
    """The git user sshd lets in: created if absent, shell git-shell, password field `*`
    (no password, yet not "locked": sshd without PAM refuses even keys to a `!` account)."""
    shell = _git_shell()
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--system", "--create-home", "--home-dir", f"/var/lib/{user}",
                        "--shell", shell, user], check=True, capture_output=True)
        entry = pwd.getpwnam(user)
    if entry.pw_shell != shell:
        subprocess.run(["usermod", "--shell", shell, user], check=True, capture_output=True)
    subprocess.run(["usermod", "-p", "*", user], check=True, capture_output=True)
    return pwd.getpwnam(user)


@dataclass
class SshGitServer(Service):
    """Git over SSH on 127.0.0.1 (a context manager): Debian's sshd, public key only, user
    `dwgit` with shell git-shell. `add_repo()` returns commit SHAs, `url(name)` the
    `ssh://dwgit@127.0.0.1:PORT/...` URL, `git_ssh_command()` the GIT_SSH_COMMAND a client
    needs (for a container: the paths where `client_dir` is mounted)."""

    user: str = SSH_USER
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dw-gitssh-")))
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = None
    _log: Path | None = None

    @property
    def repo_dir(self) -> Path:
        return self.root / "repos"

    @property
    def client_dir(self) -> Path:
        """Holds `id_ed25519` (the accepted key, 0600) and `known_hosts`: mount it read-only."""
        return self.root / "client"

    @property
    def key_path(self) -> Path:
        return self.client_dir / "id_ed25519"

    @property
    def known_hosts_path(self) -> Path:
        return self.client_dir / "known_hosts"

    @property
    def known_hosts_line(self) -> str:
        return self.known_hosts_path.read_text().strip()

    def url(self, name: str) -> str:
        return f"ssh://{self.user}@{LOOPBACK}:{self.port}{self.repo_dir / name}"

    def git_ssh_command(self, key: str | Path | None = None,
                        known_hosts: str | Path | None = None) -> str:
        """GIT_SSH_COMMAND that offers only `key` and trusts only `known_hosts` (defaults: the
        host paths), never prompting."""
        return (f"ssh -i {key or self.key_path} -o IdentitiesOnly=yes -o BatchMode=yes"
                f" -o UserKnownHostsFile={known_hosts or self.known_hosts_path}"
                " -o StrictHostKeyChecking=yes")

    def add_repo(self, name: str, files: Files, branch: str = "main",
                 extra_branches: Mapping[str, Files] | None = None) -> dict[str, str]:
        """A bare repository the git user owns (git refuses repositories of another owner)."""
        if not name.endswith(".git") or ".." in name or name.startswith("/"):
            raise ValueError(f"repository name must be a relative path ending in .git: {name!r}")
        path = self.repo_dir / name
        shas = make_bare_repo(path, files, branch, extra_branches)
        entry = pwd.getpwnam(self.user)
        for dirpath, _dirs, names in os.walk(path):
            os.chown(dirpath, entry.pw_uid, entry.pw_gid)
            for item in names:
                os.chown(os.path.join(dirpath, item), entry.pw_uid, entry.pw_gid)
        return shas

    def start(self) -> None:
        if not Path("/usr/sbin/sshd").exists() or not shutil.which("git"):
            ensure_test_tools()
        ensure_ssh_user(self.user)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        # The git user must reach the repositories and read authorized_keys (sshd opens it
        # with the user's uid): the rig dir is world-traversable, its keys are root's.
        self.root.chmod(0o755)
        self.repo_dir.mkdir(mode=0o755, exist_ok=True)
        self.client_dir.mkdir(mode=0o700, exist_ok=True)
        server_dir = self.root / "server"
        server_dir.mkdir(mode=0o755, exist_ok=True)
        host_key = server_dir / "host_ed25519"
        for key in (host_key, self.key_path):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dockerworker-tests",
                            "-f", str(key)], check=True, capture_output=True)
        authorized = server_dir / "authorized_keys"
        authorized.write_text(Path(f"{self.key_path}.pub").read_text())
        authorized.chmod(0o644)
        self.port = free_port()
        host_pub = Path(f"{host_key}.pub").read_text().split()
        self.known_hosts_path.write_text(f"[{LOOPBACK}]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        config = server_dir / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {LOOPBACK}:{self.port}",
            f"HostKey {host_key}",
            f"PidFile {server_dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {authorized}",
            f"AllowUsers {self.user}",
            "AuthenticationMethods publickey",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin no",
            "UsePAM no",
            # StrictModes would walk up from authorized_keys and refuse /tmp (mode 1777);
            # the file and its dir are root's and not writable by others anyway.
            "StrictModes no",
            "AllowTcpForwarding no",
            "X11Forwarding no",
            "PrintMotd no",
            "LogLevel VERBOSE",
            "",
        ]))
        self._log = server_dir / "sshd.log"
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                          stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd exited ({self._proc.returncode}): {self.log()}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), 0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on {LOOPBACK}:{self.port} in 10 s: {self.log()}")

    def log(self) -> str:
        """sshd's own log (why a key was refused, for failure messages)."""
        return self._log.read_text(errors="replace") if self._log and self._log.exists() else ""

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        shutil.rmtree(self.root, ignore_errors=True)
