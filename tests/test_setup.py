"""Preparing a cluster: downloads of every file, errors that name the real cause, nothing left
behind by a run that fails in its set-up, and what is known of each file's integrity.

The hub is never contacted: its calls are monkeypatched, and ADM's files come from the local
HTTP server of the download tests.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch

from selfflow import cli
from selfflow.base import download as dl
from selfflow.base.errors import CheckpointError, ConfigurationError, DownloadError
from selfflow.model.checkpoint import load_model
from selfflow.model.vae import SD_VAE_ID, load_vae
from tests.conftest import make_tiny_vae
from tests.eval.test_download import FileServer


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


def _sample_args(checkpoint, vae, out, *extra) -> list[str]:
    return ["sample", "--ckpt", str(checkpoint), "--vae", str(vae), "--output-dir", str(out),
            "--num-fid-samples", "4", "--batch-size", "4", "--num-steps", "2", *extra]  # fmt: skip


@pytest.fixture
def hub_answers(monkeypatch):
    """The hub is taken as reachable: load_vae's one probe request is not made."""
    monkeypatch.setattr(dl, "hub_unreachable", lambda repo, filename: None)


# -- selfflow download vae | all ------------------------------------------------------------------


def test_download_vae_loads_it_the_way_every_run_does(tmp_path, monkeypatch, capsys, hub_answers):
    from diffusers import AutoencoderKL

    calls = []

    def from_pretrained(source, **kwargs):
        calls.append(source)
        return make_tiny_vae()

    cached = tmp_path / "hub" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", from_pretrained)
    monkeypatch.setattr(
        "huggingface_hub.try_to_load_from_cache",
        lambda repo, name: str(cached / name) if repo == SD_VAE_ID else None,
    )
    assert cli.main(["download", "vae"]) == 0
    assert capsys.readouterr().out.strip() == str(cached)
    assert calls == [SD_VAE_ID]  # the hub id, as `selfflow sample` asks for it


def test_download_all_fetches_the_four_and_names_what_failed(server, tmp_path, monkeypatch, capsys):
    import selfflow.model.checkpoint
    import selfflow.model.vae

    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    server.files["/graph.pb"] = b"graph bytes"
    server.files["/ref.npz"] = b"reference bytes"
    monkeypatch.setattr(dl, "INCEPTION_URL", server.url("/graph.pb"))
    monkeypatch.setattr(dl, "REFERENCE_URL", server.url("/ref.npz"))
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"weights")
    monkeypatch.setattr(selfflow.model.checkpoint, "download_checkpoint", lambda: checkpoint)
    monkeypatch.setattr(selfflow.model.vae, "download_vae", lambda: tmp_path / "vae")
    assert cli.main(["download", "all"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"checkpoint: {checkpoint}",
        f"vae: {tmp_path / 'vae'}",
        f"inception: {tmp_path / 'cache' / 'classify_image_graph_def.pb'}",
        f"reference: {tmp_path / 'cache' / 'VIRTUAL_imagenet256_labeled.npz'}",
    ]
    assert (tmp_path / "cache" / "VIRTUAL_imagenet256_labeled.npz").read_bytes() == (
        b"reference bytes"
    )

    def offline():
        raise DownloadError("could not load the VAE: offline")

    monkeypatch.setattr(selfflow.model.vae, "download_vae", offline)
    (tmp_path / "cache" / "classify_image_graph_def.pb").unlink()
    assert cli.main(["download", "all"]) == 1
    captured = capsys.readouterr()
    assert "vae: FAILED: could not load the VAE: offline" in captured.err
    assert "1 of 4 failed: vae" in captured.err.strip().splitlines()[-1]
    assert (tmp_path / "cache" / "classify_image_graph_def.pb").is_file()  # the rest went on


# -- the real cause of a VAE that cannot be loaded ------------------------------------------------


def _bare(cls, message: str) -> BaseException:
    """An instance of a hub error class whose constructor wants an HTTP response."""
    error = cls.__new__(cls)
    error.args = (message,)
    return error


def _wrapped(inner: BaseException) -> OSError:
    """What diffusers raises: its own OSError, with the hub's error as the cause."""
    try:
        raise inner
    except BaseException as error:
        wrapper = OSError(f"{SD_VAE_ID} does not appear to have a file named config.json.")
        wrapper.__cause__ = error
        return wrapper


def _offline_lookup() -> BaseException:
    from huggingface_hub.errors import LocalEntryNotFoundError

    error = LocalEntryNotFoundError("cannot find the requested files in the local cache")
    error.__cause__ = socket.gaierror(-2, "Name or service not known")
    return error


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (_offline_lookup, "the hub cannot be reached (gaierror"),
        (
            lambda: __import__("huggingface_hub.errors").errors.OfflineModeIsEnabled("offline"),
            "offline mode is on (HF_HUB_OFFLINE)",
        ),
        (
            lambda: _bare(__import__("huggingface_hub.errors").errors.RepositoryNotFoundError, "x"),
            "no such repository on the hub",
        ),
        (
            lambda: _bare(__import__("huggingface_hub.errors").errors.GatedRepoError, "x"),
            "the repository is gated",
        ),
    ],
)
def test_a_vae_that_cannot_be_loaded_names_the_cause(monkeypatch, make, cause, hub_answers):
    from diffusers import AutoencoderKL

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    error = _wrapped(make())

    def from_pretrained(source, **kwargs):
        raise error

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", from_pretrained)
    with pytest.raises(DownloadError) as caught:
        load_vae(SD_VAE_ID)
    message = str(caught.value)
    assert cause in message and "selfflow download vae" in message
    assert "does not appear to have a file named" not in message


