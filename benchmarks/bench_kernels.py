"""Time every randygpt kernel against its NumPy reference on the model's real shapes.

Usage:
    python benchmarks/bench_kernels.py [--threads N] [--repeat R] [--json] [--only NAME,...]
                                       [--quick]

    --threads N   threads for randygpt's kernels and NumPy's BLAS alike (default: one per physical core)
    --repeat R    timed samples per kernel; the median is reported (default 7)
    --json        print one JSON document instead of the table
    --only LIST   comma-separated kernel families or names, e.g. matmul,rmsnorm,adamw_step
    --quick       tiny shapes and one sample: a smoke test, not a measurement

Shapes are the default model's (B=32, T=64, C=256, 8 heads, MLP 1024, vocab 67, P=4,769,280).
Each kernel's output is checked against its reference (randygpt._kernels._ref_<family>) before
it is timed: a wrong result prints FAIL and the script exits with status 1. Ours and the
reference are warmed up and sampled in turn, and medians are reported. Every GEMM of a
training step (forward NT, input-gradient NN and weight-gradient TN of qkv, wo, fc1, fc2 and
lm_head) is also compared with NumPy's own `@` on the same product, at the same thread count,
and timed again at one thread for the "matmul 1->N thread scaling" line.

Rows are printed as they are measured; Ctrl-C stops the run, prints the summary of the rows
measured so far and exits with status 130. The header says which kernels NumPy's BLAS runs
(and warns when OPENBLAS_CORETYPE or OPENBLAS_L2_SIZE overrides its choice) and the cores' peak
FMA rate at the thread count, measured now (benchmarks/_fma_peak.py); "% peak" is a row's
GFLOP/s against it. The matmul_bf16 rows are the step's GEMMs with precision="bf16" (checked
against float64 sums of the bf16-rounded operands); their % peak is against vdpbf16ps's peak,
measured in the same run, where the bf16 path is native (the FMA peak where it is emulated).

Targets (the PASS/MISS column): every matmul >= 0.8x NumPy `@`; every fused kernel (attention,
norms, cross-entropy, AdamW, grad norm, dropout, squared ReLU) >= 3x its NumPy reference;
embedding forward >= 1x its reference; matmul at 2 threads >= 1.7x one thread (0.85x N for N).
Kernel families that are not built are listed as skipped.
"""
import argparse
import importlib
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
from threadpoolctl import threadpool_limits

from _common import (SPIN_SETTLE_S, StreamTable, dump_json, fmt, fmt_ratio, format_machine,
                     machine_info, time_interleaved)
from _fma_peak import (available_bf16_isas as fma_peak_bf16_isas, available_isas as fma_peak_isas,
                       fma_peak_gflops)
import randygpt  # noqa: E402  (after _common, which puts the checkout on sys.path)

FAMILIES = ("matmul", "attention", "norm", "activation", "xent", "embedding", "adamw")

# Thresholds of the PASS/MISS column (see the module docstring).
MATMUL_VS_NUMPY = 0.8
FUSED_VS_REF = 3.0
EMBEDDING_VS_REF = 1.0
SCALING_PER_THREAD = 0.85  # 1.7x at 2 threads

EPS = 1e-5
DROPOUT_P = 0.1
SEED = 1337


@dataclass(frozen=True)
class Dims:
    """The sizes every kernel is measured at (letters as in docs/kernels.md)."""
    B: int
    T: int
    C: int
    NH: int
    H: int
    V: int
    P: int

    @property
    def N(self):
        return self.B * self.T


REAL = Dims(B=32, T=64, C=256, NH=8, H=1024, V=67, P=4_769_280)
QUICK = Dims(B=2, T=8, C=32, NH=4, H=128, V=67, P=20_000)


@dataclass
class Trial:
    """Callables for one measurement, each on its own copy of the buffers.

    ours_out / ref_out are the arrays each side fills; they are compared (together with
    the return values) after one call of each on the freshly built buffers.
    """
    ours: Callable
    ref: Callable
    ours_out: tuple
    ref_out: tuple
    numpy_matmul: Optional[Callable] = None


@dataclass
class Case:
    family: str
    name: str
    direction: str
    shape: str
    build: Callable  # (kernel module, reference module, rng, n_threads) -> Trial
    flops: Optional[float] = None
    target: Optional[tuple] = None  # ("ref", x): speedup >= x; ("@", x): vs NumPy @ >= x
    gemm: bool = False  # one of the step's GEMMs, summed for the thread-scaling line
    bf16: bool = False  # precision="bf16": % peak against the bf16 path's own peak

    @property
    def label(self):
        return f"{self.name} {self.direction}"


