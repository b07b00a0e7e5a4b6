"""CUDA sources without a GPU: every ``kdengine/csrc/<op>/*.cu`` must compile with nvcc, and the
kd_loss row code must compute the reference's numbers when run on the host.

1. ``test_nvcc_compiles``: one ``nvcc -c`` per ``.cu`` file of the CUDA library (parametrized over
   ``_native.sources("cuda")``, so new files are checked automatically) with the flags of the real
   JIT build (kdengine/_native.py: torch's COMMON_NVCC_FLAGS + _native.CUDA_CFLAGS, torch and
   Python include dirs, the C++ ABI of this torch), for sm_80 and sm_90
   (``KDENGINE_NVCC_ARCHS="80"`` to pick others). Skipped, with the reason, when nvcc is not found.
2. ``csrc/kd_loss/kd_loss_emul.cu`` registers ``kdengine_cuda_emul::kd_loss_kernel`` on CPU: the
   kernel's ``__host__ __device__`` row code and group reduction (kd_loss_rows.cuh) run with
   std::threads as the lanes of a row (the GPU launch's thread counts, strided 16-byte sweeps with
   row heads/tails, warp butterfly, lane-0 broadcast, shared-memory combine). It checks the CUDA
   backend against the float64 reference. What only a GPU can show (the real shuffle/barrier
   instructions, fast-math intrinsics, launch configuration, streams) is left to
   tests/test_kd_gpu.py.

All nvcc runs (the compile checks and the emulation library) start together, once per session, in
the session fixture ``nvcc_builds``; their outputs are cached like the native builds
(``_native.cache_dir()``), keyed by the source, every header under csrc and the flags, so a run
with unchanged sources compiles nothing.

A CPU-only torch wheel lacks some CUDA-build headers (c10/cuda/impl/cuda_cmake_macros.h, and the
cuBLAS/cuSPARSE headers behind ATen/cuda/CUDAContext.h); the sources cope with that (see the top of
kd_loss.cu), so this check works on a CPU torch with a bare CUDA toolkit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import subprocess
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from kdengine import _dispatch, _native, _schemas
from kdengine.ops.kd_loss.config import Divergence, KDConfig, Reduction

CU_FILES = [f for f in _native.sources("cuda") if f.suffix == ".cu"]
EMUL_SRC = _native.CSRC / "kd_loss" / "kd_loss_emul.cu"
NVCC_TIMEOUT_S = 1200  # a 2-core machine shared with other builds can be very slow


def _find_nvcc() -> str | None:
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


NVCC = _find_nvcc()
# nvcc needs about two minutes of a 2-core machine on a cold cache: not in the default run
# (`python -m pytest -m slow` runs it; CI runs both).
pytestmark = pytest.mark.slow
needs_nvcc = pytest.mark.skipif(
    NVCC is None,
    reason="nvcc not found (neither $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc, PATH nor "
    "/usr/local/cuda): the CUDA sources cannot be compile-checked here",
)


def _arch_flags() -> list[str]:
    archs = os.environ.get("KDENGINE_NVCC_ARCHS", "80,90").replace(";", ",").split(",")
    out: list[str] = []
    for a in (x.strip().replace(".", "") for x in archs if x.strip()):
        out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return out


def _common_flags(ext_name: str) -> list[str]:
    """The nvcc flags torch.utils.cpp_extension.load uses for kdengine's .cu files (no arch)."""
    from torch.utils import cpp_extension

    # include_paths() without "cuda": it needs no CUDA_HOME (None on a CPU torch); nvcc adds its
    # own toolkit include dir.
    includes = cpp_extension.include_paths()
    py_include = sysconfig.get_path("include", scheme="posix_prefix")
    flags = [f"-I{_native.CSRC}"]
    for inc in includes + ([py_include] if py_include else []):
        flags += ["-isystem", inc]
    flags += [
        f"-DTORCH_EXTENSION_NAME={ext_name}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "--compiler-options",
        "-fPIC",
        *_native.CUDA_CFLAGS,  # -O3 -std=c++17 --use_fast_math -lineinfo, as the real build
    ]
    return flags


@dataclasses.dataclass(frozen=True)
class NvccResult:
    what: str
    output: Path
    cmd: tuple[str, ...]
    returncode: int
    log: str
    seconds: float  # 0 when the cached output was reused

    def check(self) -> Path:
        assert self.returncode == 0, (
            f"nvcc failed on {self.what} (exit {self.returncode}, {self.seconds:.0f} s)\n"
            f"command: {' '.join(self.cmd)}\n{self.log}"
        )
        assert self.output.is_file() and self.output.stat().st_size > 0, self.output
        return self.output


