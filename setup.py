"""Build randygpt's Cython kernels, with OpenMP when the compiler has it.

Environment switches (all optional):
  RANDYGPT_NO_OPENMP=1     build serial kernels without probing for OpenMP
  RANDYGPT_NATIVE=1        add -march=native (local builds only: the binary may not run elsewhere)
  RANDYGPT_DEBUG=1         turn Cython's bounds and wraparound checks back on
  RANDYGPT_EXTENSIONS=a,b  build only these kernel families (for kernel development)
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL_DIR = os.path.join("src", "randygpt", "_kernels")

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n);
        return n > 0 ? 0 : 1;
    }
    """
)


def _openmp_flags(compiler):
    """Return (compile_args, link_args) for OpenMP, or None if a probe program fails."""
    if compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    tmp = tempfile.mkdtemp(prefix="randygpt-omp-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        for cflags, ldflags in candidates:
            try:
                objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
                exe = os.path.join(tmp, "probe")
                compiler.link_executable(objs, exe, extra_postargs=ldflags)
                subprocess.run([exe], check=True, capture_output=True, timeout=30)
                return cflags, ldflags
            except Exception:
                continue
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _warn_serial(reason):
    bar = "*" * 72
    msg = (
        f"\n{bar}\n"
        f"randygpt: building WITHOUT OpenMP ({reason}).\n"
        "The kernels will run on one thread only: training will be several times\n"
        "slower on a multi-core machine. To fix it, install an OpenMP-capable compiler\n"
        "(gcc, or clang with libomp) and reinstall. Check a build with:\n"
        "    python -c 'import randygpt; print(randygpt.openmp_enabled())'\n"
        f"{bar}\n"
    )
    sys.stderr.write(msg)


class BuildExt(build_ext):
    """Adds OpenMP and optimisation flags once the real compiler is known, and compiles the
    kernel families in parallel (one per CPU), since `pip install .` offers no -j flag."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        compiler = self.compiler
        if compiler.compiler_type == "msvc":
            base = ["/O2"]
        else:
            base = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-Wno-unused-function"]
            if os.environ.get("RANDYGPT_NATIVE") == "1":
                base.append("-march=native")
        cflags, ldflags = [], []
        if os.environ.get("RANDYGPT_NO_OPENMP") == "1":
            _warn_serial("RANDYGPT_NO_OPENMP=1")
        else:
            flags = _openmp_flags(compiler)
            if flags is None:
                _warn_serial("the compiler could not build and run an OpenMP test program")
            else:
                cflags, ldflags = flags
        for ext in self.extensions:
            ext.extra_compile_args = base + cflags + list(ext.extra_compile_args)
            ext.extra_link_args = ldflags + list(ext.extra_link_args)
        super().build_extensions()


def _extensions():
    only = os.environ.get("RANDYGPT_EXTENSIONS")
    wanted = {s.strip() for s in only.split(",")} if only else None
    # Every kernel may include the shared headers and .pxd files: declare them, so that
    # editing one rebuilds the extensions instead of silently keeping stale objects.
    headers = sorted(glob.glob(os.path.join(KERNEL_DIR, "*.h")) + glob.glob(os.path.join(KERNEL_DIR, "*.pxd")))
    exts = []
    for pyx in sorted(glob.glob(os.path.join(KERNEL_DIR, "*.pyx"))):
        name = os.path.splitext(os.path.basename(pyx))[0]
        if wanted is not None and name not in wanted:
            continue
        exts.append(Extension(f"randygpt._kernels.{name}", [pyx], include_dirs=[KERNEL_DIR],
                              depends=headers))
    return exts


debug = os.environ.get("RANDYGPT_DEBUG") == "1"
setup(
    ext_modules=cythonize(
        _extensions(),
        compiler_directives={
            "language_level": 3,
            "boundscheck": debug,
            "wraparound": debug,
            "initializedcheck": debug,
            "cdivision": True,
        },
        # Debug and release C sources live apart: cythonize only compares file times, so a
        # shared location would keep the bounds checks of a debug build in the next release build.
        build_dir=os.path.join("build", "cython-debug" if debug else "cython"),
    ),
    cmdclass={"build_ext": BuildExt},
)
