"""Pre-quantized checkpoints (compressed-tensors W4A16, AutoAWQ GEMM, FP8): detected and converted at load.

`detect` reads config.json's `quantization_config`; `load` builds the model from the config without transformers'
quantizer and converts each quantized Linear's tensors, exactly, into our own layouts: `Int4Linear` (kernels/int4.py)
for the 4-bit formats, `Fp8Linear` (kernels/fp8.py) for FP8. The tensors in the files decide which Linears are
quantized (not the configs' ignore lists): a quantized text Linear becomes ours, one elsewhere (the vision tower,
lm_head) is dequantized to 16 bits, as is every one when a 16-bit precision is asked for.

What each format stores, and how it maps onto `Int4Linear`'s `(q - zero) * scale` with `qweight` int32 `[N, K/8]`,
nibble j of word w = column 8w + j:
- compressed-tensors "pack-quantized" (llm-compressor's W4A16; compressed_tensors/compressors/pack_quantized):
  `weight_packed` int32 `[N, K/8]`, value i at bits 4i..4i+3 of its word, stored as `q + 8` (q signed, -8..7), so
  it is our layout bit for bit; `weight_scale` `[N, K/G]`; `weight_zero_point` (asymmetric only) int32
  `[ceil(N/8), K/G]`, packed the same way along N and also stored + 8 (older releases: int8 `[N, K/G]`, unpacked);
  symmetric means zero 8. `weight_shape` `[N, K]`; `weight_g_idx` only for activation ordering (refused unless in
  order).
- AutoAWQ GEMM (awq/modules/linear/gemm.py, WQLinear_GEMM.from_linear): `qweight` int32 `[K, N/8]` packed along N,
  nibble i of word c = column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; `qzeros` int32 `[K/G, N/8]` the same; `scales` fp16
  `[K/G, N]`; the weight is `(q - zero) * scale`, unsigned q and zero.
- FP8 (Qwen's -FP8 releases; transformers' integrations/finegrained_fp8.py FP8Linear): `weight` float8_e4m3fn
  `[N, K]`, `weight_scale_inv` fp32 `[ceil(N/128), ceil(K/128)]`: Fp8Linear's own layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3vl_webui import precisions
from qwen3vl_webui.weights import quantize
from qwen3vl_webui.weights.model import LoadRefused, compute_dtype

log = logging.getLogger(__name__)

SUPPORTED = (
    "compressed-tensors pack-quantized W4A16 (llm-compressor), AutoAWQ GEMM 4-bit, and FP8 with 128x128 block "
    "scales (Qwen's -FP8 releases)"
)
SIXTEEN_BIT = ("bf16", "fp16", "fp32")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ GEMM: nibble i of a word holds column AWQ_ORDER[i] of its 8
AWQ_UNDO = tuple(AWQ_ORDER.index(j) for j in range(8))  # column j of the 8 sits in nibble AWQ_UNDO[j]
MAX_GROUP = 128  # larger groups (per-channel scales) are split into groups of this size, same scales: exact


@dataclass(frozen=True)
class CheckpointFormat:
    """A pre-quantized checkpoint's format, as its config.json says."""

    method: str  # "compressed-tensors", "awq" or "fp8"
    precision: str  # its own precision (precisions.py): "int4" or "fp8"
    description: str  # for the log and the status line, e.g. "AutoAWQ GEMM (4-bit, group 128)"


# ------------------------------------------------------------------------------------------------ detect


