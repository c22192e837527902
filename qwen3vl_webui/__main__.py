"""`python -m qwen3vl_webui` does the same as `python app.py`."""

from qwen3vl_webui.cli import main

main()
