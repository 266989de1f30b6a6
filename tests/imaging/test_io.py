from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from anomalyvae.imaging.batch import read_images
from anomalyvae.imaging.files import find_images
from anomalyvae.imaging.io import ImageReadError, read_image
from anomalyvae.imaging.preprocessing import (
    MaskError,
    Preprocessing,
    load_image,
    preprocess,
    read_mask,
    to_channels,
)


def _save(path, array, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return path


def test_find_images_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ["b/deep/z.PNG", "a.jpg", "b/c.tif", "notes.txt", ".hidden/x.png", "b/.y.png"]:
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.jpg", "b/c.tif", "b/deep/z.PNG"]


def test_find_images_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "nope")


def test_find_images_survives_symlink_loop(tmp_path):
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert [p.name for p in find_images(tmp_path)] == ["a.png"]


@pytest.mark.parametrize(
    ("array", "suffix", "bit_depth", "expected_max"),
    [
        (np.full((5, 6), 255, np.uint8), ".png", 8, 1.0),
        (np.full((5, 6), 65535, np.uint16), ".png", 16, 1.0),
        (np.full((5, 6), 1000, np.uint16), ".png", 16, 1000 / 65535),
        (np.full((5, 6), 1000, np.uint16), ".tif", 16, 1000 / 65535),
        (np.full((5, 6, 3), 128, np.uint8), ".bmp", 8, 128 / 255),
    ],
)
def test_read_image_keeps_bit_depth(tmp_path, array, suffix, bit_depth, expected_max):
    path = _save(tmp_path / f"img{suffix}", array)
    decoded = read_image(path)
    assert decoded.bit_depth == bit_depth
    assert decoded.pixels.dtype == np.float32
    assert decoded.pixels.shape[:2] == (5, 6)
    np.testing.assert_allclose(decoded.pixels.max(), expected_max, rtol=1e-6)


def test_sixteen_bit_values_are_not_squeezed_to_eight_bits(tmp_path):
    ramp = np.arange(0, 65536, 257, dtype=np.uint16)[:256].reshape(16, 16) + 1
    decoded = read_image(_save(tmp_path / "ramp.png", ramp))
    np.testing.assert_allclose(decoded.pixels[:, :, 0] * 65535, ramp, atol=0.01)


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "CMYK", "1"])
def test_read_image_converts_other_modes(tmp_path, mode):
    image = Image.new("RGB", (8, 8), (200, 100, 50)).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    decoded = read_image(path)
    assert decoded.pixels.shape[:2] == (8, 8)
    assert 0.0 <= decoded.pixels.min() <= decoded.pixels.max() <= 1.0


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not a recognised image format"),
        (b"hello, I am text", "not a recognised image format"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, content, reason):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    assert "broken.png" in str(info.value)


