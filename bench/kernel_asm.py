"""The decode kernels compiled for a GPU that is not here: Triton lowers them to PTX and ptxas (bundled with Triton)
assembles them for the target, with no GPU and no driver. What a config's code does per thread shows before any
device time is spent on it: its global loads by width (`ld.global.b16` is one 2-byte value, `cp.async ... 16` a
pipelined 16-byte copy), its shared-memory traffic and size, its tensor-core instructions.

    python -m bench.kernel_asm                               # the int4 swap kernels (tiles 2-4, 6, 8) at 16 and 32 rows
    python -m bench.kernel_asm --tiles 3,6 --rows 32 --n 19456 --k 2560 --ptx /tmp/ptx   # and write each PTX file

Launch arguments are specialized as Triton's launcher does on a GPU: pointers and integers divisible by 16 get that
divisibility, integers equal to 1 become constants. tests/test_kernel_asm.py compiles every kernel variant the sweep
can pick this way, so a variant that Triton cannot build fails on CPU, not during a device call.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path
from typing import Any

SM90 = 90  # H100, H200: the device's GPUs
INSTRUCTIONS = {  # what the counts are keyed by: a PTX pattern per name
    "ld.global": r"\bld\.global(?:\.\w+)*",
    "cp.async": r"\bcp\.async\.\w+\.shared\.global \[[^\]]*\], \[[^\]]*\], (?:0x)?\w+",
    "st.shared": r"\bst\.shared(?:::cta)?(?:\.\w+)*",
    "ld.shared": r"\bld\.shared(?:::cta)?(?:\.\w+)*",
    "stmatrix": r"\bstmatrix\b",
    "ldmatrix": r"\bldmatrix\b",
    "wgmma": r"\bwgmma\.mma_async\b",
    "mma": r"\bmma\.sync\b",
    "atom": r"\b(?:atom|red)\.global(?:\.\w+)*",
}


def compile_offline(fn: Any, args: dict[str, Any], constexprs: dict[str, Any], warps: int, stages: int,
                    capability: int = SM90) -> Any:  # fmt: skip
    """`fn` (a @triton.jit kernel) compiled for CUDA `capability`. `args`: each runtime argument's value, a pointer as
    its Triton type ("*bf16"); specialized as the launcher does (divisible by 16 / equal to 1)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    # constexprs not given take their defaults (e.g. PDL 0: launched without programmatic dependent launch)
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
    constants = dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constants, attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps, "num_stages": stages}
    )


def ptx_counts(ptx: str) -> dict[str, int]:
    """Instructions in the PTX by kind and width (the static count: a loop's body once)."""
    counts: Counter[str] = Counter()
    for kind, pattern in INSTRUCTIONS.items():
        for match in re.finditer(pattern, ptx):
            text = match.group(0)
            if kind == "cp.async":  # keyed by the bytes each copy moves
                text = f"cp.async {int(text.rsplit(',', 1)[1].strip(), 0)} B"
            counts[text] += 1
    return dict(sorted(counts.items()))


