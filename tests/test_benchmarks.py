"""Smoke tests of the benchmark scripts on their tiny --quick setting: they run, print their
table or valid JSON, and report a wrong kernel as FAIL with a non-zero exit status.
Kernel families that are not built are skipped (by the script, or here when it needs all)."""
import importlib
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import randygpt

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
FAMILIES = ("matmul", "attention", "norm", "activation", "xent", "embedding", "adamw")


def built_families():
    built = []
    for family in FAMILIES:
        try:
            importlib.import_module(f"randygpt._kernels.{family}")
        except ImportError:
            continue
        built.append(family)
    return built


def run_script(name, *args, timeout=60):
    proc = subprocess.run([sys.executable, str(BENCH_DIR / name), *args], capture_output=True,
                          text=True, timeout=timeout)
    return proc


def _import_benchmark(name):
    """Yields the module benchmarks/<name>.py, with benchmarks/ on sys.path only meanwhile."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH_DIR))


@pytest.fixture(scope="module")
def bench_kernels():
    if not built_families():
        pytest.skip("no kernel family is built")
    yield from _import_benchmark("bench_kernels")


def need_model():
    missing = [f for f in FAMILIES if f not in built_families()]
    if missing:
        pytest.skip(f"the model needs every kernel family; not built: {', '.join(missing)}")


def test_bench_kernels_json(bench_kernels):
    proc = run_script("bench_kernels.py", "--quick", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True
    assert doc["machine"]["threads"] == 1
    assert set(doc["skipped"]) == set(FAMILIES) - set(built_families())
    assert {r["family"] for r in doc["results"]} == set(built_families())
    for r in doc["results"]:
        assert r["status"] in ("PASS", "MISS", "-"), r
        assert r["ours_ms"] > 0 and r["ref_ms"] > 0 and r["speedup"] > 0, r
        assert r["shape"]
    gemms = [r for r in doc["results"] if r["gemm"]]
    if gemms:
        # fwd, dX and dW of qkv, wo, fc1, fc2 and lm_head, each against NumPy's @.
        assert len(gemms) == 15
        assert all(r["vs_numpy_matmul"] > 0 for r in gemms)
    assert doc["scaling"] is None  # one thread: nothing to scale
    # Training's own call forms have rows of their own.
    labels = {f"{r['kernel']} {r['direction']}" for r in doc["results"]}
    if "attention" in built_families():
        assert {"attention fwd att=None", "attention bwd recompute"} <= labels
    if "activation" in built_families():
        assert {"squared_relu bwd inplace", "dropout_add_to fwd"} <= labels


@pytest.fixture
def common():
    yield from _import_benchmark("_common")


@pytest.mark.parametrize("settle_s", [0.0, 0.001])
def test_time_interleaved_wakes_the_pool_before_each_sample(common, monkeypatch, settle_s):
    # A fake clock that advances only inside the calls: with a settle pause, the call right
    # after it (the slow wake-up of parked threads, here 100 s) must stay out of every sample.
    now = [0.0]
    since_sleep = [None]

    def sleep(s):
        since_sleep[0] = 0

    def fn():
        if since_sleep[0] == 0:
            now[0] += 100.0
        else:
            now[0] += 1e-3
        if since_sleep[0] is not None:
            since_sleep[0] += 1

    monkeypatch.setattr(common, "time", types.SimpleNamespace(sleep=sleep,
                                                             perf_counter=lambda: now[0]))
    (t,) = common.time_interleaved([fn], repeat=3, settle_s=settle_s)
    assert t == pytest.approx(1e-3)


def test_bench_kernels_table_and_scaling(bench_kernels):
    if "matmul" not in built_families() or randygpt._kernels.usable_cpus() < 2 \
            or not randygpt.openmp_enabled():
        pytest.skip("thread scaling needs the matmul kernels, OpenMP and 2 CPUs")
    # Two products keep it short: 2-thread OpenMP regions crawl on a busy 2-core machine.
    proc = run_script("bench_kernels.py", "--quick", "--threads", "2", "--only",
                      "matmul qkv,matmul wo")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    for needle in ("CPU", "OpenMP on", "NumPy", "OPENBLAS_CORETYPE", "load average",
                   "matmul qkv", "NT 16x32x96", "vs @", "matmul 1->2 thread scaling",
                   "sum of 6 GEMMs"):
        assert needle in out, f"{needle!r} missing from:\n{out}"


def test_bench_kernels_rejects_unknown_kernel():
    proc = run_script("bench_kernels.py", "--quick", "--only", "no_such_kernel")
    assert proc.returncode == 2
    assert "no_such_kernel" in proc.stderr


def test_bench_kernels_reports_a_wrong_kernel(bench_kernels, monkeypatch, capsys):
    if "norm" not in built_families():
        pytest.skip("norm kernels not built")
    norm = importlib.import_module("randygpt._kernels.norm")
    real = norm.rmsnorm_forward

    def off_by_a_bit(out, rstd, x, eps, n_threads):
        real(out, rstd, x, eps, n_threads)
        out[0, 0] += 1.0

    monkeypatch.setattr(norm, "rmsnorm_forward", off_by_a_bit)
    status = bench_kernels.main(["--quick", "--threads", "1", "--only", "rmsnorm", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert status == 1 and doc["ok"] is False
    statuses = {r["direction"]: r for r in doc["results"]}
    assert statuses["fwd"]["status"] == "FAIL" and "(0, 0)" in statuses["fwd"]["error"]
    assert statuses["fwd"]["ours_ms"] is None  # a wrong kernel is not timed
    assert statuses["bwd"]["status"] != "FAIL"  # the others still run
    status = bench_kernels.main(["--quick", "--threads", "1", "--only", "rmsnorm"])
    assert status == 1 and "FAIL rmsnorm fwd" in capsys.readouterr().out


def test_bench_kernels_compare_reports_worst_element(bench_kernels):
    ref = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert bench_kernels.compare(ref.copy(), ref) is None
    bad = ref.copy()
    bad[1, 2] += 0.5
    assert "(1, 2)" in bench_kernels.compare(bad, ref)


def test_bench_kernels_prints_rows_as_measured_and_stops_on_ctrl_c(bench_kernels, monkeypatch,
                                                                   capsys):
    if "norm" not in built_families():
        pytest.skip("norm kernels not built")
    real, printed_before = bench_kernels.run_case, []

    def interrupted_third(*args, **kwargs):
        printed_before.append(capsys.readouterr().out)
        if len(printed_before) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_kernels, "run_case", interrupted_third)
    status = bench_kernels.main(["--quick", "--threads", "1", "--only", "rmsnorm,layernorm"])
    rest = capsys.readouterr()
    assert status == 130
    # Each row was on stdout before the next one was measured.
    assert "rmsnorm " in printed_before[1] and "fwd" in printed_before[1]
    assert "bwd" in printed_before[2] and "layernorm" not in "".join(printed_before)
    assert "interrupted: 2 row(s) measured" in rest.out and "Traceback" not in rest.err


def test_bench_kernels_json_on_ctrl_c(bench_kernels, monkeypatch, capsys):
    if "norm" not in built_families():
        pytest.skip("norm kernels not built")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_kernels, "run_case", interrupt)
    assert bench_kernels.main(["--quick", "--threads", "1", "--only", "rmsnorm", "--json"]) == 130
    doc = json.loads(capsys.readouterr().out)
    assert doc["interrupted"] is True and doc["results"] == []


def test_machine_header_names_the_blas_kernels_and_warns_on_coretype(common):
    info = common.machine_info(1)
    for b in info["blas"]:
        assert f"running its {b['architecture']} kernels" in common.format_machine(info)
    unset = dict(info, openblas_coretype=None, openblas_l2_size=None)
    assert common.blas_warning(unset) is None
    assert "warning" not in common.format_machine(unset)
    forced = dict(unset, openblas_coretype="Haswell")
    line = common.blas_warning(forced)
    assert line.startswith("warning  : OPENBLAS_CORETYPE=Haswell overrides OpenBLAS's choice")
    assert line in common.format_machine(forced).splitlines()
    both = dict(forced, openblas_l2_size="1048576")
    assert "OPENBLAS_CORETYPE=Haswell and OPENBLAS_L2_SIZE=1048576 override" in \
        common.blas_warning(both)


# ------------------------------------------------------------------------------ FMA peak

@pytest.fixture(scope="module")
def fma_peak():
    yield from _import_benchmark("_fma_peak")


def _best_gemm_gflops(n, repeat=5, precision="fp32"):
    """Our GEMM's best rate on an n x n x n product that fits in cache, one thread."""
    import time

    from randygpt._kernels import matmul

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    c = np.empty((n, n), np.float32)
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        matmul.gemm(c, a, b, False, False, False, 1, precision=precision)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def test_fma_peak_bounds_the_gemm(fma_peak):
    if "matmul" not in built_families():
        pytest.skip("matmul kernels not built")
    from randygpt._kernels import matmul

    # The probe has a path for each of the GEMM's, named alike.
    assert fma_peak.available_isas() == matmul.available_isas()
    old = matmul.get_isa()
    try:
        for isa in matmul.available_isas():
            matmul.set_isa(isa)
            # The peak is the rate no GEMM on the same path can beat: measured on registers
            # alone, it must come out above (with room for timing noise) what the GEMM itself
            # reaches on a cache-resident product, and below a rate no x86 core has (64 flops
            # a cycle at 8 GHz).
            # Load from other jobs only slows either down, by spells: each is the best of
            # several tries, taken in alternation so that both see the machine's quiet spells.
            gemm = peak = 0.0
            for _ in range(4):
                gemm = max(gemm, _best_gemm_gflops(192))
                peak = max(peak, fma_peak.fma_peak_gflops(isa, 1, seconds=0.05))
            assert np.isfinite(peak) and peak < 64 * 8.0, (isa, peak)
            assert peak > 0.8 * gemm, (isa, peak, gemm)
    finally:
        matmul.set_isa(old)