def _randn(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _twins(**arrays):
    """Two independent copies of the named arrays: one for our kernel, one for the reference."""
    return ({k: v.copy() for k, v in arrays.items()}, {k: v.copy() for k, v in arrays.items()})


# --- matmul ---------------------------------------------------------------------------------

def _linear_products(d):
    """(name, in_features, out_features) of every linear layer; wq/wk/wv run as one qkv GEMM."""
    return [("qkv", d.C, 3 * d.C), ("wo", d.C, d.C), ("fc1", d.C, d.H), ("fc2", d.H, d.C),
            ("lm_head", d.C, d.V)]


def _gemm_forward(d, IC, OC, precision="fp32"):
    # bf16: the reference sums the bf16-rounded operands in float64
    def build(K, R, rng, n):
        x, w = _randn(rng, d.N, IC), _randn(rng, OC, IC)
        a, b = _twins(out=np.empty((d.N, OC), np.float32))
        c = np.empty((d.N, OC), np.float32)
        return Trial(
            ours=lambda: K.matmul_forward(a["out"], x, w, n, precision=precision),
            ref=(lambda: R.matmul_forward_ref(b["out"], x, w)) if precision == "fp32" else
                (lambda: R.gemm_bf16_ref(b["out"], x, w, False, True, False)),
            ours_out=(a["out"],), ref_out=(b["out"],),
            numpy_matmul=lambda: np.matmul(x, w.T, out=c))
    return build


def _gemm_input_grad(d, IC, OC, precision="fp32"):
    def build(K, R, rng, n):
        dout, x, w = _randn(rng, d.N, OC), _randn(rng, d.N, IC), _randn(rng, OC, IC)
        a, b = _twins(dx=np.zeros((d.N, IC), np.float32))
        c = np.empty((d.N, IC), np.float32)
        return Trial(
            ours=lambda: K.matmul_backward(a["dx"], None, dout, x, w, n, precision=precision),
            ref=(lambda: R.matmul_backward_ref(b["dx"], None, dout, x, w)) if precision == "fp32"
                else (lambda: R.gemm_bf16_ref(b["dx"], dout, w, False, False, True)),
            ours_out=(a["dx"],), ref_out=(b["dx"],),
            numpy_matmul=lambda: np.matmul(dout, w, out=c))
    return build


def _gemm_weight_grad(d, IC, OC, precision="fp32"):
    def build(K, R, rng, n):
        dout, x, w = _randn(rng, d.N, OC), _randn(rng, d.N, IC), _randn(rng, OC, IC)
        a, b = _twins(dw=np.zeros((OC, IC), np.float32))
        c = np.empty((OC, IC), np.float32)
        return Trial(
            ours=lambda: K.matmul_backward(None, a["dw"], dout, x, w, n, precision=precision),
            ref=(lambda: R.matmul_backward_ref(None, b["dw"], dout, x, w)) if precision == "fp32"
                else (lambda: R.gemm_bf16_ref(b["dw"], dout, x, True, False, True)),
            ours_out=(a["dw"],), ref_out=(b["dw"],),
            numpy_matmul=lambda: np.matmul(dout.T, x, out=c))
    return build


def _matmul_sqrelu(d):
    def build(K, R, rng, n):
        x, w = _randn(rng, d.N, d.C), _randn(rng, d.H, d.C)
        a, b = _twins(out=np.empty((d.N, d.H), np.float32), pre=np.empty((d.N, d.H), np.float32))
        c = np.empty((d.N, d.H), np.float32)
        return Trial(
            ours=lambda: K.matmul_sqrelu_forward(a["out"], a["pre"], x, w, n),
            ref=lambda: R.matmul_sqrelu_forward_ref(b["out"], b["pre"], x, w),
            ours_out=(a["out"], a["pre"]), ref_out=(b["out"], b["pre"]),
            numpy_matmul=lambda: np.matmul(x, w.T, out=c))
    return build


def _matmul_sqrelu_backward(d):
    """fc2's two gradients from fc1's pre-activation: NumPy's `@` does the same two products
    (dW and dX) on relu(pre)^2 made beforehand, so "vs @" leaves out the squaring passes."""
    def build(K, R, rng, n):
        pre, dout, w = _randn(rng, d.N, d.H), _randn(rng, d.N, d.C), _randn(rng, d.C, d.H)
        a, b = _twins(dpre=np.empty((d.N, d.H), np.float32), dw=np.zeros((d.C, d.H), np.float32))
        act = np.square(np.maximum(pre, 0))
        c_dw, c_dx = np.empty((d.C, d.H), np.float32), np.empty((d.N, d.H), np.float32)

        def numpy_matmul():
            np.matmul(dout.T, act, out=c_dw)
            np.matmul(dout, w, out=c_dx)
        return Trial(
            ours=lambda: K.matmul_sqrelu_backward(a["dpre"], a["dw"], dout, pre, w, n),
            ref=lambda: R.matmul_sqrelu_backward_ref(b["dpre"], b["dw"], dout, pre, w),
            ours_out=(a["dpre"], a["dw"]), ref_out=(b["dpre"], b["dw"]),
            numpy_matmul=numpy_matmul)
    return build


# A --tokenizer bpe model's vocabularies: its lm_head is then the step's largest GEMM.
BPE_VOCABS = (2048, 8192)


def _bpe_lm_head_cases(d):
    """lm_head's three GEMMs at each BPE vocabulary (not in the default step's GEMM sum)."""
    cases = []
    for V in BPE_VOCABS:
        flops = 2.0 * d.N * d.C * V
        for direction, shape, build in (("fwd", f"NT {d.N}x{d.C}x{V}", _gemm_forward),
                                        ("bwd dX", f"NN {d.N}x{V}x{d.C}", _gemm_input_grad),
                                        ("bwd dW", f"TN {V}x{d.N}x{d.C}", _gemm_weight_grad)):
            cases.append(Case("matmul", f"matmul lm_head V={V}", direction, shape,
                              build(d, d.C, V), flops, ("@", MATMUL_VS_NUMPY)))
    return cases


def matmul_cases(d):
    at_least = ("@", MATMUL_VS_NUMPY)
    cases = []
    for name, IC, OC in _linear_products(d):
        flops = 2.0 * d.N * IC * OC
        cases += [
            Case("matmul", f"matmul {name}", "fwd", f"NT {d.N}x{IC}x{OC}",
                 _gemm_forward(d, IC, OC), flops, at_least, gemm=True),
            Case("matmul", f"matmul {name}", "bwd dX", f"NN {d.N}x{OC}x{IC}",
                 _gemm_input_grad(d, IC, OC), flops, at_least, gemm=True),
            Case("matmul", f"matmul {name}", "bwd dW", f"TN {OC}x{d.N}x{IC}",
                 _gemm_weight_grad(d, IC, OC), flops, at_least, gemm=True),
        ]
    cases += _bpe_lm_head_cases(d)
    cases.append(Case("matmul", "matmul_sqrelu fc1", "fwd", f"NT {d.N}x{d.C}x{d.H}",
                      _matmul_sqrelu(d), 2.0 * d.N * d.C * d.H, at_least))
    cases.append(Case("matmul", "matmul_sqrelu fc2", "bwd", f"TN+NN {d.N}x{d.H}x{d.C}",
                      _matmul_sqrelu_backward(d), 4.0 * d.N * d.C * d.H, at_least))
    # The same GEMMs with precision="bf16" ("vs @" is against NumPy's fp32 product).
    for name, IC, OC in _linear_products(d):
        flops = 2.0 * d.N * IC * OC
        cases += [
            Case("matmul", f"matmul_bf16 {name}", "fwd", f"NT {d.N}x{IC}x{OC}",
                 _gemm_forward(d, IC, OC, "bf16"), flops, bf16=True),
            Case("matmul", f"matmul_bf16 {name}", "bwd dX", f"NN {d.N}x{OC}x{IC}",
                 _gemm_input_grad(d, IC, OC, "bf16"), flops, bf16=True),
            Case("matmul", f"matmul_bf16 {name}", "bwd dW", f"TN {OC}x{d.N}x{IC}",
                 _gemm_weight_grad(d, IC, OC, "bf16"), flops, bf16=True),
        ]
    return cases


# --- attention ------------------------------------------------------------------------------

def attention_cases(d):
    HS = d.C // d.NH
    # Causal attention scores only pairs j <= i: T(T+1)/2 per (batch, head).
    pairs = d.B * d.NH * d.T * (d.T + 1) / 2
    shape = f"B{d.B} T{d.T} C{d.C} NH{d.NH}"

    def forward(K, R, rng, n):
        qkv = _randn(rng, d.B, d.T, 3 * d.C)
        a, b = _twins(out=np.empty((d.B, d.T, d.C), np.float32),
                      att=np.empty((d.B, d.NH, d.T, d.T), np.float32))
        return Trial(
            ours=lambda: K.attention_forward(a["out"], a["att"], qkv, d.NH, n),
            ref=lambda: R.attention_forward_ref(b["out"], b["att"], qkv, d.NH),
            ours_out=(a["out"], a["att"]), ref_out=(b["out"], b["att"]))

    def backward(K, R, rng, n):
        qkv, dout = _randn(rng, d.B, d.T, 3 * d.C), _randn(rng, d.B, d.T, d.C)
        att = np.empty((d.B, d.NH, d.T, d.T), np.float32)
        R.attention_forward_ref(np.empty((d.B, d.T, d.C), np.float32), att, qkv, d.NH)
        a, b = _twins(dqkv=np.zeros((d.B, d.T, 3 * d.C), np.float32))
        return Trial(
            ours=lambda: K.attention_backward(a["dqkv"], dout, qkv, att, d.NH, n),
            ref=lambda: R.attention_backward_ref(b["dqkv"], dout, qkv, att, d.NH),
            ours_out=(a["dqkv"],), ref_out=(b["dqkv"],))

    def forward_unsaved(K, R, rng, n):
        # Training's form: the probabilities stay in per-thread scratch, none are written.
        qkv = _randn(rng, d.B, d.T, 3 * d.C)
        a, b = _twins(out=np.empty((d.B, d.T, d.C), np.float32))
        return Trial(
            ours=lambda: K.attention_forward(a["out"], None, qkv, d.NH, n),
            ref=lambda: R.attention_forward_ref(b["out"], None, qkv, d.NH),
            ours_out=(a["out"],), ref_out=(b["out"],))

    def backward_recompute(K, R, rng, n):
        # Training's form: no saved probabilities (recomputed from q and k), the gradient
        # written rather than accumulated, and the forward's output handed back.
        qkv, dout = _randn(rng, d.B, d.T, 3 * d.C), _randn(rng, d.B, d.T, d.C)
        a, b = _twins(dqkv=np.empty((d.B, d.T, 3 * d.C), np.float32),
                      out=np.empty((d.B, d.T, d.C), np.float32))
        return Trial(
            ours=lambda: K.attention_backward(a["dqkv"], dout, qkv, None, d.NH, n,
                                              accumulate=False, out=a["out"]),
            ref=lambda: R.attention_backward_ref(b["dqkv"], dout, qkv, None, d.NH,
                                                 accumulate=False, out=b["out"]),
            ours_out=(a["dqkv"], a["out"]), ref_out=(b["dqkv"], b["out"]))

    fused = ("ref", FUSED_VS_REF)
    # Forward: q.k and att.v, 2*HS flops each per pair; backward: four such products, plus
    # the forward's two when it recomputes the probabilities and the output.
    return [Case("attention", "attention", "fwd", shape, forward, 4 * HS * pairs, fused),
            Case("attention", "attention", "bwd", shape, backward, 8 * HS * pairs, fused),
            Case("attention", "attention", "fwd att=None", shape, forward_unsaved,
                 4 * HS * pairs, fused),
            Case("attention", "attention", "bwd recompute", shape, backward_recompute,
                 12 * HS * pairs, fused)]


# --- norm -----------------------------------------------------------------------------------

def norm_cases(d):
    shape = f"{d.N}x{d.C}"

    def rms_forward(K, R, rng, n):
        x = _randn(rng, d.N, d.C)
        a, b = _twins(out=np.empty((d.N, d.C), np.float32), rstd=np.empty(d.N, np.float32))
        return Trial(
            ours=lambda: K.rmsnorm_forward(a["out"], a["rstd"], x, EPS, n),
            ref=lambda: R.rmsnorm_forward_ref(b["out"], b["rstd"], x, EPS),
            ours_out=(a["out"], a["rstd"]), ref_out=(b["out"], b["rstd"]))

    def rms_backward(K, R, rng, n):
        x, dout = _randn(rng, d.N, d.C), _randn(rng, d.N, d.C)
        rstd = np.empty(d.N, np.float32)
        R.rmsnorm_forward_ref(np.empty_like(x), rstd, x, EPS)
        a, b = _twins(dx=np.zeros((d.N, d.C), np.float32))
        return Trial(
            ours=lambda: K.rmsnorm_backward(a["dx"], dout, x, rstd, n),
            ref=lambda: R.rmsnorm_backward_ref(b["dx"], dout, x, rstd),
            ours_out=(a["dx"],), ref_out=(b["dx"],))

    def ln_forward(K, R, rng, n):
        x, weight, bias = _randn(rng, d.N, d.C), _randn(rng, d.C), _randn(rng, d.C)
        a, b = _twins(out=np.empty((d.N, d.C), np.float32), mean=np.empty(d.N, np.float32),
                      rstd=np.empty(d.N, np.float32))
        return Trial(
            ours=lambda: K.layernorm_forward(a["out"], a["mean"], a["rstd"], x, weight, bias,
                                             EPS, n),
            ref=lambda: R.layernorm_forward_ref(b["out"], b["mean"], b["rstd"], x, weight, bias,
                                                EPS),
            ours_out=(a["out"], a["mean"], a["rstd"]), ref_out=(b["out"], b["mean"], b["rstd"]))

    def ln_backward(K, R, rng, n):
        x, dout, weight = _randn(rng, d.N, d.C), _randn(rng, d.N, d.C), _randn(rng, d.C)
        mean, rstd = np.empty(d.N, np.float32), np.empty(d.N, np.float32)
        R.layernorm_forward_ref(np.empty_like(x), mean, rstd, x, weight, _randn(rng, d.C), EPS)
        a, b = _twins(dx=np.zeros((d.N, d.C), np.float32), dweight=np.zeros(d.C, np.float32),
                      dbias=np.zeros(d.C, np.float32))
        return Trial(
            ours=lambda: K.layernorm_backward(a["dx"], a["dweight"], a["dbias"], dout, x, mean,
                                              rstd, weight, n),
            ref=lambda: R.layernorm_backward_ref(b["dx"], b["dweight"], b["dbias"], dout, x,
                                                 mean, rstd, weight),
            ours_out=(a["dx"], a["dweight"], a["dbias"]),
            ref_out=(b["dx"], b["dweight"], b["dbias"]))

    fused = ("ref", FUSED_VS_REF)
    return [Case("norm", "rmsnorm", "fwd", shape, rms_forward, target=fused),
            Case("norm", "rmsnorm", "bwd", shape, rms_backward, target=fused),
            Case("norm", "layernorm", "fwd", shape, ln_forward, target=fused),
            Case("norm", "layernorm", "bwd", shape, ln_backward, target=fused)]


# --- activation -----------------------------------------------------------------------------

def activation_cases(d):
    # Dropout coordinates: (seed, step, layer, site), as the model passes them.
    coords = (SEED, 1, 0, 0)

    def sqrelu_forward(K, R, rng, n):
        x = _randn(rng, d.N, d.H)
        a, b = _twins(out=np.empty((d.N, d.H), np.float32))
        return Trial(
            ours=lambda: K.squared_relu_forward(a["out"], x, n),
            ref=lambda: R.squared_relu_forward_ref(b["out"], x),
            ours_out=(a["out"],), ref_out=(b["out"],))

    def sqrelu_backward(K, R, rng, n):
        x, dout = _randn(rng, d.N, d.H), _randn(rng, d.N, d.H)
        a, b = _twins(dx=np.zeros((d.N, d.H), np.float32))
        return Trial(
            ours=lambda: K.squared_relu_backward(a["dx"], dout, x, n),
            ref=lambda: R.squared_relu_backward_ref(b["dx"], dout, x),
            ours_out=(a["dx"],), ref_out=(b["dx"],))

    def sqrelu_backward_inplace(K, R, rng, n):
        # Each call overwrites d with its gradient, so the timed calls compound the factor
        # 2 relu(x): any value other than 0 or 1 would drive d to inf or to (slow) denormals
        # over a sample's calls. x = +-0.5 keeps the factor 1 or 0, and still half the
        # elements take each branch.
        x = np.where(rng.random((d.N, d.H)) < 0.5, -0.5, 0.5).astype(np.float32)
        a, b = _twins(d=_randn(rng, d.N, d.H))
        return Trial(
            ours=lambda: K.squared_relu_backward_inplace(a["d"], x, n),
            ref=lambda: R.squared_relu_backward_inplace_ref(b["d"], x),
            ours_out=(a["d"],), ref_out=(b["d"],))

    def dropout_forward(K, R, rng, n):
        x = _randn(rng, d.N, d.C)
        a, b = _twins(out=np.empty((d.N, d.C), np.float32))
        return Trial(
            ours=lambda: K.dropout_forward(a["out"], x, DROPOUT_P, *coords, n),
            ref=lambda: R.dropout_forward_ref(b["out"], x, DROPOUT_P, *coords),
            ours_out=(a["out"],), ref_out=(b["out"],))

    def dropout_backward(K, R, rng, n):
        dout = _randn(rng, d.N, d.C)
        a, b = _twins(dx=np.zeros((d.N, d.C), np.float32))
        return Trial(
            ours=lambda: K.dropout_backward(a["dx"], dout, DROPOUT_P, *coords, n),
            ref=lambda: R.dropout_backward_ref(b["dx"], dout, DROPOUT_P, *coords),
            ours_out=(a["dx"],), ref_out=(b["dx"],))

    def dropout_add(K, R, rng, n):
        x = _randn(rng, d.N, d.C)
        a, b = _twins(resid=_randn(rng, d.N, d.C))
        return Trial(
            ours=lambda: K.dropout_add_forward(a["resid"], x, DROPOUT_P, *coords, n),
            ref=lambda: R.dropout_add_forward_ref(b["resid"], x, DROPOUT_P, *coords),
            ours_out=(a["resid"],), ref_out=(b["resid"],))

    def dropout_add_to(K, R, rng, n):
        resid, x = _randn(rng, d.N, d.C), _randn(rng, d.N, d.C)
        a, b = _twins(out=np.empty((d.N, d.C), np.float32))
        return Trial(
            ours=lambda: K.dropout_add_to_forward(a["out"], resid, x, DROPOUT_P, *coords, n),
            ref=lambda: R.dropout_add_to_forward_ref(b["out"], resid, x, DROPOUT_P, *coords),
            ours_out=(a["out"],), ref_out=(b["out"],))

    fused = ("ref", FUSED_VS_REF)
    hidden, width = f"{d.N}x{d.H}", f"{d.N}x{d.C} p={DROPOUT_P}"
    return [Case("activation", "squared_relu", "fwd", hidden, sqrelu_forward, target=fused),
            Case("activation", "squared_relu", "bwd", hidden, sqrelu_backward, target=fused),
            Case("activation", "squared_relu", "bwd inplace", hidden, sqrelu_backward_inplace,
                 target=fused),
            Case("activation", "dropout", "fwd", width, dropout_forward, target=fused),
            Case("activation", "dropout", "bwd", width, dropout_backward, target=fused),
            Case("activation", "dropout_add", "fwd", width, dropout_add, target=fused),
            Case("activation", "dropout_add_to", "fwd", width, dropout_add_to, target=fused)]


# --- cross-entropy --------------------------------------------------------------------------

def xent_cases(d):
    def inputs(rng):
        return _randn(rng, d.N, d.V), rng.integers(0, d.V, d.N, dtype=np.int32)

    def forward(K, R, rng, n):
        logits, targets = inputs(rng)
        a, b = _twins(losses=np.empty(d.N, np.float32))
        return Trial(
            ours=lambda: K.cross_entropy_forward(a["losses"], logits, targets, n),
            ref=lambda: R.cross_entropy_forward_ref(b["losses"], logits, targets),
            ours_out=(a["losses"],), ref_out=(b["losses"],))

    def backward(K, R, rng, n):
        logits, targets = inputs(rng)
        a, b = _twins(dlogits=np.zeros((d.N, d.V), np.float32))
        return Trial(
            ours=lambda: K.cross_entropy_backward(a["dlogits"], logits, targets, 1.0, n),
            ref=lambda: R.cross_entropy_backward_ref(b["dlogits"], logits, targets, 1.0),
            ours_out=(a["dlogits"],), ref_out=(b["dlogits"],))

    def fused_pass(K, R, rng, n):
        logits, targets = inputs(rng)
        a, b = _twins(dlogits=np.empty((d.N, d.V), np.float32))
        return Trial(
            ours=lambda: K.cross_entropy_forward_backward(a["dlogits"], logits, targets, n),
            ref=lambda: R.cross_entropy_forward_backward_ref(b["dlogits"], logits, targets),
            ours_out=(a["dlogits"],), ref_out=(b["dlogits"],))

    fused = ("ref", FUSED_VS_REF)
    shape = f"{d.N}x{d.V}"
    return [Case("xent", "cross_entropy", "fwd", shape, forward, target=fused),
            Case("xent", "cross_entropy", "bwd", shape, backward, target=fused),
            Case("xent", "cross_entropy", "fwd+bwd", shape, fused_pass, target=fused)]


# --- embedding ------------------------------------------------------------------------------

def embedding_cases(d):
    def forward(K, R, rng, n):
        idx = rng.integers(0, d.V, (d.B, d.T), dtype=np.int32)
        wte, wpe = _randn(rng, d.V, d.C), _randn(rng, d.T, d.C)
        a, b = _twins(out=np.empty((d.B, d.T, d.C), np.float32))
        return Trial(
            ours=lambda: K.embedding_forward(a["out"], idx, wte, wpe, n),
            ref=lambda: R.embedding_forward_ref(b["out"], idx, wte, wpe),
            ours_out=(a["out"],), ref_out=(b["out"],))

    def backward(K, R, rng, n):
        idx = rng.integers(0, d.V, (d.B, d.T), dtype=np.int32)
        dout = _randn(rng, d.B, d.T, d.C)
        a, b = _twins(dwte=np.zeros((d.V, d.C), np.float32), dwpe=np.zeros((d.T, d.C), np.float32))
        return Trial(
            ours=lambda: K.embedding_backward(a["dwte"], a["dwpe"], dout, idx, n),
            ref=lambda: R.embedding_backward_ref(b["dwte"], b["dwpe"], dout, idx),
            ours_out=(a["dwte"], a["dwpe"]), ref_out=(b["dwte"], b["dwpe"]))

    shape = f"B{d.B} T{d.T} C{d.C} V{d.V}"
    # The brief sets no target for the backward scatter-add: NumPy's np.add.at is no yardstick.
    return [Case("embedding", "embedding", "fwd", shape, forward,
                 target=("ref", EMBEDDING_VS_REF)),
            Case("embedding", "embedding", "bwd", shape, backward)]


# --- optimizer ------------------------------------------------------------------------------

def adamw_cases(d):
    def norm(K, R, rng, n):
        g = _randn(rng, d.P)
        return Trial(ours=lambda: K.grad_norm(g, n), ref=lambda: R.grad_norm_ref(g),
                     ours_out=(), ref_out=())

    def step(K, R, rng, n):
        grads = _randn(rng, d.P)
        a, b = _twins(params=_randn(rng, d.P), m=0.1 * _randn(rng, d.P),
                      v=np.abs(0.01 * _randn(rng, d.P)))
        hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01, 10, 0.5)  # lr, betas, eps, decay, step t, scale
        return Trial(
            ours=lambda: K.adamw_step(a["params"], grads, a["m"], a["v"], True, *hyper, n),
            ref=lambda: R.adamw_step_ref(b["params"], grads, b["m"], b["v"], True, *hyper),
            ours_out=(a["params"], a["m"], a["v"]), ref_out=(b["params"], b["m"], b["v"]))

    fused = ("ref", FUSED_VS_REF)
    return [Case("adamw", "grad_norm", "step", f"P={d.P:,}", norm, target=fused),
            Case("adamw", "adamw_step", "step", f"P={d.P:,}", step, target=fused)]


