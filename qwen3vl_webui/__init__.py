"""Qwen3-VL WebUI: Qwen3-VL-4B-Instruct in the browser, served in-process (docs/architecture.md has the module map)."""
