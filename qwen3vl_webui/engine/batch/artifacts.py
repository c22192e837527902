"""Portable compile artifacts: what inductor made for the decode step, saved to one file a user can keep and carry.

`torch.compiler.save_cache_artifacts()` serialises every cache entry the compile produced or hit (inductor's FX graphs
with their Triton kernels, AOTAutograd's entries, autotuning results, dynamo's dynamic-shape profile);
`load_cache_artifacts()` writes them into this machine's on-disk caches, so the next compile of the same step finds
every entry there and compiles nothing (dynamo still traces the Python, seconds, not minutes).

One file per setup, named after a hash of its key: GPU, torch, triton and transformers versions, precision, the
model's config and the engine options that shape the compiled step. A file that is not ours, damaged, made for
another setup or refused by torch is ignored with one log line: the engine then compiles as if it were not there.

Beside it, one file per GPU and torch/triton versions holds the JIT builds of our own Triton kernels (split-KV
attention, the GEMVs, W4A16, FP8: `kernels/*_triton.py`), which no torch cache covers and which the engine's
first-serving path builds before its first answer (5.4 s of its 9.5 s on an H200, bench/RESULTS.md, session 16):
`load_kernels` unpacks them into Triton's cache before the engine starts, `save_kernels` packs them after a compile.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"QWEN3VL-COMPILE-ARTIFACTS\n"
FORMAT = 1
PREFIX = "decode-"
KERNELS_PREFIX = "kernels-"
SUFFIX = ".artifacts"
_HEADER_MAX = 64 * 1024
KERNELS_MAX_BYTES = 256 * 1024 * 1024  # a Triton cache past this is not ours alone: not packed
_KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
# A Triton cache entry: <hash>/<file>, one level, plain names (what Triton writes; anything else is refused).
_ENTRY = re.compile(r"^[A-Za-z0-9_=-]{8,128}/[A-Za-z0-9_=-][A-Za-z0-9_.=-]{0,199}$")  # no dot files (our temps)


def machine_key(device: str) -> dict[str, str]:
    """The GPU (or CPU) and the torch and Triton versions that compiled code and our kernels' builds depend on."""
    import platform

    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    device = str(device)
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        gpu = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor}, CUDA {torch.version.cuda})"
    else:
        gpu = f"cpu ({platform.machine()})"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version}


def setup_key(loaded: Any, engine: dict[str, Any]) -> dict[str, str]:
    """What the compiled code depends on, as strings: the machine and library versions, the model, the engine."""
    import transformers

    return {
        **machine_key(loaded.device),
        "transformers": transformers.__version__,
        "precision": str(loaded.precision),
        "model": config_digest(loaded.model.config),
        "engine": json.dumps(engine, sort_keys=True, default=str),
    }


