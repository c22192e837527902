"""Moved: the tiny model generator is production code and lives in qwen3vl_webui.weights (see testing/tiny_model.py)."""
