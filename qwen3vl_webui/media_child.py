"""The video decoder child: a fresh interpreter that decodes one untrusted video with PyAV under resource limits.

`media.load_video` starts it (`python -c` loading this file by path, never the package: stdlib + numpy + av only, and
qwen-vl-utils' pure rules from vision_rules.py, loaded the same way) and reads back frames.npy and result.json from its
private working folder. A crash, a hang or an allocation bomb here costs this process only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

# When a container declares no duration we must decode sequentially; this caps that work.
_BLIND_DECODE_CAP = 20_000
# Without a seek index, decoding forward beats seeking for targets closer than this.
_SEEK_GAP_S = 5.0
_DECODER_THREADS = 4
RESULT_FILE = "result.json"
FRAMES_FILE = "frames.npy"


# Qwen3-VL sees 16-px patches merged 2x2, so frame sides are multiples of 32.
ALIGN = 32
MIN_SIDE = 64
_RULES_MODULE = "_qwen3vl_vision_rules"


class _UnusableVideo(Exception):
    """Raised in the decoder child with a message fit for the user."""


def _child_main(job_json: str) -> None:
    """Entry point of the decoder process: decode, then write frames.npy and result.json."""
    job = json.loads(job_json)
    _limit_resources(job["memory_bytes"], job["total_pixels"])
    try:
        result = _decode_video(job)
    except Exception as exc:  # one plain sentence for the user; the parent logs the rest
        result = {"error": _plain_error(exc)}
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    with open(os.path.join(job["workdir"], RESULT_FILE), "w", encoding="utf-8") as f:
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

    segment = job.get("segment")  # [start s, end s): only this part is decoded (a long video, segment by segment)
    with _open(job["path"]) as container:
        stream = _video_stream(container)
        probe = _probe(container, stream)
        if job.get("probe_only") or segment:
            if not probe:
                raise _UnusableVideo("its duration is unknown, so it cannot be read in segments")
            if job.get("probe_only"):
                fps, _, duration, total = probe
                return {"metadata": {"fps": fps, "total_num_frames": total, "duration": duration}, "sample_fps": 0}
        picked = _decode_planned(container, stream, probe, job) if probe else []
    if not picked and segment:
        raise _UnusableVideo(f"it has no decodable frames between {segment[0]:g} s and {segment[1]:g} s")
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
    np.save(os.path.join(job["workdir"], FRAMES_FILE), np.stack([a for _, a in picked]))
    metadata = {
        "fps": fps,
        "total_num_frames": total,
        "frames_indices": indices,
        "duration": duration,
    }
    if segment:
        duration = max(1.0 / fps, min(duration, segment[1]) - segment[0])
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
    lo, hi = 0, total
    if job.get("segment"):
        a, b = job["segment"]
        lo = min(total - 1, max(0, int(a * fps)))
        hi = max(lo + 1, min(total, int(math.ceil(b * fps))))
    n = _frame_count(fps, hi - lo, job)
    targets = [start + i / fps for i in np.linspace(lo, hi - 1, n).round()]
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


def _frame_count(fps: float, total: int, job: dict[str, Any]) -> int:
    """Frames to sample: qwen-vl-utils' `smart_nframes`, the clip's length at the budget's rate, in pairs, within
    [FRAME_FACTOR, frame_cap] and at most the frames there are. Its default floor of 4 frames is not used: a short
    clip is not padded with repeated frames. A clip of one frame gives FRAME_FACTOR (the frame repeats)."""
    r = vision_rules()
    if total < r.FRAME_FACTOR:
        return r.FRAME_FACTOR
    wanted = {"fps": job["fps"], "min_frames": r.FRAME_FACTOR, "max_frames": job["frame_cap"]}
    return int(r.smart_nframes(wanted, total_frames=total, video_fps=fps))


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
    n = max(1, min(cap, len(kept) - len(kept) % 2))
    chosen = [kept[int(i)] for i in np.linspace(0, len(kept) - 1, n).round()]
    return chosen, (fps, first, duration, decoded)


def _frame_size(frame: Any, n: int, job: dict[str, Any]) -> tuple[int, int, int]:
    """(width, height, quarter turns) for one frame so that n frames fit in the pixel budget."""
    turns = round((frame.rotation or 0) / 90) % 4  # phone videos carry a display rotation
    width, height = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
    # A short clip's few frames could each be huge; no frame gets more pixels than an image.
    per_frame = min(job["total_pixels"] // n, job["frame_pixels"])
    scale = min(1.0, math.sqrt(per_frame / (width * height)))
    w = max(MIN_SIDE, int(width * scale) // ALIGN * ALIGN)
    h = max(MIN_SIDE, int(height * scale) // ALIGN * ALIGN)
    # Extreme aspect ratios: the 64-px floor on one side must not push the frame over budget.
    w = min(w, max(MIN_SIDE, per_frame // h // ALIGN * ALIGN))
    h = min(h, max(MIN_SIDE, per_frame // w // ALIGN * ALIGN))
    return w, h, turns


def _to_rgb_array(frame: Any, size: tuple[int, int, int]) -> Any:
    import numpy as np

    w, h, turns = size
    stored_w, stored_h = (h, w) if turns % 2 else (w, h)
    rgb = frame.to_ndarray(width=stored_w, height=stored_h, format="rgb24", interpolation="AREA")
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def vision_rules() -> Any:
    """vision_rules.rules() from the file beside this one, loaded by path (the child imports nothing of the package)."""
    module = sys.modules.get(_RULES_MODULE)
    if module is None:
        spec = importlib.util.spec_from_file_location(_RULES_MODULE, Path(__file__).with_name("vision_rules.py"))
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[_RULES_MODULE] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.rules()
