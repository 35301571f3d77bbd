"""Downloads that resume, land atomically, and can be checked: ``selfflow download TARGET``.

Large files (the 2 GB ADM reference batch) are fetched into ``NAME.part`` with HTTP Range
requests, so an interrupted download continues where it stopped, and are renamed to their final
name only when complete (and, when a digest is known, verified). A file at the final name is
therefore always whole. Only the standard library is used (urllib), plus tqdm for progress.

The server's ``ETag`` (or ``Last-Modified``) is kept in ``NAME.part.json`` and sent back as
``If-Range`` when resuming: if the file changed upstream in between, the server sends the whole
new file instead of the rest of the old one. Without a validator only the size check stands.

Cache: ``$SELFFLOW_CACHE`` if set, else ``~/.cache/selfflow``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from selfflow.base.cache import cache_dir
from selfflow.base.errors import CannotWriteError, DownloadError
from selfflow.base.files import file_sha256, write_failure

INCEPTION_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
    "classify_image_graph_def.pb"
)
REFERENCE_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
    "VIRTUAL_imagenet256_labeled.npz"
)
# ADM's ImageNet 512 reference batch, beside the 256 one (guided-diffusion's evaluations README)
REFERENCE_512_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/512/"
    "VIRTUAL_imagenet512.npz"
)
REFERENCE_RESOLUTIONS = (256, 512)
CHUNK = 1 << 20
_USER_AGENT = "selfflow-download/1"

PUBLISHED_SHA256: dict[str, str | None] = {
    "classify_image_graph_def.pb": None,
    "VIRTUAL_imagenet256_labeled.npz": None,
    "VIRTUAL_imagenet512.npz": None,
    "selfflow_imagenet256.pt": None,
}
"""The sha256 each file is known to have, by file name; ``None``: no citable digest is known.