def all_cases(d):
    return (matmul_cases(d) + attention_cases(d) + norm_cases(d) + activation_cases(d)
            + xent_cases(d) + embedding_cases(d) + adamw_cases(d))


# --- running --------------------------------------------------------------------------------

def load_families(wanted):
    """({family: (kernel module, reference module)} of those built, {family: why} of the rest)."""
    loaded, skipped = {}, {}
    for family in wanted:
        try:
            kernels = importlib.import_module(f"randygpt._kernels.{family}")
        except ImportError as e:
            skipped[family] = f"not built ({e})"
            continue
        try:
            reference = importlib.import_module(f"randygpt._kernels._ref_{family}")
        except ImportError as e:
            skipped[family] = f"no NumPy reference ({e})"
            continue
        loaded[family] = (kernels, reference)
    return loaded, skipped


def compare(ours, ref, rtol=1e-4):
    """None if ours matches ref, else a one-line description of the worst mismatch.

    The absolute tolerance scales with the largest reference value: float32 sums over
    thousands of terms (GEMM, grad norm) lose bits in a different order than NumPy's.
    """
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return f"shape {ours.shape} != reference {ref.shape}"
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    atol = 1e-5 * max(1.0, scale)
    err = np.abs(ours - ref)
    bad = ~(err <= atol + rtol * np.abs(ref))
    if not bad.any():
        return None
    i = tuple(int(k) for k in np.unravel_index(np.argmax(np.where(bad, err, -1.0)), err.shape))
    return (f"{int(bad.sum())} of {err.size} values differ, max abs diff {np.nanmax(err):.3e}, "
            f"worst at {i}: {float(ours[i]):.6g} vs reference {float(ref[i]):.6g}")


