"""`mnistlab bench`: its arithmetic and plumbing on tiny runs (the timings themselves are benchmarks)."""

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mnistlab.errors import RunError
from mnistlab.kernels import calls
from mnistlab.lab import bench, reference
from mnistlab.models import create_model

from .test_cli import run_cli


def test_flops_of_the_linear_model_are_counted_exactly():
    # forward x @ W.T: 2 * 784 * 10 per image; backward: the weight gradient only (inputs need none)
    assert bench.training_flops_per_image(create_model("linear")) == 2 * (2 * 784 * 10)


def test_flops_grow_with_the_model():
    seed_cnn = bench.training_flops_per_image(reference.SeedCNN())
    assert seed_cnn == bench.training_flops_per_image(create_model("cnn"))  # the same network
    assert seed_cnn < bench.training_flops_per_image(create_model("fastcnn"))


def _measured(name, accs, seconds, images_per_epoch=50000, flops=1e6, seed=0):
    epochs = [{"epoch": i + 1, "train_seconds": seconds * (i + 1), "images": images_per_epoch * (i + 1),
               "valid_acc": a} for i, a in enumerate(accs)]
    return bench.Measured(name, epochs, wall_seconds=seconds * len(accs) + 3, max_rss_mb=400, flops_per_image=flops,
                          seed=seed)


def test_summary_rows_time_to_99_and_ratios():
    results = [
        _measured("seed's code as written", [0.9, 0.95], 10.0),
        _measured("mnistlab --preset fast", [0.985, 0.991], 2.0, seed=0),
        _measured("mnistlab --preset fast", [0.99, 0.992], 4.0, seed=1),
    ]
    rows = {r["recipe"]: r for r in bench.summarize(results, peak=100e9)}
    seed, fast = rows["seed's code as written"], rows["mnistlab --preset fast"]
    assert seed["seconds_to_99"] is None and seed["images_per_second"] == 5000
    assert fast["runs"] == 2 and fast["seconds_to_99"] == pytest.approx(4.0)  # median of 4.0 and 4.0
    assert fast["images_per_second"] == pytest.approx((25000 + 12500) / 2)
    assert fast["speedup_images_per_second"] == pytest.approx(18750 / 5000)
    assert fast["valid_acc_mean"] == pytest.approx(0.9915) and fast["valid_acc_min"] == 0.991
    assert fast["percent_of_peak"] == pytest.approx(100 * 1e6 * 18750 / 100e9)
    table = bench.markdown(list(rows.values()), 100e9, bench.BenchPlan(), "mnistlab bench")
    assert "| mnistlab --preset fast | 2 | 2 | 99.15% / 99.10% | 4.0 |" in table
    assert "| seed's code as written | 1 | 2 | 95.00% / 95.00% | — |" in table


def test_phase_table_takes_medians_and_leaves_the_rest_to_start_up():
    runs = [_measured("mnistlab --preset fast", [0.99], s, seed=i) for i, s in enumerate((2.0, 4.0, 3.0))]
    for r, pictures in zip(runs, (1.0, 3.0, 2.0), strict=True):
        r.timings = {"training": r.train_seconds, "pictures": pictures}  # wall = training + 3
    reference_run = _measured("seed's code as written", [0.9], 10.0)
    rows = bench.summarize([reference_run, *runs], peak=100e9)
    fast = rows[1]
    assert "timings" not in rows[0]
    assert fast["timings"] == {"training": 3.0, "pictures": 2.0, "start-up and other": 1.0}  # 3 - 2 each time
    table = bench.markdown(rows, 100e9, bench.BenchPlan(), "mnistlab bench")
    assert "| recipe | whole command | training | pictures | start-up and other |" in table
    assert "| mnistlab --preset fast | 6.0 | 3.00 | 2.00 | 1.00 |" in table


def test_quick_plan_is_bounded_and_full_plan_runs_every_seed():
    from mnistlab.config import PRESETS

    quick = bench.BenchPlan(quick=True).jobs()
    for j in quick:  # at most an epoch of 300 batches (references), the presets at most 2 epochs
        if j["kind"] == "reference":
            assert j["epochs"] == 1 and j["max_batches"] <= 300 and j["max_valid"] <= 2000, j
        else:
            assert j.get("epochs", PRESETS[j["preset"]]["epochs"]) <= 2, j
    full = bench.BenchPlan(seeds=(0, 1, 2)).jobs()
    fast = [(j["seed"], j.get("precision")) for j in full if j.get("preset") == "fast"]
    if calls.bf16_available():  # each seed in fp32, then in bf16 right after it, each row named
        assert fast == [(s, p) for s in (0, 1, 2) for p in ("fp32", "bf16")]
        assert {j["name"] for j in full if j.get("precision")} == {f"mnistlab --preset fast --precision {p}"
                                                                   for p in ("fp32", "bf16")}
    else:
        assert fast == [(0, None), (1, None), (2, None)]
    assert not [j for j in bench.BenchPlan(device="cuda").jobs() if j.get("precision")]


