"""Moved to qwen3vl_webui.weights.tiny_model. This alias stays only until bench/ imports the new path; delete then."""

from qwen3vl_webui.weights.tiny_model import *  # noqa: F403