def detect(path: str | Path) -> CheckpointFormat | None:
    """The format of the checkpoint in `path` from config.json's `quantization_config`; None when it has none.
    Raises LoadRefused (one sentence naming what is supported) for a quantization this module does not load."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    quant = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config")
    if not quant:
        return None
    method = str(quant.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(quant)
    if method == "awq":
        return _awq(quant)
    if method == "fp8":
        return _fp8(quant)
    named = repr(method) if method else "an unnamed method"
    raise LoadRefused(
        f"This checkpoint is quantized with {named}, which this app does not load; it loads {SUPPORTED}, "
        "or an unquantized checkpoint in any --precision."
    )


def _refuse(what: str) -> LoadRefused:
    return LoadRefused(f"This checkpoint is {what}; this app loads {SUPPORTED}.")


def _compressed_tensors(quant: dict[str, Any]) -> CheckpointFormat:
    groups = quant.get("config_groups") or {}
    if not groups:
        raise _refuse("compressed-tensors without config_groups")
    if quant.get("sparsity_config") or quant.get("transform_config"):
        raise _refuse("compressed-tensors with sparsity or transforms (rotations)")
    status = quant.get("quantization_status", "compressed")
    if status != "compressed":
        raise _refuse(f"compressed-tensors saved {status!r}, not compressed")
    sizes, symmetric = set(), set()
    for name, group in groups.items():
        fmt = group.get("format") or quant.get("format")
        weights = group.get("weights") or {}
        if fmt != "pack-quantized" or group.get("input_activations") or group.get("output_activations"):
            raise _refuse(f"compressed-tensors {fmt or 'of no format'} (group {name!r}), not pack-quantized W4A16")
        if weights.get("num_bits") != 4 or weights.get("type", "int") != "int" or weights.get("dynamic"):
            raise _refuse(f"compressed-tensors with {weights.get('num_bits')}-bit {weights.get('type')} weights")
        if weights.get("strategy") not in ("group", "channel"):
            raise _refuse(f"compressed-tensors with {weights.get('strategy')!r} weight scales")
        if weights.get("actorder") in ("group", "dynamic"):  # groups out of column order (weight_g_idx)
            raise _refuse("compressed-tensors with activation-ordered groups (actorder 'group')")
        sizes.add(weights.get("group_size") or "channel")
        symmetric.add(bool(weights.get("symmetric", True)))
    if quant.get("kv_cache_scheme"):
        log.info("compressed-tensors checkpoint: its kv_cache_scheme is ignored (the KV cache stays 16-bit)")
    words = ", ".join(f"group {s}" if s != "channel" else "per channel" for s in sorted(sizes, key=str))
    sym = "symmetric" if symmetric == {True} else "asymmetric" if symmetric == {False} else "mixed"
    return CheckpointFormat("compressed-tensors", "int4", f"compressed-tensors W4A16 ({words}, {sym})")


def _awq(quant: dict[str, Any]) -> CheckpointFormat:
    version = str(quant.get("version", "gemm")).lower()
    bits, group = quant.get("bits", quant.get("w_bit")), quant.get("group_size", quant.get("q_group_size"))
    if version != "gemm":
        raise _refuse(f"AutoAWQ {version!r} (only the GEMM layout loads)")
    if bits != 4 or not quant.get("zero_point", True):
        raise _refuse(f"AutoAWQ with {bits}-bit weights{'' if quant.get('zero_point', True) else ' and no zeros'}")
    groups = "per channel" if group in (None, -1) else f"group {group}"
    return CheckpointFormat("awq", "int4", f"AutoAWQ GEMM (4-bit, {groups})")


def _fp8(quant: dict[str, Any]) -> CheckpointFormat:
    block = quant.get("weight_block_size")
    fmt, scales = str(quant.get("fmt", "e4m3")).lower(), quant.get("scale_fmt", "float")
    if fmt != "e4m3" or scales != "float":
        raise _refuse(f"FP8 {fmt} with {scales} scales (e4m3 with float scales loads)")
    if block is not None and list(block) != [128, 128]:
        raise _refuse(f"FP8 with {list(block)} blocks (128x128 blocks load)")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        log.info("FP8 checkpoint: its static activation scales are ignored (activations stay 16-bit)")
    scaled = "128x128 block scales" if block else "one scale per tensor"
    return CheckpointFormat("fp8", "fp8", f"FP8 (e4m3, {scaled})")


def auto_precision(path: str | Path, device: str) -> str | None:
    """What `--precision auto` loads the checkpoint in `path` as: its own precision, or bf16 (dequantized) where the
    GPU cannot run it (FP8 below compute capability 8.9); None for an unquantized checkpoint."""
    fmt = detect(path)
    if fmt is None:
        return None
    if str(device).startswith("cuda"):
        import torch

        blocker = precisions.capability_blocker(fmt.precision, torch.cuda.get_device_capability(torch.device(device)))
        if blocker:
            log.warning("%s: %s So auto dequantizes it to bf16.", fmt.description, blocker)
            return "bf16"
    return fmt.precision


def target_precision(fmt: CheckpointFormat, precision: str) -> str:
    """The precision a `fmt` checkpoint loads in when `precision` is asked for; LoadRefused for one it cannot."""
    if precision in ("auto", fmt.precision):
        return fmt.precision
    if precision in SIXTEEN_BIT:
        return precision
    raise LoadRefused(
        f"This checkpoint is {fmt.description}: it loads as {fmt.precision} or dequantized to "
        f"{'/'.join(SIXTEEN_BIT)}, not as {precision}; for {precision}, load the unquantized model."
    )


def precision_blocker(path: str | Path, precision: str) -> str | None:
    """Why the checkpoint in `path` cannot load in `precision` (one sentence), or None (the precision switch asks this
    before it unloads anything)."""
    fmt = detect(path)
    if fmt is None or precision == "auto":
        return None
    try:
        target_precision(fmt, precision)
    except LoadRefused as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------------------------ load


def load(path: str | Path, fmt: CheckpointFormat, precision: str, device: str, attn: str = "sdpa") -> Any:
    """The model of the `fmt` checkpoint in `path`, in `precision` (its own, or 16-bit: dequantized), on `device`.

    Built from the config without transformers' quantizer, its 16-bit tensors loaded from the shards, each quantized
    text Linear converted to ours straight onto `device`, one at a time (the GPU never holds a 16-bit copy)."""
    import torch
    from torch import nn

    from qwen3vl_webui.kernels import int8

    target = target_precision(fmt, precision)
    quantize.check_device(target, device)
    keep = target == fmt.precision
    dtype = compute_dtype(target, device)
    if keep:
        log.info("Loading %s as %s (its own precision)", fmt.description, target)
    else:
        log.info("Loading %s dequantized to %s Linears (--precision %s); its own precision is %s",
                 fmt.description, target, precision, fmt.precision)  # fmt: skip
    model = _skeleton(Path(path), dtype, attn)
    names = {id(module): name for name, module in model.named_modules()}
    done: set[str] = set()  # Linears whose tensors were read here (quantized in the file)
    with _Tensors(Path(path)) as tensors, torch.no_grad():

        def convert(linear: nn.Linear) -> nn.Module:
            name = names[id(linear)]
            quantized = _quantized(tensors, fmt, name, linear, device)
            if quantized is None:
                return linear  # 16-bit in the file: loaded with the rest
            done.add(name)
            return quantized if keep else _dequantized_into(linear, quantized, dtype)

        int8.replace_text_linears(model, convert)
        for name, module in model.named_modules():  # quantized outside the text model: always dequantized
            if type(module) is nn.Linear and name not in done:
                quantized = _quantized(tensors, fmt, name, module, device)
                if quantized is not None:
                    done.add(name)
                    _dequantized_into(module, quantized, dtype)
        _load_rest(model, tensors, done)
    log.info(
        "%s: %d Linears converted (%s)", fmt.description, len(done), "kept" if keep else f"dequantized to {target}"
    )
    return model.to(device)


def _skeleton(path: Path, dtype: Any, attn: str) -> Any:
    """The model from `path`'s config, quantization_config stripped, in `dtype` on the CPU, its weights unwritten:
    `no_init_weights` skips every init, so untouched memory stays unallocated pages (the text Linears' 16-bit weights
    are replaced before anything writes them). Non-persistent buffers (rotary frequencies) are computed as usual."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def canonical_name(key: str) -> str:
    """A tensor's name in today's Qwen3-VL module tree. Checkpoints written by older transformers (AutoAWQ pinned
    those) name the text model `model.layers...` and the vision tower `visual...`: transformers 4.5x renamed them
    on load with these two rules (`_checkpoint_conversion_mapping` of the Qwen VL models)."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key.removeprefix("model.")
    return key


class _Tensors:
    """The checkpoint's tensors by (canonical) name across its safetensors shards, read on demand."""

    def __init__(self, path: Path) -> None:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            stored = {name: path / shard for name, shard in weight_map.items()}
        else:
            from safetensors import safe_open

            single = path / "model.safetensors"
            if not single.is_file():
                raise LoadRefused(f"No safetensors weights in {path} (model.safetensors or its index).")
            with safe_open(single, framework="pt") as f:
                stored = dict.fromkeys(f.keys(), single)
        self._where = {canonical_name(name): (name, shard) for name, shard in stored.items()}
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> _Tensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self._open.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        stored, shard = self._where[name]
        if shard not in self._open:
            self._open[shard] = safe_open(shard, framework="pt")
        return self._open[shard].get_tensor(stored)