def check(trial):
    """Run ours and the reference once each on fresh buffers; None if they agree."""
    got, want = trial.ours(), trial.ref()
    if (got is None) != (want is None):
        return f"return value {got!r} vs reference {want!r}"
    pairs = list(zip(trial.ours_out, trial.ref_out))
    if got is not None:
        pairs.append((got, want))
    for k, (o, r) in enumerate(pairs):
        problem = compare(o, r)
        if problem:
            return f"output {k}: {problem}"
    return None


def run_case(case, kernels, reference, n_threads, repeat, rng, settle_s):
    """Check then time one case; returns its result row as a dict."""
    row = {"kernel": case.name, "direction": case.direction, "shape": case.shape,
           "family": case.family, "threads": n_threads, "gemm": case.gemm,
           "ours_ms": None, "ref_ms": None, "speedup": None, "gflops": None,
           "numpy_matmul_ms": None, "vs_numpy_matmul": None, "target": None, "status": "-",
           "error": None}
    try:
        trial = case.build(kernels, reference, rng, n_threads)
        problem = check(trial)
    except Exception as e:  # a wrong signature or a raising kernel is a failure, not a crash
        problem = f"{type(e).__name__}: {e}"
    if problem:
        row["status"], row["error"] = "FAIL", problem
        return row, None
    fns = [trial.ours, trial.ref] + ([trial.numpy_matmul] if trial.numpy_matmul else [])
    times = time_interleaved(fns, repeat, settle_s)
    row["ours_ms"], row["ref_ms"] = times[0] * 1e3, times[1] * 1e3
    row["speedup"] = times[1] / times[0]
    if case.flops:
        row["gflops"] = case.flops / times[0] / 1e9
    if trial.numpy_matmul:
        row["numpy_matmul_ms"] = times[2] * 1e3
        row["vs_numpy_matmul"] = times[2] / times[0]
    if case.target:
        kind, threshold = case.target
        value = row["speedup"] if kind == "ref" else row["vs_numpy_matmul"]
        row["target"] = f">= {threshold:g}x {'ref' if kind == 'ref' else 'NumPy @'}"
        row["status"] = "PASS" if value >= threshold else "MISS"
    return row, trial