ADM's release publishes only the URLs of its Inception graph and reference batch, and the
Self-Flow release publishes none outside the hub, so every entry is ``None`` for now: such files
are recorded as unverified, with the sha256 computed here, so that two runs can still be
compared. A known digest is checked after every download and before the file is trusted. A
checkpoint fetched through huggingface_hub is checked against the hub's own LFS sha256 instead
(see :func:`verification`).
"""


class _Restart(Exception):
    """The partial file cannot be continued; start again from byte 0."""


def _content_range_total(header: str | None) -> int | None:
    match = re.match(r"bytes\s+(\d+|\*)-?(\d*)/(\d+|\*)", header or "")
    if not match or match.group(3) == "*":
        return None
    return int(match.group(3))


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_validator(part: Path, url: str) -> str | None:
    """The ETag (strong) or Last-Modified stored for ``part``'s bytes, if they came from ``url``."""
    try:
        stored = json.loads(_validator_path(part).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("url") != url:
        return None
    value = stored.get("validator")
    return value if isinstance(value, str) and value else None


def _write_validator(part: Path, url: str, headers) -> None:
    etag = headers.get("ETag")
    value = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")
    path = _validator_path(part)
    if value:
        path.write_text(json.dumps({"url": url, "validator": value}))
    else:
        path.unlink(missing_ok=True)


def _fetch_once(url: str, part: Path, timeout: float, progress: bool, desc: str) -> int | None:
    """Append the rest of ``url`` to ``part``; return the expected total size when known."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = _read_validator(part, url)
        if validator:
            headers["If-Range"] = validator  # a changed file comes back whole (200)
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            total = _content_range_total(error.headers.get("Content-Range"))
            if total == offset:
                return total  # the partial file is already complete
            raise _Restart from error
        raise
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        if status == 206:
            start = re.match(r"bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                raise _Restart
            total = _content_range_total(response.headers.get("Content-Range"))
            mode = "ab"
        else:  # 200: the server ignored the Range header and sends the whole file
            offset = 0
            total = int(length) if length is not None else None
            mode = "wb"
        from tqdm.auto import tqdm

        try:
            if mode == "wb" or not _validator_path(part).exists():
                _write_validator(part, url, response.headers)
            handle = open(part, mode)  # noqa: SIM115 (closed by the with below)
        except OSError as error:  # the disk, not the network: retrying will not help
            raise _cannot_write(part, error) from error
        with (
            handle,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
                file=sys.stderr,
                dynamic_ncols=True,
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                try:
                    handle.write(chunk)
                except OSError as error:
                    raise _cannot_write(part, error) from error
                bar.update(len(chunk))
    return total


def _cannot_write(part: Path, error: OSError) -> Exception:
    """A full or read-only cache in one line (the bytes received stay in ``part``, so the
    rerun resumes); any other failure to write ``part`` as a DownloadError."""
    return write_failure(part, error) or DownloadError(f"cannot write {part}: {error}")


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 2.0,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` to ``dest`` (resuming ``dest.part``), verify, and rename into place.

    An existing ``dest`` is returned as is (checked against ``sha256`` when given). Network
    errors are retried ``retries`` times, each time continuing from the bytes already on disk.
    """
    dest = Path(dest)
    if dest.is_file():
        if sha256 and file_sha256(dest) != sha256.lower():
            raise DownloadError(
                f"{dest} exists but its sha256 is not {sha256}; delete it to download it again"
            )
        return dest
    if offline_mode():
        raise DownloadError(
            f"offline mode is set (HF_HUB_OFFLINE), so nothing is downloaded: fetch {url} "
            f"where there is internet access and place it at {dest} (or unset HF_HUB_OFFLINE)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: BaseException | None = None
    refused = 0
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * attempt)
        try:
            total = _fetch_once(url, part, timeout, progress, dest.name)
        except _Restart:
            part.unlink(missing_ok=True)
            _validator_path(part).unlink(missing_ok=True)
            last_error = None
            continue
        except urllib.error.HTTPError as error:
            if 400 <= error.code < 500 and error.code not in (408, 429):
                raise DownloadError(
                    f"could not download {url}: HTTP {error.code} {error.reason}. "
                    f"Fetch it by hand and place it at {dest}"
                ) from error
            last_error = error
            continue
        except CannotWriteError:
            raise  # a full or read-only cache (an OSError too): retrying will not help
        except (http.client.HTTPException, OSError) as error:
            # OSError covers URLError, ssl.SSLError, connection resets and timeouts; errors
            # writing the file come as DownloadError instead and are not retried.
            refused += _connection_refused(error)
            if hopeless := _hopeless(error, refused, url, part, dest):
                raise hopeless from error
            last_error = error
            continue
        size = part.stat().st_size if part.exists() else 0
        if total is not None and size != total:
            last_error = DownloadError(f"connection closed after {size} of {total} bytes")
            continue
        break
    else:
        raise DownloadError(
            f"could not download {url} after {retries + 1} attempts "
            f"({type(last_error).__name__}: {last_error}){_kept(part)}. "
            f"Or fetch it by hand and place it at {dest}"
        ) from last_error
    _validator_path(part).unlink(missing_ok=True)
    if sha256:
        actual = file_sha256(part)
        if actual != sha256.lower():
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url} downloaded with sha256 {actual}, expected {sha256}; the file was removed"
            )
    os.replace(part, dest)
    return dest


def _hopeless(
    error: BaseException, refused: int, url: str, part: Path, dest: Path
) -> DownloadError | None:
    """The error to stop with when retrying cannot help, else None. A name that does not
    resolve will not resolve seconds later (no network, no DNS): not retried. A refused
    connection rarely opens: retried once (``refused`` counts them)."""
    if not (_name_not_resolved(error) or refused > 1):
        return None
    host = urllib.parse.urlsplit(url).hostname or url
    return DownloadError(
        f"could not download {url}: {network_failure_words(error, host)}{_kept(part)}. "
        f"Fetch it by hand on a machine with internet access and place it at {dest}"
    )


