"""The CUDA C decode kernels' plumbing (kernels/w4_mma.py, kernels/fp8_mma.py): NVRTC compiles CUDA C to a cubin
at first use (torch's CUDA wheels ship libnvrtc), the driver API loads it into torch's context and launches it with
`cuLaunchKernelEx` on torch's current stream (so CUDA graphs capture it), programmatic dependent launch (PDL) as a
launch attribute. ctypes only: no build step, no compiler at install time.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

# The decode kernels' shared device code (kernels/w4_mma.py, kernels/fp8_mma.py). Each variant defines before it: KIND
# ("bf16" or "f16", the mma's), WARPS (a program's), UNROLL (groups a warp loads ahead), NT (n-tiles of 8 batch rows)
# and CPG (64-k chunks a group). A lane (g, q) reads, of each 64-k chunk, the 16 activations 16q..16q+15 of its batch
# row (two 16-byte loads), so its fragments' k order is the kernels' own (their repacks follow it).
DECODE_HELPERS = r"""
#define GSIZE (64 * CPG)

// Weights are streamed once, so not kept in L1 (the activations are).
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// The activations, written by the kernel before: a coherent load in `asm volatile`, so that neither the compiler nor
// ptxas moves it above the PDL wait (a `__ldg`, read-only in the compiler's eyes, was hoisted above it).
__device__ __forceinline__ uint4 load_x(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." KIND "." KIND ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The same groups' activations: the lane's 16 values of each 64-k chunk (values 16q..16q+15) for each n-tile's row
// (8 nt + g of the batch: xg[nt] points at it).
__device__ __forceinline__ void load_group_x(uint4 (&x)[UNROLL][NT][2 * CPG], const uint4* const (&xg)[NT], int gg,
                                             int end) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (gg + u * WARPS < end) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < CPG; ++c) {  // a chunk is 64 values: 8 loads of 16 bytes
                    x[u][nt][2 * c] = load_x(xg[nt] + u * WARPS * GSIZE / 8 + 8 * c);
                    x[u][nt][2 * c + 1] = load_x(xg[nt] + u * WARPS * GSIZE / 8 + 8 * c + 1);
                }
        }
    }
}

// After the wait for the kernel before (PDL): mode 1 ("early") lets the next kernel launch at once.
#if PDL
#define PDL_WAIT()                                                                                                    \
    do {                                                                                                              \
        asm volatile("griddepcontrol.wait;" ::: "memory");                                                            \
        if (PDL == 1) asm volatile("griddepcontrol.launch_dependents;" :::);                                          \
    } while (0)
#else
#define PDL_WAIT() do {} while (0)
#endif

// Lane (g, q)'s activation pointers, one an n-tile (batch row 8 nt + g; rows past M read row M - 1, never stored),
// at the program's first group; and its sums, zeroed.
__device__ __forceinline__ void start_rows(const uint4* (&xg)[NT], float (&acc)[NT][4], const unsigned short* X, int M,
                                           int sx, int first) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        xg[nt] = reinterpret_cast<const uint4*>(X + (size_t)min(8 * nt + g, M - 1) * sx + q * 16) + first * GSIZE / 8;
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[nt][c] = 0.f;
    }
}

// The program's warps add their sums in shared memory and warp 0 writes the tile's 16 outputs of each batch row as
// fp32 partial sums `[split, M, N]` (ys: a part's stride, its rows x N); in PDL mode 2 ("late") the next kernel may
// launch once the sums are in shared memory.
__device__ __forceinline__ void store_parts(float (&acc)[NT][4], float* __restrict__ Y, int M, int N, int tile,
                                            int split, long long ys) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    __shared__ float red[WARPS][NT * 4][32];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) red[warp][4 * nt + c][lane] = acc[nt][c];
    __syncthreads();
