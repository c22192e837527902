"""GPU benchmarks and checks, each run as `python -m bench.<name>`; shared helpers in bench/common.py."""
