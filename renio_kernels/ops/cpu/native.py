"""Native CPU row kernels (``csrc/``): JIT build, cache, and the row-kernel launchers.

Same contract and math as ``ops.triton`` (``fwd``/``bwd``) and ``ops.torch.chunked``:
``renio_fwd_cpu`` returns ``RowStats``, ``renio_bwd_cpu`` the student gradient in the student's
dtype. The C++ kernels take one ``(b, t)`` row per task over ``torch.get_num_threads()`` threads,
read each row in L1-sized fp32 tiles and write every output element themselves (see
``csrc/renio_cpu.cpp``). They implement the divergences the built extension declares
(``divergences()``, listed in ``csrc/renio_cpu_math.h``); a divergence's C++ mode is its index in
that list.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, OpenMP,
``-O3`` plus the vector ISA torch itself dispatches to here: AVX-512, AVX2 or none) into torch's
extension root (``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions/py<ver>_<accel>``).
The build directory is named after a hash of everything that changes the binary
(``build_identity``: sources, flags, the torch installation's path, version and build
configuration, the compiler and its version, the Python ABI), so two environments never share or
rebuild over one build, and an edited source gets a fresh one. A finished build is marked
complete (``renio_build.json``: the library's size and hash); a complete build is loaded as is,
without the build lock or any write, so a read-only extension directory that holds one works.
When the build fails, ``load_extension()`` returns None after one warning that names the cause
(no compiler, no ninja, a directory that is not writable, a compile error), and callers fall back
to the torch backend.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch

from ..rows import DenseTeacher, DivergenceParams, RowStats

__all__ = [
    "load_extension",
    "extension_error",
    "loaded",
    "divergences",
    "renio_fwd_cpu",
    "renio_bwd_cpu",
    "renio_fwd_grad_cpu",
    "renio_scale_grad_cpu",
    "grad_cache_info",
    "empty_grad_cache",
    "set_grad_cache",
    "build_flags",
    "build_identity",
    "build_directory",
    "complete_build",
    "extensions_root",
    "wait_for_build_lock",
    "ExtensionDirNotWritable",
]

# A source checkout (or editable install) compiles the repository's csrc/; a built wheel carries a
# copy in renio_kernels/_csrc (setup.py).
_PACKAGED = Path(__file__).resolve().parents[2] / "_csrc"
CSRC = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[3] / "csrc"
SOURCES = ("renio_cpu.cpp", "renio_cpu_grad.cpp", "renio_cpu_pool.cpp")
HEADERS = ("renio_cpu_math.h", "renio_cpu_rows.h", "renio_cpu_pool.h")
_LIBRARY = "renio_kernels_cpu"

# The flags torch's own kernels use for each capability; Sleef's matching routines are exported
# by libtorch. ``CPU_CAPABILITY`` names our copy of at::vec's inline namespace, so its inline
# functions never collide with libtorch's.
_ISA_FLAGS = {
    "AVX512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-DCPU_CAPABILITY_AVX512",
        "-DCPU_CAPABILITY=renio_avx512",
    ],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=renio_avx2"],
}

_UNTRIED = object()
_state: dict[str, object] = {"lib": _UNTRIED, "error": None}


def build_flags() -> list[str]:
    """Compiler flags for this machine: ``-O3 -fopenmp`` plus the ISA torch dispatches to."""
    isa = _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ["-DCPU_CAPABILITY=renio_base"])
    return ["-O3", "-fopenmp", *isa]


_LDFLAGS = ("-fopenmp",)  # a tuple: cpp_extension.load appends to the list it is given
_MARKER = "renio_build.json"


def _compiler() -> str:
    """The C++ compiler torch's extension builder runs (``$CXX``, else ``c++``)."""
    return os.environ.get("CXX", "c++")


@functools.cache
def _compiler_identity(cxx: str) -> str:
    path = shutil.which(cxx)
    if path is None:
        return f"{cxx}: not found"
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        version = f"unknown ({err})"
    return f"{os.path.realpath(path)}\n{version}"


