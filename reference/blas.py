"""An optimized BLAS under MLX's float matmuls on Linux CPUs.

MLX's Linux CPU wheel links the netlib *reference* BLAS (a plain Fortran triple
loop): a 1024 x 1024 float32 product takes about 1 s there, 0.1 s in OpenBLAS.
MLX reaches BLAS through one function for float32, ``cblas_sgemm``, an undefined
symbol of ``libmlx.so`` that the dynamic linker binds when ``mlx.core`` is loaded.
A library loaded earlier with ``RTLD_GLOBAL`` that defines ``cblas_sgemm`` wins
that binding. So:

* ``scipy-openblas32`` (PyPI, self-contained) ships OpenBLAS, but with every
  symbol prefixed ``scipy_``; a C shim of a few lines (``SHIM_SOURCE``) defines
  ``cblas_sgemm`` and forwards it to ``scipy_cblas_sgemm``;
* ``install()`` compiles the shim with ``cc`` on first use into a cache folder
  (named by a hash of the source and of the library's path, so an upgrade
  rebuilds it) and loads it, before ``reference`` imports ``mlx.core``.

Python loads extension modules with ``RTLD_NOW``: once ``mlx.core`` is loaded its
binding is fixed, and a shim loaded later changes nothing. ``install()`` then says
so and leaves MLX's own BLAS in place, as it does without a compiler, without
scipy-openblas32, or when ``LMCONFORM_BLAS=mlx`` asks for MLX's own BLAS: one
line on stderr, once, and every result is still correct, only slower. On macOS
MLX already uses Accelerate, and nothing is done.

Only float32 is forwarded: the reference computes in float32, and MLX's other
BLAS calls (float64, complex) are not on its path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Row-major products with one row (a decode step: one token times a weight matrix)
# go to sgemv: OpenBLAS's sgemm packs all of the weight matrix into a buffer before
# using each element once, which for one row doubles the memory traffic of what is
# a memory-bound product. Everything else goes to sgemm.
SHIM_SOURCE = r"""
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

void scipy_cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k,
                       float alpha, const float *a, int lda, const float *b, int ldb,
                       float beta, float *c, int ldc);
void scipy_cblas_sgemv(int order, int trans, int rows, int cols, float alpha,
                       const float *matrix, int ld, const float *x, int incx,
                       float beta, float *y, int incy);

/* Products served, so that a caller can check MLX's calls really arrive here. */
static unsigned long long calls;

unsigned long long lmconform_blas_calls(void)
{
    return __atomic_load_n(&calls, __ATOMIC_RELAXED);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k,
                 float alpha, const float *a, int lda, const float *b, int ldb,
                 float beta, float *c, int ldc)
{
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
    if (order != ROW_MAJOR || m != 1 || k == 0) {
        scipy_cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb,
                          beta, c, ldc);
        return;
    }
    /* c (1 x n) = alpha a (1 x k) op(b) + beta c, as the vector op(b)^T a. The row a
       is contiguous unless it is stored transposed (a k x 1 column, stride lda). */
    int inc_a = trans_a == NO_TRANS ? 1 : lda;
    if (trans_b == NO_TRANS) /* b is k x n */
        scipy_cblas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a,
                          beta, c, 1);
    else /* b is n x k, stored row by row */
        scipy_cblas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a,
                          beta, c, 1);
}
"""

DEFAULT_THREADS = 1


@dataclass(frozen=True)
class Blas:
    """Which BLAS serves MLX's float32 products in this process.

    ``shim`` is the loaded shim (None when MLX's own BLAS serves them), ``reason``
    why not, ``threads`` the OpenBLAS threads.
    """

    shim: ctypes.CDLL | None
    library: str
    threads: int = 0
    reason: str = ""

    @property
    def optimized(self) -> bool:
        return self.shim is not None

    def calls(self) -> int:
        """Products the shim has served so far (0 without it)."""
        if self.shim is None:
            return 0
        count = self.shim.lmconform_blas_calls
        count.restype = ctypes.c_ulonglong
        return count()


_installed: Blas | None = None


def install() -> Blas:
    """Put OpenBLAS under MLX if it can be (once per process); else say why, once."""
    global _installed
    if _installed is None:
        _installed = _install()
        if not _installed.optimized and sys.platform.startswith("linux"):
            print(
                f"lmconform: {_installed.reason}; MLX's float32 matmuls use its bundled "
                "reference BLAS (correct, about 10x slower)",
                file=sys.stderr,
            )
    return _installed


def _install() -> Blas:
    own = Blas(None, "MLX's bundled BLAS")
    if not sys.platform.startswith("linux"):
        return own
    if os.environ.get("LMCONFORM_BLAS", "").lower() == "mlx":
        return Blas(None, own.library, reason="LMCONFORM_BLAS=mlx")
    if "mlx.core" in sys.modules:
        return Blas(None, own.library, reason="mlx.core was imported before reference")
    try:
        threads = blas_threads()
        library = openblas_library()
        shim = ctypes.CDLL(str(built_shim(library)), mode=ctypes.RTLD_GLOBAL)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as error:
        return Blas(None, own.library, reason=f"no OpenBLAS shim ({error})")
    ctypes.CDLL(str(library)).scipy_openblas_set_num_threads(threads)
    return Blas(shim, f"OpenBLAS ({library})", threads)


def blas_threads() -> int:
    """OpenBLAS threads: ``LMCONFORM_BLAS_THREADS``, else one.

    One, because OpenBLAS's waiting threads spin: on a machine that other
    processes share (test workers, ``check -j``, a CI runner) more threads than
    free cores made each product 10x slower, not faster. MLX's own CPU kernels
    run on one thread too.
    """
    text = os.environ.get("LMCONFORM_BLAS_THREADS", str(DEFAULT_THREADS))
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"LMCONFORM_BLAS_THREADS must be a whole number >= 1, got {text!r}")
    return int(text)


def openblas_library() -> Path:
    """The OpenBLAS shared library of the scipy-openblas32 package."""
    try:
        import scipy_openblas32
    except ImportError:
        raise RuntimeError("scipy-openblas32 is not installed") from None
    return Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True)


def shim_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmconform"


def built_shim(library: Path) -> Path:
    """The compiled shim for ``library``: from the cache, else compiled now.

    Compiled into a temporary file and renamed into place, so that processes
    starting together (test workers) never load a half-written file.
    """
    key = hashlib.sha256(f"{SHIM_SOURCE}\0{library}".encode()).hexdigest()[:16]
    target = shim_cache() / f"blas-shim-{key}.so"
    if target.is_file():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError("no C compiler (cc) to build it")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        source = Path(scratch) / "shim.c"
        source.write_text(SHIM_SOURCE)
        built = Path(scratch) / "shim.so"
        command = [
            compiler,
            "-O2",
            "-shared",
            "-fPIC",
            "-o",
            str(built),
            str(source),
            str(library),
            f"-Wl,-rpath,{library.parent}",
        ]
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"{compiler} failed: {last}")
        os.replace(built, target)
    return target