def gemm_scaling(gemm_trials, rows, n_threads, repeat):
    """Time the step's GEMMs again at one thread; the sums give the 1 -> N scaling."""
    if n_threads == 1 or not gemm_trials:
        return None
    ours_1 = numpy_1 = 0.0
    randygpt.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            for build_one_thread in gemm_trials:
                trial = build_one_thread()
                t_ours, t_numpy = time_interleaved([trial.ours, trial.numpy_matmul], repeat)
                ours_1 += t_ours
                numpy_1 += t_numpy
    finally:
        randygpt.set_num_threads(n_threads)
    ours_n = sum(r["ours_ms"] for r in rows if r["gemm"] and r["ours_ms"]) / 1e3
    numpy_n = sum(r["numpy_matmul_ms"] for r in rows if r["gemm"] and r["ours_ms"]) / 1e3
    threshold = SCALING_PER_THREAD * n_threads
    scaling = ours_1 / ours_n
    return {"threads": n_threads, "gemms": len(gemm_trials),
            "ours_1_ms": ours_1 * 1e3, "ours_n_ms": ours_n * 1e3, "ours_scaling": scaling,
            "numpy_1_ms": numpy_1 * 1e3, "numpy_n_ms": numpy_n * 1e3,
            "numpy_scaling": numpy_1 / numpy_n, "target": f">= {threshold:.2f}x",
            "status": "PASS" if scaling >= threshold else "MISS"}