#if PDL == 2
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
    if (warp == 0) {
        float* yp = Y + (size_t)split * ys + (size_t)tile * 16 + g;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
#pragma unroll
                for (int w = 1; w < WARPS; ++w) acc[nt][c] += red[w][4 * nt + c][lane];
                const int row = 8 * nt + 2 * q + (c & 1);  // the batch's row: the mma's column in n-tile nt
                if (row < M) yp[(size_t)row * N + 8 * (c >> 1)] = acc[nt][c];
            }
    }
}
"""


def _find_nvrtc() -> str:
    """libnvrtc from torch's CUDA wheels (nvidia/cu13/lib, nvidia/cuda_nvrtc/lib), else the loader's search
    (LD_LIBRARY_PATH, a CUDA toolkit's)."""
    import site

    roots = [*site.getsitepackages(), site.getusersitepackages(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)))  # torch's own site-packages
    for root in filter(None, roots):
        for pattern in ("nvidia/cu1*/lib/libnvrtc.so.*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"):
            found = sorted(p for p in glob.glob(os.path.join(root, pattern)) if "builtins" not in p and "alt" not in p)
            if found:
                return found[-1]
    return "libnvrtc.so.13" if str(torch.version.cuda or "").startswith("13") else "libnvrtc.so.12"


@functools.cache
def _nvrtc() -> Any:
    return ctypes.CDLL(_find_nvrtc())


def compile_cubin(code: str, arch: str, name: str = "kernel") -> bytes:
    """NVRTC: CUDA C -> a cubin for `arch` (e.g. "sm_90"). Needs no GPU (the tests compile for sm_90 on a CPU)."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()

    def check(result: int, what: str) -> None:
        if result != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(result).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), f"{name}.cu".encode(), 0, None, None), "create")
    try:
        options = [f"--gpu-architecture={arch}".encode(), b"-default-device", b"--std=c++17", b"-lineinfo"]
        array = (ctypes.c_char_p * len(options))(*options)
        if lib.nvrtcCompileProgram(prog, len(options), array) != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile {name} for {arch}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class _Attr(ctypes.Structure):
    # c_ubyte, not c_char: ctypes hands a c_char array field out as a bytes copy (a write to it changes nothing)
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_ubyte * 4), ("value", ctypes.c_ubyte * 64)]


class _Config(ctypes.Structure):
    _fields_ = [
        ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)),
        ("numAttrs", ctypes.c_uint),
    ]  # fmt: skip


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


def pdl_attribute() -> _Attr:
    """The launch attribute that lets the kernel start before the one before it ends (its programs wait at
    `griddepcontrol.wait`): CUDA's `programmaticStreamSerializationAllowed = 1`, the value union's first int."""
    attr = _Attr()
    attr.id = PROGRAMMATIC_STREAM_SERIALIZATION
    ctypes.c_int.from_buffer(attr, _Attr.value.offset).value = 1
    return attr


_PDL = pdl_attribute()


@functools.cache
def _driver() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"CUDA driver {what}: {result} {name.value.decode() if name.value else ''}")


_lock = threading.Lock()


@functools.cache
def function(device_index: int, code: str, name: str) -> ctypes.c_void_p:
    """Kernel `name` of CUDA C `code` compiled for the device and loaded into its primary context (torch's), once a
    process. Not inside a CUDA graph capture: a step of each batch size runs before its capture (so every variant a
    step uses is built then)."""
    with torch.cuda.device(device_index):  # the device's primary context current on this thread (not another GPU's)
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{name}: a kernel variant was first needed inside a CUDA graph capture; run a step first")
    major, minor = torch.cuda.get_device_capability(device_index)
    cubin = compile_cubin(code, f"sm_{major}{minor}", name)  # NVRTC: no lock, no CUDA call
    with _lock, torch.cuda.device(device_index):
        _primary_context(device_index)
        module, func = ctypes.c_void_p(), ctypes.c_void_p()
        _check(_driver().cuModuleLoadData(ctypes.byref(module), cubin), "module load")
        _check(_driver().cuModuleGetFunction(ctypes.byref(func), module, name.encode()), "function")
        return func


def _primary_context(device_index: int) -> None:
    """Makes the device's primary context (the one torch's runtime uses) current on this thread if none is."""
    lib = _driver()
    current = ctypes.c_void_p()
    _check(lib.cuCtxGetCurrent(ctypes.byref(current)), "current context")
    if current.value:
        return
    device, context = ctypes.c_int(), ctypes.c_void_p()
    _check(lib.cuDeviceGet(ctypes.byref(device), device_index), "device")
    _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "primary context")
    _check(lib.cuCtxSetCurrent(context), "set context")


@functools.cache
def available(device_index: int) -> bool:
    """Compute capability 8.0+ (mma.sync with bf16) and NVRTC and the driver found."""
    try:
        if torch.cuda.get_device_capability(device_index) < (8, 0):
            return False
        _nvrtc()
        _driver()
        return True
    except Exception:
        return False


def builds(device_index: int, build: Any, name: str) -> bool:
    """Whether a kernel serves on this GPU: `available`, and `build()` (compiling and loading one variant) succeeds.
    An NVRTC older than the GPU's architecture refuses it: the weights then keep their own layout and kernels
    instead of failing at the first product. A failure is logged."""
    if not available(device_index):
        return False
    try:
        build()
        return True
    except Exception as exc:  # noqa: BLE001 - any failure to build means: not this kernel
        import logging

        logging.getLogger(name).warning("%s does not build on this GPU (%s): the Triton kernels serve", name, exc)
        return False


def kernel_rows(x: torch.Tensor) -> torch.Tensor:
    """`x [..., K]` as the `[rows, K]` the decode kernels read: rows contiguous and 16-byte aligned (a view where it
    already is, else a copy)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    if x2.stride(-1) != 1 or (rows > 1 and x2.stride(0) != k) or x2.data_ptr() % 16:
        x2 = torch.empty((rows, k), dtype=x.dtype, device=x.device).copy_(x2)
    return x2


