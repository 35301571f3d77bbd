"""Downloads against a local HTTP server with Range support: resume, atomic rename, checks."""

from __future__ import annotations

import hashlib
import http.server
import re
import ssl
import threading
from pathlib import Path

import pytest

from selfflow.base import download as dl
from selfflow.base.errors import DownloadError
from selfflow.cli import main

PAYLOAD = bytes(range(256)) * 1200 + b"tail"  # 307 204 bytes


class FileServer:
    """Serves byte strings; can ignore Range, drop connections, or fail with a status first."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, list[int]] = {}  # per request, in order: bytes before hanging up
        self.fail_first: dict[str, list[int]] = {}  # statuses to answer before serving
        self.ignore_range: set[str] = set()
        self.validators: dict[str, dict[str, str]] = {}  # path -> ETag / Last-Modified headers
        self.log: list[tuple[str, str | None]] = []
        self.if_range: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                path, range_header = self.path, self.headers.get("Range")
                server.log.append((path, range_header))
                if_range = self.headers.get("If-Range")
                server.if_range.append(if_range)
                validators = server.validators.get(path, {})
                if server.fail_first.get(path):
                    self.send_error(server.fail_first[path].pop(0))
                    return
                if path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[path]
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                current = if_range is None or if_range in (
                    validators.get("ETag"),
                    validators.get("Last-Modified"),
                )
                if match and current and path not in server.ignore_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                for header, value in validators.items():
                    self.send_header(header, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                drops = server.drop_after.get(path)
                if drops:
                    self.wfile.write(body[: drops.pop(0)])  # then hang up early
                    self.wfile.flush()
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    s.files["/graph.pb"] = PAYLOAD
    yield s
    s.close()


def fetch(server, dest: Path, **kwargs) -> Path:
    kwargs.setdefault("backoff", 0.0)
    return dl.download(server.url("/graph.pb"), dest, progress=False, **kwargs)


def test_fresh_download_lands_whole(server, tmp_path):
    dest = tmp_path / "sub" / "graph.pb"
    assert fetch(server, dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert list(dest.parent.iterdir()) == [dest]  # no .part left behind
    assert server.log == [("/graph.pb", None)]


def test_existing_partial_file_is_resumed_with_a_range_request(server, tmp_path):
    dest = tmp_path / "graph.pb"
    (tmp_path / "graph.pb.part").write_bytes(PAYLOAD[:100_000])
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.log == [("/graph.pb", "bytes=100000-")]


def test_dropped_connection_resumes_where_it_stopped(server, tmp_path):
    server.drop_after["/graph.pb"] = [50_000, 70_000]
    dest = tmp_path / "graph.pb"
    fetch(server, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD
    assert server.log == [
        ("/graph.pb", None),
        ("/graph.pb", "bytes=50000-"),
        ("/graph.pb", "bytes=120000-"),
    ]


def test_failed_download_keeps_the_part_and_never_the_final_name(server, tmp_path):
    server.drop_after["/graph.pb"] = [10_000, 10_000]
    dest = tmp_path / "graph.pb"
    with pytest.raises(DownloadError, match=r"after 2 attempts.*keeps the 20000 bytes"):
        fetch(server, dest, retries=1)
    assert not dest.exists()
    assert (tmp_path / "graph.pb.part").read_bytes() == PAYLOAD[:20_000]
    fetch(server, dest)  # a later run continues
    assert dest.read_bytes() == PAYLOAD
    assert server.log[-1] == ("/graph.pb", "bytes=20000-")


def test_checksum_mismatch_removes_the_download(server, tmp_path):
    dest = tmp_path / "graph.pb"
    with pytest.raises(DownloadError, match="sha256"):
        fetch(server, dest, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_checked_not_refetched(server, tmp_path):
    dest = tmp_path / "graph.pb"
    dest.write_bytes(b"something else")
    with pytest.raises(DownloadError, match="delete it"):
        fetch(server, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert fetch(server, dest) == dest and server.log == []


def test_server_that_ignores_range_restarts_cleanly(server, tmp_path):
    server.ignore_range.add("/graph.pb")
    dest = tmp_path / "graph.pb"
    (tmp_path / "graph.pb.part").write_bytes(PAYLOAD[:1000])
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD  # not the first 1000 bytes twice


def test_complete_part_file_answered_416_is_kept(server, tmp_path):
    dest = tmp_path / "graph.pb"
    (tmp_path / "graph.pb.part").write_bytes(PAYLOAD)
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD and server.log == [("/graph.pb", f"bytes={len(PAYLOAD)}-")]


def test_wrong_part_file_larger_than_the_remote_restarts(server, tmp_path):
    dest = tmp_path / "graph.pb"
    (tmp_path / "graph.pb.part").write_bytes(PAYLOAD + b"extra junk")
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD


def test_server_errors_are_retried_but_missing_files_are_not(server, tmp_path):
    server.fail_first["/graph.pb"] = [503]
    fetch(server, tmp_path / "graph.pb")
    assert (tmp_path / "graph.pb").read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="HTTP 404.*place it at"):
        dl.download(server.url("/missing"), tmp_path / "missing", progress=False, backoff=0)
    assert server.log.count(("/missing", None)) == 1
    assert not (tmp_path / "missing").exists()


def test_cache_helpers_download_once(server, tmp_path, monkeypatch):
    cache = tmp_path / "my-cache"
    monkeypatch.setenv("SELFFLOW_CACHE", str(cache))
    assert dl.cache_dir() == cache
    path = dl.inception_path(url=server.url("/graph.pb"))
    assert path == cache / "classify_image_graph_def.pb" and path.read_bytes() == PAYLOAD
    assert dl.inception_path(url=server.url("/graph.pb")) == path and len(server.log) == 1
    with pytest.raises(DownloadError, match="missing"):
        dl.reference_path(download=False)
    monkeypatch.delenv("SELFFLOW_CACHE")
    assert dl.cache_dir() == Path.home() / ".cache" / "selfflow"


def test_download_command(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path))
    server.files["/ref.npz"] = b"reference bytes"
    monkeypatch.setattr(dl, "INCEPTION_URL", server.url("/graph.pb"))
    monkeypatch.setattr(dl, "REFERENCE_URL", server.url("/ref.npz"))
    assert main(["download", "inception"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "classify_image_graph_def.pb")
    assert main(["download", "reference"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed.read_bytes() == b"reference bytes"

    import selfflow.model.checkpoint

    (tmp_path / "ckpt.pt").write_bytes(b"weights")
    monkeypatch.setattr(
        selfflow.model.checkpoint, "download_checkpoint", lambda: tmp_path / "ckpt.pt"
    )
    assert main(["download", "checkpoint"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ckpt.pt")


def test_download_reference_at_512_fetches_adms_512_batch(server, tmp_path, monkeypatch, capsys):
    # ADM's evaluation README: .../ref_batches/imagenet/512/VIRTUAL_imagenet512.npz
    expected = dl.REFERENCE_URL.replace("256", "512").replace("_labeled.npz", ".npz")
    assert expected == dl.REFERENCE_512_URL
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path))
    server.files["/ref256.npz"] = b"256 bytes"
    server.files["/ref512.npz"] = b"512 bytes"
    monkeypatch.setattr(dl, "REFERENCE_URL", server.url("/ref256.npz"))
    monkeypatch.setattr(dl, "REFERENCE_512_URL", server.url("/ref512.npz"))
    assert main(["download", "reference", "--resolution", "512"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == tmp_path / "VIRTUAL_imagenet512.npz"
    assert printed.read_bytes() == b"512 bytes"
    assert main(["download", "reference"]) == 0  # 256 stays the default, in its own file
    assert Path(capsys.readouterr().out.strip()).read_bytes() == b"256 bytes"
    with pytest.raises(SystemExit):
        main(["download", "reference", "--resolution", "384"])  # ADM has no such batch


def test_download_command_reports_failure_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(dl, "INCEPTION_URL", "http://127.0.0.1:9/nothing-listens-here")
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    assert main(["download", "inception"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("selfflow download: error: could not download") and "by hand" in err
    assert not (tmp_path / "classify_image_graph_def.pb").exists()


def test_a_file_changed_upstream_is_fetched_whole_not_spliced(server, tmp_path):
    server.validators["/graph.pb"] = {
        "ETag": '"v1"',
        "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT",
    }
    server.drop_after["/graph.pb"] = [50_000]
    dest = tmp_path / "graph.pb"
    with pytest.raises(DownloadError):
        fetch(server, dest, retries=0)
    # Same size, other bytes: the size check alone cannot see the change.
    new = bytes(reversed(PAYLOAD))
    server.files["/graph.pb"] = new
    server.validators["/graph.pb"] = {"ETag": '"v2"'}
    fetch(server, dest)
    assert server.if_range == [None, '"v1"'] and server.log[-1] == ("/graph.pb", "bytes=50000-")
    assert dest.read_bytes() == new
    assert list(tmp_path.iterdir()) == [dest]  # the stored validator is gone too


def test_last_modified_is_the_validator_when_the_etag_is_weak(server, tmp_path):
    stamp = "Tue, 02 Jan 2024 10:00:00 GMT"
    server.validators["/graph.pb"] = {"ETag": 'W/"weak"', "Last-Modified": stamp}
    server.drop_after["/graph.pb"] = [30_000]
    dest = tmp_path / "graph.pb"
    fetch(server, dest)
    assert server.if_range == [None, stamp]
    assert server.log[-1] == ("/graph.pb", "bytes=30000-") and dest.read_bytes() == PAYLOAD


def test_ssl_errors_and_connection_resets_are_retried_and_resumed(server, tmp_path, monkeypatch):
    real_urlopen = dl.urllib.request.urlopen
    failures = [ssl.SSLError("[SSL] record layer failure"), "reset after 10000 bytes"]

    class ResetMidway:
        """A response whose connection is reset after its first 10 000 bytes."""

        def __init__(self, response):
            self.response, self.sent = response, False
            self.status, self.headers = response.status, response.headers

        def read(self, size):
            if self.sent:
                raise ConnectionResetError(104, "Connection reset by peer")
            self.sent = True
            return self.response.read(10_000)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.response.close()

    def flaky_urlopen(request, timeout):
        failure = failures.pop(0) if failures else None
        if isinstance(failure, OSError):
            raise failure
        response = real_urlopen(request, timeout=timeout)
        return ResetMidway(response) if failure else response

    monkeypatch.setattr(dl.urllib.request, "urlopen", flaky_urlopen)
    dest = tmp_path / "graph.pb"
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.log == [("/graph.pb", None), ("/graph.pb", "bytes=10000-")]


def test_errors_writing_the_file_are_not_retried(server, tmp_path):
    dest = tmp_path / "graph.pb"
    (tmp_path / "graph.pb.part").mkdir()  # cannot be opened for writing
    with pytest.raises(DownloadError, match="cannot write .*graph.pb.part"):
        fetch(server, dest)
    assert len(server.log) == 1 and not dest.exists()


# -- no network: say so at once ------------------------------------------------------------------


def _count_sleeps(monkeypatch) -> list[float]:
    sleeps: list[float] = []
    monkeypatch.setattr(dl.time, "sleep", sleeps.append)
    return sleeps


def test_a_name_that_does_not_resolve_is_tried_once_and_named(tmp_path, monkeypatch):
    import socket
    import time

    lookups = []

    def getaddrinfo(host, *args, **kwargs):  # what a machine without network or DNS answers
        lookups.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    sleeps = _count_sleeps(monkeypatch)
    dest = tmp_path / "graph.pb"
    began = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        dl.download("https://files.example.invalid/graph.pb", dest, progress=False)
    assert time.monotonic() - began < 2
    assert lookups == ["files.example.invalid"] and sleeps == []  # one attempt, no back-off
    message = str(caught.value)
    assert "name resolution failed for files.example.invalid" in message
    assert f"place it at {dest}" in message and "attempts" not in message
    assert not dest.exists() and not (tmp_path / "graph.pb.part").exists()


def test_a_refused_connection_is_retried_once_only(tmp_path, monkeypatch):
    import socket

    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    attempts = []
    real_urlopen = dl.urllib.request.urlopen

    def counting_urlopen(request, timeout):
        attempts.append(request.full_url)
        return real_urlopen(request, timeout=timeout)

    monkeypatch.setattr(dl.urllib.request, "urlopen", counting_urlopen)
    sleeps = _count_sleeps(monkeypatch)
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1 refused the connection"):
        dl.download(f"http://127.0.0.1:{port}/graph.pb", tmp_path / "graph.pb", progress=False)
    assert len(attempts) == 2 and len(sleeps) == 1


def test_offline_mode_refuses_plain_downloads_without_a_connection(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("offline mode must not open a connection")

    monkeypatch.setattr(dl.urllib.request, "urlopen", no_network)
    dest = tmp_path / "graph.pb"
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the hub accepts either
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv(variable, "1")
        with pytest.raises(DownloadError) as caught:
            dl.download("https://files.example.invalid/graph.pb", dest, progress=False)
        assert "offline mode is set (HF_HUB_OFFLINE)" in str(caught.value)
        assert f"place it at {dest}" in str(caught.value)
    dest.write_bytes(b"placed by hand")  # what is already there is used, offline or not
    assert dl.download("https://files.example.invalid/graph.pb", dest, progress=False) == dest
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the hub reads HF_HUB_OFFLINE first
    assert not dl.offline_mode()
