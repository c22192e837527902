"""Starts the Qwen3-VL WebUI: `python app.py --help` lists the flags."""

from qwen3vl_webui.cli import main

if __name__ == "__main__":
    main()