def select(cases, only):
    """Cases whose family, name or name+direction is listed in `only` (None keeps all)."""
    if not only:
        return cases
    wanted = {s.strip() for s in only.split(",") if s.strip()}
    known = {c.family for c in cases} | {c.name for c in cases} | {c.label for c in cases}
    unknown = sorted(wanted - known)
    if unknown:
        names = ", ".join(sorted({c.family for c in cases} | {c.name for c in cases}))
        raise ValueError(f"--only: unknown kernel(s) {', '.join(unknown)}; choose from {names}")
    return [c for c in cases if wanted & {c.family, c.name, c.label}]


HEADERS = ["kernel", "dir", "shape", "ours ms", "ref ms", "speedup", "GFLOP/s", "% peak",
           "@ ms", "vs @", "target", "status"]
NUMERIC = [False, False, False, True, True, True, True, True, True, True, False, False]


def row_cells(r):
    return [r["kernel"], r["direction"], r["shape"], fmt(r["ours_ms"], ".3f"),
            fmt(r["ref_ms"], ".3f"), fmt_ratio(r["speedup"]), fmt(r["gflops"], ".1f"),
            fmt(r["share_of_fma_peak"] and 100 * r["share_of_fma_peak"], ".0f"),
            fmt(r["numpy_matmul_ms"], ".3f"), fmt_ratio(r["vs_numpy_matmul"]),
            r["target"] or "-", r["status"]]