def build_identity(flags: list[str]) -> dict[str, str]:
    """Everything that changes the built binary; the build directory's name hashes it."""
    sources = hashlib.sha256()
    for name in SOURCES + HEADERS:
        sources.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return {
        "sources": sources.hexdigest(),
        "flags": " ".join(flags) + " | " + " ".join(_LDFLAGS),
        "torch_version": torch.__version__,
        "torch_git": str(getattr(torch.version, "git_version", "")),
        "torch_path": str(Path(torch.__file__).resolve().parent),
        "torch_config": torch.__config__.show(),
        "torch_cxx11_abi": str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")),
        "compiler": _compiler_identity(_compiler()),
        "python_abi": " ".join(
            (
                sys.implementation.cache_tag or "",
                str(sysconfig.get_config_var("EXT_SUFFIX")),
                getattr(sys, "abiflags", ""),
            )
        ),
    }


def _build_name(flags: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(build_identity(flags), sort_keys=True).encode())
    return f"renio_cpu_{digest.hexdigest()[:16]}"


def extensions_root() -> Path:
    """torch's extension root (as ``cpp_extension`` lays it out), without creating it."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def build_directory(flags: list[str] | None = None) -> Path:
    """Where this environment's build lives (``extensions_root() / _build_name(flags)``)."""
    return extensions_root() / _build_name(build_flags() if flags is None else flags)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def complete_build(build_dir: Path) -> Path | None:
    """The library of a finished build in ``build_dir`` (its marker matches the library's size
    and hash), else None. Reads only."""
    try:
        marker = json.loads((build_dir / _MARKER).read_text())
        library = build_dir / marker["library"]
        if library.name != f"{build_dir.name}.so":
            return None
        if library.stat().st_size != marker["size"] or _file_digest(library) != marker["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return library


def _mark_complete(build_dir: Path, library: Path, identity: dict) -> None:
    record = {
        "library": library.name,
        "size": library.stat().st_size,
        "sha256": _file_digest(library),
        "identity": identity,
    }
    tmp = build_dir / f"{_MARKER}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, build_dir / _MARKER)
    except OSError:  # unmarked: the next process goes through torch's (no-op) build again
        tmp.unlink(missing_ok=True)


class ExtensionDirNotWritable(OSError):
    """The build directory cannot be written and holds no complete build."""


_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def _require_writable(build_dir: Path) -> None:
    """Create ``build_dir`` and check that a file can be made there (the build writes its
    objects and torch's lock file there); ExtensionDirNotWritable otherwise."""
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        probe = build_dir / f".renio-write-test-{os.getpid()}"
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600))
        probe.unlink()
    except OSError as err:
        if err.errno not in _READ_ONLY:
            raise
        raise ExtensionDirNotWritable(
            err.errno,
            f"the extension directory {build_dir} is not writable ({os.strerror(err.errno)}) "
            "and holds no complete build for this torch, compiler and source: set "
            "TORCH_EXTENSIONS_DIR to a writable directory, or build once where it is writable "
            "(python -c 'from renio_kernels.ops.cpu import native; native.load_extension()') "
            "and then make it read-only",
        ) from err


# A build killed midway (Ctrl-C during the first call, a CI timeout) leaves torch's lock file in
# its build directory, and torch would make every later process wait on it forever. A build takes
# well under a minute on 2 cores, so a lock that stays longer than this is taken as stale.
STALE_LOCK_S = 300.0


def wait_for_build_lock(build_dir: Path, stale_after_s: float = STALE_LOCK_S) -> None:
    """Wait while another process holds the build lock; remove it (with a warning) once stale."""
    lock = build_dir / "lock"
    waited, told = 0.0, False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_after_s:
            warnings.warn(
                f"renio_kernels: removing the build lock {lock}, {age:.0f} s old: a build of the "
                "native CPU kernel was interrupted; rebuilding",
                RuntimeWarning,
                stacklevel=3,
            )
            lock.unlink(missing_ok=True)
            return
        if waited >= 30.0 and not told:
            warnings.warn(
                f"renio_kernels: waiting for {lock}: another process is building the native CPU "
                f"kernel (or one was interrupted; the lock is removed once {stale_after_s:.0f} s "
                "old, or delete it by hand if no build is running)",
                RuntimeWarning,
                stacklevel=3,
            )
            told = True
        time.sleep(0.5)
        waited += 0.5


