"""Tests for qwen3vl_webui.media on real files made with Pillow and PyAV (CPU, a few seconds)."""

from __future__ import annotations

import io
import os
import resource
import signal
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import av
import numpy as np
import psutil
import pytest
from PIL import Image

from qwen3vl_webui.media import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    MediaBudget,
    MediaError,
    describe_budget,
    load_image,
    load_video,
    media_kind,
)

BUDGET = MediaBudget()


# ------------------------------------------------------------------------------ file makers


def level(i: int, period: int = 100) -> int:
    """Grey level that encodes a frame's number, so a decoded frame tells which one it is."""
    return 20 + (i % period) * 200 // period


def write_video(
    target: str | Path | io.RawIOBase,
    *,
    seconds: float = 3.0,
    fps: int = 30,
    size: tuple[int, int] = (320, 240),
    codec: str = "libx264",
    fmt: str | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    rotation: float | None = None,
    period: int = 100,
) -> None:
    width, height = size
    out = av.open(
        target if isinstance(target, io.RawIOBase) else str(target),
        mode="w",
        format=fmt,
        options=container_options or {},
    )
    stream = out.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = options or {}
    if rotation is not None:
        stream.set_display_rotation(rotation)
    for i in range(round(seconds * fps)):
        pixels = np.full((height, width, 3), level(i, period), np.uint8)
        pixels[: height // 4, : width // 4] = (255, 0, 0)  # marker: shows orientation
        out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
    out.mux(stream.encode())
    out.close()


def repeat_video(segment: Path, out_path: Path, seconds: float, times: int) -> None:
    """Muxes `segment` (`seconds` long) `times` times with shifted timestamps: a long file, no re-encoding."""
    with av.open(str(segment)) as src, av.open(str(out_path), "w") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        span = round(seconds / src.streams.video[0].time_base)
        for k in range(times):
            src.seek(0)
            for packet in src.demux(video=0):
                if packet.size:
                    packet.pts += k * span
                    packet.dts += k * span
                    packet.stream = stream
                    out.mux(packet)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header declares width x height, with only a few rows of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(bytes(4 * (1 + 3 * width)))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def decoder_children() -> list[psutil.Process]:
    """This process's video decoder children (other fixtures may own other children)."""
    return [
        p for p in psutil.Process().children() if "_qwen3vl_media_child" in " ".join(p.cmdline())
    ]


def assert_clip_within_budget(clip, budget: MediaBudget = BUDGET) -> None:
    t, h, w, c = clip.frames.shape
    assert clip.frames.dtype == np.uint8 and c == 3
    assert t >= 2 and t % 2 == 0 and t <= budget.video_max_frames
    assert t * h * w <= budget.video_total_pixels
    assert h % 32 == 0 and w % 32 == 0
    indices = clip.metadata["frames_indices"]
    assert len(indices) == t
    assert (
        indices == sorted(indices)
        and 0 <= indices[0]
        and indices[-1] < clip.metadata["total_num_frames"]
    )


def assert_frames_match_indices(clip, period: int = 100) -> None:
    """Each frame's grey level must be the one written for the index the metadata claims."""
    for frame, index in zip(clip.frames, clip.metadata["frames_indices"], strict=True):
        h, w, _ = frame.shape
        seen = frame[h // 2 :, w // 2 :].mean()  # away from the marker
        assert abs(seen - level(index, period)) <= 5, (index, seen)


# ------------------------------------------------------------------------------ kinds, budget


@pytest.mark.parametrize("ext", IMAGE_EXTENSIONS)
def test_image_extensions_are_images(ext: str) -> None:
    assert media_kind(f"/uploads/photo{ext}") == "image"
    assert media_kind(f"photo{ext.upper()}") == "image"


@pytest.mark.parametrize("ext", VIDEO_EXTENSIONS)
def test_video_extensions_are_videos(ext: str) -> None:
    assert media_kind(f"/uploads/clip{ext}") == "video"
    assert media_kind(f"clip{ext.upper()}") == "video"


@pytest.mark.parametrize("name", ["notes.txt", "scan.bmp", "noext", "archive.tar.gz"])
def test_unknown_extension_is_refused_naming_basename(name: str) -> None:
    with pytest.raises(MediaError) as err:
        media_kind(f"/secret/dir/{name}")
    assert str(err.value).startswith(f"{name} is not a supported file type")
    assert "/secret" not in str(err.value)


def test_describe_budget_default() -> None:
    expected = "images ≤ 0.9 MP · video 2 fps, ≤ 32 frames, ≤ 7.4 MP total"
    assert describe_budget(BUDGET) == expected


def test_budget_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="video_fps"):
        MediaBudget(video_fps=0)
    with pytest.raises(ValueError, match="video_max_frames"):
        MediaBudget(video_max_frames=1)


# ------------------------------------------------------------------------------ images


@pytest.mark.parametrize(
    "fmt,ext", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("GIF", ".gif")]
)
def test_valid_images_load_as_rgb(tmp_path: Path, fmt: str, ext: str) -> None:
    path = tmp_path / f"pic{ext}"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, format=fmt)
    im = load_image(str(path), BUDGET)
    assert im.mode == "RGB" and im.size == (64, 48)
    r, g, b = im.getpixel((32, 24))
    assert r > 150 and g < 80 and b < 80


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (40, 40), c) for c in ((0, 0, 255), (255, 0, 0), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_image(str(path), BUDGET).getpixel((20, 20)) == (0, 0, 255)


def test_transparent_png_is_flattened_on_white(tmp_path: Path) -> None:
    path = tmp_path / "alpha.png"
    im = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    im.paste((0, 128, 0, 255), (0, 0, 10, 20))
    im.save(path)
    out = load_image(str(path), BUDGET)
    assert out.getpixel((15, 10)) == (255, 255, 255) and out.getpixel((5, 10)) == (0, 128, 0)


def test_16_bit_png_keeps_its_range(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(path)
    assert abs(load_image(str(path), BUDGET).getpixel((4, 4))[0] - 128) <= 1


def test_resize_respects_max_image_pixels(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (2000, 1000), (10, 20, 30)).save(path)
    im = load_image(str(path), MediaBudget(max_image_pixels=100_000))
    w, h = im.size
    assert w * h <= 100_000 and w * h > 95_000
    assert abs(w / h - 2.0) < 0.02


def test_large_jpeg_is_shrunk_to_default_budget(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (4000, 3000), (90, 120, 200)).save(path, quality=80)
    im = load_image(str(path), BUDGET)
    w, h = im.size
    assert w * h <= BUDGET.max_image_pixels and abs(w / h - 4 / 3) < 0.01 and w >= 1100


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise
    Image.new("RGB", (60, 30), (0, 0, 0)).save(path, exif=exif)
    assert load_image(str(path), BUDGET).size == (30, 60)


def test_text_renamed_png_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_text("hello, I am definitely a picture\n")
    with pytest.raises(MediaError) as err:
        load_image(str(path), BUDGET)
    assert str(err.value) == "x.png is not a valid image."


def test_other_pillow_formats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    Image.new("RGB", (16, 16)).save(path, format="TIFF")  # Pillow could read it; we must not
    with pytest.raises(MediaError, match="scan.png is not a valid image"):
        load_image(str(path), BUDGET)


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_png_is_not_an_image(tmp_path: Path, keep: float) -> None:
    source = tmp_path / "full.png"
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)
    Image.fromarray(noise).save(source)
    data = source.read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(MediaError, match="cut.png is not a valid image"):
        load_image(str(path), BUDGET)


@pytest.mark.parametrize("side", [9000, 20000])  # 81 MP: under Pillow's own limit; 400 MP: over
def test_decompression_bomb_refused_from_header(tmp_path: Path, side: int) -> None:
    path = tmp_path / "bomb.png"
    png_header_only(path, side, side)
    assert path.stat().st_size < 100_000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.monotonic()
    with pytest.raises(MediaError, match="bomb.png is too large"):
        load_image(str(path), BUDGET)
    assert time.monotonic() - start < 0.5
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 20  # decoding would need 243 MB (9000²) or 1.2 GB (20000²)


def test_source_pixel_limit_comes_from_budget(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 1000)).save(path)
    with pytest.raises(MediaError, match=r"big.png is too large \(2000×1000 pixels"):
        load_image(str(path), MediaBudget(max_image_source_pixels=1_000_000))