def result_table(cases):
    """The table the rows of `cases` will be printed in, one at a time: text columns as wide
    as their longest value, number columns as wide as the largest value they show."""
    texts = [[c.name for c in cases], [c.direction for c in cases], [c.shape for c in cases]]
    widths = [max(map(len, col), default=0) for col in texts] + [9, 9, 8, 8, 6, 9, 7, 16, 6]
    return StreamTable(HEADERS, widths, NUMERIC)


def print_header(doc):
    print(format_machine(doc["machine"]))
    peak = doc["fma_peak"]
    if "gflops" in peak:
        print(f"FMA peak : {peak['gflops']:.1f} GFLOP/s ({peak['isa']} tile, {peak['threads']} "
              "thread(s), measured now): % peak = a row's GFLOP/s against it")
    else:
        print(f"FMA peak : not measured ({peak['error']})")
    bf16 = doc["bf16_peak"]
    if "gflops" in bf16:
        print(f"bf16 peak: {bf16['gflops']:.1f} GFLOP/s ({bf16['isa']}, {bf16['threads']} "
              "thread(s), measured now): % peak of the matmul_bf16 rows")
    else:
        print(f"bf16 peak: {bf16['error']}")
    d = doc["dims"]
    print(f"shapes   : B={d['B']} T={d['T']} C={d['C']} NH={d['NH']} H={d['H']} V={d['V']} "
          f"P={d['P']:,}; median of {doc['repeat']} interleaved samples; "
          f"speedup = reference / ours, vs @ = NumPy @ / ours")
    print(flush=True)


def print_summary(doc):
    s = doc["scaling"]
    print()
    if doc["interrupted"]:
        print(f"interrupted: {len(doc['results'])} row(s) measured")
    elif s:
        print(f"matmul 1->{s['threads']} thread scaling: ours {s['ours_scaling']:.2f}x "
              f"(sum of {s['gemms']} GEMMs {s['ours_1_ms']:.1f} -> {s['ours_n_ms']:.1f} ms), "
              f"NumPy @ {s['numpy_scaling']:.2f}x ({s['numpy_1_ms']:.1f} -> "
              f"{s['numpy_n_ms']:.1f} ms); target {s['target']}: {s['status']}")
    else:
        print("matmul thread scaling: not measured (needs matmul and --threads > 1)")
    for family, reason in doc["skipped"].items():
        print(f"skipped {family}: {reason}")
    for r in doc["results"]:
        if r["status"] == "FAIL":
            print(f"FAIL {r['kernel']} {r['direction']}: {r['error']}")
    misses = sum(r["status"] == "MISS" for r in doc["results"])
    passes = sum(r["status"] == "PASS" for r in doc["results"])
    print(f"targets: {passes} PASS, {misses} MISS; "
          f"{'all outputs match their references' if doc['ok'] else 'WRONG RESULTS (FAIL above)'}")