def _build(verbose: bool = False) -> str:
    """Load the complete build, or compile it and mark it complete; returns the library path."""
    flags = build_flags()
    identity = build_identity(flags)
    build_dir = extensions_root() / _build_name(flags)
    library = complete_build(build_dir)
    if library is not None:  # no lock, no write: works in a read-only directory
        torch.ops.load_library(str(library))
        return str(library)
    _require_writable(build_dir)
    wait_for_build_lock(build_dir)
    from torch.utils import cpp_extension  # a slow import: only when building

    path = cpp_extension.load(
        name=build_dir.name,
        sources=[str(CSRC / source) for source in SOURCES],
        extra_cflags=list(flags),
        extra_ldflags=list(_LDFLAGS),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    _mark_complete(build_dir, Path(path), identity)
    return path


def _failure_cause(exc: BaseException) -> str:
    """What to do about a failed build, from its cause."""
    if isinstance(exc, ExtensionDirNotWritable):
        return str(exc.strerror)
    if isinstance(exc, OSError) and exc.errno in _READ_ONLY:
        return (
            f"a file of the build could not be written ({exc}): set TORCH_EXTENSIONS_DIR to a "
            "writable directory"
        )
    if shutil.which(_compiler()) is None:
        return (
            f"no C++ compiler ({_compiler()!r}, from $CXX or the default c++) was found: install "
            "one with OpenMP (e.g. `apt-get install g++`) and ninja (`pip install ninja`), then "
            "restart Python"
        )
    if "ninja" in str(exc).lower() and shutil.which("ninja") is None:
        return "ninja is missing: `pip install ninja`, then restart Python"
    return (
        "the compiler is there but the build failed (a compile or link error, see the error "
        "below and renio_kernels.ops.cpu.native.extension_error()); please report it"
    )


def load_extension() -> str | None:
    """The built library's path, building it on the first call; None when it cannot be built.

    The first failure warns once, with its cause and what to do; later calls return None quietly.
    """
    if _state["lib"] is _UNTRIED:
        try:
            _state["lib"] = _build()
        except Exception as exc:  # a missing compiler or ninja, a compile error, a read-only cache
            _state["lib"] = None
            _state["error"] = f"{type(exc).__name__}: {str(exc).strip()[-600:]}"
            warnings.warn(
                "renio_kernels: the native CPU kernel (csrc/) could not be built, so CPU tensors "
                f"use the slower chunked torch backend. Cause: {_failure_cause(exc)}. The build "
                "is cached under torch's extension directory ($TORCH_EXTENSIONS_DIR or "
                f"~/.cache/torch_extensions). Error: {_state['error']}",
                RuntimeWarning,
                stacklevel=2,
            )
    return _state["lib"]  # type: ignore[return-value]


def extension_error() -> str | None:
    """Why the last build failed (None when it succeeded or was not tried)."""
    return _state["error"]  # type: ignore[return-value]


def _ops():
    if load_extension() is None:
        raise RuntimeError(f"the native CPU kernel is unavailable: {extension_error()}")
    return getattr(torch.ops, _LIBRARY)


@functools.cache
def _declared_divergences() -> tuple[str, ...]:
    return tuple(_ops().divergence_names())


def divergences() -> frozenset[str]:
    """The divergences the built extension implements, as it declares them."""
    return frozenset(_declared_divergences())


def _scalars(params: DivergenceParams) -> tuple:
    return (
        params.inv_tau,
        float(params.beta),
        params.clip_value,
        _declared_divergences().index(params.divergence),
        params.clip_on,
        int(params.ignore_index),
    )


def renio_fwd_cpu(
    student: torch.Tensor,
    teacher_input: DenseTeacher,
    labels: torch.Tensor,
    params: DivergenceParams,
    *,
    with_divergence: bool = True,
    store_c: bool = True,
) -> RowStats:
    """Row statistics of ``(B, T, Vs)`` student and ``(B, T, Vt >= Vs)`` teacher CPU logits."""
    teacher = teacher_input.logits
    assert student.dim() == 3 and teacher.dim() == 3 and labels.dim() == 2
    assert student.stride(-1) == 1 and teacher.stride(-1) == 1
    store_c = store_c and with_divergence
    out = _ops().renio_fwd(student, teacher, labels, *_scalars(params), with_divergence, store_c)
    lse_s, lse_t, ls_x, lt_x, d, c = out.unbind(0)
    return RowStats(lse_s, lse_t, ls_x, lt_x, d, c if store_c else None)


def renio_bwd_cpu(
    student: torch.Tensor,
    teacher_input: DenseTeacher,
    labels: torch.Tensor,
    params: DivergenceParams,
    stats: RowStats,
    grad_d: torch.Tensor | None,
    grad_ls_x: torch.Tensor | None,
) -> torch.Tensor:
    """Gradient of ``sum(grad_d * d) + sum(grad_ls_x * ls[x])`` w.r.t. the student logits."""
    teacher = teacher_input.logits
    assert grad_d is not None or grad_ls_x is not None
    assert grad_d is None or stats.c is not None, "forward ran without store_c"

    def rows(x: torch.Tensor | None) -> torch.Tensor | None:
        # Upstream gradients may be expanded or strided (B, T) tensors; they are tiny.
        return None if x is None else x.float().contiguous()

    return _ops().renio_bwd(
        student,
        teacher,
        labels,
        rows(stats.lse_s),
        rows(stats.lse_t),
        rows(stats.c) if grad_d is not None else None,
        rows(grad_d),
        rows(grad_ls_x),
        *_scalars(params),
    )


def renio_fwd_grad_cpu(
    student: torch.Tensor,
    teacher_input: DenseTeacher,
    labels: torch.Tensor,
    params: DivergenceParams,
) -> tuple[RowStats, torch.Tensor]:
    """Row statistics (with ``d`` and ``C``) and the unit-scale gradient ``u = (c - ps C) / tau``.

    ``u`` is ``(B, T, Vs)`` in the student's dtype, zero on ignored rows; ``dL/dd * u`` is the
    gradient of a loss through ``d`` (``renio_scale_grad_cpu`` applies the scale in place).
    """
    teacher = teacher_input.logits
    assert student.dim() == 3 and teacher.dim() == 3 and labels.dim() == 2
    assert student.stride(-1) == 1 and teacher.stride(-1) == 1
    out, unit = _ops().renio_fwd_grad(student, teacher, labels, *_scalars(params))
    lse_s, lse_t, ls_x, lt_x, d, c = out.unbind(0)
    return RowStats(lse_s, lse_t, ls_x, lt_x, d, c), unit


def renio_scale_grad_cpu(
    grad: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """``grad[b, t, :] *= scale[b, t]`` in place (ignored rows untouched); returns ``grad``."""
    assert grad.dim() == 3 and grad.is_contiguous()
    _ops().renio_scale_grad(grad, scale.float().contiguous(), labels, int(ignore_index))
    return grad


def grad_cache_info() -> dict[str, int | bool]:
    """State of the native kernels' gradient-buffer cache (``csrc/renio_cpu_pool.h``)."""
    enabled, cached_bytes, buffers, reuses, allocations = _ops().grad_cache_info()
    return {
        "enabled": bool(enabled),
        "cached_bytes": cached_bytes,
        "cached_buffers": buffers,
        "reuses": reuses,
        "allocations": allocations,
    }


def loaded() -> bool:
    """True once the extension is built and registered in this process (never builds it)."""
    return _state["lib"] not in (_UNTRIED, None)


def empty_grad_cache() -> None:
    """Return the cached gradient buffers to the OS (no-op before the extension is loaded)."""
    if loaded():
        _ops().grad_cache_empty()


def set_grad_cache(enabled: bool) -> bool:
    """Turn the gradient-buffer cache on or off (off also empties it); returns the old setting."""
    return bool(_ops().grad_cache_set_enabled(bool(enabled)))
