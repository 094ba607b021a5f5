"""Build the C extension attnpy._core from csrc/.

The core (csrc/attn_core.c) is plain C11 and knows nothing of Python; the
binding (csrc/attnpy_module.c) is the only file that includes Python.h and
numpy's headers.  ATTNPY_STRICT=1 (set by dev.sh and CI) turns warnings into
errors; ATTNPY_SANITIZE=1 and ATTNPY_FUZZ=1 make the sanitizer and fuzzer builds;
ATTNPY_FAULT_INJECTION=1 (and ATTNPY_SANITIZE=1) builds the allocation
fault-injection hook in.
"""
import os
import sys

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -ffp-contract=fast lets a * b + c become one FMA instruction in the fast
# kernels (ISO C mode turns contraction off by default). No -march: the fast
# kernels carry their own target attributes and are chosen at run time.
extra_compile_args = ["-std=c11", "-O3", "-pthread", "-ffp-contract=fast", "-Wall", "-Wextra"]
extra_link_args = ["-pthread"]
if os.environ.get("ATTNPY_STRICT") == "1":
    extra_compile_args.append("-Werror")
if os.environ.get("ATTNPY_SANITIZE") == "1":
    # the test command's second build: AddressSanitizer + UndefinedBehaviorSanitizer,
    # any finding fatal
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    extra_compile_args += sanitize + ["-O1", "-g", "-fno-omit-frame-pointer"]
    extra_link_args += sanitize
if os.environ.get("ATTNPY_FUZZ") == "1":
    # the fuzzer's build (fuzz/build.sh, with CC=clang): libFuzzer's coverage
    # instrumentation (what -fsanitize=fuzzer-no-link turns on, less
    # stack-depth, whose symbol atheris's libFuzzer does not export) on every
    # edge of the binding and the core, resolved at import time by the
    # libFuzzer inside atheris. UBSan traps (no runtime needed), so undefined
    # behaviour is a crash the fuzzer sees. ATTNPY_FUZZ_ASAN=1 adds ASan.
    fuzz = ["-fsanitize-coverage=inline-8bit-counters,pc-table,trace-cmp,indirect-calls",
            "-fsanitize=undefined", "-fsanitize-trap=undefined"]
    if os.environ.get("ATTNPY_FUZZ_ASAN") == "1":
        fuzz.append("-fsanitize=address")
    extra_compile_args += fuzz + ["-O1", "-g", "-fno-omit-frame-pointer"]
    extra_link_args += fuzz

define_macros = [("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")]
if os.environ.get("ATTNPY_FAULT_INJECTION") == "1" or os.environ.get("ATTNPY_SANITIZE") == "1":
    # a debug hook, never in a release build: _core._fail_alloc(n) makes the n-th
    # allocation fail (tests/test_memory.py); the sanitizer build has it too
    define_macros.append(("ATTN_FAULT_INJECTION", "1"))

core = Extension(
    "attnpy._core",
    sources=["csrc/attnpy_module.c", "csrc/attn_core.c", "csrc/attn_fast.c",
             "csrc/attn_parallel.c", "csrc/attn_plan.c"],
    depends=["csrc/attn_core.h", "csrc/attn_internal.h", "csrc/attn_kernels.inc",
             "csrc/attn_reference.inc", "csrc/attn_fast.inc", "csrc/attn_fast_instance.h",
             "csrc/attn_fast_isa.h", "csrc/attn_max_abs.inc", "csrc/attn_thread.h"],
    include_dirs=[np.get_include(), "csrc"],
    define_macros=define_macros,
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
    libraries=[] if sys.platform == "win32" else ["m"],
)


class BuildExt(build_ext):
    """MSVC's flags in place of GCC's and clang's (the core is C11 either way;
    MSVC builds the reference kernel only: csrc/README.md)."""

    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            # _CRT_SECURE_NO_WARNINGS: getenv is C11; MSVC's C4996 would stop /WX
            flags = ["/std:c11", "/O2", "/experimental:c11atomics", "/W3",
                     "/D_CRT_SECURE_NO_WARNINGS"]
            if os.environ.get("ATTNPY_STRICT") == "1":
                flags.append("/WX")
            for ext in self.extensions:
                ext.extra_compile_args, ext.extra_link_args = flags, []
        super().build_extensions()


setup(ext_modules=[core], cmdclass={"build_ext": BuildExt})