def test_extreme_aspect_ratio_refused(tmp_path: Path) -> None:
    path = tmp_path / "line.png"
    Image.new("RGB", (1, 300)).save(path)
    with pytest.raises(MediaError, match="line.png is too narrow"):
        load_image(str(path), BUDGET)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="gone.png was not found"):
        load_image(str(tmp_path / "gone.png"), BUDGET)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match="empty.mp4 is empty"):
        load_video(str(tmp_path / "empty.mp4"), BUDGET)


# ------------------------------------------------------------------------------ videos


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Route tempfile into tmp_path, so leftover decoder work dirs would be visible."""
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    return work


def test_mp4_decodes_to_budget(tmp_path: Path, private_tmp: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path)
    clip = load_video(str(path), BUDGET)
    assert_clip_within_budget(clip)
    assert clip.frames.shape == (6, 224, 320, 3)  # 3 s at 2 fps; 240 rounds down to 224
    assert clip.metadata["fps"] == 30.0 and clip.metadata["total_num_frames"] == 90
    assert clip.metadata["duration"] == pytest.approx(3.0)
    assert clip.metadata["frames_indices"][0] == 0 and clip.metadata["frames_indices"][-1] == 89
    assert clip.sample_fps == pytest.approx(2.0)
    assert_frames_match_indices(clip)
    assert list(private_tmp.iterdir()) == []  # the decoder's work dir is gone


def test_webm_decodes_to_budget(tmp_path: Path) -> None:
    path = tmp_path / "clip.webm"
    write_video(path, codec="libvpx-vp9", options={"deadline": "realtime", "cpu-used": "8"})
    clip = load_video(str(path), BUDGET)
    assert_clip_within_budget(clip)
    assert clip.frames.shape[0] == 6 and clip.metadata["total_num_frames"] == 90
    assert_frames_match_indices(clip)


def test_small_budget_shrinks_frames_and_count(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, seconds=4, fps=25)
    budget = MediaBudget(video_fps=4.0, video_max_frames=7, video_total_pixels=6 * 128 * 96)
    clip = load_video(str(path), budget)
    assert_clip_within_budget(clip, budget)
    assert clip.frames.shape[0] == 6  # 16 wanted, capped at 7, rounded down to even
    assert_frames_match_indices(clip)


def test_short_hd_clip_frames_stay_within_image_budget(tmp_path: Path) -> None:
    path = tmp_path / "hd.mp4"
    write_video(path, seconds=1, fps=10, size=(1600, 900))
    clip = load_video(str(path), BUDGET)
    assert_clip_within_budget(clip)
    assert clip.frames.shape == (2, 704, 1280, 3)  # 0.8 scale -> 1280x720, height aligned to 32
    assert_frames_match_indices(clip)


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "phone.mp4"
    write_video(path, rotation=-90)  # FFmpeg convention: -90 means show rotated clockwise
    frame = load_video(str(path), BUDGET).frames[0]
    assert frame.shape[:2] == (320, 224)
    red = (frame[..., 0] > 200) & (frame[..., 1] < 60)
    assert red[:40, -40:].all() and not red[:40, :40].any()  # top-left marker moved top-right


def test_video_without_duration_falls_back_to_decoding(tmp_path: Path) -> None:
    class Unseekable(io.RawIOBase):  # the Matroska muxer then writes no duration and no cues
        def __init__(self, f):
            self.f = f

        def writable(self):
            return True

        def write(self, b):
            return self.f.write(b)

    path = tmp_path / "stream.mkv"
    with open(path, "wb") as f:
        write_video(Unseekable(f), fmt="matroska")
    with av.open(str(path)) as c:
        assert c.duration is None and c.streams.video[0].duration is None
    clip = load_video(str(path), BUDGET)
    assert_clip_within_budget(clip)
    assert clip.frames.shape[0] == 6 and clip.metadata["total_num_frames"] == 90
    assert_frames_match_indices(clip)


def test_long_video_samples_without_decoding_everything(tmp_path: Path) -> None:
    # One hour at 15 fps (54,000 frames): a 10 s segment muxed 360 times with shifted timestamps.
    segment, path = tmp_path / "segment.mp4", tmp_path / "hour.mp4"
    write_video(segment, seconds=10, fps=15, size=(160, 120), options={"g": "15"}, period=150)
    repeat_video(segment, path, seconds=10, times=360)
    with av.open(str(segment)) as src:  # this machine's decode rate, to bound a full decode
        start = time.monotonic()
        decoded = sum(1 for _ in src.decode(video=0))
        full_decode_s = (time.monotonic() - start) / decoded * 54_000

    start = time.monotonic()
    clip = load_video(str(path), BUDGET)
    elapsed = time.monotonic() - start
    assert_clip_within_budget(clip)
    assert clip.frames.shape[0] == 32 and clip.metadata["total_num_frames"] == 54_000
    assert clip.metadata["duration"] == pytest.approx(3600, abs=0.1)
    assert clip.metadata["frames_indices"][-1] > 53_000  # spread over the whole hour
    assert clip.sample_fps == pytest.approx(32 / 3600)
    assert_frames_match_indices(clip, period=150)  # each seek landed on the right frame
    assert elapsed < min(5.0, full_decode_s / 2), (elapsed, full_decode_s)


@pytest.mark.parametrize("cut", ["half", "first_kb", "faststart_half"])
def test_truncated_mp4_is_refused(tmp_path: Path, private_tmp: Path, cut: str) -> None:
    source = tmp_path / "whole.mp4"
    faststart = {"movflags": "+faststart"} if cut == "faststart_half" else None
    write_video(source, container_options=faststart)
    data = source.read_bytes()
    path = tmp_path / "clip.mp4"
    path.write_bytes(data[:1024] if cut == "first_kb" else data[: len(data) // 2])
    with pytest.raises(MediaError) as err:
        load_video(str(path), BUDGET)
    assert str(err.value).startswith("clip.mp4 could not be decoded: ")
    assert str(tmp_path) not in str(err.value)
    assert list(private_tmp.iterdir()) == []
    assert_clip_within_budget(load_video(str(source), BUDGET))  # the parent is fine


def test_random_bytes_and_images_renamed_mp4_are_refused(tmp_path: Path) -> None:
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(1).bytes(50_000))
    picture = tmp_path / "picture.mp4"  # FFmpeg would read a PNG as a one-frame video
    Image.new("RGB", (64, 64), (0, 255, 0)).save(picture, format="PNG")
    for path in (noise, picture):
        with pytest.raises(
            MediaError, match=f"{path.name} could not be decoded: it is not a readable"
        ):
            load_video(str(path), BUDGET)


def test_timeout_kills_the_decoder(tmp_path: Path, private_tmp: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, seconds=1)
    start = time.monotonic()
    with pytest.raises(
        MediaError, match=r"clip.mp4 could not be decoded within the 0.01 s time limit"
    ):
        load_video(str(path), MediaBudget(video_timeout_s=0.01))
    assert time.monotonic() - start < 2.0
    assert decoder_children() == [] and list(private_tmp.iterdir()) == []


def test_memory_limit_is_enforced(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, seconds=1)
    with pytest.raises(
        MediaError, match="clip.mp4 could not be decoded: it needs more than 64 MiB of memory"
    ):
        load_video(str(path), MediaBudget(video_memory_bytes=64 * 1024**2))


def test_decoder_crash_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, seconds=1)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            load_video(str(path), BUDGET)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 10
    while not (children := decoder_children()) and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(children[0].pid, signal.SIGSEGV)  # what a decoder bug on a hostile file does
    worker.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], MediaError)
    assert str(outcome[0]) == "clip.mp4 could not be decoded: the decoder crashed (SIGSEGV)."
    assert_clip_within_budget(load_video(str(path), BUDGET))


def test_decoder_child_gets_no_secrets_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The child parses hostile files with FFmpeg: whatever is in its environment, an exploit can read.
    monkeypatch.setenv("QWEN3VL_AUTH", "alice:secret-password")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    path = tmp_path / "clip.mp4"
    write_video(path, seconds=1)
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(load_video(str(path), BUDGET)))
    worker.start()
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:  # the child's real environment, from /proc while it runs
        for child in decoder_children():
            try:
                seen = child.environ()
            except psutil.Error:  # exited meanwhile
                pass
        time.sleep(0.002)
    worker.join(30)
    assert seen, "the decoder child was not caught running"
    assert "QWEN3VL_AUTH" not in seen and "HF_TOKEN" not in seen
    assert not any("secret" in value for value in seen.values())
    allowed = {"PATH", "PYTHONPATH", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_ARENA_MAX", "LD_LIBRARY_PATH"}
    assert set(seen) <= allowed, set(seen) - allowed
    assert len(outcome) == 1
    assert_clip_within_budget(outcome[0])  # and it still decodes with only that
