"""Tests for qwen3vl_webui.telemetry on a CPU-only machine (GPU branches checked if one exists)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from qwen3vl_webui.telemetry import (
    GenerationStats,
    GpuProbe,
    GpuSnapshot,
    RequestStats,
    _visible_device,
    format_bytes,
    read_system,
    torch_memory,
)


def _stats(new_tokens: int, decode_s: float, ttft_s: float = 0.5) -> RequestStats:
    return RequestStats(
        prompt_text_tokens=10,
        prompt_image_tokens=880,
        prompt_video_tokens=0,
        new_tokens=new_tokens,
        ttft_s=ttft_s,
        decode_s=decode_s,
    )


def _has_nvml_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def test_gpu_probe_degrades_without_gpu() -> None:
    if _has_nvml_gpu():
        pytest.skip("this machine has an NVML GPU")
    probe = GpuProbe()
    for _ in range(2):  # the second read takes the already-initialised path
        assert probe.read() is None
        assert probe.reason is not None and probe.reason.startswith("no GPU")
        assert "\n" not in probe.reason
    probe.close()
    assert probe.read() is None
    assert probe.reason == "probe closed"


def test_gpu_probe_reads_real_gpu() -> None:
    if not _has_nvml_gpu():
        pytest.skip("no NVML GPU here")
    probe = GpuProbe()
    snap = probe.read()
    assert isinstance(snap, GpuSnapshot), probe.reason
    assert 0 < snap.memory_used <= snap.memory_total
    assert probe.reason is None
    probe.close()


def test_visible_device_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _visible_device(1) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert _visible_device(0) == 3
    assert _visible_device(1) == 1
    assert _visible_device(2) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _visible_device(0) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-abc")
    assert _visible_device(0) == "MIG-abc"


def test_gpu_probe_hidden_device_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    probe = GpuProbe()
    assert probe.read() is None
    assert probe.reason  # NVML missing, or the device hidden: either way one line
    assert "\n" not in probe.reason


def test_read_system_is_sane() -> None:
    snap = read_system()
    assert snap.ram_total > snap.ram_used > 0
    assert snap.process_rss > 0
    assert 0.0 <= snap.cpu_pct <= 100.0 * 1024


def test_torch_memory_zero_without_cuda() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert torch_memory() == (0, 0, 0)
    assert torch_memory(5) == (0, 0, 0)


def test_import_does_not_pull_torch() -> None:
    code = (
        "import sys\n"
        "from qwen3vl_webui import telemetry\n"
        "telemetry.GpuProbe().read(); telemetry.torch_memory(); telemetry.read_system()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert telemetry.torch_memory() == (0, 0, 0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_request_stats_rates() -> None:
    s = _stats(new_tokens=101, decode_s=4.0)
    assert s.tokens_per_s == pytest.approx(25.0)
    assert s.prompt_tokens == 890
    assert _stats(new_tokens=1, decode_s=0.0).tokens_per_s == 0.0
    assert _stats(new_tokens=5, decode_s=0.0).tokens_per_s == 0.0


def test_generation_stats_rolling() -> None:
    stats = GenerationStats(window=3)
    assert stats.last is None
    assert stats.rolling_tokens_per_s is None
    assert stats.rolling_ttft_s is None
    assert stats.count == 0
    stats.record(_stats(new_tokens=1000, decode_s=1.0, ttft_s=9.0))  # falls out of the window
    stats.record(_stats(new_tokens=11, decode_s=1.0, ttft_s=0.2))  # 10 steps
    stats.record(_stats(new_tokens=31, decode_s=2.0, ttft_s=0.4))  # 30 steps
    last = _stats(new_tokens=1, decode_s=0.0, ttft_s=0.6)  # no decode steps: not in the rate
    stats.record(last)
    assert stats.count == 4
    assert stats.last == last
    assert stats.rolling_tokens_per_s == pytest.approx(40 / 3.0)
    assert stats.rolling_ttft_s == pytest.approx(0.4)


def test_generation_stats_thread_safety() -> None:
    stats = GenerationStats(window=20)
    threads_n, per_thread = 8, 500
    start = threading.Barrier(threads_n)

    def worker() -> None:
        start.wait()
        for _ in range(per_thread):
            stats.record(_stats(new_tokens=21, decode_s=1.0))
            stats.rolling_tokens_per_s  # noqa: B018 - readers race the writers

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.count == threads_n * per_thread
    assert stats.rolling_tokens_per_s == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (512 * 1024**2, "512 MiB"),
        (int(45.5 * 1024**2), "45.5 MiB"),
        (int(8.32 * 1024**3), "8.32 GiB"),
        (1024**3 - 1, "1.00 GiB"),  # no "1024 MiB"
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text