def test_truncated_png_is_an_error(tmp_path):
    path = _save(
        tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated|corrupt"):
        read_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.png")


def test_to_channels_luma_and_replicate():
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[..., 1] = 1.0
    np.testing.assert_allclose(to_channels(rgb, 1)[..., 0], 0.587, rtol=1e-6)
    assert to_channels(rgb[..., :1], 3).shape == (2, 2, 3)


def test_preprocess_shape_and_range():
    spec = Preprocessing(channels=1, height=16, width=24)
    out = preprocess(np.random.default_rng(0).random((40, 50, 3), dtype=np.float32), spec)
    assert out.shape == (1, 16, 24) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("bad", [dict(channels=2), dict(height=4), dict(resize="lanczos9")])
def test_preprocessing_validates(bad):
    args = dict(channels=1, height=16, width=16) | bad
    with pytest.raises(ValueError):
        Preprocessing(**args)


def test_read_images_skips_and_reports_unreadable(tmp_path):
    good = _save(tmp_path / "good.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    blank = _save(tmp_path / "blank.png", np.zeros((8, 8), np.uint8))  # a dead camera
    spec = Preprocessing(1, 8, 8)
    with pytest.warns(UserWarning, match="bad.png"):
        images, kept, errors = read_images([good, bad, blank], spec)
    assert images.shape == (1, 1, 8, 8) and kept == [good] and len(errors) == 2
    assert "blank" in errors[1].reason and errors[1].path == blank
    with pytest.raises(ImageReadError):
        read_images([good, bad], spec, on_error="raise")
    assert load_image(good, spec).shape == (1, 8, 8)
    with pytest.raises(ImageReadError, match="blank"):
        load_image(blank, spec)


def test_read_mask_threshold_resize_and_size_check(tmp_path):
    mask = np.zeros((20, 20), np.uint8)
    mask[4:14, 4:14] = 255
    mask[0, 0] = 40  # a soft edge value
    path = _save(tmp_path / "m.png", mask)
    assert read_mask(path)[0, 0]
    assert not read_mask(path, threshold=0.5)[0, 0]
    small = read_mask(path, size=(10, 10), threshold=0.5)
    assert small.shape == (10, 10) and small.sum() == 25
    with pytest.raises(MaskError, match="must match"):
        read_mask(path, expected_shape=(30, 20))


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("L", ".png"),
        ("L", ".jpg"),
        ("RGB", ".jpg"),
        ("I;16", ".png"),
        ("RGBA", ".png"),
        ("P", ".png"),
    ],
)
def test_huge_images_are_decoded_reduced_with_their_own_size_kept(tmp_path, mode, suffix):
    from anomalyvae.imaging.io import REDUCE_FACTOR

    rng = np.random.default_rng(0)
    height, width = 2400, 1700
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (height, width)).astype(np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        image = image.convert(mode)
    path = tmp_path / f"big{suffix}"
    image.save(path)
    full, reduced = read_image(path), read_image(path, max_side=2400 // REDUCE_FACTOR // 2)
    assert (reduced.height, reduced.width) == (full.height, full.width) == (height, width)
    assert reduced.pixels.shape[0] <= height // 2 and reduced.bit_depth == full.bit_depth
    assert reduced.pixels.mean() == pytest.approx(full.pixels.mean(), abs=0.01)
    small = read_image(path, max_side=height)  # not much larger than the model: in full
    assert small.pixels.shape == full.pixels.shape


def test_one_walker_for_training_and_scans(tmp_path):
    from anomalyvae.imaging.files import find_images, walk_images
    from anomalyvae.inference.decoding import SCAN_EXTENSIONS

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for path in (data / "a" / "1.png", tmp_path / "elsewhere" / "2.png", data / ".hidden.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    (data / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (data / "a" / "loop").symlink_to(data, target_is_directory=True)  # a symlink loop
    names = sorted(p.name for p in find_images(data))
    assert names == ["1.png", "2.png"]  # linked folder entered once, loop harmless
    scanned = sorted(p.name for p in walk_images(data, SCAN_EXTENSIONS))
    assert scanned == names == sorted(p.name for p in walk_images(data))


def test_the_size_limit_is_checked_on_the_header_not_by_a_warnings_filter(tmp_path, monkeypatch):
    """The scan decodes on several threads; a process-wide warnings filter set by one
    decode could be lifted under another, letting an oversized image through (it did)."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from anomalyvae.imaging import io

    monkeypatch.setattr(io, "MAX_PIXELS", 50 * 50)
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "ok.png")

    def outcome(name: str) -> str:
        try:
            read_image(tmp_path / name)
            return "read"
        except ImageReadError as error:
            return "too large" if "too large" in str(error) else str(error)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whatever filters the caller has set
        assert outcome("big.png") == "too large"
    names = ["big.png", "ok.png"] * 100
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(outcome, names))
    assert got == ["too large", "read"] * 100


def _write_png16(path, values: np.ndarray, rng: np.random.Generator) -> None:
    """A 48-bit (RGB) or 64-bit (RGBA) PNG, each row with a random PNG filter type.

    Pillow cannot write these, so the file is put together here (filters 0-4 as the
    PNG specification defines them, so the decoder's unfiltering is exercised too).
    """
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    def paeth(a, b, c):
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))

    height, width, channels = values.shape
    bpp = 2 * channels
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    header += bytes([16, 2 if channels == 3 else 6, 0, 0, 0])
    stream, previous = b"", np.zeros(width * bpp, np.int32)
    for y in range(height):
        row = np.frombuffer(values[y].astype(">u2").tobytes(), np.uint8).astype(np.int32)
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int32), previous[:-bpp]])
        kind = int(rng.integers(0, 5))
        filtered = {
            0: row,
            1: row - left,
            2: row - previous,
            3: row - (left + previous) // 2,
            4: row - paeth(left, previous, upper_left),
        }[kind]
        stream += bytes([kind]) + (filtered % 256).astype(np.uint8).tobytes()
        previous = row
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(stream))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [3, 4])
def test_48_and_64_bit_colour_png_keep_all_16_bits(tmp_path, channels):
    rng = np.random.default_rng(channels)
    values = rng.integers(0, 65536, (37, 23, channels)).astype(np.uint16)
    path = tmp_path / "wide.png"
    _write_png16(path, values, rng)
    decoded = read_image(path)
    assert decoded.bit_depth == 16 and decoded.pixels.shape == (37, 23, 3)  # alpha dropped
    assert np.array_equal(decoded.raw, values[:, :, :3].astype(np.float32))
    np.testing.assert_allclose(decoded.pixels, values[:, :, :3] / 65535.0, atol=1e-7)
    reduced = read_image(path, max_side=4)  # large-image path: box-reduced, size kept
    assert (reduced.height, reduced.width) == (37, 23) and reduced.bit_depth == 16
    assert reduced.pixels.mean() == pytest.approx(decoded.pixels.mean(), abs=0.02)


def test_a_huge_jpeg_is_decoded_at_reduced_scale_not_in_full(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        calls.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1600, 1200), dtype=np.uint8)).save(tmp_path / "b.jpg")
    decoded = read_image(tmp_path / "b.jpg", max_side=100)
    assert calls, "the JPEG decoder's own downscaling (draft mode) was not used"
    assert (decoded.height, decoded.width) == (1600, 1200)
    assert max(decoded.pixels.shape[:2]) <= 400


def test_the_walker_goes_on_past_a_file_it_may_not_look_at(tmp_path, monkeypatch):
    """A stat that fails (no permission, a /proc entry) drops that file, not the walk."""
    from pathlib import Path

    from anomalyvae.imaging.files import walk_images

    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "locked").write_bytes(b"x")  # extensionless: sniffed for DICOM
    real_is_file = Path.is_file

    def is_file(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    assert [p.name for p in walk_images(tmp_path)] == ["a.png"]


@pytest.mark.parametrize(
    ("fmt", "suffix", "scored"),
    [
        ("GIF", ".gif", 2),
        ("PNG", ".png", 2),
        ("WEBP", ".webp", 2),
        ("TIFF", ".tif", 2),
        ("MPO", ".jpg", 1),
    ],  # an MPO's further pictures are previews, not images of their own
)
def test_a_file_of_several_images_lists_its_frames(tmp_path, fmt, suffix, scored):
    from anomalyvae.imaging.io import content_frames
    from anomalyvae.imaging.preprocessing import load_frames

    patch = np.zeros((20, 24, 3), np.uint8)
    patch[6:14, 8:16] = 40  # not blank (a blank frame is an error), through lossy WebP too
    frames = [Image.fromarray(patch + v) for v in (10, 200)]
    path = tmp_path / f"two{suffix}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    assert content_frames(path) == tuple(range(scored))
    spec = Preprocessing(channels=1, height=16, width=16)
    means = [float(x.mean()) for _, x in load_frames(path, spec)]
    assert len(means) == scored and means[0] < 0.1
    if scored == 2:
        assert means[1] > 0.7  # the second frame is its own picture, not the first again
        with pytest.raises(ImageReadError, match="holds 2 images"):
            load_image(path, spec)
    else:
        assert load_image(path, spec).shape == (1, 16, 16)


def test_a_damaged_file_of_several_frames_is_an_error_not_its_first_frame(tmp_path):
    """An animated PNG whose header claims more frames than it holds cannot list its
    frames: scoring the first alone would pass the rest unseen, so it is an error."""
    import struct
    import zlib

    from anomalyvae.imaging.io import content_frames

    frames = [Image.fromarray(np.full((20, 20), v, np.uint8)) for v in (10, 200)]
    path = tmp_path / "claims.png"
    frames[0].save(path, format="PNG", save_all=True, append_images=frames[1:])
    data = bytearray(path.read_bytes())
    chunk = data.find(b"acTL")
    struct.pack_into(">I", data, chunk + 4, 1000)  # num_frames
    struct.pack_into(">I", data, chunk + 12, zlib.crc32(bytes(data[chunk : chunk + 12])))
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="damaged file of several frames"):
        content_frames(path)
    spec = Preprocessing(channels=1, height=16, width=16)
    with pytest.raises(ImageReadError, match="damaged"):
        load_image(path, spec)


def test_a_tiff_that_opens_with_a_thumbnail_is_read_by_its_image(tmp_path):
    """Page 0 a reduced-resolution copy, page 1 the image: every reader takes page 1."""
    from anomalyvae.imaging.io import content_frames

    image = Image.fromarray((np.arange(40 * 60).reshape(40, 60) % 251).astype(np.uint8))
    thumb = image.resize((15, 10))
    thumb.encoderinfo = {"tiffinfo": {254: 1}}
    image.encoderinfo = {"tiffinfo": {254: 0}}
    path = tmp_path / "thumb_first.tif"
    thumb.save(path, save_all=True, append_images=[image], tiffinfo={254: 1})
    assert content_frames(path) == (1,)
    assert read_image(path).pixels.shape == (40, 60, 1)
    spec = Preprocessing(channels=1, height=40, width=60)
    np.testing.assert_allclose(
        load_image(path, spec)[0], np.asarray(image, np.float32) / 255, atol=1e-6
    )


def test_stored_size_reads_the_header_and_agrees_with_the_decoded_image(tmp_path, monkeypatch):
    """A mask's size check needs the image's size, not its pixels: the header gives it
    (nothing decoded), the same size read_image reports, also for a TIFF that opens with
    a thumbnail page; a file that is no image raises the reader's own error."""
    import anomalyvae.imaging.io as io

    rng = np.random.default_rng(0)
    files = [
        _save(tmp_path / "grey.png", rng.integers(0, 255, (30, 50), dtype=np.uint8)),
        _save(tmp_path / "colour.jpg", rng.integers(0, 255, (41, 17, 3), dtype=np.uint8)),
        _save(tmp_path / "deep.png", rng.integers(0, 65535, (23, 29)).astype(np.uint16)),
    ]
    page = Image.fromarray(rng.integers(0, 255, (64, 48), dtype=np.uint8))
    thumbnail = Image.fromarray(rng.integers(0, 255, (8, 6), dtype=np.uint8))
    thumbnail.encoderinfo = {"tiffinfo": {254: 1}}  # a reduced-resolution copy
    page.encoderinfo = {"tiffinfo": {254: 0}}
    tiff = tmp_path / "pages.tif"
    thumbnail.save(tiff, save_all=True, append_images=[page], tiffinfo={254: 1})
    files.append(tiff)
    expected = {f.name: (read_image(f).height, read_image(f).width) for f in files}
    assert expected["pages.tif"] == (64, 48)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(io, "_decode_frame", no_decoding)
    assert {f.name: io.stored_size(f) for f in files} == expected
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="broken.png"):
        io.stored_size(tmp_path / "broken.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_stored_size_refuses_a_fifo_without_opening_it(tmp_path):
    """Opening a FIFO blocks until a writer comes: the size check must refuse it first."""
    import threading

    import anomalyvae.imaging.io as io

    os.mkfifo(tmp_path / "pipe.png")
    raised: list[Exception] = []

    def size() -> None:
        try:
            io.stored_size(tmp_path / "pipe.png")
        except Exception as error:
            raised.append(error)

    worker = threading.Thread(target=size, daemon=True)  # a hang fails, not blocks, the run
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "stored_size blocked on a FIFO"
    assert isinstance(raised[0], ImageReadError) and "a FIFO" in str(raised[0])
