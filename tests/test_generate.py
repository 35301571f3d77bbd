"""`selfflow generate` and `selfflow classes`: options checked before any work, the format the
extension names, classes by name, captions, and the same bytes however the images are batched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfflow import cli
from selfflow.base.images import image_grid
from selfflow.sampling.pipeline import SelfFlowPipeline

SIZE, GAP = 16, 2  # the tiny VAE's images and the grid's padding


def generate(checkpoint, vae, out, *extra, capsys=None) -> int:
    args = ["generate", "--ckpt", str(checkpoint), "--vae", str(vae), "--out", str(out)]
    args += ["--num-steps", "3", "--device", "cpu", *extra]
    return cli.main(args)


def cells(path: Path, count: int, columns: int) -> np.ndarray:
    grid = np.asarray(Image.open(path).convert("RGB"))
    out = []
    for n in range(count):
        r, c = divmod(n, columns)
        top, left = r * (SIZE + GAP), c * (SIZE + GAP)
        out.append(grid[top : top + SIZE, left : left + SIZE])
    return np.stack(out)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the options must be refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(SelfFlowPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "{tmp}/a_file/x.png"], "a_file is a file, not a folder"),
        (["--out", "{tmp}/x.gif"], "cannot tell the image format from the extension '.gif'"),
        (["--out", "{tmp}/noext"], "extension '(none)'"),
        (["--out", "{tmp}"], "is a folder"),
        (["--columns", "-2"], "--columns must be at least 1; got -2"),
        (["--columns", "0"], "--columns must be at least 1; got 0"),
        (["--num", "0"], "--num must be at least 1; got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1; got 0"),
        (["--class", "zzz-no-such"], "no ImageNet class matches 'zzz-no-such'"),
        (["--class", "shark"], "'shark' matches"),
        (["--class", "1001"], "no ImageNet class matches '1001'"),
        (["--num-steps", "1"], "--num-steps must be at least 2"),
        (["--cfg-scale", "-1"], "--cfg-scale must be >= 0"),
    ],
)
def test_bad_options_are_refused_in_one_line_before_any_model_is_loaded(
    tmp_path, capsys, no_model, extra, message
):
    (tmp_path / "a_file").write_text("a file")
    extra = [e.format(tmp=tmp_path) for e in extra]
    if "--out" not in extra:
        extra += ["--out", str(tmp_path / "grid.png")]
    code = cli.main(["generate", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("selfflow generate: error:") and message.format(tmp=tmp_path) in err[0]


def test_an_unwritable_folder_is_refused_before_any_model_is_loaded(tmp_path, capsys, no_model):
    import os

    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who may write anywhere (root)")
        code = cli.main(["generate", "--out", str(folder / "sub" / "grid.png")])
    finally:
        folder.chmod(0o700)
    assert code == 1 and "is not writable" in capsys.readouterr().err


@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"),
                                             (".webp", "WEBP")])  # fmt: skip
def test_the_picture_has_the_format_its_extension_names(
    tmp_path, tiny_checkpoint, tiny_vae_dir, suffix, fmt
):
    out = tmp_path / "new" / f"grid{suffix}"
    assert generate(tiny_checkpoint, tiny_vae_dir, out, "--num", "2") == 0
    with Image.open(out) as picture:
        assert picture.format == fmt and picture.size == (2 * SIZE + GAP, SIZE)


def test_classes_by_name_or_wordnet_id_give_the_images_of_their_numbers(
    tmp_path, tiny_checkpoint, tiny_vae_dir
):
    by_name, by_number = tmp_path / "name.png", tmp_path / "number.png"
    assert generate(tiny_checkpoint, tiny_vae_dir, by_name, "--num", "3",
                    "--class", "golden retriever", "n01440764", "unconditional") == 0  # fmt: skip
    assert generate(tiny_checkpoint, tiny_vae_dir, by_number, "--num", "3",
                    "--class", "207", "0", "1000") == 0  # fmt: skip
    np.testing.assert_array_equal(
        np.asarray(Image.open(by_name)), np.asarray(Image.open(by_number))
    )


def test_captions_are_drawn_below_the_untouched_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    plain = image_grid(images, columns=3)
    named = image_grid(images, columns=3, captions=["207 golden retriever"] * 5)
    other = image_grid(images, columns=3, captions=["0 tench"] * 5)
    assert named.shape[0] > plain.shape[0]
    cell = (named.shape[0] - GAP) // 2  # two grid rows, each an image and its caption band
    width = (named.shape[1] - 2 * GAP) // 3  # cells widened for the longer caption
    assert cell - SIZE > 4 and width > SIZE
    for n in range(5):
        r, c = divmod(n, 3)
        top, left = r * (cell + GAP), c * (width + GAP)
        np.testing.assert_array_equal(named[top : top + SIZE, left : left + SIZE], images[n])
        assert (named[top : top + SIZE, left + SIZE : left + width] == 255).all()  # white
        caption = named[top + SIZE : top + cell, left : left + width]
        assert (caption < 128).any()  # dark text on white
        assert (caption[:, SIZE:] < 128).any()  # the text runs past the image's width
    assert not np.array_equal(named[SIZE:cell], other[SIZE:cell, : named.shape[1]])
    with pytest.raises(ValueError, match="2 captions for 5 images"):
        image_grid(images, captions=["a", "b"])


def test_generate_captions_change_only_the_caption_band(tmp_path, tiny_checkpoint, tiny_vae_dir):
    plain, named = tmp_path / "plain.png", tmp_path / "named.png"
    assert generate(tiny_checkpoint, tiny_vae_dir, plain, "--num", "2", "--columns", "2") == 0
    assert generate(tiny_checkpoint, tiny_vae_dir, named, "--num", "2", "--columns", "2",
                    "--captions") == 0  # fmt: skip
    a, b = np.asarray(Image.open(plain)), np.asarray(Image.open(named))
    assert b.shape[0] > a.shape[0]
    width = (b.shape[1] - GAP) // 2  # the cells widen to the caption
    for c in range(2):
        np.testing.assert_array_equal(
            b[:SIZE, c * (width + GAP) : c * (width + GAP) + SIZE],
            a[:SIZE, c * (SIZE + GAP) : c * (SIZE + GAP) + SIZE],
        )
    assert (b[SIZE:] < 128).any()


def test_an_image_has_the_same_bytes_in_a_short_last_batch_alone_or_in_a_full_one(
    tmp_path, tiny_checkpoint, tiny_vae_dir
):
    """--num 9 in batches of 4 (image 8 alone in the last batch) against --num 12, and image 8
    drawn on its own through the Python API with the same batch size."""
    short, full = tmp_path / "short.png", tmp_path / "full.png"
    common = ("--batch-size", "4", "--columns", "4", "--class", "207", "1", "980")
    assert generate(tiny_checkpoint, tiny_vae_dir, short, "--num", "9", *common) == 0
    assert generate(tiny_checkpoint, tiny_vae_dir, full, "--num", "12", *common) == 0
    np.testing.assert_array_equal(cells(short, 9, 4), cells(full, 9, 4))
    pipe = SelfFlowPipeline.from_pretrained(tiny_checkpoint, tiny_vae_dir, device="cpu")
    alone = pipe([980], indices=[8], seed=0, num_steps=3, batch_size=4)
    np.testing.assert_array_equal(alone[0], cells(full, 9, 4)[8])


def test_classes_lists_index_wordnet_id_and_name(capsys):
    assert cli.main(["classes", "retriever"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "207\tn02099601\tgolden retriever" in lines and len(lines) == 5
    assert cli.main(["classes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1000 and lines[0] == "0\tn01440764\ttench"
    assert cli.main(["classes", "no-such-class"]) == 1
    assert "no ImageNet class matches" in capsys.readouterr().err