def measure_fma_peak(loaded, n_threads, quick):
    """The cores' peak FMA rate with the GEMM path in use, or why it was not measured."""
    try:
        isa = loaded["matmul"][0].get_isa() if "matmul" in loaded else fma_peak_isas()[0]
        gflops = fma_peak_gflops(isa, n_threads, seconds=0.01 if quick else 0.2)
    except (RuntimeError, ValueError) as e:
        return {"error": str(e)}
    return {"isa": isa, "threads": n_threads, "gflops": gflops}


def measure_bf16_peak(loaded, n_threads, quick):
    """The peak of the bf16 GEMM path in use: tdpbf16ps's (amx) or vdpbf16ps's where it runs
    natively; the FMA peak of its tile where it is emulated (the emulation runs fp32 FMAs)."""
    if "matmul" not in loaded:
        return {"error": "not measured (matmul not built)"}
    isa = loaded["matmul"][0].get_bf16_isa()
    if isa not in fma_peak_bf16_isas():
        return {"error": f"{isa} is emulated with fp32 FMAs: its rows' % peak is against the "
                         "FMA peak"}
    try:
        gflops = fma_peak_gflops(isa, n_threads, seconds=0.01 if quick else 0.2)
    except (RuntimeError, ValueError) as e:
        return {"error": f"not measured ({e})"}
    return {"isa": isa, "threads": n_threads, "gflops": gflops}


def measure(cases, loaded, doc, n_threads, repeat, rng, settle_s, table):
    """Checks and times every case, appending each row to doc["results"] (and printing it
    when `table` is given) as soon as it is measured; returns the GEMM trials for the
    thread-scaling line."""
    gemm_trials = []
    fma_peak = doc["fma_peak"].get("gflops")
    for case in cases:
        if case.family not in loaded:
            continue
        kernels, reference = loaded[case.family]
        row, trial = run_case(case, kernels, reference, n_threads, repeat, rng, settle_s)
        peak = doc["bf16_peak"].get("gflops", fma_peak) if case.bf16 else fma_peak
        row["share_of_fma_peak"] = row["gflops"] / peak if peak and row["gflops"] else None
        doc["results"].append(row)
        if table:
            print(table.line(row_cells(row)), flush=True)
        if case.gemm and trial is not None:
            gemm_trials.append(lambda c=case, k=kernels, r=reference: c.build(k, r, rng, 1))
    return gemm_trials


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for our kernels and NumPy's BLAS (default: one per physical core)")
    parser.add_argument("--repeat", type=int, default=7, help="timed samples per kernel")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--only", default=None, help="comma-separated families or kernel names")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one sample (smoke test)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    dims = QUICK if args.quick else REAL
    repeat = 1 if args.quick else args.repeat
    try:
        cases = select(all_cases(dims), args.only)
    except ValueError as e:
        parser.error(str(e))

    randygpt.set_num_threads(args.threads)
    n_threads = randygpt.effective_n_threads()
    if args.threads is not None and n_threads != args.threads:
        print(f"note: --threads {args.threads} runs as {n_threads} thread(s) "
              f"({randygpt._kernels.usable_cpus()} usable CPUs, OpenMP "
              f"{'on' if randygpt.openmp_enabled() else 'off'})", file=sys.stderr)
    families = [f for f in FAMILIES if any(c.family == f for c in cases)]
    loaded, skipped = load_families(families)
    rng = np.random.default_rng(SEED)
    # One thread leaves no idle core for a spinning pool to take; --quick is no measurement.
    settle_s = SPIN_SETTLE_S if n_threads > 1 and not args.quick else 0.0
    table = None if args.json else result_table([c for c in cases if c.family in loaded])
    doc = {"machine": machine_info(n_threads), "fma_peak": {"error": "interrupted"},
           "bf16_peak": {"error": "interrupted"},
           "dims": asdict(dims), "repeat": repeat, "results": [], "scaling": None,
           "skipped": skipped, "interrupted": False}
    try:
        with threadpool_limits(limits=n_threads, user_api="blas"):
            doc["machine"] = machine_info(n_threads)
            doc["fma_peak"] = measure_fma_peak(loaded, n_threads, args.quick)
            doc["bf16_peak"] = measure_bf16_peak(loaded, n_threads, args.quick)
            if table:
                print_header(doc)
                print(table.header(), flush=True)
            gemm_trials = measure(cases, loaded, doc, n_threads, repeat, rng, settle_s, table)
            doc["scaling"] = gemm_scaling(gemm_trials, doc["results"], n_threads, repeat)
    except KeyboardInterrupt:  # Ctrl-C: report the rows measured so far, no traceback
        doc["interrupted"] = True
    doc["ok"] = all(r["status"] != "FAIL" for r in doc["results"])
    if args.json:
        print(dump_json(doc))
    else:
        print_summary(doc)
    if doc["interrupted"]:
        return 130  # as a shell reports a command ended by SIGINT
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
