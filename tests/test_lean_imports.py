"""weights/lean.py: transformers told that scipy (and, in the engine process, torchvision) are not there, so that a
start does not import them; the tokenizer the engine process loads instead of the processor is the processor's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qwen3vl_webui.weights.loading import load_model

ROOT = Path(__file__).resolve().parents[1]

FRONT = """
import json, sys
from qwen3vl_webui.weights.loading import load_front
from qwen3vl_webui.weights import lean
loaded = load_front(sys.argv[1], "fp32", "cpu")
batch = loaded.processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[__import__("PIL.Image").Image.new("RGB", (64, 48))])
print(json.dumps({"scipy": "scipy" in sys.modules, "torchvision": "torchvision" in sys.modules,
                  "hidden": lean.hidden("scipy"), "pixels": list(batch["pixel_values"].shape)}))
"""


def _front(checkpoint: Path, lean: str) -> dict:
    env = {**os.environ, "QWEN3VL_LEAN_IMPORTS": lean, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", FRONT, str(checkpoint)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_front_end_loads_the_processor_without_scipy_and_images_still_preprocess(tiny_checkpoint) -> None:
    lean, full = _front(tiny_checkpoint, "1"), _front(tiny_checkpoint, "0")
    assert lean["hidden"] and not lean["scipy"], lean
    assert lean["torchvision"], lean  # the processor's own: kept
    assert not full["hidden"] and full["scipy"], full  # as before: the check can fail
    assert lean["pixels"] == full["pixels"] and lean["pixels"][0] > 0


def test_the_engine_process_tokenizer_is_the_processor_tokenizer(tiny_checkpoint, tiny_loaded) -> None:
    engine_side = load_model(str(tiny_checkpoint), "fp32", "cpu", tokenizer_only=True)
    ours, theirs = engine_side.processor.tokenizer, tiny_loaded.processor.tokenizer
    assert not hasattr(engine_side.processor, "image_processor")
    assert type(ours) is type(theirs) and len(ours) == len(theirs)
    text = "Hello <|im_start|>user\nwhat is in <|vision_start|><|image_pad|><|vision_end|>? 猫 é<|im_end|>"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    ids = theirs(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.all_special_ids == theirs.all_special_ids and ours.eos_token_id == theirs.eos_token_id
