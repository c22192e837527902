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

if TYPE_CHECKING:
    import numpy
    from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv")

logger = logging.getLogger(__name__)

# Only these Pillow decoders ever see user bytes: Pillow can open dozens of formats, some with a
# history of exploits (and EPS shells out to Ghostscript).
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# Qwen's resizer raises on aspect ratios above 200; refuse those with a readable message instead.
_MAX_ASPECT = 200
# Qwen3-VL sees 16-px patches merged 2x2, so frame sides are multiples of 32.
_ALIGN = 32
_MIN_SIDE = 64
# When a container declares no duration we must decode sequentially; this caps that work.
_BLIND_DECODE_CAP = 20_000
# Without a seek index, decoding forward beats seeking for targets closer than this.
_SEEK_GAP_S = 5.0
_DECODER_THREADS = 4
_RESULT_FILE = "result.json"
_FRAMES_FILE = "frames.npy"


class MediaError(ValueError):
    """A user-facing problem with an uploaded file.

    str() is one plain sentence naming the file (basename only).
    """


class _UnusableVideo(Exception):
    """Raised in the decoder child with a message fit for the user."""


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

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MediaBudget.{f.name} must be a positive number, got {value!r}")
        if self.video_max_frames < 2:
            raise ValueError(
                f"MediaBudget.video_max_frames must be >= 2, got {self.video_max_frames}"
            )
        if self.video_total_pixels < 2 * _MIN_SIDE * _MIN_SIDE:
            raise ValueError(
                f"MediaBudget.video_total_pixels must be >= {2 * _MIN_SIDE * _MIN_SIDE} "
                f"(two {_MIN_SIDE}x{_MIN_SIDE} frames), got {self.video_total_pixels}"
            )

    @property
    def frame_cap(self) -> int:
        """Most frames one video may yield: even, and small enough that each keeps 64x64 pixels."""
        fit = self.video_total_pixels // (_MIN_SIDE * _MIN_SIDE)
        return _even_floor(min(self.video_max_frames, fit))


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
    if max(width, height) > _MAX_ASPECT * min(width, height):
        raise MediaError(
            f"{name} is too narrow ({width}×{height} pixels; at most 1:{_MAX_ASPECT})."
        )


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


def _run_decoder(path: str, budget: MediaBudget, workdir: str, name: str) -> dict[str, Any]:
    # A fresh interpreter rather than multiprocessing: 'spawn' and 'forkserver' re-import the
    # app's __main__ (gradio + torch, seconds, and torch alone maps ~3 GB of address space, over
    # RLIMIT_AS), while 'fork' is unsafe in a threaded parent. Loading this file by path keeps the
    # child to stdlib + numpy + av, whatever the package's __init__ grows to import.
    job = {
        "path": path,
        "workdir": workdir,
        "fps": budget.video_fps,
        "frame_cap": budget.frame_cap,
        "total_pixels": budget.video_total_pixels,
        "frame_pixels": budget.max_image_pixels,
        "memory_bytes": budget.video_memory_bytes,
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
            [sys.executable, "-c", bootstrap, os.path.abspath(__file__), json.dumps(job)],
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
    result_path = os.path.join(workdir, _RESULT_FILE)
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

    frames = np.load(os.path.join(workdir, _FRAMES_FILE), allow_pickle=False)
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


# ------------------------------------------------------ decoder child (a fresh interpreter)


def _child_main(job_json: str) -> None:
    """Entry point of the decoder process: decode, then write frames.npy and result.json."""
    job = json.loads(job_json)
    _limit_resources(job["memory_bytes"], job["total_pixels"])
    try:
        result = _decode_video(job)
    except Exception as exc:  # one plain sentence for the user; the parent logs the rest
        result = {"error": _plain_error(exc)}
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    with open(os.path.join(job["workdir"], _RESULT_FILE), "w", encoding="utf-8") as f:
        json.dump(result, f)


def _limit_resources(memory_bytes: int, total_pixels: int) -> None:
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ValueError, OSError) as exc:  # e.g. macOS: decode anyway, under the time limit only
        print(f"RLIMIT_AS not applied: {exc}", file=sys.stderr)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing decoder must not dump GBs
    file_cap = total_pixels * 3 + 64 * 1024**2  # frames.npy, result and log only
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_cap, file_cap))