def _quantized(tensors: _Tensors, fmt: CheckpointFormat, name: str, linear: Any, device: str) -> Any | None:
    """The Linear `name` as Int4Linear / Fp8Linear on `device` when the file holds it quantized, else None."""
    import torch

    from qwen3vl_webui.kernels.fp8 import Fp8Linear
    from qwen3vl_webui.kernels.int4 import Int4Linear

    def has(leaf: str) -> bool:
        return f"{name}.{leaf}" in tensors

    def get(leaf: str) -> Any:
        return tensors.get(f"{name}.{leaf}").to(device) if has(leaf) else None

    n, k = linear.out_features, linear.in_features
    if fmt.method == "awq" and has("qweight"):
        qweight, scales, zeros = _from_awq(get("qweight"), get("qzeros"), get("scales"))
    elif fmt.method == "compressed-tensors" and has("weight_packed"):
        shape = tuple(int(v) for v in tensors.get(f"{name}.weight_shape").tolist())
        if shape != (n, k):
            raise LoadRefused(f"{name}: the checkpoint's weight_shape {shape} is not the model's {(n, k)}.")
        if has("weight_g_idx"):
            _check_in_order(name, tensors.get(f"{name}.weight_g_idx"), k)
        qweight, scales, zeros = _from_compressed_tensors(
            get("weight_packed"), get("weight_scale"), get("weight_zero_point")
        )
    elif fmt.method == "fp8" and has("weight_scale_inv"):
        weight = get("weight")
        if weight.dtype != torch.float8_e4m3fn:
            raise LoadRefused(f"{name}: an FP8 checkpoint's weight stored as {weight.dtype}, not float8_e4m3fn.")
        scale_inv = _fp8_block_scales(tensors.get(f"{name}.weight_scale_inv"), n, k).to(device)
        return Fp8Linear(weight, scale_inv, get("bias"))
    else:
        return None
    if qweight.shape != (n, k // 8) or k % 8:
        raise LoadRefused(f"{name}: 4-bit weights of shape {tuple(qweight.shape)} do not fit the model's {(n, k)}.")
    scales, zeros = _regroup(scales, zeros, k)
    return Int4Linear(qweight, scales, zeros, get("bias"))


def _unpack_nibbles(words: Any) -> Any:
    """int32 `[R, W]` -> uint8 `[R, W, 8]`: nibble i of each word (bits 4i..4i+3), unsigned."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    return ((words[..., None] >> shifts) & 0xF).to(torch.uint8)


def _from_awq(qweight: Any, qzeros: Any, scales: Any) -> tuple[Any, Any, Any]:
    """AutoAWQ GEMM (`[K, N/8]` packed along N in AWQ's order; zeros the same; scales `[K/G, N]`) -> ours."""
    from qwen3vl_webui.kernels import int4

    undo = list(AWQ_UNDO)

    def columns(packed: Any) -> Any:  # [rows, N/8] -> [rows, N], columns in their natural order
        return _unpack_nibbles(packed)[..., undo].reshape(packed.shape[0], -1)

    q = columns(qweight).t().contiguous()  # [N, K]
    return int4.pack(q), scales.t().contiguous(), columns(qzeros).t().contiguous()


def _from_compressed_tensors(packed: Any, scale: Any, zero_point: Any | None) -> tuple[Any, Any, Any]:
    """compressed-tensors pack-quantized (already `[N, K/8]`, q + 8 in each nibble in column order) -> ours."""
    import torch

    n = packed.shape[0]
    if zero_point is None:  # symmetric: q - 0 = (q + 8) - 8
        zeros = torch.full(scale.shape, 8, dtype=torch.uint8, device=packed.device)
    elif zero_point.dtype == torch.int32 and zero_point.shape[0] == -(-n // 8):  # packed along N, + 8
        zeros = _unpack_nibbles(zero_point.t()).reshape(zero_point.shape[1], -1)[:, :n].t().contiguous()
    else:  # older releases: int8 [N, K/G], signed
        zeros = (zero_point.to(torch.int16) + 8).to(torch.uint8)
    if zeros.shape != scale.shape:
        raise LoadRefused(
            f"compressed-tensors zero points {tuple(zero_point.shape)} do not match {tuple(scale.shape)}."
        )
    return packed.contiguous(), scale.contiguous(), zeros


def _check_in_order(name: str, g_idx: Any, k: int) -> None:
    import torch

    group = k // int(g_idx.max().item() + 1)
    if not torch.equal(g_idx.to(torch.int64), torch.arange(k) // group):
        raise LoadRefused(f"{name}: activation-ordered groups (weight_g_idx out of order) are not supported.")


def _regroup(scales: Any, zeros: Any, k: int) -> tuple[Any, Any]:
    """Groups longer than MAX_GROUP (per-channel scales: one group of K) split into groups of the largest of
    128/64/32/16/8 dividing them, each repeating its group's scale and zero: the same weights, kernel-sized tiles."""
    group = k // scales.shape[1]
    if group <= MAX_GROUP:
        return scales, zeros
    split = next((g for g in (128, 64, 32, 16, 8) if group % g == 0), group)
    repeat = group // split
    return scales.repeat_interleave(repeat, dim=1), zeros.repeat_interleave(repeat, dim=1)


def _fp8_block_scales(scale_inv: Any, n: int, k: int) -> Any:
    """`weight_scale_inv` as Fp8Linear's `[ceil(N/128), ceil(K/128)]` fp32 grid (one per-tensor scale: repeated)."""
    import torch

    from qwen3vl_webui.kernels.fp8 import BLOCK

    grid = (-(-n // BLOCK), -(-k // BLOCK))
    scale_inv = scale_inv.to(torch.float32)
    if scale_inv.numel() == 1:
        return scale_inv.reshape(1, 1).expand(grid).contiguous()
    if tuple(scale_inv.shape) != grid:
        raise LoadRefused(f"FP8 block scales {tuple(scale_inv.shape)} do not match 128x128 blocks of {n}x{k}.")
    return scale_inv


def _dequantized_into(linear: Any, quantized: Any, dtype: Any) -> Any:
    """`linear` (the skeleton's nn.Linear) holding `quantized`'s weight, dequantized (exact in fp32, rounded once)."""
    from torch import nn

    linear.weight = nn.Parameter(quantized.dequantized(dtype), requires_grad=False)
    if quantized.bias is not None:
        linear.bias = nn.Parameter(quantized.bias.detach().to(dtype), requires_grad=False)
    return linear


def _load_rest(model: Any, tensors: Any, done: set[str]) -> None:
    """Copies every other parameter and persistent buffer from the files into the skeleton (cast to its dtype).
    A tensor missing from the files is refused, unless it is tied to one that was loaded (lm_head to embeddings)."""
    loaded: set[int] = set()
    missing: list[tuple[str, Any]] = []
    for key, value in model.state_dict(keep_vars=True).items():
        if key.rpartition(".")[0] in done:
            continue
        if key not in tensors:
            missing.append((key, value))
            continue
        stored = tensors.get(key)
        if value.is_floating_point() and (not stored.is_floating_point() or stored.element_size() < 2):
            raise LoadRefused(f"{key} is stored as {stored.dtype}, a quantization this loader does not convert.")
        if tuple(stored.shape) != tuple(value.shape):
            raise LoadRefused(
                f"{key}: the checkpoint's shape {tuple(stored.shape)} is not the model's {tuple(value.shape)}."
            )
        value.data.copy_(stored)
        loaded.add(id(value))
    for key, value in missing:
        if id(value) not in loaded:
            raise LoadRefused(f"The checkpoint has no tensor {key}.")
