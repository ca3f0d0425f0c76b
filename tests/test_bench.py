"""The kernel benchmark's arithmetic and outputs (the timing itself needs a GPU), and the offline inspection."""
import csv
import os
import subprocess
import sys

import pytest

import torch

from benchmarks.bench import COLUMNS, _rates, sets_that_fit, time_method, write_outputs


def test_rates_and_outputs(tmp_path, capsys):
    base = {"fwd_ms": 2.0, "fwdbwd_ms": 7.0, "fwd_graph_ms": 1.5, "fwdbwd_graph_ms": 6.0,
            "fwd_cycle_ms": 2.2, "fwdbwd_cycle_ms": 7.7}
    sparse = {"fwd_ms": 0.5, "fwdbwd_ms": 1.0, "fwd_graph_ms": 0.1, "fwdbwd_graph_ms": "capture failed: X",
              "fwd_cycle_ms": 1.1, "fwdbwd_cycle_ms": 3.5}
    dense, executed = 4e12, 1e11
    r = _rates(sparse, base, executed=executed, dense=dense)
    assert r["fwd_speedup"] == 4.0 and r["fwdbwd_speedup"] == 7.0
    # the cycle is compared with SDPA's own cycle, not its one-set time
    assert r["fwd_cycle_speedup"] == pytest.approx(2.0) and r["fwdbwd_cycle_speedup"] == pytest.approx(2.2)
    assert r["fwdbwd_cycle_tflops_dense"] == pytest.approx(3.5 * dense / 3.5e-3 / 1e12)
    assert r["fwd_graph_speedup"] == pytest.approx(15.0) and "fwdbwd_graph_speedup" not in r
    # ms -> TFLOP/s: FLOPs / (ms * 1e-3) / 1e12
    assert r["fwd_tflops_exec"] == pytest.approx(executed / 0.5e-3 / 1e12)
    assert r["fwdbwd_tflops_dense"] == pytest.approx(3.5 * dense / 1.0e-3 / 1e12)
    assert _rates(base, base, executed=dense, dense=dense)["fwd_graph_speedup"] == 1.0
    rows = [dict(n=64, method="sdpa", **base), dict(n=64, method="llsa", **sparse, **r)]
    write_outputs(rows, tmp_path, "title")
    with open(tmp_path / "bench.csv") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == COLUMNS and read[1]["fwdbwd_graph_ms"] == "capture failed: X"
    assert float(read[1]["fwd_speedup"]) == 4.0 and (tmp_path / "bench.png").is_file()


def test_cycle_timing_calls_every_set_in_turn_and_one_set_again_and_again():
    """``time_method`` with a stand-in for ``do_bench``: the one-set passes see only the first set, the
    cycle passes every set in turn; forward+backward clears the gradients of the sets it uses."""
    sets = [tuple(torch.full((1, 1, 4, 2), float(i)).requires_grad_(j < 3) for j in range(4)) for i in range(3)]
    seen = []

    def fn(q, k, v):
        seen.append(int(q[0, 0, 0, 0]))
        return q * k * v

    def fake_bench(f, warmup, rep, grad_to_none, return_mode):
        seen.clear()
        for _ in range(7):
            f()
        fake_bench.grads.append(grad_to_none)
        return float(len(set(seen)))

    fake_bench.grads = []
    out = time_method(fn, sets, bench=fake_bench)
    # the stand-in returns how many distinct sets the pass called
    assert out == {"fwd_ms": 1.0, "fwdbwd_ms": 1.0, "fwd_cycle_ms": 3.0, "fwdbwd_cycle_ms": 3.0}
    assert fake_bench.grads[0] is None and len(fake_bench.grads[1]) == 3 and len(fake_bench.grads[3]) == 9


def test_cycle_sets_are_capped_by_memory():
    # 7 tensors of 1,000 two-byte elements = 14,000 bytes a set
    assert sets_that_fit(24, 1000, 2, 4 * 14_000 * 30) == 24
    assert sets_that_fit(24, 1000, 2, 4 * 14_000 * 5 + 1) == 5
    assert sets_that_fit(24, 1000, 2, 100) == 1


def test_levels_per_length():
    from benchmarks.bench import parse_levels

    assert parse_levels([]) == {} and parse_levels(["2"]) == {None: 2}
    assert parse_levels(["16384:2", "65536:2"]) == {16384: 2, 65536: 2}
    for bad in (["x"], ["4096:0"], ["a:2"]):
        with pytest.raises(SystemExit, match="levels"):
            parse_levels(bad)


def test_offline_inspection_reads_ptxas_and_the_ptx():
    """The kernels compile for an H100 here, without one; the fine dk/dv kernel's products are wgmma and it
    does not spill (ptxas counts its registers); the disassembly shows the fused forward's three key loops and
    dense attention's one.
    Run in a fresh interpreter: the tests' TRITON_INTERPRET=1 replaces the kernels with interpreter wrappers,
    which do not compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.inspect_llsa", "--dim", "64"], env=env,
                         capture_output=True, text=True, timeout=600)
    if "ptxas" in out.stderr and out.returncode:
        pytest.skip("no ptxas with this Triton")
    assert out.returncode == 0, out.stderr[-2000:]
    # rows are named by kernel and tile rows (which TUNE sets), e.g. "fused forward (BM=64)"
    rows = {line.split("|")[1].strip().split(" (")[0]: [c.strip() for c in line.split("|")[2:-1]]
            for line in out.stdout.splitlines() if line.startswith("| f")}
    assert set(rows) == {"fused forward", "fused dq", "fine dk/dv"}
    d, warps, stages, registers, spills, shared, wgmma, mma_sync, _, _ = rows["fine dk/dv"]
    assert 0 < int(registers) <= 255 and spills == "0 / 0" and float(shared) > 0
    assert int(wgmma) > 0 and int(mma_sync) == 0
    # the fused forward's three key loops at 65,536 tokens: enriched candidates, coarsest level, fine segment
    steps = [int(x) for x in rows["fused forward"][-1].split(",")]
    assert len(steps) == 3 and all(x > 100 for x in steps), steps
    # dense attention's loop at the same tile, for comparison: one key loop, on wgmma
    dense = [line.split("|")[2:-1] for line in out.stdout.splitlines() if line.startswith("| dense loop")]
    assert len(dense) == 1 and int(dense[0][6]) > 0 and int(dense[0][7]) == 0, dense
    assert len(dense[0][-1].split(",")) == 1 and int(dense[0][-1]) > 100, dense