def _plain_error(exc: Exception) -> str:
    # Never import av here: this also reports av failing to import under RLIMIT_AS.
    text = str(exc)
    if isinstance(exc, MemoryError) or "map segment" in text or "allocate memory" in text:
        return "out of memory"
    if isinstance(exc, _UnusableVideo):
        return text
    if type(exc).__module__.startswith("av."):  # FFmpegError; its str() holds the server path
        if getattr(exc, "errno", None) in (11, 12):  # EAGAIN (no thread), ENOMEM: RLIMIT_AS hit
            return "out of memory"
        if type(exc).__name__ == "InvalidDataError":
            return "the file is damaged or not a supported video"
        return (getattr(exc, "strerror", None) or "the decoder reported an error").lower()
    return f"the decoder failed ({type(exc).__name__})"


def _decode_video(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    with _open(job["path"]) as container:
        stream = _video_stream(container)
        probe = _probe(container, stream)
        picked = _decode_planned(container, stream, probe, job) if probe else []
    if not picked:
        # No usable duration, or nothing at the planned times: decode from the start instead.
        with _open(job["path"]) as container:
            picked, probe = _decode_blind(container, _video_stream(container), job)
    if not picked:
        raise _UnusableVideo("it contains no decodable video frames")
    picked = picked[:-1] if len(picked) % 2 and len(picked) > 1 else picked
    picked = picked * 2 if len(picked) == 1 else picked  # a one-frame video still needs T >= 2
    fps, start, duration, total = probe
    indices = [min(total - 1, max(0, round((t - start) * fps))) for t, _ in picked]
    indices = [max(indices[: i + 1]) for i in range(len(indices))]  # monotone despite VFR jitter
    np.save(os.path.join(job["workdir"], _FRAMES_FILE), np.stack([a for _, a in picked]))
    metadata = {
        "fps": fps,
        "total_num_frames": total,
        "frames_indices": indices,
        "duration": duration,
    }
    return {"metadata": metadata, "sample_fps": len(picked) / duration}


def _open(path: str) -> Any:
    import av

    # Only the MP4/MOV and Matroska/WebM demuxers may parse user bytes, and only local files may
    # be opened: FFmpeg otherwise probes ~300 formats, some of which follow playlists and URLs.
    options = {"format_whitelist": "mov,mp4,matroska,webm", "protocol_whitelist": "file"}
    try:
        return av.open(path, mode="r", container_options=options)
    except av.error.FFmpegError:
        raise _UnusableVideo("it is not a readable MP4, MOV, WebM or MKV video") from None


def _video_stream(container: Any) -> Any:
    if not container.streams.video:
        raise _UnusableVideo("it has no video track")
    stream = container.streams.video[0]
    stream.codec_context.thread_type = "AUTO"
    # FFmpeg's default is one thread per core; each costs stack and heap under RLIMIT_AS.
    stream.codec_context.thread_count = min(_DECODER_THREADS, os.cpu_count() or 1)
    return stream


def _source_fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate and 0 < rate < 1000 else 0.0


def _probe(container: Any, stream: Any) -> tuple[float, float, float, int] | None:
    """(fps, start s, duration s, total frames) from headers, or None when they are unusable."""
    import av

    fps = _source_fps(stream)
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    if not (fps and 0 < duration < 1e7):
        return None
    total = stream.frames if stream.frames > 0 else max(1, round(duration * fps))
    return fps, start, duration, total


def _decode_planned(container: Any, stream: Any, probe: tuple, job: dict[str, Any]) -> list:
    """Seek to evenly spread timestamps: cost grows with sampled frames, not with duration."""
    import numpy as np

    fps, start, duration, total = probe
    n = min(job["frame_cap"], _even_floor(round(duration * job["fps"])), max(2, _even_floor(total)))
    n = max(2, n)
    targets = [start + i / fps for i in np.linspace(0, total - 1, n).round()]
    tolerance = 0.5 / fps
    size = None
    picked: list[tuple[float, Any]] = []
    frames = container.decode(stream)
    last = None  # (time, frame) most recently decoded
    for target in targets:
        if last is None or last[0] < target - tolerance:
            if _worth_seeking(stream, target, last[0] if last else start):
                frames = _seek(container, stream, target) or frames
            last = _next_frame_at(frames, target - tolerance)
            if last is None:
                break  # the stream ends before its declared duration (truncated file)
        size = size or _frame_size(last[1], n, job)
        picked.append((last[0], _to_rgb_array(last[1], size)))
    return picked


def _worth_seeking(stream: Any, target: float, position: float) -> bool:
    """Seek only when a keyframe lies between the decoder's position and the target."""
    tb = stream.time_base
    entries = stream.index_entries
    if not tb or len(entries) == 0:
        return target - position > _SEEK_GAP_S
    i = entries.search_timestamp(int(target / tb), backward=True)
    return i >= 0 and entries[i].timestamp * tb > position


def _seek(container: Any, stream: Any, target: float) -> Any:
    import av

    try:
        container.seek(int(target / stream.time_base), stream=stream, backward=True)
    except av.error.FFmpegError:
        return None  # unseekable: keep decoding forward
    return container.decode(stream)


def _next_frame_at(frames: Any, earliest: float) -> tuple[float, Any] | None:
    for frame in frames:
        if frame.time is not None and frame.time >= earliest:
            return frame.time, frame
    return None


def _decode_blind(container: Any, stream: Any, job: dict[str, Any]) -> tuple[list, tuple]:
    """Decode from the start, keeping frames at the target rate and halving it when over budget."""
    import numpy as np

    step = 1.0 / job["fps"]
    cap, size = job["frame_cap"], None
    kept: list[tuple[float, Any]] = []
    first = last = None
    decoded = 0
    for frame in container.decode(stream):
        decoded += 1
        t = frame.time if frame.time is not None else decoded * step
        first = t if first is None else first
        last = t
        if not kept or t >= kept[-1][0] + step:
            size = size or _frame_size(frame, cap, job)
            kept.append((t, _to_rgb_array(frame, size)))
            if len(kept) > 2 * cap:  # keep memory bounded: thin out and sample half as often
                kept, step = kept[::2], step * 2
        if decoded >= _BLIND_DECODE_CAP:
            break
    if not kept:
        return [], ()
    span = max(last - first, 0.0)
    fps = _source_fps(stream) or ((decoded - 1) / span if decoded > 1 and span > 0 else job["fps"])
    duration = span + 1.0 / fps
    n = max(1, min(cap, _even_floor(len(kept))))
    chosen = [kept[int(i)] for i in np.linspace(0, len(kept) - 1, n).round()]
    return chosen, (fps, first, duration, decoded)


def _frame_size(frame: Any, n: int, job: dict[str, Any]) -> tuple[int, int, int]:
    """(width, height, quarter turns) for one frame so that n frames fit in the pixel budget."""
    turns = round((frame.rotation or 0) / 90) % 4  # phone videos carry a display rotation
    width, height = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
    # A short clip's few frames could each be huge; no frame gets more pixels than an image.
    per_frame = min(job["total_pixels"] // n, job["frame_pixels"])
    scale = min(1.0, math.sqrt(per_frame / (width * height)))
    w = max(_MIN_SIDE, int(width * scale) // _ALIGN * _ALIGN)
    h = max(_MIN_SIDE, int(height * scale) // _ALIGN * _ALIGN)
    # Extreme aspect ratios: the 64-px floor on one side must not push the frame over budget.
    w = min(w, max(_MIN_SIDE, per_frame // h // _ALIGN * _ALIGN))
    h = min(h, max(_MIN_SIDE, per_frame // w // _ALIGN * _ALIGN))
    return w, h, turns


def _to_rgb_array(frame: Any, size: tuple[int, int, int]) -> Any:
    import numpy as np

    w, h, turns = size
    stored_w, stored_h = (h, w) if turns % 2 else (w, h)
    rgb = frame.to_ndarray(width=stored_w, height=stored_h, format="rgb24", interpolation="AREA")
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


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


def _even_floor(n: int) -> int:
    return int(n) - int(n) % 2


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f}" if pixels >= 100_000 else f"{pixels / 1e6:.2f}"


def _format_bytes(n: int) -> str:
    return f"{n / 1024**3:.3g} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