def sass_code(cubin: bytes) -> list[tuple[int, str]]:
    """A cubin's SASS (cuobjdump, bundled with Triton) as (address, instruction) in order."""
    import os
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        Path(path).write_bytes(cubin)
        sass = subprocess.run([str(tool), "-sass", path], capture_output=True, text=True, check=True).stdout
    return [(int(at, 16), text) for at, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def sass_loop(cubin: bytes) -> dict[str, int]:
    """The kernel's longest loop in SASS (the machine code ptxas made: cuobjdump, bundled with Triton), instructions
    by opcode: what one trip of the K loop issues per thread, where PTX shows what ptxas was asked for (session 27:
    tile 6's `and` and `or` of each nibble pair stayed two LOP3s, a LOP3 taking one immediate). {} if not found."""
    code = sass_code(cubin)
    loops = [(int(m.group(1), 16), at) for at, text in code
             if (m := re.search(r"\bBRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?(0x[0-9a-f]+)", text))
             and int(m.group(1), 16) < at]  # fmt: skip
    if not loops:
        return {}
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    ops = Counter(
        re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for at, text in code if start <= at <= end
    )
    return dict(ops.most_common())


def w4_args(rows: int, n: int, k: int, group: int = 128, split: int = 1) -> dict[str, Any]:
    """`w4a16_triton._swap_kernel`'s runtime arguments for an `[rows, k] x [n, k]ᵀ` product."""
    return dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*u8", y_ptr="*bf16" if split == 1 else "*fp32", M=rows,
                N=n, K=k, stride_xm=k, stride_wn=k // 8, stride_sn=k // group, stride_ys=rows * n, stride_ym=n,
                groups_per_split=-(-k // group // split))  # fmt: skip


def compile_w4(cfg: Any, rows: int, n: int, k: int, group: int = 128, capability: int = SM90) -> Any:
    """One int4 launch config (`w4a16_triton.W4Config`) compiled as `w4_matmul` would launch it for these shapes with K
    whole (one split: a bf16 output; a split launch differs only in its fp32 output and K range arguments)."""
    from qwen3vl_webui.kernels import w4a16_triton as wk

    if cfg.tile < 2:
        raise ValueError("tiles 0 and 1 are not compiled here (the sweep no longer picks them)")
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, G=group, **wk.swap_constexprs(cfg))
    return compile_offline(wk._swap_kernel, w4_args(rows, n, k, group), constexprs, cfg.warps, cfg.stages, capability)


def compile_fp8(cfg: Any, rows: int, n: int, k: int, block: int = 128, capability: int = SM90) -> Any:
    """One fp8 launch config (`fp8_triton.Fp8Config`) compiled as `fp8_matmul` would launch it (GEMV, atomic GEMV,
    swap; not the skinny tile), K whole for the swap kernel and `split_k` blocks per atomic program as asked."""
    from qwen3vl_webui.kernels import fp8_triton as fk

    common = dict(x_ptr="*bf16", w_ptr="*fp8e4nv", s_ptr="*fp32", N=n, K=k, stride_xm=k, stride_wn=k,
                  stride_sn=-(-k // block))  # fmt: skip
    if cfg.swap == fk.ATOMIC:
        args = dict(common, y_ptr="*fp32", stride_ym=n)
        constexprs = dict(BLOCK_N=cfg.block_n, B=block, BLOCKS=max(1, cfg.split_k))
        return compile_offline(fk._atomic_gemv_kernel, args, constexprs, cfg.warps, cfg.stages, capability)
    if cfg.swap:
        args = dict(common, y_ptr="*bf16", M=rows, stride_ys=rows * n, stride_ym=n, blocks_per_split=-(-k // block))
        constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, B=block)
        return compile_offline(fk._swap_kernel, args, constexprs, cfg.warps, cfg.stages, capability)
    args = dict(common, y_ptr="*bf16", stride_ym=n)
    return compile_offline(fk._gemv_kernel, args, dict(BLOCK_N=cfg.block_n, B=block), cfg.warps, cfg.stages, capability)


def main(argv: list[str] | None = None) -> None:
    from qwen3vl_webui.kernels import w4a16_triton as wk

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", default="2,3,4,6,8", help="int4 W4Config.tile values (2-4, 6 and 8: the swap kernel)")
    ap.add_argument("--rows", default="16,32", help="row counts (block_m 16 up to 16 rows, else 32)")
    ap.add_argument("--n", type=int, default=19456, help="output features (default: the fused gate/up)")
    ap.add_argument("--k", type=int, default=2560, help="input features")
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--capability", type=int, default=SM90, help="CUDA compute capability x10 (90: sm_90)")
    ap.add_argument("--ptx", type=Path, help="a folder to write each config's PTX into")
    ap.add_argument("--mma", action="store_true", help="kernels/w4_mma.py's and fp8_mma.py's CUDA kernels instead (NVRTC), every variant")
    args = ap.parse_args(argv)
    if args.mma:
        print_mma(args.capability)
        return
    for rows in (int(r) for r in args.rows.split(",")):
        for tile in (int(t) for t in args.tiles.split(",")):
            cfg = wk.W4Config(16 if rows <= 16 else 32, args.block_n, 1, 4, args.stages, tile)
            kernel = compile_w4(cfg, rows, args.n, args.k, capability=args.capability)
            ptx = kernel.asm["ptx"]
            lines = sum(1 for line in ptx.splitlines() if line.rstrip().endswith(";"))
            print(f"rows {rows} tile {tile} {tuple(cfg)}: shared {kernel.metadata.shared} B, {lines} PTX instructions,",
                  ", ".join(f"{name} x{count}" for name, count in ptx_counts(ptx).items()))  # fmt: skip
            loop = sass_loop(kernel.asm["cubin"])
            print(f"  its K loop in SASS: {sum(loop.values())} instructions a trip,",
                  ", ".join(f"{name} x{count}" for name, count in list(loop.items())[:10]))  # fmt: skip
            if args.ptx:
                args.ptx.mkdir(parents=True, exist_ok=True)
                (args.ptx / f"w4_tile{tile}_rows{rows}.ptx").write_text(ptx)


def print_mma(capability: int = SM90) -> None:
    """kernels/w4_mma.py's and kernels/fp8_mma.py's variants (bf16, groups of 128) compiled by NVRTC: spills, and the
    K loop's instructions a weight (a trip is two steps of `unroll` groups; 16 x 128 weights a group, over 32 lanes)."""
    import torch

    from qwen3vl_webui.kernels import cuda, fp8_mma, w4_mma

    for module in (w4_mma, fp8_mma):
        name = module.__name__.rsplit(".", 1)[1]
        for tiles in (1, 2, 4):
            for warps in (4, 8):
                for unroll in (1, 2) if tiles < 4 else (1,):
                    code_c = module.source(torch.bfloat16, warps, unroll, 1, 128, tiles)
                    cubin = cuda.compile_cubin(code_c, f"sm_{capability}", name)
                    code = [text for _, text in sass_code(cubin)]
                    spills = sum(1 for text in code if "STL" in text or "LDL" in text)
                    loop = sass_loop(cubin)
                    weights = 2 * unroll * 128 * 16 // 32
                    print(f"{name} n-tiles {tiles} warps {warps} unroll {unroll}: {spills} spill instructions, K loop "
                          f"{sum(loop.values())} instructions a trip = {sum(loop.values()) / weights:.2f} a weight "
                          f"({tiles * 8} rows): " + ", ".join(f"{op} x{count}" for op, count in list(loop.items())[:8]))  # fmt: skip

if __name__ == "__main__":
    main()
