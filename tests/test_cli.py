"""Tests of the command line (``python -m cuflash``) and of the benchmark's grid and FLOP accounting.

CPU only and fast: the subprocess runs hide any GPU (``CUDA_VISIBLE_DEVICES=""``) so that they exercise the
no-GPU path wherever the suite runs.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cuflash
from cuflash import cli_check
from cuflash.reference import attention_backward_numpy, attention_numpy

ROOT = Path(__file__).resolve().parent.parent


def _run_cli(*args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "cuflash", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_attention_under_test",
                                                  ROOT / "bench" / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


# CPU implementations with cuflash's calling convention, built on the tiled NumPy FlashAttention.

def _cpu_attention(q, k, v, *, causal=False, return_lse=False, **kw):
    out, lse = attention_numpy(q, k, v, causal=causal, **kw)
    return (out, lse) if return_lse else out


def _cpu_backward(do, q, k, v, out, lse, *, causal=False, **kw):
    return attention_backward_numpy(do, q, k, v, out, lse, causal=causal, **kw)


# ---------------------------------------------------------------------------
# python -m cuflash
# ---------------------------------------------------------------------------

def test_no_subcommand_prints_help():
    """`python -m cuflash` with no arguments prints the usage listing all three subcommands and exits 0."""
    r = _run_cli()
    assert r.returncode == 0, r.stderr
    for word in ("info", "check", "bench"):
        assert word in r.stdout


def test_info_without_gpu():
    """`info` runs without a GPU, exits 0, reports the cuflash version, says no GPU was found, and shows the
    kernel cache directory (honouring CUFLASH_CACHE_DIR)."""
    env_dir = ROOT / "build" / "test-cli-cache"
    r = subprocess.run([sys.executable, "-m", "cuflash", "info"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT),
                                             CUFLASH_CACHE_DIR=str(env_dir)))
    assert r.returncode == 0, r.stderr
    assert cuflash.__version__ in r.stdout
    assert "no GPU found" in r.stdout
    assert str(env_dir) in r.stdout
    assert "cached variants" in r.stdout


def _fill_fake_cache(cache_dir):
    """Entries named like cubins of the current sources (info reads only the names): 3 fwd_sm80 for sm_80,
    2 bwd_prepost for sm_90a, 1 fwd_sm90 for sm_90a."""
    from cuflash import dispatch, jit
    cache_dir.mkdir(parents=True)
    fwd = dispatch.all_forward_keys()[:3]
    pre = [k for k in dispatch.all_backward_keys() if k.family == "bwd_prepost"][:2]
    picks = [(k, "sm_80") for k in fwd] + [(k, "sm_90a") for k in pre] + [(dispatch.all_forward_sm90_keys()[0],
                                                                            "sm_90a")]
    for k, arch in picks:
        (cache_dir / f"{k.name}.{arch}.{jit.source_digest()}.nvrtc130{jit.CACHE_SUFFIX}").write_bytes(b"")
    return [f"{k.name}@{arch}" for k, arch in picks]


def test_info_summarizes_cached_variants(tmp_path):
    """`info` counts cached variants per kernel family and target instead of printing hundreds of lines;
    `info -v` (and --verbose) lists each one."""
    names = _fill_fake_cache(tmp_path / "cache")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT), CUFLASH_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "cuflash", "info"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "cached variants  6 (python -m cuflash info -v lists them)" in r.stdout
    rows = {line.split()[0]: line.split(None, 1)[1] for line in r.stdout.splitlines()
            if line.strip().startswith(("fwd_", "bwd_"))}
    assert rows == {"fwd_sm80": "sm_80 3", "bwd_prepost": "sm_90a 2", "fwd_sm90": "sm_90a 1"}
    assert not any(n in r.stdout for n in names)
    for flag in ("-v", "--verbose"):
        v = subprocess.run([sys.executable, "-m", "cuflash", "info", flag], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert v.returncode == 0, v.stderr
        assert all(n in v.stdout for n in names)


def test_summarize_cached_counts_family_by_target():
    """summarize_cached splits each variant@arch name at its dtype (family names hold underscores:
    bwd_dq_sm80) and counts per family and target, targets in order."""
    from cuflash.__main__ import summarize_cached
    names = ["bwd_dq_sm80_fp16_d64_br64_bc64_w4@sm_90a", "bwd_dq_sm80_bf16_d64_br64_bc64_w4@sm_80",
             "bwd_dq_sm80_bf16_d128_br64_bc64_w4@sm_80", "fwd_sm80_bf16_d64_br128_bc96_w4@sm_86"]
    assert summarize_cached(names) == [("bwd_dq_sm80", "sm_80 2, sm_90a 1"), ("fwd_sm80", "sm_86 1")]


@pytest.mark.parametrize("args", [["info"], ["info", "-v"]])
def test_closed_stdout_is_no_traceback(tmp_path, args):
    """Output into a pipe whose reader is gone (`python -m cuflash info | head -3`) ends quietly with exit
    status 1, as Python's own recipe for EPIPE does, not with a BrokenPipeError traceback."""
    _fill_fake_cache(tmp_path / "cache")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader quits before cuflash writes anything: every write meets EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "cuflash", *args], cwd=ROOT, stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=300,
                           env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT),
                                    CUFLASH_CACHE_DIR=str(tmp_path / "cache")))
    finally:
        os.close(write_end)
    assert "BrokenPipeError" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1


