"""VRAM planner: what a precision x context x concurrency needs on a GPU, and the most that fits.

    python -m qwen3vl_webui.plan --gpu L4 --precision int4 --max-context 32768 --max-concurrency 8

It follows the batch engine's layout (engine/batch/options.py, kv.py): every slot holds `max_context` tokens of KV,
a quarter as many retained-prefix entries (at least one) may each hold as much, one prompt's KV is staged while it
prefills, then activations (a prefill chunk through the text model, the largest image through the vision tower, the
sampler's logits), CUDA graph pools, the prefill graphs' static buffers and the allocator's split segments, the CUDA
context and what else torch does not count, and room for one more prefill transient (figures measured on an H200).
Weights come from planner.weight_bytes, precisions from precisions.TABLE. bench/plan_check.py measures these on a
GPU (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from qwen3vl_webui import planner, precisions, ranges

GIB = 1024**3
MIB = 1024**2
LEN_ALIGN = 64  # KV rows per slot are a multiple of this (engine/batch/options.py)
PREFILL_CHUNK = 2048  # prompt tokens one prefill forward takes (BatchOptions.prefill_chunk)
IDLE_PREFILL_FACTOR = 4  # short prompts batch up to this many chunks, padded (BatchOptions.idle_prefill_factor)
PREFIX_SHARE = 0.25  # retained-prefix entries per slot (BatchOptions.prefix_share)
# Measured by bench/plan_check.py on one H200 (random 4B weights; the device image's torch 2.11 + cu130): the twelve
# cases run without the cap (bench/results/h200/plan_check_uncapped.json; under the cap, plan_check.json, every case
# had dropped its retained prefixes, so its `needed` lacked them). Figures in GiB.
# Not counted by torch's allocator: the CUDA context, cuBLAS handles and workspaces, kernels' code, the CUDA graphs'
# own memory: 0.95-0.98 at the end of every uncapped case, 1.01-1.04 in the capped runs (whose cap set-up adds
# cuBLAS's fp32 handle), 0.67 once the weights are loaded (it grows while serving: graphs captured, Triton kernels
# loaded). The H100 estimate of ~0.5 GiB left half of it out.
CUDA_CONTEXT = 1088 * MIB
# Free bytes inside partly used segments, which the caching allocator cannot give back to the driver (a segment
# returns only whole): 0.77-0.78 in bf16, 0.75-0.88 in int4, 0.86-0.99 in int8wo (1.01 in one capped int8wo run),
# whatever the context and concurrency (the old planner's 4% of everything over-planned the large cases and
# under-planned the small ones).
ALLOCATOR_SPLIT = 1024 * MIB
# The CUDA graphs' private pools, whole (the live blocks of the captured graphs' outputs and the free rest): 0.46-0.48
# in bf16; a weight-only precision's first-chunk prefill graphs also hold their dequantized weights (_dequantized).
GRAPH_POOLS = 512 * MIB
DEEPSTACK_LAYERS = 3  # text layers that add the vision tower's deepstack features (3 in every Qwen3-VL size)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes the driver reports (NVML's total)
    capability: tuple[int, int]


# NVML's totals for each card (MiB), and the compute capability fp8 needs to know.
GPUS: tuple[Gpu, ...] = (
    Gpu("T4", 15360 * MIB, (7, 5)),
    Gpu("L4", 23034 * MIB, (8, 9)),
    Gpu("A10G", 23028 * MIB, (8, 6)),
    Gpu("RTX 4090", 24564 * MIB, (8, 9)),
    Gpu("A100 40GB", 40960 * MIB, (8, 0)),
    Gpu("A100 80GB", 81920 * MIB, (8, 0)),
    Gpu("H100", 81559 * MIB, (9, 0)),
    Gpu("H200", 143771 * MIB, (9, 0)),
)


def find_gpu(name: str) -> Gpu:
    """A GPU by a loose name: "L4", "a100-40", "A100 80GB", "4090", "rtx4090", "h200"."""

    def key(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum()).removeprefix("nvidia").removesuffix("gb")

    wanted = key(name)
    for gpu in GPUS:
        k = key(gpu.name)
        if wanted in (k, k.removeprefix("rtx")):
            return gpu
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in GPUS)} (or give --gpu-memory GiB)")


@dataclass(frozen=True)
class MemoryPlan:
    precision: str
    max_context: int  # tokens a slot holds (aligned as the engine aligns it)
    max_concurrency: int
    weights: int
    kv: int  # the slots' KV cache, allocated at start
    retained_kv: int  # retained-prefix entries at their largest (allocated as they are kept)
    staging_kv: int  # one prompt's (or a burst's) KV while it prefills, before it is copied into its slot
    activations: int  # one prefill forward's transient: the last chunk's attention or MLP, or the vision tower
    overhead: int  # prefill graphs' static buffers, graph pools, the allocator's split segments
    cuda_context: int  # what torch does not count (CUDA context, handles, kernels' code)
    headroom: int = 0  # one more prefill transient: a fresh segment while free bytes sit in cached ones

    @property
    def torch_bytes(self) -> int:
        """What torch's allocator cannot do without at the peak (bench/plan_check.py compares this)."""
        return self.weights + self.kv + self.retained_kv + self.staging_kv + self.activations + self.overhead

    @property
    def total(self) -> int:
        return self.torch_bytes + self.cuda_context + self.headroom