def _kept(part: Path) -> str:
    """What a failed download leaves for the next run, in words ('' when nothing)."""
    if not part.exists():
        return ""
    return f"; {part} keeps the {part.stat().st_size} bytes received and the next run resumes"


def offline_mode() -> bool:
    """Whether huggingface_hub's offline mode is set, read as the hub reads it.

    ``HF_HUB_OFFLINE`` (or, when that is unset or empty, ``TRANSFORMERS_OFFLINE``) spelled 1,
    ON, YES or TRUE, or the hub's own flag set in this process. It is read at each call rather
    than once at import, so a value set after import counts too. Plain-URL downloads honour it
    as well: it marks a machine without internet access, where trying only costs time.
    """
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.strip().upper() in _TRUE:
        return True
    constants = sys.modules.get("huggingface_hub.constants")  # only if the hub is loaded
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _error_chain(error: BaseException) -> list[BaseException]:
    """``error``, its causes and contexts, and the ``reason`` a ``URLError`` wraps."""
    chain: list[BaseException] = []
    pending: list[BaseException] = [error]
    while pending and len(chain) < 20:
        current = pending.pop(0)
        if any(current is seen for seen in chain):
            continue
        chain.append(current)
        for linked in (getattr(current, "reason", None), current.__cause__, current.__context__):
            if isinstance(linked, BaseException):
                pending.append(linked)
    return chain


def _name_not_resolved(error: BaseException) -> bool:
    return any(isinstance(item, socket.gaierror) for item in _error_chain(error))


def _connection_refused(error: BaseException) -> bool:
    return any(isinstance(item, ConnectionRefusedError) for item in _error_chain(error))


def network_failure_words(error: BaseException, host: str) -> str:
    """What went wrong reaching ``host``, in words: a name that does not resolve, a refused
    connection, else the innermost network error as Python names it."""
    chain = _error_chain(error)
    for item in chain:
        if isinstance(item, socket.gaierror):
            return (
                f"name resolution failed for {host} ({item.strerror or item}; no network, or "
                f"no DNS server answers here)"
            )
    if _connection_refused(error):
        return f"{host} refused the connection"
    network = [item for item in chain if _is_network_error(item)] or chain
    return f"{type(network[-1]).__name__}: {network[-1]}"


def hub_unreachable(repo_id: str, filename: str, timeout: float = 10.0) -> str | None:
    """Why huggingface_hub cannot fetch ``repo_id``'s ``filename`` now, or None when it may try.

    On a failed connection the hub retries five times with back-off (about 30 s, logging a
    line each time) before it gives up, although a name that does not resolve or a refused
    connection does not heal in that time. So one request without retries is made first,
    through the hub's own client (its endpoint, proxies and token): after a network failure
    there, the caller reads huggingface_hub's cache only (``local_files_only=True``), which
    answers at once. Any HTTP answer, an error status included, means the hub can be reached;
    the real call then runs as usual and reports what the hub said. In offline mode nothing
    is sent.
    """
    if offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=timeout)
    except Exception as error:  # the hub raises many types; only network failures count here
        if any(_is_network_error(item) for item in _error_chain(error)):
            host = urllib.parse.urlsplit(constants.ENDPOINT).hostname or constants.ENDPOINT
            return f"the hub cannot be reached ({network_failure_words(error, host)})"
    return None


def _cached(url: str, name: str, fetch: bool) -> Path:
    path = cache_dir() / name
    if path.is_file() or not fetch:
        if not path.is_file():
            raise DownloadError(f"{path} is missing; run `selfflow download` or fetch {url}")
        return path
    if not offline_mode():  # offline, download() refuses at once: its line is the only one
        print(f"downloading {url} to {path}", file=sys.stderr)
    return download(url, path, sha256=PUBLISHED_SHA256.get(name))