def config_digest(config: Any) -> str:
    """A hash of the model's architecture (its config without paths and version stamps)."""
    data = config.to_dict()
    for name in ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path"):
        data.pop(name, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def path_for(folder: str | os.PathLike[str], key: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"{PREFIX}{digest}{SUFFIX}"


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The file's header and the offset of its payload; ValueError if it is not an artifact file of ours."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + _HEADER_MAX)
    if not head.startswith(MAGIC):
        raise ValueError("not a compile-artifact file")
    end = head.find(b"\n", len(MAGIC))
    if end < 0:
        raise ValueError("its header is cut short")
    try:
        header = json.loads(head[len(MAGIC) : end])
    except ValueError:
        raise ValueError("its header is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("key"), dict):
        raise ValueError(f"format {header.get('format') if isinstance(header, dict) else '?'} is not {FORMAT}")
    return header, end + 1


def load(folder: str | os.PathLike[str], key: dict[str, str]) -> str:
    """Loads this setup's artifacts into torch's caches. Returns "loaded", "absent" or "ignored"; never raises.

    Logs one line either way.
    """
    path = path_for(folder, key)
    if not path.exists():
        others = _differences(Path(folder), key)
        if others:
            log.info("compile artifacts: none for this setup in %s (%s); compiling", folder, others)
        else:
            log.info("compile artifacts: none in %s yet; compiling (saved there afterwards)", folder)
        return "absent"
    try:
        _check_owner(path)
        info = _populate(_read_verified(path, key))
    except Exception as exc:  # whatever is wrong with the file, the engine compiles as if it were not there
        log.warning("compile artifacts: ignoring %s: %s; compiling instead", path, _one_line(exc))
        return "ignored"
    log.info("compile artifacts: loaded %s (%s): compiling from them", path, info)
    return "loaded"


def _check_owner(path: Path) -> None:
    """The payload is pickled (as is inductor's own cache): refuse a file another user could have written."""
    import stat

    for item in (path, path.parent):
        info = item.stat()
        if info.st_mode & stat.S_IWOTH and not (item.is_dir() and info.st_mode & stat.S_ISVTX):
            raise ValueError(f"{item} is writable by every user (its artifacts could run their code)")
        if hasattr(os, "getuid") and info.st_uid not in (os.getuid(), 0):
            raise ValueError(f"{item} belongs to another user (its artifacts could run their code)")


def _populate(payload: bytes) -> str:
    import torch

    with _quiet("torch.compiler._cache"):  # torch logs a traceback for a payload it cannot read; we log one line
        info = torch.compiler.load_cache_artifacts(payload)
    if info is None:
        raise ValueError("torch could not read them")
    counts = {kind: len(keys) for kind, keys in getattr(info, "artifacts", {}).items() if keys}
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "no entries"


def save(folder: str | os.PathLike[str], key: dict[str, str]) -> Path | None:
    """Writes what this process compiled (and every cache entry it hit) for this setup; None if nothing to save.

    Atomic (a temporary file renamed into place); a failure is one log line, never an exception.
    """
    import torch

    path = path_for(folder, key)
    try:
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            log.info("compile artifacts: nothing to save (the compile left no cache entries)")
            return None
        payload, info = result
        _write(path, key, payload, {kind: len(keys) for kind, keys in getattr(info, "artifacts", {}).items()})
    except Exception as exc:
        log.warning("compile artifacts: could not save to %s: %s", path, _one_line(exc))
        return None
    log.info("compile artifacts: saved %s (%.1f MB)", path, len(payload) / 1e6)
    return path


# ------------------------------------------------------------------ our own Triton kernels' builds


def kernel_names() -> set[str]:
    """The names of our @triton.jit functions (read from kernels/*.py, no import): a Triton cache entry is ours
    when it has a `__grp__<name>.json` for one of them."""
    names: set[str] = set()
    for path in sorted(_KERNELS_DIR.glob("*.py")):
        jit = False
        for line in path.read_text().splitlines():
            if line.startswith("@triton.jit"):
                jit = True
            elif jit and line.startswith("def "):
                names.add(line[4:].split("(", 1)[0].strip())
                jit = False
    return names


def kernels_key(device: str) -> dict[str, str]:
    """What our kernels' builds on `device` depend on: the GPU, torch and Triton, and our kernels' source (an edited
    kernel is a new file, saved after the next compile; the old one is no longer read). No model: the engine process
    unpacks them before its weights load (engine.prepare_kernels)."""
    source = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_KERNELS_DIR.glob("*.py")))).hexdigest()[:16]
    return {"kind": "triton kernels", **machine_key(device), "source": source}


def kernels_path_for(folder: str | os.PathLike[str], key: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"{KERNELS_PREFIX}{digest}{SUFFIX}"


def triton_cache_dir() -> Path:
    """The Triton JIT cache in effect: $TRITON_CACHE_DIR (the engine sets it, compiled.use_kernel_cache_dir), else
    Triton's default."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    return Path.home() / ".triton" / "cache"


def save_kernels(folder: str | os.PathLike[str], key: dict[str, str], cache: Path | None = None) -> Path | None:
    """Packs the entries of Triton's cache that hold our kernels into one file; None if there are none (or on a
    failure, logged in one line)."""
    cache = triton_cache_dir() if cache is None else cache
    path = kernels_path_for(folder, key)
    try:
        names = kernel_names()
        entries = sorted(d for d in cache.iterdir() if d.is_dir() and _ours(d, names)) if cache.is_dir() else []
        if not entries:
            log.info("kernel builds: none of ours in %s to save", cache)
            return None
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for entry in entries:
                for file in sorted(entry.iterdir()):
                    name = f"{entry.name}/{file.name}"
                    if file.is_file() and not file.is_symlink() and _ENTRY.match(name):
                        tar.add(file, arcname=name, recursive=False)
        payload = buffer.getvalue()
        if len(payload) > KERNELS_MAX_BYTES:
            log.info("kernel builds: %.0f MB in %s, over the %d MB cap; not saved", len(payload) / 1e6, cache,
                     KERNELS_MAX_BYTES // 2**20)  # fmt: skip
            return None
        _write(path, key, payload, {"triton entries": len(entries)})
    except Exception as exc:
        log.warning("kernel builds: could not save to %s: %s", path, _one_line(exc))
        return None
    log.info("kernel builds: saved %d Triton cache entries to %s (%.1f MB)", len(entries), path, len(payload) / 1e6)
    return path


def _ours(entry: Path, names: set[str]) -> bool:
    """A build of one of our kernels, or Triton's CUDA helper module (`cuda_utils`, a C extension it compiles with
    the host's C compiler on its first kernel launch in a fresh cache: seconds, on the same path)."""
    return any((entry / f"__grp__{name}.json").is_file() for name in names) or any(entry.glob("cuda_utils*.so"))


