"""Finding CUTLASS, keying the build cache and compiling the native sources on first use.

Sources: src/lowbit/csrc/cutlass_w4a8/ (w4a8_gemm.cu: the CUTLASS kernel behind a plain C++
launcher; w4a8_mma.cu: the decode-batch mma.sync kernel, plain CUDA; binding.cpp: the torch
binding). They are compiled with torch.utils.cpp_extension (ninja + nvcc) into
~/.cache/lowbit/cutlass/<key>/, where the key hashes the torch version, the CUDA version torch was
built with, the GPU architecture, the CUTLASS version and the sources' bytes.
A second process finds the built library there and imports it without running the compiler.

Environment:
  LOWBIT_CUTLASS_DIR    a CUTLASS checkout or install (holding include/ and tools/util/include/);
                        default: the headers shipped in the `nvidia-cutlass` wheel (cutlass_library)
  LOWBIT_CUTLASS_CACHE  the cache root (default ~/.cache/lowbit/cutlass)
  LOWBIT_CUTLASS_LIB    a library built ahead of time with csrc/cutlass_w4a8/CMakeLists.txt: imported
                        as is, no JIT build and no cache
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

import torch

FIX = "pip install 'lowbit[cutlass]'"
ARCH = "sm_90a"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cutlass_w4a8"
API_VERSION = 2  # binding.cpp's api_version: the entry points' arguments this Python code passes
SOURCES = ("w4a8_gemm.cu", "w4a8_mma.cu", "w4a8_gemm.h", "binding.cpp")
# Headers the kernel includes directly or relies on; checked before any compiler runs, so an
# incomplete install is reported as such instead of as a page of nvcc errors.
REQUIRED_HEADERS = (
    "include/cutlass/cutlass.h",
    "include/cutlass/version.h",
    "include/cute/tensor.hpp",
    "include/cutlass/gemm/collective/sm90_mma_tma_gmma_rs_warpspecialized_mixed_input.hpp",
    "include/cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp",
    "tools/util/include/cutlass/util/packed_stride.hpp",
)
# NOTE: -gencode, not -arch=sm_90a: with -arch nvcc 13 also runs a plain sm_90 pass, which
# rejects wgmma. Passing a -gencode also stops torch from adding its own arch flags. The -U flags
# undo torch's -D__CUDA_NO_HALF_OPERATORS__ family, which CUTLASS's half/bfloat16 types need.
NVCC_FLAGS = (
    "-gencode=arch=compute_90a,code=sm_90a",
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "-O3",
    "-DNDEBUG",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
)
CXX_FLAGS = ("-O3",)  # the C++ standard of the binding is the one torch builds extensions with


def cutlass_root() -> Path | None:
    """The CUTLASS tree to compile against: $LOWBIT_CUTLASS_DIR, else the nvidia-cutlass wheel's."""
    env = os.environ.get("LOWBIT_CUTLASS_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("cutlass_library")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        return Path(loc) / "source"
    return None


def missing_headers(root: Path | None = None) -> str | None:
    """None when the CUTLASS headers are complete, else a one-line reason with the fix."""
    root = root if root is not None else cutlass_root()
    if root is None:
        return f"CUTLASS headers not found (nvidia-cutlass is not installed; {FIX})"
    missing = [h for h in REQUIRED_HEADERS if not (root / h).is_file()]
    if missing:
        return (
            f"CUTLASS headers incomplete under {root} ({len(missing)} missing, e.g. {missing[0]}; "
            f"{FIX}, or point LOWBIT_CUTLASS_DIR at a CUTLASS >= 3.8 checkout)"
        )
    return None


def include_dirs(root: Path) -> list[str]:
    return [str(root / "include"), str(root / "tools" / "util" / "include")]


def cutlass_version(root: Path | None = None) -> str:
    """major.minor.patch parsed from include/cutlass/version.h ('unknown' when absent)."""
    root = root if root is not None else cutlass_root()
    try:
        text = (root / "include" / "cutlass" / "version.h").read_text() if root else ""
    except OSError:
        text = ""
    parts = []
    for name in ("CUTLASS_MAJOR", "CUTLASS_MINOR", "CUTLASS_PATCH"):
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "#define" and fields[1] == name:
                parts.append(fields[2])
                break
    return ".".join(parts) if len(parts) == 3 else "unknown"


def source_hash(source_dir: Path = SOURCE_DIR) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((source_dir / name).read_bytes())
    h.update(" ".join(NVCC_FLAGS + CXX_FLAGS).encode())
    return h.hexdigest()


def cache_key(
    torch_version: str, cuda_version: str | None, arch: str, cutlass_ver: str, src_hash: str
) -> str:
    """Build-cache key: any change in torch, CUDA, GPU arch, CUTLASS or the sources gives a new one."""
    raw = "|".join((torch_version, cuda_version or "none", arch, cutlass_ver, src_hash))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def current_cache_key() -> str:
    return _key_for(str(cutlass_root()))


@functools.cache
def _key_for(root: str) -> str:  # hashing the sources once per process, not per linear call
    return cache_key(torch.__version__, torch.version.cuda, ARCH, cutlass_version(Path(root)), source_hash())


def cache_dir(key: str | None = None) -> Path:
    root = os.environ.get("LOWBIT_CUTLASS_CACHE") or os.path.join(Path.home(), ".cache", "lowbit", "cutlass")
    return Path(root) / (key or current_cache_key())


def module_name(key: str) -> str:
    return f"lowbit_cutlass_w4a8_{key}"


def nvcc_path() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def built_library(key: str | None = None) -> Path | None:
    """The cached extension library for this machine's key, if one was built."""
    d = cache_dir(key)
    key = key or d.name
    hits = sorted(d.glob(module_name(key) + "*.so")) + sorted(d.glob(module_name(key) + "*.pyd"))
    return hits[0] if hits else None


def prebuilt_library() -> Path | None:
    lib = os.environ.get("LOWBIT_CUTLASS_LIB")
    return Path(lib) if lib else None


def build_blocker() -> str | None:
    """Why the extension cannot be built or loaded here (None: it can). Runs no compiler."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None)"
    prebuilt = prebuilt_library()
    if prebuilt is not None:
        return None if prebuilt.is_file() else f"LOWBIT_CUTLASS_LIB={prebuilt} does not exist"
    reason = missing_headers()
    if reason is not None:
        return reason
    failed = _FAILED.get(current_cache_key())
    if failed is not None:
        return failed.splitlines()[0] + " (full log: lowbit.kernels.cutlass.build.load())"
    if built_library() is not None:
        return None  # already compiled for this key: neither nvcc nor ninja is needed
    if nvcc_path() is None:
        return "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    if shutil.which("ninja") is None:  # torch.utils.cpp_extension runs the ninja binary
        return f"ninja not found on PATH ({FIX})"
    return None


def compiled() -> bool:
    """True when load() would not compile: loaded already, a cached build for this key, or a
    prebuilt library (LOWBIT_CUTLASS_LIB). Checks files only; what AUTO requires."""
    return ready() or _compiled_on_disk()


@functools.cache
def _compiled_on_disk() -> bool:  # once per process: AUTO asks on every linear call
    if build_blocker() is not None:
        return False
    return prebuilt_library() is not None or built_library() is not None


def ready() -> bool:
    """True once load() has returned the extension in this process (no more checks needed)."""
    return load.cache_info().currsize > 0


def device_blocker(device: torch.device) -> str | None:
    """Why the sm_90a kernel cannot run on `device` (None: it can)."""
    if device.type != "cuda":
        return f"the CUTLASS kernel needs a CUDA tensor, got {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return _capability_blocker(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability_blocker(index: int) -> str | None:
    cc = torch.cuda.get_device_capability(index)
    if cc != (9, 0):  # sm_90a code runs on compute capability 9.0 only
        return f"the CUTLASS kernel is built for sm_90a (Hopper, CC 9.0); this GPU is CC {cc[0]}.{cc[1]}"
    return None


class BuildError(RuntimeError):
    """The native build failed; the message ends with the compiler log's tail."""


_FAILED: dict[str, str] = {}  # key -> reason: a failed build is not retried in the same process


def _import_library(path: Path, name: str) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


@functools.cache
def load(verbose: bool = False) -> ModuleType:
    """The compiled extension: imported from the cache, or built there first (minutes)."""
    key = current_cache_key()
    if key in _FAILED:
        raise BuildError(_FAILED[key])
    blocker = build_blocker()
    if blocker is not None:
        raise BuildError(blocker)
    prebuilt = prebuilt_library()
    if prebuilt is not None:  # ahead-of-time build: the module name is the file's stem
        mod = _import_library(prebuilt, prebuilt.name.split(".")[0])
        api = getattr(mod, "api_version", 1)
        if api != API_VERSION:
            raise BuildError(f"LOWBIT_CUTLASS_LIB={prebuilt} was built from other lowbit sources (API "
                             f"version {api}, this lowbit needs {API_VERSION}): rebuild it from "
                             "csrc/cutlass_w4a8 or unset it")
        return mod
    lib = built_library(key)
    if lib is not None:
        try:
            return _import_library(lib, module_name(key))
        except ImportError:
            pass  # a truncated or foreign library: rebuild it below
    from torch.utils.cpp_extension import load as cpp_load

    root = cutlass_root()
    assert root is not None
    build_dir = cache_dir(key)
    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        mod = cpp_load(
            name=module_name(key),
            sources=[str(SOURCE_DIR / n) for n in ("binding.cpp", "w4a8_gemm.cu", "w4a8_mma.cu")],
            extra_include_paths=include_dirs(root) + [str(SOURCE_DIR)],
            extra_cflags=list(CXX_FLAGS),
            extra_cuda_cflags=list(NVCC_FLAGS),
            build_directory=str(build_dir),
            verbose=verbose,
        )
    except Exception as e:  # keep the tail: the useful nvcc error is at the end of a long log
        tail = str(e)[-3000:]
        _FAILED[key] = f"CUTLASS W4A8 build failed in {build_dir}: {tail}"
        raise BuildError(_FAILED[key]) from e
    (build_dir / "build_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return mod


def cached_load_seconds() -> float:
    """Seconds a fresh Python process takes to import torch and load the extension from the cache
    (build it first with load()). Raises RuntimeError with the child's stderr if it fails."""
    import subprocess
    import sys

    code = (
        "import time; t = time.perf_counter(); import torch; from lowbit.kernels.cutlass import build; "
        "build.load(); print(time.perf_counter() - t)"
    )
    src = str(Path(__file__).resolve().parents[3])  # the directory holding the lowbit package
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": path})
    if out.returncode:
        raise RuntimeError(f"cached load in a new process failed: {out.stderr[-3000:]}")
    return float(out.stdout.split()[-1])


def status() -> dict[str, object]:
    """Backend state for `lowbit doctor`; compiles nothing and initialises CUDA only if present."""
    root = cutlass_root()
    key = current_cache_key()
    lib = built_library(key)
    gpu = None
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability(0)
        gpu = f"{cc[0]}.{cc[1]}"
    return {
        "cutlass_dir": str(root) if root else None,
        "cutlass_version": cutlass_version(root),
        "headers": missing_headers(root) or "complete",
        "nvcc": nvcc_path(),
        "ninja": shutil.which("ninja") is not None,
        "cache_dir": str(cache_dir(key)),
        "built": str(prebuilt_library() or lib or "") or None,
        "gpu_cc": gpu,
        "sm90a_gpu": gpu == "9.0",
        "blocker": build_blocker(),
    }
