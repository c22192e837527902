"""Writes a random-weight Qwen3-VL checkpoint (real architecture, tokenizer, processor, chat template)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qwen3vl_webui.weights.chat_template import QWEN3_VL_CHAT_TEMPLATE

# Qwen's special tokens in Qwen's order, so ids sit in the same relative order as the real tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

_CORPUS = """
The quick brown fox jumps over the lazy dog. A picture shows a red circle, a blue square and a
green triangle on a white background. The video shows a ball moving from left to right.
Describe the image. What is in this video? Hello, how are you today? I am a vision language model.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000. Colours: red, green, blue, yellow, black, white, orange.
Qwen3-VL answers questions about pictures and videos, counts objects and reads text in images.
"""

# Widths are multiples of 64: bitsandbytes' CPU 4-bit kernels crash on narrower linear layers.
TINY = {
    "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=32768,
                 mrope_section=[4, 2, 2]),
    "vision": dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4,
                   num_position_embeddings=256, deepstack_visual_indexes=[1, 2, 3]),
    "tie_word_embeddings": False,  # tied random embeddings make greedy output repeat the prompt forever
}  # fmt: skip

# The real Qwen3-VL-4B-Instruct architecture (its config.json): same FLOPs and bytes as the checkpoint.
QWEN3_VL_4B = {
    "text": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                 mrope_section=[24, 20, 20], rope_theta=5_000_000.0),
    "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                   num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}  # fmt: skip

PRESETS = {"tiny": TINY, "4b": QWEN3_VL_4B}
DEMO_VERSION = 1  # bump when the tiny checkpoint's contents change


def build_tokenizer(vocab_size: int = 1024) -> Any:
    """Trains a small byte-level BPE and wraps it as a Qwen2Tokenizer with Qwen's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tok.chat_template = QWEN3_VL_CHAT_TEMPLATE
    return tok


def build_processor(tokenizer: Any) -> Any:
    """The processor of Qwen3-VL-4B-Instruct (its preprocessor configs) around `tokenizer`."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image = Qwen2VLImageProcessor(
        size={"shortest_edge": 65536, "longest_edge": 16777216},
        patch_size=16, temporal_patch_size=2, merge_size=2, **norm,
    )  # fmt: skip
    video = Qwen3VLVideoProcessor(
        size={"shortest_edge": 4096, "longest_edge": 25165824},
        patch_size=16, temporal_patch_size=2, merge_size=2, fps=2, min_frames=4, max_frames=768, **norm,
    )  # fmt: skip
    return Qwen3VLProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=QWEN3_VL_CHAT_TEMPLATE
    )


def build_config(preset: str, tokenizer: Any) -> Any:
    """A Qwen3VLConfig of `preset` whose special-token ids match `tokenizer`."""
    from transformers import Qwen3VLConfig

    spec = PRESETS[preset]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(spec["text"])
    rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta", 5_000_000.0),
            "mrope_section": text.pop("mrope_section"), "mrope_interleaved": True}  # fmt: skip
    vocab = spec.get("vocab_size", len(tokenizer))
    text_config = dict(text, vocab_size=vocab, rope_parameters=rope, hidden_act="silu", rms_norm_eps=1e-6,
                       pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=spec["tie_word_embeddings"])  # fmt: skip
    vision_config = dict(spec["vision"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                         in_channels=3, hidden_act="gelu_pytorch_tanh", out_hidden_size=text["hidden_size"])  # fmt: skip
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["tie_word_embeddings"],
    )


def build_model(config: Any, seed: int = 0, dtype: Any = None, device: str = "cpu") -> Any:
    """Random weights of the real Qwen3-VL class; cheap because `_from_config` skips nothing but I/O."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype or torch.float32)
    if dtype is None or dtype == torch.float32:
        # Default init (std 0.02) gives near-uniform logits; a wider spread makes greedy output vary.
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
    model.generation_config.eos_token_id = config.text_config.pad_token_id
    return model.eval()


def write_checkpoint(
    path: str | Path, preset: str = "tiny", seed: int = 0, dtype: str | None = None, device: str = "cpu"
) -> Path:
    """Writes a loadable checkpoint directory (config, safetensors, tokenizer, processor)."""
    import torch

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(preset, tokenizer)
    model = build_model(config, seed=seed, dtype=getattr(torch, dtype) if dtype else None, device=device)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos[1]
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "DEMO_MODEL").write_text(f"random weights, preset {preset}, seed {seed}\n")
    return out


class UnsafeCheckpointDir(PermissionError):
    """A demo checkpoint folder that another user could have written: its files would be loaded as ours."""


def default_demo_dir() -> Path:
    """The private per-user folder for the demo checkpoint when no --cache-dir is given."""
    return Path.home() / ".cache" / "qwen3vl-webui" / "demo"


def ensure_demo_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The tiny demo checkpoint under `cache_dir` (default: `default_demo_dir()`, mode 0700), written once, atomically.

    Raises UnsafeCheckpointDir when the folder, or the checkpoint in it, is not ours alone: in a shared folder
    such as /tmp another user could plant a "demo checkpoint" (tokenizer, template, weights) before we write ours.
    """
    import os
    import tempfile

    if cache_dir:
        root = Path(cache_dir)
    else:
        root = default_demo_dir()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if root.stat().st_uid == os.geteuid():
            root.chmod(0o700)  # ours: keep it private even if an older version made it 0755
    target = root / f"demo-tiny-v{DEMO_VERSION}"
    if not is_demo_checkpoint(target):
        root.mkdir(parents=True, exist_ok=True)
        check_private(root)  # before writing: a folder others can write is refused outright
        staging = Path(tempfile.mkdtemp(prefix="demo-", dir=root))
        write_checkpoint(staging)
        try:
            os.replace(staging, target)  # concurrent writers: one rename wins, the others find it done
        except OSError:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    check_private(root)
    check_private(target, recursive=True)
    return target


def check_private(path: Path, recursive: bool = False) -> None:
    """Raises UnsafeCheckpointDir unless `path` (and with `recursive`, all below it) is ours and not group/other
    writable. Links are judged as links (lstat): one inside a folder only we can write was made by us."""
    import os
    import stat

    uid = os.geteuid()
    paths = [path, *(sorted(path.rglob("*")) if recursive else [])]
    for item in paths:
        st = item.lstat()
        if st.st_uid != uid:
            problem = f"it belongs to another user (uid {st.st_uid})"
        elif not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
            problem = f"other users can write to it (mode {stat.S_IMODE(st.st_mode):04o})"
        else:
            continue
        raise UnsafeCheckpointDir(
            f"refusing to load the demo checkpoint from {path}: {item} is not private ({problem}); "
            "give --cache-dir a folder only you can write, or leave it out to use "
            f"{default_demo_dir()}"
        )


def is_demo_checkpoint(path: str | Path) -> bool:
    """True for a directory written by `write_checkpoint` (the UI shows a random-weights banner)."""
    return (Path(path) / "DEMO_MODEL").is_file()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 for the 4b preset (default float32)")
    parser.add_argument("--device", default="cpu", help="where the random weights are made (cuda is faster)")
    args = parser.parse_args(argv)
    print(write_checkpoint(args.path, args.preset, args.seed, args.dtype, args.device))


if __name__ == "__main__":
    main()