def load_kernels(folder: str | os.PathLike[str], key: dict[str, str], cache: Path | None = None) -> str:
    """Unpacks this GPU's kernel builds into Triton's cache (never over a file already there). Returns "loaded",
    "absent" or "ignored"; never raises. A damaged or foreign file, or one naming a path outside an entry, is
    ignored with one log line: the kernels are then built as if it were not there."""
    cache = triton_cache_dir() if cache is None else cache
    path = kernels_path_for(folder, key)
    if not path.exists():
        return "absent"
    try:
        _check_owner(path)
        payload = _read_verified(path, key)
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tar:
            members = tar.getmembers()
            names = {m.name for m in members}
            files: dict[str, bytes] = {}
            for member in members:  # every member checked (and its group rehomed) before any is written
                source = tar.extractfile(member) if member.isfile() and _ENTRY.match(member.name) else None
                if source is None:
                    raise ValueError(f"it holds {member.name!r}, not a Triton cache file")
                data = source.read()
                if Path(member.name).name.startswith("__grp__"):
                    data = _rehome_group(data, member.name, names, cache)
                files[member.name] = data
        written = 0
        for name, data in files.items():
            target = cache / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                try:
                    tmp.write_bytes(data)
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
                written += 1
    except Exception as exc:
        log.warning("kernel builds: ignoring %s: %s; building them instead", path, _one_line(exc))
        return "ignored"
    entries = len({name.split("/", 1)[0] for name in files})
    log.info("kernel builds: %d Triton cache entries from %s into %s (%d files new)", entries, path, cache, written)
    return "loaded"


def _rehome_group(data: bytes, name: str, names: set[str], cache: Path) -> bytes:
    """A `__grp__` file lists its entry's files by absolute path (Triton's FileCacheManager.put_group), and Triton
    rebuilds the kernel when one is missing: point them into this cache. Each must be a file of the same entry."""
    entry = name.split("/", 1)[0]
    group = json.loads(data)
    children = group.get("child_paths") if isinstance(group, dict) else None
    if not isinstance(children, dict):
        raise ValueError(f"{name!r} is not a Triton group file")
    rehomed = {}
    for child, old in children.items():
        own = f"{entry}/{Path(str(old)).name}"
        if not isinstance(child, str) or own not in names:
            raise ValueError(f"{name!r} names a file outside its entry")
        rehomed[child] = str(cache / own)
    return json.dumps({**group, "child_paths": rehomed}).encode()


def _write(path: Path, key: dict[str, str], payload: bytes, entries: dict[str, int]) -> None:
    header = {
        "format": FORMAT, "key": key, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "entries": entries,
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_verified(path: Path, key: dict[str, str]) -> bytes:
    header, offset = read_header(path)
    if header["key"] != key:
        raise ValueError(f"made for another setup (it differs in {', '.join(_differing(header['key'], key))})")
    payload = path.read_bytes()[offset:]
    if len(payload) != header.get("bytes") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise ValueError("damaged (its checksum does not match)")
    return payload


def _differences(folder: Path, key: dict[str, str]) -> str:
    """For the log: how the artifact files of other setups in `folder` differ from this one."""
    fields: set[str] = set()
    count = 0
    for other in sorted(folder.glob(f"{PREFIX}*{SUFFIX}"))[:32]:
        try:
            header, _ = read_header(other)
        except (OSError, ValueError):
            continue
        count += 1
        fields.update(_differing(header["key"], key))
    if not count:
        return ""
    return f"{count} file(s) for other setups, differing in {', '.join(sorted(fields)) or 'nothing known'}"


def _differing(theirs: dict[str, Any], ours: dict[str, str]) -> list[str]:
    return sorted(name for name in set(theirs) | set(ours) if theirs.get(name) != ours.get(name))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