def test_bf16_peak_bounds_the_bf16_gemm(fma_peak):
    if "matmul" not in built_families():
        pytest.skip("matmul kernels not built")
    from randygpt._kernels import matmul

    # Every native bf16 GEMM path has a probe of the same name (the emulated ones are held
    # to the FMA peak), and it bounds that path's GEMM as the FMA peak bounds fp32's; AMX
    # reaches ~3.7 TFLOP/s a core here, so the sanity bound is 2048 flops a cycle at 8 GHz.
    native = [isa for isa in matmul.available_bf16_isas() if isa in ("amx", "avx512bf16")]
    assert fma_peak.available_bf16_isas() == native
    old = matmul.get_bf16_isa()
    try:
        for isa in native:
            matmul.set_bf16_isa(isa)
            gemm = peak = 0.0
            for _ in range(4):
                gemm = max(gemm, _best_gemm_gflops(256, precision="bf16"))
                peak = max(peak, fma_peak.fma_peak_gflops(isa, 1, seconds=0.05))
            assert np.isfinite(peak) and peak < 2048 * 8.0, (isa, peak)
            assert peak > 0.8 * gemm, (isa, peak, gemm)
    finally:
        matmul.set_bf16_isa(old)


def test_fma_peak_rejects_bad_arguments(fma_peak):
    isa = fma_peak.available_isas()[0]
    for bad in (0, 1.5, True, None):
        with pytest.raises(ValueError, match="n_threads must be an int >= 1"):
            fma_peak.fma_peak_gflops(isa, bad)
    for bad in (0, -1.0, 100, "0.1", True, None):
        with pytest.raises(ValueError, match="seconds must be a number"):
            fma_peak.fma_peak_gflops(isa, 1, seconds=bad)
    with pytest.raises(ValueError, match="isa must be one of"):
        fma_peak.fma_peak_gflops("avx1024", 1, seconds=0.01)