def summed(parts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A decode kernel's `[split, ..., N]` fp32 partial sums for `x [..., K]` as the product in x's dtype (one
    split: a cast; more: the split-K reduction kernel)."""
    if parts.shape[0] == 1:
        return parts[0].to(x.dtype)
    from qwen3vl_webui.kernels import splitk

    n = parts.shape[-1]
    return splitk.reduce_partials(parts.reshape(parts.shape[0], -1, n), x.dtype).reshape(*x.shape[:-1], n)


def launch(
    func: ctypes.c_void_p, grid: tuple[int, int], threads: int, values: Sequence[Any], device_index: int,
    pdl_mode: int,
) -> None:  # fmt: skip
    """One launch of `func` on the device's current stream: `values` its arguments as ctypes scalars, in order; with
    the PDL attribute where `pdl_mode` is not 0 (the kernel then waits at `griddepcontrol.wait`)."""
    stream = torch.cuda.current_stream(device_index).cuda_stream
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    conf = _Config(grid[0], grid[1], 1, threads, 1, 1, 0, stream)
    if pdl_mode:
        conf.attrs, conf.numAttrs = ctypes.pointer(_PDL), 1
    _check(_driver().cuLaunchKernelEx(ctypes.byref(conf), func, params, None), "launch")


def pdl_mode_for(x: torch.Tensor, kernel: str, pdl_mode: int | None) -> int:
    """The PDL mode a launch on `x`'s device takes (kernels/pdl.py's for `kernel` where none is given): 0 before
    Hopper (no `griddepcontrol`)."""
    from qwen3vl_webui.kernels import pdl

    mode = pdl.args(x, kernel).get("PDL", 0) if pdl_mode is None else pdl_mode
    return 0 if mode and torch.cuda.get_device_capability(x.get_device()) < (9, 0) else mode