@pytest.mark.skipif(not hasattr(cuflash, "attention"), reason="cuflash.attention not present yet")
def test_check_without_cupy_names_the_cause():
    """Without CuPy (simulated: sys.modules["cupy"] = None) `check` says CuPy is not installed and which
    extra installs it, instead of claiming no GPU was found, and still checks the NumPy path (whose pass or
    fail is test_check_without_gpu_passes's business)."""
    def check(*args):
        code = ("import sys\nsys.modules['cupy'] = None\nfrom cuflash.__main__ import main\n"
                f"sys.exit(main({list(args)!r}))")
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))

    r = check("check")
    assert "Traceback" not in r.stderr and r.stdout, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("CuPy is not installed") and "No CUDA GPU found" not in r.stdout
    assert '"cuflash[cuda13]"' in first and '"cuflash[cuda12]"' in first
    assert "PASS fwd  numpy" in r.stdout
    r = check("check", "--libs", "cupy")  # asked for CuPy explicitly: the same cause, and a failing exit
    assert r.returncode == 1 and r.stdout.startswith("CuPy is not installed") and "cuflash[cuda13]" in r.stdout


@pytest.mark.skipif(not hasattr(cuflash, "attention"), reason="cuflash.attention not present yet")
def test_check_without_gpu_passes():
    """`check` without a GPU says so, checks the NumPy path against the float64 reference, prints PASS lines
    and exits 0."""
    r = _run_cli("check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No CUDA GPU found" in r.stdout
    assert "PASS fwd  numpy" in r.stdout
    assert "FAIL" not in r.stdout
    assert " 0 failed" in r.stdout


def test_check_passes_correct_cpu_implementation():
    """The check logic accepts a correct implementation: the tiled NumPy FlashAttention passes every forward
    and backward line, so a PASS from `check` is reachable by an exact implementation."""
    lines = []
    code = cli_check.main(["--libs", "numpy"], attention=_cpu_attention, attention_backward=_cpu_backward,
                          out=lines.append)
    assert code == 0, "\n".join(lines)
    assert sum(line.startswith("PASS fwd") for line in lines) == len(cli_check.CASES) * 2
    assert sum(line.startswith("PASS bwd") for line in lines) == len(cli_check.CASES) * 2


def test_check_fails_when_causal_mask_ignored():
    """A forward that ignores `causal` makes `check` exit nonzero with FAIL lines (the causal cases)."""
    def wrong(q, k, v, *, causal=False, return_lse=False, **kw):
        return _cpu_attention(q, k, v, causal=False, return_lse=return_lse, **kw)

    lines = []
    code = cli_check.main(["--libs", "numpy"], attention=wrong, attention_backward=_cpu_backward,
                          out=lines.append)
    assert code != 0
    assert any(line.startswith("FAIL fwd") and "causal" in line for line in lines)


def test_check_fails_on_small_output_error():
    """An output off by 0.5% (well above fp16 rounding) fails the 2x-naive-error rule: the check is tight
    enough to catch a subtly wrong kernel, not only a grossly wrong one."""
    def off(q, k, v, *, return_lse=False, **kw):
        out, lse = _cpu_attention(q, k, v, return_lse=True, **kw)
        out = (out.astype(np.float64) * 1.005).astype(out.dtype)
        return (out, lse) if return_lse else out

    lines = []
    code = cli_check.main(["--libs", "numpy"], attention=off, attention_backward=_cpu_backward,
                          out=lines.append)
    assert code != 0
    assert sum(line.startswith("FAIL fwd") for line in lines) == len(cli_check.CASES) * 2


def test_check_fails_on_wrong_gradient():
    """A backward with dv scaled by 1.01 fails the backward lines and makes `check` exit nonzero."""
    def bad_bwd(*args, **kw):
        dq, dk, dv = _cpu_backward(*args, **kw)
        return dq, dk, (dv.astype(np.float64) * 1.01).astype(dv.dtype)

    lines = []
    code = cli_check.main(["--libs", "numpy"], attention=_cpu_attention, attention_backward=bad_bwd,
                          out=lines.append)
    assert code != 0
    assert all("dv err" in line for line in lines if line.startswith("FAIL"))
    assert any(line.startswith("FAIL bwd") for line in lines)


def test_check_skips_missing_backward_without_failing():
    """A backward raising NotImplementedError is reported as SKIP, not FAIL, and does not by itself fail."""
    def nobwd(*args, **kw):
        raise NotImplementedError("not yet")

    lines = []
    code = cli_check.main(["--libs", "numpy"], attention=_cpu_attention, attention_backward=nobwd,
                          out=lines.append)
    assert code == 0
    assert any(line.startswith("SKIP bwd") for line in lines)


def test_bfloat16_rounding_emulation():
    """The bf16 rounding used for the naive baseline rounds to nearest even on 8 mantissa bits."""
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -9, -2.5], dtype=np.float32)
    got = cli_check.round_to(x, "bfloat16")
    np.testing.assert_array_equal(got, [1.0, 1.0, 1.0 + 2 ** -6, 1.0, -2.5])