def test_fma_peak_is_built_once_under_build(fma_peak):
    fma_peak.available_isas()
    built = list(fma_peak.BUILD_DIR.glob("_fma_peak-*"))
    assert built and all(p.suffix != ".tmp" for p in built)
    assert fma_peak.BUILD_DIR.parts[-2:] == ("build", "fma_peak")


def test_bench_train_json():
    need_model()
    # PyTorch only when it is installed: its import alone takes seconds.
    with_torch = importlib.util.find_spec("torch") is not None
    proc = run_script("bench_train.py", "--quick", "--threads", "1", "--json", "--profile",
                      *([] if with_torch else ["--no-torch"]))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    (run,) = doc["runs"]
    ours = run["ours"]
    if with_torch:
        torch_run = run["torch"]
        assert "error" not in torch_run, torch_run
        # Same model: the same parameter count, and a first loss near ln(vocab).
        assert torch_run["num_params"] == ours["num_params"]
        assert abs(torch_run["loss"] - np.log(doc["config"]["vocab_size"])) < 0.5
        assert torch_run["step_ms"] > 0 and torch_run["peak_rss_mb"] > 0
        assert run["speed_vs_torch"] > 0
    assert ours["threads"] == 1 and ours["step_ms"] > 0 and ours["peak_rss_mb"] > 0
    assert np.isfinite(ours["loss"])
    assert ours["tokens_per_s"] > 0 and 0 < ours["share_of_numpy_gemm"]
    assert run["numpy_gemm"]["gemm_ms"] > 0
    assert doc["gemm_gflop_per_step"] > 0
    # The FMA peak is the best over our GEMM paths, and bounds every measured GEMM rate.
    assert run["fma_peak_gflops"] == max(ours["fma_peaks_gflops"].values())
    assert run["gemm_floor_ms"] > 0
    for impl in ("ours", "numpy_gemm"):
        assert 0 < run[impl]["share_of_fma_peak"] < 1
    # The profile sees every kernel call: per step, lm_head's and each block's qkv, wo and fc1
    # weight gradients go through matmul_backward, fc2's through matmul_sqrelu_backward, and
    # the kernels fit inside the step's time.
    profile = ours["profile"]
    calls = {(r["phase"], r["kernel"]): r["calls"] for r in profile["kernels"]}
    assert calls[("backward", "matmul_backward")] == 3 * doc["config"]["n_layer"] + 1
    assert calls[("backward", "matmul_sqrelu_backward")] == doc["config"]["n_layer"]
    assert calls[("optimizer", "adamw_step")] == 1
    assert 0 < sum(r["ms"] for r in profile["kernels"]) <= profile["step_ms"]


