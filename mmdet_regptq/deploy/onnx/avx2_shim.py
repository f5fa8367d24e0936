"""Run ONNX Runtime with its AVX2 kernels on a CPU that has AVX-512 VNNI (Linux x86-64).

ORT's kernel library (MLAS) picks its integer kernels from the CPUID feature bits once per
process. Linux lets a process make the ``CPUID`` instruction fault (``arch_prctl(
ARCH_SET_CPUID, 0)``, where the CPU and kernel offer CPUID faulting: ``cpuid_fault`` in
``/proc/cpuinfo``). :func:`build_avx2_shim` compiles a small ``LD_PRELOAD`` library that
does this at process start and answers every ``CPUID`` from a signal handler with the real
values minus the AVX-512 / VNNI / AMX feature bits. ORT, numpy, ... in that process then
see an AVX2 CPU and run their AVX2 code natively: the u8 x s8 kernel whose int16 pair sums
saturate (``vpmaddubsw``), at the speed of AVX2 code on this core. It is a check of the
kernel *choice*, not of another CPU: latency measured this way is that of AVX2 kernels on
this micro-architecture.

Use :func:`avx2_env` as the environment of a subprocess (the library must be loaded
before any CPUID is read), e.g. ``subprocess.run([...], env=avx2_env(lib))``.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ['SHIM_SOURCE', 'cpuid_faulting', 'build_avx2_shim', 'avx2_env']

#: C source of the ``LD_PRELOAD`` library: a constructor, a SIGSEGV handler, and
#: ``sigaction`` / ``signal`` wrappers that keep that handler in place when the program
#: installs its own (TVM does) and pass other faults on to the program's
SHIM_SOURCE = r'''
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
/* The SIGSEGV handler the program itself installed (TVM installs one for back traces):
 * ours stays in place and passes every fault that is not a CPUID on to it. */
static struct sigaction app_segv;
static int shim_ready;

static sigaction_fn real_sigaction(void) {
    static sigaction_fn fn;
    if (!fn) fn = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return fn;
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV || !shim_ready) return real_sigaction()(sig, act, old);
    if (old) *old = app_segv;
    if (act) app_segv = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

/* Not a CPUID: what the program asked for, else the default action. */
static void pass_on(int sig, siginfo_t *info, void *raw) {
    if ((app_segv.sa_flags & SA_SIGINFO) && app_segv.sa_sigaction) {
        app_segv.sa_sigaction(sig, info, raw);
        return;
    }
    if (!(app_segv.sa_flags & SA_SIGINFO) && app_segv.sa_handler != SIG_DFL &&
        app_segv.sa_handler != SIG_IGN) {
        app_segv.sa_handler(sig);
        return;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction()(SIGSEGV, &dfl, NULL);
    if (info->si_code <= 0) raise(SIGSEGV);   /* sent, not a fault: send it again */
}

/* CPUID with faulting on: SIGSEGV (si_code SI_KERNEL) at a 0f a2 instruction. Answer it
 * with the real values (faulting briefly off for this thread) minus AVX-512 / VNNI / AMX,
 * skip the 2 bytes. */
static void on_segv(int sig, siginfo_t *info, void *raw) {
    ucontext_t *ctx = raw;
    greg_t *g = ctx->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        pass_on(sig, info, raw);
        return;
    }
    unsigned leaf = (unsigned)g[REG_RAX], sub = (unsigned)g[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512 F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) |
               (1u << 28) | (1u << 30) | (1u << 31));
        /* ECX: AVX512 VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, FP16 23, AMX 24/25 */
        d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) |
               (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        a &= ~((1u << 4) | (1u << 5) | (1u << 23));   /* AVX-VNNI, AVX512_BF16, AVX-IFMA */
        d &= ~((1u << 4) | (1u << 5) | (1u << 10));   /* AVX-VNNI-INT8, NE-CONVERT, INT16 */
    }
    g[REG_RAX] = a; g[REG_RBX] = b; g[REG_RCX] = c; g[REG_RDX] = d;
    g[REG_RIP] += 2;
}

__attribute__((constructor)) static void avx2_shim_init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    real_sigaction()(SIGSEGV, &sa, NULL);
    app_segv.sa_handler = SIG_DFL;
    shim_ready = 1;
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {   /* inherited by threads */
        perror("avx2 shim: arch_prctl(ARCH_SET_CPUID, 0)");
        _exit(3);
    }
}
'''


def cpuid_faulting(cpuinfo: str = '/proc/cpuinfo') -> str | None:
    """``None`` when this machine can run :func:`build_avx2_shim`'s library, else why not."""
    if platform.system() != 'Linux' or platform.machine().lower() not in ('x86_64', 'amd64'):
        return f'needs Linux on x86-64, got {platform.system()} {platform.machine()}'
    try:
        flags = Path(cpuinfo).read_text()
    except OSError as err:
        return f'cannot read {cpuinfo}: {err}'
    if 'cpuid_fault' not in flags.split():
        return 'the CPU / kernel offer no CPUID faulting (no cpuid_fault flag)'
    if shutil.which(os.environ.get('CC', 'cc')) is None:
        return 'no C compiler (cc) to build the LD_PRELOAD library'
    return None


def build_avx2_shim(out_dir: str | Path | None = None) -> Path:
    """Compile the ``LD_PRELOAD`` library (``cc``) into ``out_dir`` (default: a new temporary
    folder) and return its path.

    Raises:
        RuntimeError: this machine cannot use it (:func:`cpuid_faulting` says why) or the
            compiler failed.
    """
    problem = cpuid_faulting()
    if problem:
        raise RuntimeError(f'AVX2 CPUID shim: {problem}')
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix='avx2shim-'))
    out.mkdir(parents=True, exist_ok=True)
    src, lib = out / 'cpuid_avx2.c', out / 'libcpuid_avx2.so'
    src.write_text(SHIM_SOURCE)
    tmp = lib.with_suffix('.so.tmp')
    done = subprocess.run([os.environ.get('CC', 'cc'), '-O2', '-shared', '-fPIC', '-o',
                           str(tmp), str(src), '-ldl'], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f'AVX2 CPUID shim: cc failed:\n{done.stderr}')
    tmp.replace(lib)
    return lib


def avx2_env(lib: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """A subprocess environment (``base`` or ``os.environ``) with ``lib`` preloaded."""
    env = dict(os.environ if base is None else base)
    env['LD_PRELOAD'] = ':'.join(p for p in (str(lib), env.get('LD_PRELOAD', '')) if p)
    return env


if __name__ == '__main__':   # python -m mmdet_regptq.deploy.onnx.avx2_shim [DIR]: its path
    import sys
    print(build_avx2_shim(sys.argv[1] if len(sys.argv) > 1 else None))