def test_reference_recipe_runs_in_its_own_process():
    job = {"name": "seed's code as written", "kind": "reference", "recipe": "seed", "epochs": 1, "max_batches": 5}
    r = bench.run_job(job)
    assert len(r.epochs) == 1 and r.epochs[0]["images"] == 5 * 64
    assert 0 < r.epochs[0]["valid_acc"] < 1 and r.max_rss_mb > 50 and r.wall_seconds > r.train_seconds > 0


def test_reference_examples_net_shapes():
    out = reference.ExamplesNet()(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.allclose(out.exp().sum(1), torch.ones(2))


def test_bench_bad_options_are_one_line(tmp_path, capsys):
    assert run_cli(["bench", "--out", str(tmp_path / "missing" / "bench.md")]) == 2
    assert "expected a file in an existing folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_cli(["bench", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_a_failing_recipe_process_is_a_one_line_run_error(tmp_path):
    with pytest.raises(RunError, match=r"failed \(exit status 1\): boom"):
        bench._run([sys.executable, "-c", "import sys; sys.exit('boom')"], tmp_path / "log")


def test_the_seed_benchmark_script_runs_both_sides():
    """benchmarks/bench_seed.py (``make bench``): the seed's code and ours, one epoch each, side by side."""
    script = Path(__file__).parents[1] / "benchmarks" / "bench_seed.py"
    done = subprocess.run([sys.executable, str(script), "--epochs", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 2 and "seed code as written" in rows[0] and "mnistlab train" in rows[1], done.stdout
    assert re.search(r"speed-up \(seed / mnistlab\): training \d+\.\d\dx", done.stdout), done.stdout


def test_the_table_states_bf16_beside_fp32_from_one_run():
    runs = [_measured("mnistlab --preset fast --precision fp32", [0.99], t, seed=i)
            for i, t in enumerate((3.0, 2.8, 3.2))]
    runs += [replace(_measured("mnistlab --preset fast --precision bf16", [0.99], t, seed=i), precision="bf16")
             for i, t in enumerate((2.4, 2.0, 2.2))]
    rows = bench.summarize(runs, peak=100e9, peak_bf16=250e9)
    table = bench.markdown(rows, 100e9, bench.BenchPlan(), "mnistlab bench", peak_bf16=250e9)
    assert "mnistlab --preset fast --precision bf16: training 1.36x as fast as fp32 in this run (2.20 s against " \
           "3.00 s, medians)" in table
    assert "peak (fp32 matrix product): 100 GFLOP/s; bf16 matrix product (the bf16 runs' peak): 250 GFLOP/s" in table
    # each row against its own precision's peak: 1 MFLOP an image at 50,000 / 3.0 s and 50,000 / 2.2 s
    fp32, bf16 = rows
    assert fp32["percent_of_peak"] == pytest.approx(100 * 1e6 * 50000 / 3.0 / 100e9)
    assert bf16["percent_of_peak"] == pytest.approx(100 * 1e6 * 50000 / 2.2 / 250e9)
    # without a bf16 peak (a CPU without the kernels), every row against the fp32 one
    assert bench.summarize(runs, peak=100e9)[1]["percent_of_peak"] == pytest.approx(100 * 1e6 * 50000 / 2.2 / 100e9)


def test_the_bf16_step_benchmark_times_both_precisions():
    """benchmarks/bench_bf16.py: the kernels' calls in fp32 and bf16, alternating; a bad width is one line."""
    from mnistlab.kernels import calls

    script = Path(__file__).parents[1] / "benchmarks" / "bench_bf16.py"
    bad = subprocess.run([sys.executable, str(script), "--widths", "16,30,64"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--widths takes three multiples of 16" in bad.stderr
    if not calls.bf16_available():
        pytest.skip("no bf16 kernels here: the CPU lacks AVX512-BF16, or MNISTLAB_BF16=0")
    done = subprocess.run([sys.executable, str(script), "--batch", "9", "--steps", "2", "--widths", "16,48,32"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| fp32") or line.startswith("| bf16")]
    assert len(rows) == 2 and all(len(re.findall(r"\d+\.\d\d", row)) == 4 for row in rows), done.stdout
    assert re.search(r"bf16: the kernels' step \d+\.\d\dx as fast as fp32", done.stdout), done.stdout