def hub_failure_cause(error: BaseException, unreachable: str | None = None) -> str:
    """Why a Hugging Face hub download failed, in words, from the chain of exceptions.

    Loaders wrap the hub's errors in messages that hide the cause (diffusers says a repository
    "does not appear to have a file named config.json" when the machine is simply offline), so
    the chain is searched for the hub's own error types, by name (no hub import needed).
    ``unreachable`` is :func:`hub_unreachable`'s reason when the call read the cache only.
    """
    chain = _error_chain(error)
    names = {type(item).__name__ for item in chain}
    if unreachable and names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError"}:
        return f"{unreachable}, and the file is not in huggingface_hub's cache"
    network = [item for item in chain if _is_network_error(item)]
    if "OfflineModeIsEnabled" in names or offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE) and the file is not in huggingface_hub's cache"
    if "GatedRepoError" in names:
        return "the repository is gated: accept its licence on the hub and log in (hf auth login)"
    if "RepositoryNotFoundError" in names:
        return "no such repository on the hub (or it is private and you are not logged in)"
    if "RevisionNotFoundError" in names:
        return "no such revision of the repository on the hub"
    if "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names:
        return "the repository on the hub has no such file"
    if network:
        return (
            f"the hub cannot be reached ({type(network[0]).__name__}: {network[0]}) and the file "
            f"is not in huggingface_hub's cache"
        )
    if "LocalEntryNotFoundError" in names:
        return "the hub cannot be reached and the file is not in huggingface_hub's cache"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


_TRUE = {"1", "ON", "YES", "TRUE"}  # the spellings huggingface_hub accepts for a flag


def _is_network_error(error: BaseException) -> bool:
    name = type(error).__name__
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        word in name for word in ("Connect", "Timeout", "gaierror", "NetworkError")
    )


def verification(path: str | os.PathLike, sha256: str) -> dict[str, object]:
    """What is known of a file's integrity, for ``metrics.json`` and ``manifest.json``.

    ``sha256`` is the file's digest, computed by the caller (who needs it anyway). It is
    compared with :data:`PUBLISHED_SHA256` by file name, or, for a file in huggingface_hub's
    cache, with the name of the blob it links to: the hub stores large files under their
    sha256 (the LFS object id the hub publishes for every file).
    """
    path = Path(path)
    published = PUBLISHED_SHA256.get(path.name)
    blob = path.resolve()
    if (
        published is None
        and blob.parent.name == "blobs"
        and re.fullmatch(r"[0-9a-f]{64}", blob.name)
    ):
        published, against = blob.name, "the Hugging Face hub's LFS sha256"
    else:
        against = "the published sha256"
    if published is None:
        return {"sha256": sha256, "verified": False, "how": "no published sha256 is known"}
    if sha256 == published.lower():
        return {"sha256": sha256, "verified": True, "how": f"matches {against}"}
    return {
        "sha256": sha256,
        "verified": False,
        "how": f"DIFFERS from {against} {published}: the file is damaged or another one",
    }


def inception_path(download: bool = True, url: str | None = None) -> Path:
    """ADM's Inception GraphDef in the cache, downloaded on first use."""
    return _cached(url or INCEPTION_URL, "classify_image_graph_def.pb", download)


def reference_path(download: bool = True, url: str | None = None, resolution: int = 256) -> Path:
    """ADM's ImageNet reference batch at ``resolution`` (256 or 512) in the cache, downloaded
    on first use."""
    if resolution not in REFERENCE_RESOLUTIONS:
        raise ValueError(
            f"ADM publishes ImageNet reference batches at {REFERENCE_RESOLUTIONS}; got {resolution}"
        )
    if resolution == 512:
        return _cached(url or REFERENCE_512_URL, "VIRTUAL_imagenet512.npz", download)
    return _cached(url or REFERENCE_URL, "VIRTUAL_imagenet256_labeled.npz", download)