def test_bench_train_profile_table():
    need_model()
    proc = run_script("bench_train.py", "--quick", "--no-torch", "--threads", "1", "--profile")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    for needle in ("ms/step", "tok/s", "% of NumPy @", "% of FMA peak", "FMA peak at 1 thread",
                   "a floor for any implementation", "peak RSS MB", "where our step's time goes",
                   "matmul_backward", "adamw_step", "outside kernels"):
        assert needle in out, f"{needle!r} missing from:\n{out}"


@pytest.fixture(scope="module")
def bench_train():
    yield from _import_benchmark("bench_train")


def test_bench_train_reports_a_dead_worker(bench_train):
    # A worker that cannot start (here: an unknown kind) is an error naming it, not a hang.
    with pytest.raises(bench_train.WorkerError, match="nonsense worker exited with status 2"):
        bench_train.Worker("nonsense", randygpt.Config(), 1, 1)


def test_bench_train_step_gemm_flops(bench_train):
    cfg = randygpt.Config()
    # 3 GEMMs (forward, dX, dW) of 2*N*in*out flops per linear layer; N = 32*64 rows.
    per_layer = 256 * 768 + 256 * 256 + 256 * 1024 + 1024 * 256
    expected = 3 * 2 * 2048 * (6 * per_layer + 256 * 67)
    assert bench_train.step_gemm_flops(cfg) == expected
    assert len(bench_train.step_gemms(cfg)) == 15


# ------------------------------------------------------------------------------ compare_runs

def _write_metrics(run_dir, rows):
    run_dir.mkdir()
    lines = ["iter,train_loss,val_loss,lr,tok_per_s,elapsed_s"]
    lines += [f"{it},{tr},{'' if va is None else va},1e-3,1000,{it}" for it, tr, va in rows]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_compare_runs_table_json_and_png(tmp_path):
    _write_metrics(tmp_path / "a", [(0, 4.2, 4.2), (10, 3.0, None), (20, 2.5, 2.6), (30, 2.4, 2.7)])
    _write_metrics(tmp_path / "b", [(0, 4.2, 4.2), (10, 3.1, 3.2), (20, 2.6, 2.5), (30, 2.5, 2.55)])
    proc = run_script("compare_runs.py", str(tmp_path / "a"), str(tmp_path / "b"), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["iters"] == [0, 20, 30]  # 10 only in b: not a shared evaluation
    assert doc["val_loss"] == {"a": [4.2, 2.6, 2.7], "b": [4.2, 2.5, 2.55]}
    a, b = doc["runs"]
    assert (a["final_val"], a["best_val"], a["best_iter"]) == (2.7, 2.6, 20)
    assert (b["final_val"], b["best_val"], b["best_iter"]) == (2.55, 2.5, 20)
    assert b["final_minus_first"] == pytest.approx(-0.15)
    assert b["best_minus_first"] == pytest.approx(-0.1)

    args = [str(tmp_path / "a"), str(tmp_path / "b" / "metrics.csv"), "--labels", "ours,ref"]
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if has_mpl:
        args += ["--png", str(tmp_path / "cmp.png")]
    proc = run_script("compare_runs.py", *args)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    assert table[1].split() == ["iter", "ours", "ref"]
    assert table[3].split() == ["20", "2.6000", "2.5000"]
    assert any(line.split()[:1] == ["ref"] and "-0.1500" in line for line in table)
    if has_mpl:
        assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_bad_input_is_one_line(tmp_path):
    _write_metrics(tmp_path / "a", [(0, 4.2, 4.2)])
    proc = run_script("compare_runs.py", str(tmp_path / "a"), str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "missing" in proc.stderr
    proc = run_script("compare_runs.py", str(tmp_path / "a"), str(tmp_path / "a"))
    assert proc.returncode == 2 and "distinct labels" in proc.stderr
    _write_metrics(tmp_path / "empty_val", [(0, 4.2, None)])
    proc = run_script("compare_runs.py", str(tmp_path / "a"), str(tmp_path / "empty_val"))
    assert proc.returncode == 2 and "no validation loss" in proc.stderr