def test_loading_the_vae_prints_no_accelerate_warning(tiny_vae_dir, capfd):
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        pytest.skip("accelerate is installed: diffusers has nothing to warn about")
    capfd.readouterr()
    load_vae(tiny_vae_dir)
    captured = capfd.readouterr()
    assert "accelerate" not in captured.err + captured.out


def test_the_hubs_deprecation_warning_about_diffusers_is_silenced_and_only_it(
    monkeypatch, hub_answers
):
    import warnings

    from diffusers import AutoencoderKL

    def from_pretrained(source, **kwargs):  # what diffusers + huggingface_hub do on each load
        warnings.warn(
            "The `local_dir_use_symlinks` argument is deprecated and ignored in `hf_hub_download`.",
            UserWarning,
            stacklevel=2,
        )
        warnings.warn("something else", UserWarning, stacklevel=2)
        return make_tiny_vae()

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", from_pretrained)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_vae(SD_VAE_ID)
    assert [str(w.message) for w in caught] == ["something else"]


# -- the hub unreachable or offline mode set: said at once ---------------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return tmp_path / "hub"


@pytest.fixture
def no_dns(monkeypatch):
    """A machine without network: every name lookup fails at once, as it does offline."""
    lookups: list[str] = []

    def getaddrinfo(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    import huggingface_hub.utils._http as hub_http

    # should the hub retry, its back-off sleeps (1 + 2 + 4 + 8 + 8 s) are skipped, not waited
    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)
    return lookups


def test_loading_a_hub_vae_without_network_fails_at_once_without_retry_lines(
    empty_hub_cache, no_dns, capfd, caplog
):
    import time

    import diffusers  # noqa: F401 (imported before the clock starts)

    began = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        load_vae(SD_VAE_ID)
    assert time.monotonic() - began < 3
    # our one request, and the hub's once-per-process agent lookup; not the hub's six tries
    assert set(no_dns) == {"huggingface.co"} and len(no_dns) <= 2, no_dns
    message = str(caught.value)
    assert "the hub cannot be reached (name resolution failed for huggingface.co" in message
    assert "not in huggingface_hub's cache" in message and "--vae FOLDER" in message
    printed = capfd.readouterr()
    logged = caplog.text
    assert "Retrying" not in printed.err + printed.out + logged
    assert "thrown while requesting" not in printed.err + logged


def test_a_missing_absolute_vae_folder_is_not_asked_of_the_hub(empty_hub_cache, no_dns, tmp_path):
    with pytest.raises(ConfigurationError, match="there is no VAE folder") as caught:
        load_vae(tmp_path / "moved-away")  # named as missing, not as a download that failed
    assert no_dns == [] and str(tmp_path / "moved-away") in str(caught.value)


def test_a_cached_hub_vae_loads_from_the_cache_without_network(empty_hub_cache, no_dns, capfd):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--someone--tiny-vae"
    make_tiny_vae().save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    vae = load_vae("someone/tiny-vae", dtype=torch.float32)
    expected = make_tiny_vae().state_dict()
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in expected.items())
    assert len(no_dns) <= 2 and "Retrying" not in capfd.readouterr().err


