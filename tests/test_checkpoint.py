"""Checkpoint reading: the released layouts load strictly; every bad file is refused clearly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from selfflow.base.errors import CheckpointError, DownloadError
from selfflow.model.checkpoint import (
    HUB_FILENAME,
    HUB_REPO_ID,
    HUB_URL,
    download_checkpoint,
    load_model,
    save_model,
)
from selfflow.model.network import ModelConfig, SelfFlowDiT


def bare_state(model: SelfFlowDiT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip_keeps_config_and_function(tmp_path, tiny_model, suffix):
    path = save_model(tiny_model, tmp_path / f"tiny{suffix}")
    loaded = load_model(path)
    assert loaded.config == tiny_model.config
    assert_same_weights(loaded, tiny_model)
    x, tau, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([4, 1000])
    torch.testing.assert_close(loaded(x, tau, y), tiny_model(x, tau, y), rtol=0, atol=0)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


@pytest.mark.parametrize(
    ("wrap", "entry"),
    [
        (lambda sd: sd, None),
        (lambda sd: {"model": sd}, "model"),
        (lambda sd: {"state_dict": sd}, "state_dict"),
        (lambda sd: {"ema": sd, "opt": {"step": torch.tensor(3)}}, "ema"),
        (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}, "model"),
        (lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, None),
        (lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()}, None),
    ],
)
def test_released_layouts_load(tmp_path, tiny_model, wrap, entry):
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(bare_state(tiny_model)), path)
    loaded = load_model(path, config=tiny_model.config)
    assert_same_weights(loaded, tiny_model)
    assert loaded.checkpoint_info.source_entry == entry


def test_ema_is_preferred_over_model_and_the_user_is_told(tmp_path, tiny_model, caplog):
    from tests.conftest import randomize_

    other = randomize_(SelfFlowDiT(tiny_model.config), seed=99)
    path = tmp_path / "train.pt"
    torch.save({"model": bare_state(other), "ema": bare_state(tiny_model)}, path)
    with caplog.at_level(logging.WARNING):
        loaded = load_model(path, config=tiny_model.config)
    assert_same_weights(loaded, tiny_model)
    assert "ema" in caplog.text and "paper" in caplog.text
    assert loaded.checkpoint_info.notes


def test_released_xl2_file_loads_with_inferred_config(tmp_path):
    """A bare state dict with the released XL/2 keys and shapes, as in selfflow_imagenet256.pt.

    Each tensor is one random row broadcast (stride 0), so the file holds the real shapes in a
    few megabytes.
    """
    with torch.device("meta"):
        reference = SelfFlowDiT(ModelConfig.xl_2())
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in reference.state_dict().items():
        row = torch.randn(value.shape[-1], generator=gen) * 0.02
        state[f"module.{key}"] = row.expand(value.shape)
    path = tmp_path / HUB_FILENAME
    torch.save({"model": state}, path)
    assert path.stat().st_size < 50e6
    model = load_model(path, dtype=torch.bfloat16)
    assert model.config == ModelConfig.xl_2()
    loaded = model.state_dict()
    assert loaded["blocks.27.mlp.fc1.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(
        loaded["blocks.3.attn.qkv.weight"].float(),
        state["module.blocks.3.attn.qkv.weight"].bfloat16().float(),
        rtol=0,
        atol=0,
    )


def test_unknown_shapes_without_config_ask_for_one(tmp_path, tiny_model):
    path = tmp_path / "bare.pt"
    torch.save(bare_state(tiny_model), path)
    with pytest.raises(CheckpointError, match="stores no model config.*pass config="):
        load_model(path)


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_model):
    state = bare_state(tiny_model)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.1.extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, config=tiny_model.config)
    message = str(info.value)
    assert "1 missing keys (blocks.1.mlp.fc2.bias)" in message
    assert "1 unexpected keys (blocks.1.extra.weight)" in message


def test_wrong_shape_says_expected_and_found(tmp_path, tiny_model):
    state = bare_state(tiny_model)
    state["y_embedder.embedding_table.weight"] = torch.zeros(1000, 64)  # no null row
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError,
        match=r"y_embedder.embedding_table.weight: expected \(1001, 64\), found \(1000, 64\)",
    ):
        load_model(path, config=tiny_model.config)


def test_non_finite_tensor_is_refused(tmp_path, tiny_model):
    state = bare_state(tiny_model)
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"non-finite.*blocks.0.attn.qkv.weight"):
        load_model(path, config=tiny_model.config)


class NotATensor:
    """A class whose instance can only be restored by unpickling code."""


def test_pickled_code_is_refused_with_an_explanation(tmp_path, tiny_model):
    path = tmp_path / "pickled.pt"
    torch.save({"model": bare_state(tiny_model), "args": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_model(path, config=tiny_model.config)


def test_truncated_and_garbage_files_are_refused(tmp_path, tiny_model):
    good = save_model(tiny_model, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a (readable )?PyTorch checkpoint"):
        load_model(text)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.pt")


def test_non_dict_and_non_tensor_entries_are_refused(tmp_path, tiny_model):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_model(path)
    torch.save({"a": torch.zeros(1), "b": 3}, path)
    with pytest.raises(CheckpointError, match=r"not tensors: b"):
        load_model(path)


def test_config_mismatch_is_refused(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="differs"):
        load_model(path, config=ModelConfig.xl_2())


# ----------------------------------------------------------------------------------------------
# Download through huggingface_hub's cache, without network


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "selfflow-cache"))


def test_download_offline_says_how_to_get_the_file(tmp_path, offline_hub):
    with pytest.raises(DownloadError) as info:
        download_checkpoint(cache_dir=tmp_path)
    message = str(info.value)
    assert HUB_URL in message and "--ckpt" in message
    assert str(tmp_path / "selfflow-cache" / HUB_FILENAME) in message


def test_a_checkpoint_put_where_the_error_says_is_found(tmp_path, offline_hub, tiny_model):
    with pytest.raises(DownloadError) as info:
        download_checkpoint(cache_dir=tmp_path / "hub")
    place = Path(str(info.value).split("put it at ")[1].split(" (found there")[0])
    place.parent.mkdir(parents=True)
    save_model(tiny_model, place)
    assert download_checkpoint(cache_dir=tmp_path / "hub") == place
    assert load_model(None).config == tiny_model.config


def test_download_finds_a_file_already_in_the_hub_cache(tmp_path, offline_hub, tiny_model):
    repo = tmp_path / f"models--{HUB_REPO_ID.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_model(tiny_model, snapshot / HUB_FILENAME)
    path = download_checkpoint(cache_dir=tmp_path)
    assert Path(path).resolve() == (snapshot / HUB_FILENAME).resolve()
    assert load_model(path).config == tiny_model.config


def _tensor_data_span(path: Path) -> tuple[int, int]:
    """Byte range of the largest stored tensor inside a torch.save zip archive."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
        with open(path, "rb") as handle:  # local header: 30 bytes + name + extra field
            handle.seek(info.header_offset + 26)
            name_len, extra_len = (int.from_bytes(handle.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len
        return start, start + info.compress_size


def test_bytes_flipped_inside_tensor_data_are_refused_naming_the_entry(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "tiny.pt")
    start, end = _tensor_data_span(path)
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x40  # torch.load alone would load this silently
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    assert torch.load(damaged, weights_only=True)["state_dict"]  # the reason for the check
    with pytest.raises(CheckpointError, match=r"damaged.*CRC-32.*/data/"):
        load_model(damaged)
    load_model(path)  # the intact file still loads
