"""Uploaded images and videos -> RGB pixels for Qwen3-VL, within a pixel/frame/time budget."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from qwen3vl_webui import media_child
from qwen3vl_webui.media_child import FRAMES_FILE, MIN_SIDE, RESULT_FILE
from qwen3vl_webui.vision_rules import rules

if TYPE_CHECKING:
    import numpy
    from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv")

logger = logging.getLogger(__name__)

# Only these Pillow decoders ever see user bytes: Pillow can open dozens of formats, some with a
# history of exploits (and EPS shells out to Ghostscript).
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


class MediaError(ValueError):
    """A user-facing problem with an uploaded file.

    str() is one plain sentence naming the file (basename only).
    """


@dataclass(frozen=True)
class MediaBudget:
    """Limits applied to every uploaded image and video."""

    max_image_pixels: int = 1280 * 720
    video_fps: float = 2.0
    video_max_frames: int = 32
    video_total_pixels: int = 32 * 640 * 360
    video_timeout_s: float = 30.0
    video_memory_bytes: int = 2 * 1024**3
    max_image_source_pixels: int = 64_000_000
    # (start s, end s): only this part of a video is decoded (a long video read segment by segment); None: all of it
    segment: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.segment is not None and not (
            len(self.segment) == 2 and 0 <= self.segment[0] < self.segment[1]
        ):
            raise ValueError(f"MediaBudget.segment must be (start, end) seconds with start < end, got {self.segment!r}")
        for f in fields(self):
            if f.name == "segment":
                continue
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MediaBudget.{f.name} must be a positive number, got {value!r}")
        if self.video_max_frames < 2:
            raise ValueError(
                f"MediaBudget.video_max_frames must be >= 2, got {self.video_max_frames}"
            )
        if self.video_total_pixels < 2 * MIN_SIDE * MIN_SIDE:
            raise ValueError(
                f"MediaBudget.video_total_pixels must be >= {2 * MIN_SIDE * MIN_SIDE} "
                f"(two {MIN_SIDE}x{MIN_SIDE} frames), got {self.video_total_pixels}"
            )

    @property
    def frame_cap(self) -> int:
        """Most frames one video may yield: even, and small enough that each keeps 64x64 pixels."""
        fit = self.video_total_pixels // (MIN_SIDE * MIN_SIDE)
        return rules().floor_by_factor(min(self.video_max_frames, fit), rules().FRAME_FACTOR)


@dataclass(frozen=True)
class VideoClip:
    """Frames sampled from one video, ready for the processor with do_sample_frames=False."""

    frames: numpy.ndarray  # (T, H, W, 3) uint8, T even >= 2
    metadata: dict  # fps, total_num_frames, frames_indices, duration
    sample_fps: float  # the rate the frames represent


def media_kind(path: str) -> str:
    """Return "image" or "video" from the file extension; MediaError for anything else."""
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    allowed = ", ".join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
    raise MediaError(f"{_name(path)} is not a supported file type (use {allowed}).")


def describe_budget(budget: MediaBudget) -> str:
    """One line for the UI: 'images ≤ 0.9 MP · video 2 fps, ≤ 32 frames, ≤ 7.4 MP total'."""
    return (
        f"images ≤ {_megapixels(budget.max_image_pixels)} MP · video {budget.video_fps:g} fps, "
        f"≤ {budget.frame_cap} frames, ≤ {_megapixels(budget.video_total_pixels)} MP total"
    )


# ----------------------------------------------------------------------------------- images


def load_image(path: str, budget: MediaBudget) -> Image.Image:
    """Decode an image (verified by content, bombs refused by header) to RGB within the budget."""
    from PIL import Image, ImageOps

    name = _check_file(path)
    try:
        with Image.open(path, formats=_PIL_FORMATS) as im:
            # Image.open reads only the header: refuse before any pixel is decoded.
            _check_image_size(im.size, budget, name)
            if im.format == "JPEG":
                # Let libjpeg decode at 1/2..1/8 scale when the result is shrunk anyway.
                im.draft("RGB", _fit_area(im.size, budget.max_image_pixels))
            im.load()  # first frame only for GIF/WebP animations
            rgb = _flatten_to_rgb(ImageOps.exif_transpose(im))
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"{name} is too large to open safely.") from exc
    except Exception as exc:  # any decoder failure on user bytes means the same thing to the user
        raise MediaError(f"{name} is not a valid image.") from exc
    size = _fit_area(rgb.size, budget.max_image_pixels)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return rgb


def _check_image_size(size: tuple[int, int], budget: MediaBudget, name: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise MediaError(f"{name} is not a valid image.")
    if width * height > budget.max_image_source_pixels:
        raise MediaError(
            f"{name} is too large ({width}×{height} pixels; the limit is "
            f"{_megapixels(budget.max_image_source_pixels)} MP)."
        )
    # Qwen's resizer raises on aspect ratios above its MAX_RATIO (200); refuse those with a readable message instead.
    ratio = rules().MAX_RATIO
    if max(width, height) > ratio * min(width, height):
        raise MediaError(f"{name} is too narrow ({width}×{height} pixels; at most 1:{ratio}).")


def _flatten_to_rgb(im: Image.Image) -> Image.Image:
    from PIL import Image

    if im.mode.startswith("I"):
        # 16/32-bit greyscale: a plain convert clips everything above 255 to white.
        im = im.point(lambda v: v * (1 / 256)).convert("L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Transparent pixels keep arbitrary colour underneath; show them as white, as browsers do.
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im.convert("RGB")


def _fit_area(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio and width*height <= max_pixels."""
    width, height = size
    if width * height <= max_pixels:
        return size
    scale = math.sqrt(max_pixels / (width * height))
    new_w = max(1, int(width * scale))
    new_h = max(1, min(int(height * scale), max_pixels // new_w))
    return min(new_w, max_pixels // new_h), new_h


# ----------------------------------------------------------------------------------- videos


def load_video(path: str, budget: MediaBudget) -> VideoClip:
    """Sample frames from a video in a sandboxed child process, within the budget."""
    name = _check_file(path)
    with tempfile.TemporaryDirectory(prefix="qwen3vl-video-") as workdir:  # mode 0700
        result = _run_decoder(os.path.abspath(path), budget, workdir, name)
        return _read_clip(workdir, result, budget, name)


def probe_video(path: str, budget: MediaBudget) -> dict[str, Any]:
    """A video's fps, total frames and duration from its headers, read in the sandboxed child (no frame decoded)."""
    name = _check_file(path)
    with tempfile.TemporaryDirectory(prefix="qwen3vl-video-") as workdir:
        return dict(_run_decoder(os.path.abspath(path), budget, workdir, name, probe_only=True)["metadata"])


def _run_decoder(path: str, budget: MediaBudget, workdir: str, name: str, probe_only: bool = False) -> dict[str, Any]:
    # A fresh interpreter rather than multiprocessing: 'spawn' and 'forkserver' re-import the
    # app's __main__ (gradio + torch, seconds, and torch alone maps ~3 GB of address space, over
    # RLIMIT_AS), while 'fork' is unsafe in a threaded parent. Loading media_child.py by path keeps
    # the child to stdlib + numpy + av, whatever the package's __init__ grows to import.
    job = {
        "path": path,
        "workdir": workdir,
        "fps": budget.video_fps,
        "frame_cap": budget.frame_cap,
        "total_pixels": budget.video_total_pixels,
        "frame_pixels": budget.max_image_pixels,
        "memory_bytes": budget.video_memory_bytes,
        "segment": list(budget.segment) if budget.segment else None,
        "probe_only": probe_only,
    }
    bootstrap = (
        "import importlib.util as u, sys\n"
        "s = u.spec_from_file_location('_qwen3vl_media_child', sys.argv[1])\n"
        "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
        "m._child_main(sys.argv[2])\n"
    )
    env = decoder_env()
    log_path = os.path.join(workdir, "child.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", bootstrap, os.path.abspath(media_child.__file__), json.dumps(job)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
    try:
        returncode = proc.wait(timeout=budget.video_timeout_s)
    except subprocess.TimeoutExpired:
        raise MediaError(
            f"{name} could not be decoded within the {budget.video_timeout_s:g} s time limit."
        ) from None
    finally:
        _kill_group(proc)
    return _child_outcome(returncode, workdir, log_path, budget, name)


def decoder_env() -> dict[str, str]:
    """The decoder child's whole environment: what it needs to start and find numpy and av, nothing else.

    It parses untrusted files with FFmpeg, so it gets no secrets to leak (QWEN3VL_AUTH, HF_TOKEN, cloud keys).
    """
    env = {
        # Where this interpreter finds its packages (a venv or `pip install --target` folder included).
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "PATH": os.defpath,
        # One BLAS thread and two malloc arenas: per-thread reservations would eat RLIMIT_AS.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
    }
    if "LD_LIBRARY_PATH" in os.environ:  # some Python builds (conda, pyenv --enable-shared) need it to start
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: decoder threads too
        except ProcessLookupError:
            pass
        proc.wait()


def _child_outcome(
    returncode: int, workdir: str, log_path: str, budget: MediaBudget, name: str
) -> dict[str, Any]:
    result_path = os.path.join(workdir, RESULT_FILE)
    with open(log_path, "rb") as f:
        log_tail = f.read()[-2000:].decode("utf-8", "replace").strip()
    if returncode == 0 and os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as f:
            result = json.load(f)
        if "error" not in result:
            return result
        detail = result["error"]
    elif returncode < 0:
        detail = f"the decoder crashed ({_signal_name(-returncode)})"
    elif "memory" in log_tail.lower():  # native libraries (OpenBLAS) abort when mmap fails
        detail = "out of memory"
    else:
        detail = f"the decoder stopped unexpectedly (exit status {returncode})"
    if detail == "out of memory":
        detail = f"it needs more than {_format_bytes(budget.video_memory_bytes)} of memory"
    logger.warning("video decode failed for %s: %s\n%s", name, detail, log_tail)
    raise MediaError(f"{name} could not be decoded: {detail}.")


def _read_clip(workdir: str, result: dict[str, Any], budget: MediaBudget, name: str) -> VideoClip:
    import numpy as np

    frames = np.load(os.path.join(workdir, FRAMES_FILE), allow_pickle=False)
    t = frames.shape[0] if frames.ndim == 4 else 0
    ok = (
        frames.dtype == np.uint8
        and t >= 2
        and t % 2 == 0
        and frames.shape[3] == 3
        and frames[0, :, :, 0].size * t <= budget.video_total_pixels
        and len(result["metadata"]["frames_indices"]) == t
    )
    if not ok:  # never hand the model something the budget did not allow
        raise MediaError(f"{name} could not be decoded: the decoder returned malformed frames.")
    return VideoClip(frames=frames, metadata=result["metadata"], sample_fps=result["sample_fps"])


# ---------------------------------------------------------------------------------- helpers


def _check_file(path: str) -> str:
    name = _name(path)
    if not os.path.isfile(path):
        raise MediaError(f"{name} was not found.")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{name} is empty.")
    return name


def _name(path: str) -> str:
    return os.path.basename(str(path)) or "the file"


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f}" if pixels >= 100_000 else f"{pixels / 1e6:.2f}"


def _format_bytes(n: int) -> str:
    return f"{n / 1024**3:.3g} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