def test_the_checkpoint_without_network_fails_at_once_naming_the_hub(
    tmp_path, empty_hub_cache, no_dns, monkeypatch, capfd, caplog
):
    import time

    from selfflow.model.checkpoint import HUB_URL, download_checkpoint

    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    began = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        download_checkpoint()
    assert time.monotonic() - began < 3
    assert set(no_dns) == {"huggingface.co"} and len(no_dns) <= 2, no_dns
    message = str(caught.value)
    assert "the hub cannot be reached (name resolution failed for huggingface.co" in message
    assert HUB_URL in message and str(tmp_path / "cache") in message
    assert "Retrying" not in capfd.readouterr().err + caplog.text


def test_download_vae_says_what_failed_and_how_to_get_the_folder(
    empty_hub_cache, no_dns, monkeypatch, capsys
):
    assert cli.main(["download", "vae"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("selfflow download: error: could not download the VAE")
    assert "name resolution failed for huggingface.co" in line
    assert "selfflow download vae" not in line  # not: run what just failed
    assert "config.json and diffusion_pytorch_model.safetensors" in line and "--vae" in line
    assert f"https://huggingface.co/{SD_VAE_ID}/tree/main" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lookups = len(no_dns)
    assert cli.main(["download", "vae"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "offline mode is on (HF_HUB_OFFLINE)" in line and "selfflow download vae" not in line
    assert len(no_dns) == lookups  # offline: no request at all


def test_offline_mode_download_all_fails_at_once_one_line_per_file(
    tmp_path, empty_hub_cache, no_dns, monkeypatch, capfd
):
    import time

    import diffusers  # noqa: F401 (imported before the clock starts)
    import huggingface_hub.constants as constants

    def no_connection(*args, **kwargs):
        raise AssertionError("offline mode must not open a connection")

    monkeypatch.setattr(dl.urllib.request, "urlopen", no_connection)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as when set before the hub loads
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    began = time.monotonic()
    assert cli.main(["download", "all"]) == 1
    assert time.monotonic() - began < 3
    assert no_dns == []  # nothing looked up, nothing connected
    err = capfd.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err[:-1]] == [
        "checkpoint", "vae", "inception", "reference",
    ]  # fmt: skip
    assert all("FAILED" in line and "offline mode" in line for line in err[:-1]), err
    for name in ("classify_image_graph_def.pb", "VIRTUAL_imagenet256_labeled.npz"):
        assert any(f"place it at {tmp_path / 'cache' / name}" in line for line in err)
    assert (
        err[-1] == "selfflow download: error: 4 of 4 failed: checkpoint, vae, inception, reference"
    )


# -- checkpoints that are not checkpoints ---------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "git-lfs pointer"),
        (b"<html><body>404</body></html>", "HTML"),
        (b"cat", "text"),
        (b"", "empty"),
    ],
)
def test_a_file_that_is_no_torch_file_is_named_for_what_it_is(tmp_path, content, named):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        load_model(path)
    assert named in str(caught.value) and "pickled" not in str(caught.value)


def test_a_directory_passed_as_checkpoint_is_called_a_directory(tmp_path):
    (tmp_path / "model.pt").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        load_model(tmp_path / "model.pt")


# -- a run that fails in its set-up leaves nothing ------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "text", "directory"])
def test_a_failed_ckpt_leaves_no_output_folder(tmp_path, tiny_vae_dir, capsys, kind):
    checkpoint = tmp_path / "model.pt"
    if kind == "text":
        checkpoint.write_text("not weights")
    elif kind == "directory":
        checkpoint.mkdir()
    out = tmp_path / "new" / "samples"
    assert cli.main(_sample_args(checkpoint, tiny_vae_dir, out)) == 1
    assert "selfflow sample: error:" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nor the parent it created


def test_eval_ref_fails_before_sampling_when_the_inception_graph_cannot_be_had(
    tmp_path, tiny_checkpoint, tiny_vae_dir, monkeypatch, capsys
):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dl, "INCEPTION_URL", "http://127.0.0.1:9/nothing-listens-here")
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"x")
    out = tmp_path / "samples"
    assert cli.main(_sample_args(tiny_checkpoint, tiny_vae_dir, out, "--eval-ref", str(ref))) == 1
    assert "could not download" in capsys.readouterr().err
    assert not out.exists()  # nothing was sampled