def test_bench_without_gpu_says_so():
    """`python -m cuflash bench` on a machine without a usable GPU/torch exits nonzero with an explanation
    instead of a traceback."""
    r = _run_cli("bench")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "needs a CUDA GPU" in r.stdout


# ---------------------------------------------------------------------------
# bench/bench_attention.py: FLOPs and grid
# ---------------------------------------------------------------------------

def test_flops_non_causal(bench):
    """Forward FLOPs are 4*B*H*S*S*D; backward 2.5x and fwd+bwd 3.5x of that (b2 h16 s1024 d128)."""
    fwd = 4 * 2 * 16 * 1024 * 1024 * 128
    assert bench.attention_flops(2, 16, 1024, 1024, 128, False, "fwd") == fwd == 17179869184
    assert bench.attention_flops(2, 16, 1024, 1024, 128, False, "bwd") == fwd * 5 // 2
    assert bench.attention_flops(2, 16, 1024, 1024, 128, False, "fwdbwd") == fwd * 7 // 2


def test_flops_causal(bench):
    """Causal halves every pass: b8 h32 s2048 d64 forward is 4*8*32*2048^2*64 / 2 = 137438953472 FLOPs."""
    assert bench.attention_flops(8, 32, 2048, 2048, 64, True, "fwd") == 137438953472
    assert bench.attention_flops(8, 32, 2048, 2048, 64, True, "bwd") == 137438953472 * 5 // 2
    assert bench.attention_flops(8, 32, 2048, 2048, 64, True, "fwdbwd") == 137438953472 * 7 // 2
    cfg = bench.Config("fwd", "bf16", 64, 2048, True)
    assert cfg.flops == 137438953472


def test_full_grid_is_flashattention2_grid(bench):
    """--full gives hd {64,128,256} x seqlen {512..16k} x causal {no,yes} x 3 passes x {bf16,fp16}, each with
    16384 tokens at hidden 2048: heads = 2048/hd and batch = 16384/seqlen."""
    grid = bench.build_grid(bench.parse_args(["--full"]))
    assert len(grid) == 3 * 6 * 2 * 3 * 2
    assert {c.head_dim for c in grid} == {64, 128, 256}
    assert {c.seqlen for c in grid} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {c.causal for c in grid} == {False, True}
    assert {c.pass_ for c in grid} == {"fwd", "bwd", "fwdbwd"}
    assert {c.dtype for c in grid} == {"bf16", "fp16"}
    for c in grid:
        assert c.heads == 2048 // c.head_dim and c.heads * c.head_dim == 2048
        assert c.batch == 16384 // c.seqlen and c.batch * c.seqlen == 16384
    c = next(c for c in grid if c.head_dim == 128 and c.seqlen == 512)
    assert (c.batch, c.heads) == (32, 16)
    # a head dim that does not divide 2048 gets the nearest whole number of heads
    odd = bench.build_grid(bench.parse_args(["--hdims", "192", "--seqlens", "2k", "--passes", "bwd"]))
    assert {(c.heads, c.batch) for c in odd} == {(11, 8)}


def test_quick_grid_and_options(bench):
    """--quick is hd 64/128, seqlen 1k/4k/16k, bf16 (all passes, both causal); explicit options narrow it and
    accept 'k' suffixes."""
    q = bench.parse_args(["--quick"])
    grid = bench.build_grid(q)
    assert {c.head_dim for c in grid} == {64, 128}
    assert {c.seqlen for c in grid} == {1024, 4096, 16384}
    assert {c.dtype for c in grid} == {"bf16"}
    assert len(grid) == 2 * 3 * 2 * 3
    assert bench.build_grid(bench.parse_args([])) == grid  # no options: the quick subset
    a = bench.parse_args(["--passes", "fwd", "--dtypes", "fp16", "--hdims", "256", "--seqlens", "2k,8k",
                          "--causal", "yes"])
    g = bench.build_grid(a)
    assert [(c.pass_, c.dtype, c.head_dim, c.seqlen, c.causal) for c in g] == [
        ("fwd", "fp16", 256, 2048, True), ("fwd", "fp16", 256, 8192, True)]
    assert g[0].heads == 8 and g[0].batch == 8
    with pytest.raises(SystemExit):
        bench.parse_args(["--passes", "sideways"])


def test_gpu_slug(bench):
    """Result folders are named by a filesystem-safe slug of the GPU name."""
    assert bench.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_check_libs_naming_no_library_is_a_usage_error(capsys):
    """`check --libs ,` names no library: a usage error (exit 2) that says so, not a run that checks
    nothing."""
    from cuflash import cli_check
    with pytest.raises(SystemExit) as e:
        cli_check.main(["--libs", ","])
    assert e.value.code == 2 and "names no library" in capsys.readouterr().err