def aligned_context(max_context: int) -> int:
    return max(LEN_ALIGN, max_context // LEN_ALIGN * LEN_ALIGN)


def retained_slots(max_concurrency: int) -> int:
    return max(1, math.ceil(max_concurrency * PREFIX_SHARE))


def plan_memory(
    shape: planner.ModelShape, precision: str, max_context: int, max_concurrency: int,
    image_pixels: int | None = None, burst: int | None = None,
) -> MemoryPlan:  # fmt: skip
    """Peak GPU memory of the batch engine serving `max_concurrency` chats of `max_context` tokens.

    The peak (engine/batch/): the slots' KV (allocated at start), the retained entries (each a finished prompt's
    whole KV, kept while later prompts run: at concurrency 1 too), and the KV of the prompt being prefilled, one
    allocation of its whole length written chunk by chunk (runner.py `prompt_kv`) - at any concurrency only one
    prompt prefills at a time, or one burst of short prompts batched (`burst_tokens`: more than a short context's
    whole prompt; `burst` gives a run's own, for bench/plan_check.py's rejudging) - plus that prefill's transient.
    Measured peaks held exactly these (H200, see the constants): the peak allocated less weights, slots, retained and
    staged KV was 0.49-0.52 GiB of engine buffers and a transient of 0.23-0.30 GiB at 4,096 tokens and 0.57 at
    16,384, at either concurrency.
    """
    context = aligned_context(max_context)
    per_token = planner.kv_bytes_per_token(shape)
    weights = planner.weight_bytes(shape, precision)
    kv = per_token * context * max_concurrency
    retained = per_token * context * retained_slots(max_concurrency)
    burst = burst_tokens(context, max_concurrency) if burst is None else burst
    staging = per_token * max(context, burst)
    activations = _activations(shape, precision, context, max_concurrency, image_pixels, burst)
    graphs = GRAPH_POOLS + _dequantized(shape, precision) + _prefill_graph_buffers(shape, precision)
    overhead = graphs + ALLOCATOR_SPLIT
    return MemoryPlan(precision, context, max_concurrency, weights, kv, retained, staging, activations, overhead,
                      CUDA_CONTEXT, activations)  # fmt: skip


def burst_tokens(context: int, concurrency: int) -> int:
    """The most padded tokens one batched forward of short prompts holds (engine/batch/scheduler.py next_prefill):
    rows x the widest within the idle budget, each row one slot's prompt of at most a chunk. Its KV lives until the
    rows are copied into their slots, so at a short context a burst stages more KV than one whole-context prompt."""
    return min(IDLE_PREFILL_FACTOR * PREFILL_CHUNK, concurrency * min(context, PREFILL_CHUNK))


def _prefill_graph_buffers(shape: planner.ModelShape, precision: str) -> int:
    """The first-chunk prefill graphs' static buffers (engine/batch/prefill.py ChunkGraphs), allocated at start for
    the longest chunk whatever the context, outside the graphs' pool: every layer's keys/values of the chunk, and its
    input embeddings, deepstack features and output hidden states."""
    width = 4 if precision == "fp32" else 2
    per_token = planner.kv_bytes_per_token(shape) + (2 + DEEPSTACK_LAYERS) * shape.hidden_size * width
    return PREFILL_CHUNK * per_token


def _dequantized(shape: planner.ModelShape, precision: str) -> int:
    """A weight-only precision's prefill matmul: the fused gate/up weight dequantized to 16 bits before cuBLAS (int4,
    fp8: one Triton kernel; int8wo: a cast to 16 bits, then the product in fp32 before its scale: counted as a second
    copy, which covers a 2,048-token chunk's fp32 product). The prefill graphs' pool keeps it as well: its pools
    measured 0.49-0.51 GiB in int8wo against 0.28-0.30 in bf16."""
    copies = {"int8wo": 2, "int4": 1, "fp8": 1}.get(precision, 0)
    return copies * 2 * _intermediate(shape) * shape.hidden_size * 2


def _intermediate(shape: planner.ModelShape) -> int:
    return shape.hidden_size * 38 // 10  # 9728 / 2560 in Qwen3-VL-4B


def _activations(
    shape: planner.ModelShape, precision: str, context: int, batch: int, image_pixels: int | None, burst: int
) -> int:
    """The largest transient of one prefill forward (engine/batch/runner.py, prefill.py), the larger of:

    - the last chunk's attention: a chunk after a past attends through transformers' SDPA with a mask, which repeats
      K and V to every query head over the whole prompt (`repeat_kv`: no GQA in SDPA with a mask), beside the
      past-and-chunk K/V that ChunkKV concatenates, the boolean mask and its additive bias, q and the output;
    - the chunk's MLP: the fused gate/up product, the activation and the product (4 x intermediate per token), or a
      weight-only precision's dequantized weights beside the gate/up product;
    - the vision tower on the largest image that fits the context (per block: qkv, its fp32 rotary copies, the MLP);
    plus what a chunk holds throughout (embeddings, deepstack features, hidden states and residual), the media
    features kept while the prompt prefills, and the sampler's logits. H200: 0.23 GiB (bf16), 0.30 (int8wo), 0.24
    (int4) of transient at 4,096 tokens (text, the MLP's), 0.57 at 16,384 (the attention over 16,368 tokens).
    """
    width = 4 if precision == "fp32" else 2
    hidden, kv_heads, head_dim = shape.hidden_size, shape.num_kv_heads, shape.head_dim
    heads = kv_heads * 4  # 4B and the tiny model have 4 query heads per KV head
    chunk = min(context, PREFILL_CHUNK)
    # A batched forward of short prompts holds up to this many padded tokens: its MLP and held activations, not its
    # attention (no past). The first term is what the measured checks held (bench/RESULTS.md), the second a burst.
    batched = max(min(context, IDLE_PREFILL_FACTOR * PREFILL_CHUNK), burst)
    held = batched * (4 + DEEPSTACK_LAYERS) * hidden * width  # embeddings, deepstack, hidden, residual, normed
    attention = (
        context * 2 * (heads + kv_heads) * head_dim * width  # K/V repeated to every head + the concatenated past
        + chunk * context * (1 + width)  # the boolean mask and its additive bias
        + 2 * chunk * heads * head_dim * width  # q and the attention's output
    )
    mlp = max(batched * 4 * _intermediate(shape) * width,
              batched * 2 * _intermediate(shape) * width + _dequantized(shape, precision))  # fmt: skip
    pixels = ranges.largest_image_pixels() if image_pixels is None else image_pixels
    patches = pixels // (shape.patch_size * shape.patch_size)
    merge = shape.spatial_merge * shape.spatial_merge
    patches = min(patches, context * merge)  # an image larger than the context never reaches the tower
    media = patches // merge * (1 + DEEPSTACK_LAYERS) * hidden * width  # its features, kept through the prefill
    vision_hidden, vision_mlp = 1024, 4096  # Qwen3-VL's vision tower (the same in every size)
    vision = patches * (6 * vision_hidden + 2 * vision_mlp) * width
    logits = batch * shape.vocab_size * 4 * 2  # fp32 logits and the sampler's probabilities
    return max(held + max(attention, mlp) + media, vision) + logits


def fits(plan: MemoryPlan, gpu_memory: int) -> bool:
    return plan.total <= gpu_memory


def largest_concurrency(shape: planner.ModelShape, precision: str, max_context: int, gpu_memory: int) -> int:
    """The most chats of `max_context` tokens that fit (0: not even one)."""
    best = 0
    for n in range(1, 65):  # --max-concurrency's range
        if not fits(plan_memory(shape, precision, max_context, n), gpu_memory):
            break
        best = n
    return best


def largest_context(shape: planner.ModelShape, precision: str, max_concurrency: int, gpu_memory: int) -> int:
    """The longest context (a multiple of 256, the slider's step) that fits `max_concurrency` chats (0: none)."""
    r = ranges.REQUEST["max_context"]
    lo, hi = 0, int(r.hi) // 256
    while lo < hi:  # the largest k with k * 256 fitting
        mid = (lo + hi + 1) // 2
        if mid * 256 >= r.lo and fits(plan_memory(shape, precision, mid * 256, max_concurrency), gpu_memory):
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def runs_on(precision: str, capability: tuple[int, int] | None) -> bool:
    need = precisions.BY_NAME[precision].min_capability if precision in precisions.BY_NAME else None
    return need is None or capability is None or capability >= need


def gpu_precisions() -> list[str]:
    """What a GPU can load: every precision of the table but the CPU's fp32."""
    return [p.name for p in precisions.TABLE if p.flag]


def summary(shape: planner.ModelShape, precision: str, max_context: int, max_concurrency: int, gpu_name: str,
            gpu_memory: int) -> str:  # fmt: skip
    """One line for beside the sliders: what these caps need on this GPU and the most that fits."""
    p = plan_memory(shape, precision, max_context, max_concurrency)
    chats = largest_concurrency(shape, precision, max_context, gpu_memory)
    context = largest_context(shape, precision, max_concurrency, gpu_memory)
    verdict = "fits" if fits(p, gpu_memory) else "does NOT fit"
    return (
        f"VRAM plan on {gpu_name}: {p.total / GIB:.1f} of {gpu_memory / GIB:.1f} GiB ({verdict}: weights "
        f"{p.weights / GIB:.1f}, KV {(p.kv + p.retained_kv + p.staging_kv) / GIB:.1f}, activations and overhead "
        f"{(p.activations + p.overhead + p.cuda_context + p.headroom) / GIB:.1f}) · at most {chats} chat{'s' if chats != 1 else ''} "
        f"of {p.max_context:,} tokens, or {context:,} tokens for {max_concurrency} "
        f"(python -m qwen3vl_webui.plan for every precision)"
    )


# ------------------------------------------------------------------------------- the command line


def _gib(n: int) -> str:
    return f"{n / GIB:6.2f} GiB"


def report(
    shape: planner.ModelShape, gpu_name: str, gpu_memory: int, capability: tuple[int, int] | None, precision: str,
    max_context: int, max_concurrency: int,
) -> tuple[str, bool]:  # fmt: skip
    """The planner's text for one case and every precision; (text, whether the case fits)."""
    plan = plan_memory(shape, precision, max_context, max_concurrency)
    ok = fits(plan, gpu_memory) and runs_on(precision, capability)
    kept = retained_slots(max_concurrency)
    lines = [
        f"Qwen3-VL-4B on {gpu_name} ({gpu_memory / GIB:.1f} GiB) · {precision} · max context {plan.max_context:,} · "
        f"max concurrency {max_concurrency}",
        f"  weights                                   {_gib(plan.weights)}",
        f"  KV cache ({max_concurrency} slots x {plan.max_context:,} tokens)".ljust(44) + _gib(plan.kv),
        f"  kept for follow-up turns (up to {kept})".ljust(44) + _gib(plan.retained_kv),
        "  a prompt's (or a burst's) KV as it prefills".ljust(44) + _gib(plan.staging_kv),
        "  activations (prefill chunk, vision tower)".ljust(44) + _gib(plan.activations),
        "  CUDA graphs + allocator's split segments".ljust(44) + _gib(plan.overhead),
        "  CUDA context, handles, kernels (not torch)".ljust(44) + _gib(plan.cuda_context),
        "  room for one more prefill transient".ljust(44) + _gib(plan.headroom),
        "  total".ljust(44)
        + _gib(plan.total)
        + f"  of {gpu_memory / GIB:.1f} GiB: "
        + ("fits" if ok else ("does NOT fit" if runs_on(precision, capability) else "needs a newer GPU")),
        "",
        f"The most that fits on {gpu_name}:",
        f"  {'precision':<10} {'weights':>10}  {f'chats at {plan.max_context:,} tokens':>24}  "
        f"{f'context at {max_concurrency} chats':>22}",
    ]
    for name in gpu_precisions():
        if not runs_on(name, capability):
            need = precisions.BY_NAME[name].min_capability
            lines.append(f"  {name:<10} {'':>10}  needs compute capability {need[0]}.{need[1]} (this GPU: "
                         f"{capability[0]}.{capability[1]})")  # fmt: skip
            continue
        chats = largest_concurrency(shape, name, max_context, gpu_memory)
        context = largest_context(shape, name, max_concurrency, gpu_memory)
        lines.append(f"  {name:<10} {planner.weight_bytes(shape, name) / GIB:>6.2f} GiB  {chats:>24}  "
                     f"{(f'{context:,} tokens' if context else 'none'):>22}")  # fmt: skip
    return "\n".join(lines), ok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qwen3vl_webui.plan",
        description="What Qwen3-VL-4B needs on a GPU (weights, KV cache, activations) and the most that fits. "
        "Exit code 0 when the case fits, 1 when not, 2 for a bad argument.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpu", help=f"one of {', '.join(g.name for g in GPUS)}")
    where.add_argument("--gpu-memory", type=float, metavar="GiB", help="the card's memory in GiB instead")
    p.add_argument("--precision", default="bf16", choices=gpu_precisions())
    r = ranges.REQUEST["max_context"]
    p.add_argument("--max-context", type=int, default=int(r.default), metavar="TOKENS",
                   help=f"tokens per chat ({int(r.lo)}..{int(r.hi)})")  # fmt: skip
    p.add_argument("--max-concurrency", type=int, default=1, metavar="N", help="chats at once (1..64)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    r = ranges.REQUEST["max_context"]
    if not r.lo <= args.max_context <= r.hi:
        parser.error(f"--max-context must be from {int(r.lo)} to {int(r.hi)}, got {args.max_context}")
    if not 1 <= args.max_concurrency <= 64:
        parser.error(f"--max-concurrency must be from 1 to 64, got {args.max_concurrency}")
    if args.gpu is not None:
        try:
            gpu = find_gpu(args.gpu)
        except ValueError as exc:
            parser.error(str(exc))
        name, memory, capability = gpu.name, gpu.memory, gpu.capability
    else:
        if not 1 <= args.gpu_memory <= 4096:
            parser.error(f"--gpu-memory must be from 1 to 4096 GiB, got {args.gpu_memory:g}")
        name, memory, capability = f"a {args.gpu_memory:g} GiB GPU", int(args.gpu_memory * GIB), None
    text, ok = report(planner.ModelShape.qwen3vl_4b(), name, memory, capability, args.precision, args.max_context,
                      args.max_concurrency)  # fmt: skip
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
