"""The wheels a device call carries (.whl/): what the lent H200's Python lacks for the suite, fetched and checked here.

    python -m bench.wheels download          # pip download the exact set below into .whl/ (cp312, manylinux x86_64)
    python -m bench.wheels check             # every Requires-Dist covered, one version each, tags, total size

The device image (Python 3.12, torch 2.11, transformers 5.17) has no gradio and none of its server stack, and its
transformers breaks image prompts: the set below adds gradio 6.31 with what it needs, transformers 5.23 and py-spy
(a program: `pip install --target DIR` puts it in DIR/bin, where bench.load_test looks). `check`
walks the carried wheels' requirements (Python 3.12 on Linux, no extras): each must be met by a carried wheel (its
version inside the specifier) or by a package the image holds (DEVICE, from the image's package list; versions
checked where one was recorded).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from bench.common import ROOT

FOLDER = ROOT / ".whl"
LIMIT_MIB = 64  # what one device call carries, the working tree included
CARRY = (
    "gradio==6.31.0", "gradio_client==2.7.2", "hf-gradio==0.4.1", "fastapi==0.165.0", "starlette==1.10.0",
    "uvicorn==0.55.0", "pydantic==2.13.4", "pydantic_core==2.46.4", "annotated-types==0.7.0",
    "typing-inspection==0.4.2", "typing_extensions==4.16.0", "opentelemetry-api==1.45.2", "orjson==3.13.0",
    "brotli==1.2.1", "groovy==0.1.2", "pydub==0.25.1", "python-multipart==0.0.34", "pytz==2026.6",
    "safehttpx==0.1.7", "semantic-version==2.10.0", "tomlkit==0.14.0", "transformers==5.23.0",
    "regex==2026.11.19",  # transformers checks regex>=2025.10.22 at import; the image's version is not recorded
    "qwen-vl-utils==0.0.14",  # vision_rules.py compiles its budget rules from its source file
    "py-spy==0.4.3",  # bench.suite plan b profiles both processes (a Rust binary: py3-none-manylinux x86_64)
    "prometheus-client==0.26.0",  # GET /metrics (bench.metrics_scrape reads it under load)
    "httptools==0.9.0",  # uvicorn's HTTP parser, as requirements.txt pins it (uvloop: the image has one)
)  # fmt: skip
# Carried for their files only, never imported (vision_rules.py reads qwen_vl_utils' source): their requirements
# (av, requests) need not be met.
SOURCE_ONLY = {"qwen-vl-utils"}
# The device image's packages (KINDS.md's list for nvidia-h200, 2026-11-17) with the versions recorded there or in
# FACTS.md; None: present, version not recorded.
DEVICE: dict[str, str | None] = {
    "accelerate": "1.15.0", "aiofiles": None, "annotated-doc": None, "anyio": None, "certifi": None, "click": None,
    "filelock": None, "fsspec": None, "h11": None, "hf-xet": None, "httpcore": None, "httpx": None,
    "huggingface-hub": "1.33.0", "idna": None, "jinja2": None, "markdown-it-py": None, "markupsafe": None,
    "mdurl": None, "numpy": "2.5.2", "packaging": None, "pandas": "3.0", "pillow": None, "psutil": None,
    "pygments": None, "python-dateutil": None, "pyyaml": None, "regex": None, "requests": None, "rich": None,
    "safetensors": "0.8.0", "shellingham": None, "six": None, "tokenizers": "0.23.2", "torch": "2.11.0",
    "torchvision": "0.26.0", "tqdm": None, "transformers": "5.17.0", "typer": None, "typing-extensions": None,
    "urllib3": None, "uvloop": None, "zipp": None, "nvidia-ml-py": None, "triton": "3.6.0",
}  # fmt: skip
ENVIRONMENT = {
    "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
    "os_name": "posix", "platform_machine": "x86_64", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "extra": "",
}  # fmt: skip


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) of a wheel."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    fields = [line.split(": ", 1) for line in text.split("\n\n", 1)[0].splitlines() if ": " in line]
    name = next(v for k, v in fields if k == "Name")
    version = next(v for k, v in fields if k == "Version")
    return name, version, [v for k, v in fields if k == "Requires-Dist"]


def check(folder: Path = FOLDER) -> list[str]:
    """Problems with the carried set (empty: complete)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    wheels = sorted(folder.glob("*.whl"))
    problems: list[str] = []
    carried: dict[str, str] = {}
    for wheel in wheels:
        name, version, _ = metadata(wheel)
        if canonical(name) in carried:
            problems.append(f"two versions of {name}: {carried[canonical(name)]} and {version}")
        carried[canonical(name)] = version
        tags = wheel.name.removesuffix(".whl").split("-")[-3:]
        pure = tags[1] == "none" and tags[2] == "any"
        linux = "x86_64" in tags[2] and "manylinux" in tags[2]
        binary = tags[1] == "none" and "py3" in tags[0].split(".")  # a program, no Python ABI (py-spy)
        if not pure and not (linux and (tags[0] == "cp312" or binary)):
            problems.append(f"{wheel.name}: not a cp312 (or py3-none) manylinux x86_64 wheel")
    wanted = {canonical(spec.split("==")[0]) for spec in CARRY}
    problems += [f"missing from {folder}: {name}" for name in sorted(wanted - set(carried))]
    for wheel in wheels:
        name, _version, requires = metadata(wheel)
        if canonical(name) in SOURCE_ONLY:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(ENVIRONMENT):
                continue
            key = canonical(req.name)
            have = carried.get(key) or DEVICE.get(key)
            if key not in carried and key not in DEVICE:
                problems.append(f"{name} needs {req}: neither carried nor on the device")
            elif have is not None and not req.specifier.contains(Version(have), prereleases=True):
                where = "carried" if key in carried else "on the device"
                problems.append(f"{name} needs {req}, but {have} is {where}")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    if size > LIMIT_MIB - 8:  # the working tree travels too (a few MiB)
        problems.append(f"{size:.1f} MiB of wheels: too close to the {LIMIT_MIB} MiB a call carries")
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {folder}")
    return problems


def download(folder: Path = FOLDER) -> int:
    """Fetches exactly CARRY into `folder` (binary wheels for the device's Python 3.12 on x86-64 Linux)."""
    folder.mkdir(exist_ok=True)
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux_2_5_x86_64", "manylinux1_x86_64"]  # fmt: skip
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[f"--platform={p}" for p in platforms], "-d", str(folder), *CARRY]  # fmt: skip
    return subprocess.run(command).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("download", "check"))
    ap.add_argument("--folder", default=str(FOLDER))
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    if args.action == "download" and download(folder) != 0:
        return 1
    problems = check(folder)
    for problem in problems:
        print("problem:", problem)
    print("complete" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