def _headers_digest() -> bytes:
    h = hashlib.sha1()
    for hdr in sorted(_native.CSRC.rglob("*.h")) + sorted(_native.CSRC.rglob("*.cuh")):
        h.update(hdr.relative_to(_native.CSRC).as_posix().encode())
        h.update(hdr.read_bytes())
    return h.digest()


def _nvcc(what: str, src: Path, out_name: str, args: list[str]) -> NvccResult:
    """``nvcc <args>`` writing ``out_name``, cached in _native.cache_dir() under a key of the
    source, every header and the command (a finished output is renamed into place, so a killed
    run leaves no half-written file behind)."""
    key = hashlib.sha1(src.read_bytes() + _headers_digest()
                       + "\0".join([NVCC, *args]).encode()).hexdigest()[:12]
    out = _native.cache_dir() / f"nvcc_check_{key}" / out_name
    if out.is_file():
        return NvccResult(what, out, (), 0, "", 0.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{os.getpid()}.{out_name}")
    cmd = [NVCC, *args[:1], str(src), "-o", str(tmp), *args[1:]]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return NvccResult(what, out, tuple(cmd), -1, f"ran past {NVCC_TIMEOUT_S} s",
                          time.perf_counter() - t0)
    dt = time.perf_counter() - t0
    if proc.returncode == 0:
        os.replace(tmp, out)
    log = f"--- stderr ---\n{proc.stderr[-30000:]}\n--- stdout ---\n{proc.stdout[-5000:]}"
    return NvccResult(what, out, tuple(cmd), proc.returncode, log, dt)


def _emul_args() -> list[str]:
    torch_lib = str(Path(torch.__file__).parent / "lib")
    flags = [f for f in _common_flags("kdengine_cuda_emul") if f not in ("-O3", "-lineinfo")]
    return ["-shared", *flags,
            "-O1",
            # No kernel is compiled here: one cheap arch is enough.
            "-gencode", "arch=compute_80,code=sm_80",
            f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", "-Xlinker", f"-rpath={torch_lib}"]


@pytest.fixture(scope="session")
def nvcc_builds() -> dict[str, NvccResult]:
    """Every nvcc run of this file, started together once per session: the compile check of each
    library .cu file (key: its name) and the host emulation library (key: "emul")."""
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled here")
    jobs = {cu.name: (f"{cu.parent.name}/{cu.name}", cu, f"{cu.stem}.o",
                      ["-c", *_common_flags("kdengine_cuda_check"), *_arch_flags()])
            for cu in CU_FILES}
    jobs["emul"] = ("kd_loss_emul.cu (host emulation)", EMUL_SRC, "kd_loss_emul.so", _emul_args())
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(_nvcc, *job) for name, job in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
    for r in results.values():
        print(f"nvcc {r.what}: {'cached' if not r.cmd else f'{r.seconds:.1f} s'}")
    return results


# --------------------------------------------------------------------------- 1. compile check


@needs_nvcc
@pytest.mark.parametrize(
    "cu",
    CU_FILES or [pytest.param(None, marks=pytest.mark.skip(reason="no .cu files in csrc"))],
    ids=lambda p: p.name if isinstance(p, Path) else "none",
)
def test_nvcc_compiles(cu: Path, nvcc_builds) -> None:
    nvcc_builds[cu.name].check()


# --------------------------------------------------------------------------- 2. host emulation


@pytest.fixture(scope="module")
def emul(nvcc_builds):
    """torch.ops.kdengine_cuda_emul.kd_loss_kernel: kd_loss.cu's row code, built for the host, with
    the schema of kdengine::kd_loss_kernel (defined from the same string, in its own namespace)."""
    library = nvcc_builds["emul"].check()
    _schemas.define("kdengine_cuda_emul", names=("kd_loss_kernel",))
    torch.ops.load_library(str(library))
    return torch.ops.kdengine_cuda_emul.kd_loss_kernel


_reference = _dispatch.implementation("kd_loss", "reference")


def _call(op, s, t, labels, cfg: KDConfig):
    return op(s, t, labels, cfg.temperature, cfg.scale_t2, int(cfg.divergence), cfg.beta,
              cfg.hard_weight, cfg.ignore_index, cfg.label_smoothing, int(cfg.reduction),
              cfg.need_teacher_grad)


def _logits(shape, scale=3.0, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def _check(op, s, t, labels, cfg, rtol, loss_floor, grad_floor, what=""):
    """Kernel vs float64 reference; the floors are absolute tolerances relative to the largest
    reference value (fp32 gradients of JSD / reverse KL between distant distributions cancel: even
    torch's own fp32 autograd of the reference is off by ~1.5e-5 of the gradient's scale there)."""
    loss, gs, gt = _call(op, s, t, labels, cfg)
    rloss, rgs, rgt = _reference(s.double(), t.double(), labels, cfg)
    f64 = s.dtype == torch.float64
    assert loss.dtype == (torch.float64 if f64 else torch.float32)
    assert loss.shape == ((s.shape[0],) if cfg.reduction == Reduction.NONE else ())
    assert gs.dtype == s.dtype and gs.shape == s.shape

    def close(got, want, floor, name):
        tiny = 1e-13 if f64 else 1e-6  # exact zeros (e.g. V = 1) come out as rounding noise
        atol = floor * max(float(want.abs().max()), 1.0 if name == "loss" else 0.0) + tiny
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{name} {what}: {m}")

    close(loss, rloss, loss_floor, "loss")
    close(gs, rgs, grad_floor, "grad_s")
    if cfg.need_teacher_grad:
        assert gt.dtype == s.dtype and gt.shape == s.shape
        close(gt, rgt, grad_floor, "grad_t")
    else:
        assert gt.numel() == 0
    return loss, gs, gt


SHAPES = [(1, 1), (3, 7), (4, 37), (2, 257), (2, 1500)]  # V*4 % 16 != 0 exercises the row heads


@needs_nvcc
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("divergence", [0, 1, 2], ids=["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5, math.inf], ids=["T1", "T2.5", "Tinf"])
@pytest.mark.parametrize("labels", [False, True], ids=["soft", "labels"])
def test_emulated_rows_match_reference_fp32(emul, shape, divergence, temperature, labels, seed):
    n, v = shape
    s, t = _logits(shape), _logits(shape)
    lab, alpha, eps = None, 0.0, 0.0
    if labels:
        lab = torch.randint(0, v, (n,))
        lab[n // 2] = -100  # an ignored row (the only row when n == 1)
        alpha, eps = 0.3, 0.1
    for red, need_t in [(Reduction.BATCHMEAN, True), (Reduction.NONE, False)]:
        cfg = KDConfig(temperature=temperature, divergence=Divergence(divergence), beta=0.3,
                       hard_weight=alpha, label_smoothing=eps, reduction=red,
                       need_teacher_grad=need_t)
        _check(emul, s, t, lab, cfg, 1e-5, 1e-6, 3e-5, f"seed={seed} {red.name}")


@needs_nvcc
@pytest.mark.parametrize("reduction", list(Reduction), ids=lambda r: r.name)
@pytest.mark.parametrize("temperature", [1.0, 3.0, math.inf], ids=["T1", "T3", "Tinf"])
def test_emulated_reductions_fp64(emul, reduction, temperature, seed):
    s, t = _logits((5, 19), dtype=torch.float64), _logits((5, 19), dtype=torch.float64)
    lab = torch.tensor([3, -1, 18, 0, -1])
    for alpha in (0.0, 0.4, 1.0):  # 1.0: CE only, the teacher is never used
        cfg = KDConfig(temperature=temperature, hard_weight=alpha, ignore_index=-1,
                       label_smoothing=0.05, reduction=reduction, need_teacher_grad=alpha < 1.0,
                       divergence=Divergence.JSD, beta=0.6)
        _check(emul, s, t, lab, cfg, 1e-10, 1e-12, 1e-12, f"alpha={alpha}")


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence", [0, 2], ids=["fkl", "jsd"])
def test_emulated_low_precision_rounded_once(emul, dtype, divergence, seed):
    base = _logits((4, 301), dtype=torch.float64)
    s = base.to(dtype)
    t = (base + 0.02 * torch.randn_like(base)).to(dtype)  # p - q cancels: a bf16 intermediate fails
    cfg = KDConfig(temperature=2.0, divergence=Divergence(divergence), need_teacher_grad=True)
    loss, gs, gt = _call(emul, s, t, None, cfg)
    rloss, rgs, rgt = _reference(s.double(), t.double(), None, cfg)
    fi = torch.finfo(dtype)
    # Rounded once from an fp32 value computed without cancellation: within one ulp of the exact
    # gradient element by element (plus the subnormal spacing), student and teacher alike. Plain
    # fp32 math (torch's autograd of the reference) misses this in ~25% of such draws.
    for got, want in ((gs, rgs), (gt, rgt)):
        assert got.dtype == dtype
        err = (got.double() - want).abs()
        tol = fi.eps * want.abs() + fi.tiny * fi.eps
        assert bool((err <= tol).all()), f"max excess {float((err - tol).max())}"
    assert abs(float(loss) - float(rloss)) <= fi.eps * abs(float(rloss)) + 1e-6


@needs_nvcc
@pytest.mark.parametrize("divergence", [0, 1, 2], ids=["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, math.inf], ids=["T1", "Tinf"])
def test_emulated_extreme_and_masked(emul, divergence, temperature, seed):
    s, t = _logits((3, 45), scale=1e4), _logits((3, 45), scale=1e4)
    mask = torch.rand(3, 45) < 0.3
    mask[:, 0] = False
    s, t = s.masked_fill(mask, -math.inf), t.masked_fill(mask, -math.inf)
    cfg = KDConfig(temperature=temperature, divergence=Divergence(divergence),
                   need_teacher_grad=True)
    loss, gs, gt = _call(emul, s, t, None, cfg)
    rloss, rgs, rgt = _reference(s.double(), t.double(), None, cfg)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert bool((gs[mask] == 0).all()) and bool((gt[mask] == 0).all())
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    # Reverse KL / JSD (and every teacher gradient) cancel terms of size |logit|/T ~ 1e4: fp32
    # rounding of those (eps * 1e4 ~ 1e-3) is the floor of any fp32 implementation.
    floor = 8 * 1.2e-7 * 1e4
    atol = 1e-7 * float(rgs.abs().max()) if divergence == 0 else floor
    torch.testing.assert_close(gs.double(), rgs, rtol=1e-5, atol=atol)
    torch.testing.assert_close(gt.double(), rgt, rtol=1e-5, atol=floor)


@needs_nvcc
def test_emulated_nan_ignore_and_bad_labels(emul):
    s, t = _logits((5, 17)), _logits((5, 17))
    s[1, 5] = float("nan")   # NaN in a kept row -> NaN row
    t[3, 2] = float("nan")
    s[2] = float("nan")      # ... but an ignored row may hold anything
    lab = torch.tensor([4, 1, -100, 0, 16])
    cfg = KDConfig(temperature=2.0, hard_weight=0.5, reduction=Reduction.NONE,
                   need_teacher_grad=True)
    for div in Divergence:
        for temp in (2.0, math.inf):
            c = dataclasses.replace(cfg, divergence=div, temperature=temp)
            rows, gs, gt = _call(emul, s, t, lab, c)
            assert torch.isnan(rows[1]) and torch.isnan(rows[3]), (div, temp, rows)
            assert torch.isfinite(rows[[0, 4]]).all() and rows[2] == 0
            assert bool((gs[2] == 0).all()) and bool((gt[2] == 0).all())
            total, _, _ = _call(emul, s, t, lab, dataclasses.replace(c, reduction=Reduction.SUM))
            assert torch.isnan(total)
    # CE only (alpha = 1): the teacher, NaN or not, is not part of the loss.
    c1 = KDConfig(temperature=2.0, hard_weight=1.0, reduction=Reduction.NONE,
                  need_teacher_grad=True)
    rows, gs, gt = _call(emul, s, t, lab, c1)
    assert torch.isfinite(rows[[0, 3, 4]]).all() and bool((gt == 0).all())
    # Every row ignored: loss 0 (not NaN), zero gradients, for batchmean and mean.
    for red in (Reduction.BATCHMEAN, Reduction.MEAN):
        everyone = torch.full((5,), -100)
        loss, gs, _ = _call(emul, s, t, everyone, dataclasses.replace(cfg, reduction=red))
        assert float(loss) == 0.0 and bool((gs == 0).all())
    # A label outside [0, V) that is not ignore_index: a NaN row, never an out-of-bounds read.
    rows, gs, _ = _call(emul, s[[0, 4]], t[[0, 4]], torch.tensor([2, 17]), cfg)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and torch.isnan(gs[1]).all()


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_emulated_unaligned_inputs(emul, dtype, seed):
    """Inputs whose data pointer is not 16-byte aligned (a storage offset) are copied once."""
    n, v = 3, 40
    s_buf, t_buf = _logits((n * v + 3,), dtype=dtype), _logits((n * v + 1,), dtype=dtype)
    s, t = s_buf[3:].view(n, v), t_buf[1:].view(n, v)
    assert s.is_contiguous() and s.data_ptr() % 16 != 0
    cfg = KDConfig(temperature=1.5, divergence=Divergence.REVERSE_KL, need_teacher_grad=True)
    loss, gs, gt = _call(emul, s, t, None, cfg)
    loss2, gs2, gt2 = _call(emul, s.clone(), t.clone(), None, cfg)
    assert torch.equal(loss, loss2) and torch.equal(gs, gs2) and torch.equal(gt, gt2)
    rloss, _, _ = _reference(s.double(), t.double(), None, cfg)
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-6)


@needs_nvcc
def test_emulated_high_temperature_limit(emul, seed):
    """T^2 KL at T = 1e4 is within O(1/T) of the T = inf branch: the two branches agree."""
    s, t = _logits((3, 13), dtype=torch.float64), _logits((3, 13), dtype=torch.float64)
    lim = _call(emul, s, t, None, KDConfig(temperature=math.inf))
    far = _call(emul, s, t, None, KDConfig(temperature=1e4))
    assert abs(float(lim[0]) - float(far[0])) < 1e-3 * abs(float(lim[0]))
    assert float((lim[1] - far[1]).abs().max()) < 1e-3 * float(lim[1].abs().max())