def test_a_bare_eval_ref_name_is_found_in_the_cache(
    tmp_path, tiny_checkpoint, tiny_vae_dir, monkeypatch, capsys
):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SELFFLOW_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    (cache / "VIRTUAL_imagenet256_labeled.npz").write_bytes(b"ref")
    (cache / "classify_image_graph_def.pb").write_bytes(b"graph")
    from selfflow.eval import evaluator

    calls = {}

    def evaluate(ref_path, sample_path, out_dir=None, inception=None, device=None):
        calls.update(ref=ref_path, inception=inception)
        return {}

    monkeypatch.setattr(evaluator, "evaluate", evaluate)
    monkeypatch.setattr(evaluator, "format_report", lambda metrics: "report")
    args = _sample_args(
        tiny_checkpoint,
        tiny_vae_dir,
        tmp_path / "s",
        "--eval-ref",
        "VIRTUAL_imagenet256_labeled.npz",
    )
    assert cli.main(args) == 0
    assert calls == {
        "ref": str(cache / "VIRTUAL_imagenet256_labeled.npz"),
        "inception": str(cache / "classify_image_graph_def.pb"),
    }
    (cache / "VIRTUAL_imagenet256_labeled.npz").unlink()
    assert cli.main(args) == 1
    assert "`selfflow download reference` puts it there" in capsys.readouterr().err


# -- what is known of a file's integrity ----------------------------------------------------------


def test_verification_against_a_published_digest_and_the_hub_blob_name(tmp_path, monkeypatch):
    data = b"some weights"
    digest = hashlib.sha256(data).hexdigest()
    plain = tmp_path / "classify_image_graph_def.pb"
    plain.write_bytes(data)
    assert dl.verification(plain, digest) == {
        "sha256": digest, "verified": False, "how": "no published sha256 is known",
    }  # fmt: skip
    monkeypatch.setitem(dl.PUBLISHED_SHA256, plain.name, digest)
    assert dl.verification(plain, digest)["verified"] is True
    monkeypatch.setitem(dl.PUBLISHED_SHA256, plain.name, "0" * 64)
    record = dl.verification(plain, digest)
    assert record["verified"] is False and record["how"].startswith("DIFFERS")

    # huggingface_hub's cache: snapshots/REV/NAME links to blobs/SHA256
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (blobs / digest).write_bytes(data)
    (snapshot / "selfflow_imagenet256.pt").symlink_to(blobs / digest)
    record = dl.verification(snapshot / "selfflow_imagenet256.pt", digest)
    assert record == {"sha256": digest, "verified": True,
                      "how": "matches the Hugging Face hub's LFS sha256"}  # fmt: skip
    other = hashlib.sha256(b"flipped").hexdigest()
    assert dl.verification(snapshot / "selfflow_imagenet256.pt", other)["verified"] is False


def test_a_known_digest_is_checked_after_download(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path))
    server.files["/graph.pb"] = b"graph bytes"
    monkeypatch.setitem(dl.PUBLISHED_SHA256, "classify_image_graph_def.pb", "0" * 64)
    with pytest.raises(DownloadError, match="expected 0000"):
        dl.inception_path(url=server.url("/graph.pb"))
    assert not (tmp_path / "classify_image_graph_def.pb").exists()


def test_the_manifest_says_what_was_verified_of_the_checkpoint(
    tmp_path, tiny_checkpoint, tiny_vae_dir
):
    out = tmp_path / "samples"
    assert cli.main(_sample_args(tiny_checkpoint, tiny_vae_dir, out)) == 0
    run = json.loads((out / "manifest.json").read_text())["info"]["runs"][-1]
    digest = hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()
    assert run["checkpoint_integrity"] == {
        "sha256": digest, "verified": False, "how": "no published sha256 is known",
    }  # fmt: skip


def test_a_hub_checkpoint_whose_bytes_differ_from_its_blob_name_is_refused(
    tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    blob = blobs / ("0" * 64)  # the hub's sha256 of the file, which these bytes do not have
    blob.write_bytes(Path(tiny_checkpoint).read_bytes())
    (snapshot / "selfflow_imagenet256.pt").symlink_to(blob)
    out = tmp_path / "samples"
    code = cli.main(_sample_args(snapshot / "selfflow_imagenet256.pt", tiny_vae_dir, out))
    assert code == 1
    assert "DIFFERS from the Hugging Face hub's LFS sha256" in capsys.readouterr().err
