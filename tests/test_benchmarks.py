"""Benchmarks run for real, shrunk: they must keep working, whatever their figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_CLI_ARGS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_step_cost_reports_every_variant_against_the_first():
    tiny = " ".join(arg for arg in TINY_CLI_ARGS if not arg.startswith("--trainer."))
    result = subprocess.run(
        [sys.executable, "benchmarks/train_step_cost.py", "--steps", "2", "--warmup", "1",
         "--logit-floor", "2,2,8,16",
         f"two-tower={tiny}", f"MoL={tiny} --model=MoL --model.similarity.init_args.logit_gate_hidden_dim=0"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.stdout.splitlines() if line.startswith("| ")}
    floors = {"component logits alone, float32", "component logits alone, bfloat16"}
    assert set(rows) == {"variant", "two-tower", "MoL", *floors}
    for name in floors:  # timed forward and backward, no optimiser (at this size a floor may round to 0 ms)
        forward, backward, optimiser, step, ratio = (float(cell) for cell in rows[name])
        assert optimiser == 0 and ratio >= 0 and forward + backward == pytest.approx(step, abs=3)
    assert rows["two-tower"][-1].strip() == "1.00"
    forward, backward, optimiser, step, ratio = (float(cell) for cell in rows["MoL"])
    assert step > 0 and ratio > 0 and forward + backward + optimiser == pytest.approx(step, abs=3)


def test_train_step_cost_rejects_a_malformed_logit_floor():
    result = subprocess.run(
        [sys.executable, "benchmarks/train_step_cost.py", "--logit-floor", "8,4,64", "two-tower="],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2 and "four positive integers P_Q,P_X,D_P,R, got '8,4,64'" in result.stderr


@pytest.mark.parametrize("options", [[], ["--hidden", "16", "--bfloat16"]])
def test_pair_gate_kernel_times_the_fused_and_the_pytorch_gate(options):
    result = subprocess.run(
        [sys.executable, "benchmarks/pair_gate_kernel.py", "--queries", "50", "--items", "40", "--components", "4,2",
         "--repeats", "1", *options],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"gate", "fused", "PyTorch ops"}
    assert float(rows["fused"][-1]) == 1.0 and float(rows["PyTorch ops"][-1]) > 0
    forward, backward, total = (float(cell) for cell in rows["PyTorch ops"][:3])
    assert forward >= 0 and backward >= 0 and total == pytest.approx(forward + backward, abs=0.2)


@pytest.mark.slow
def test_step_profile_times_the_phases_and_profiles():
    tiny = [arg for arg in TINY_CLI_ARGS if not arg.startswith("--trainer.")]
    result = subprocess.run(
        [sys.executable, "benchmarks/step_profile.py", *tiny, "--model=MoL", "--data.batch_size=8"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in steps] == ["step 2", "step 3", "step 4", "step 5"]
    assert all(float(line.split("forward ")[1].split()[0]) > 0 for line in steps)
    assert "aten::" in result.stdout and "Self CPU time total" in result.stdout


# ------------------------------------------------------------------------------------------------------------------
# Every other script in benchmarks/ at its tiny size: exit 0 and the table or figure it exists to produce.
def _run_script(args: list[str], timeout: int = 300, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
        env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **env},
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


def _table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows -> {first cell: the other cells}, header and rule lines left out."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_bad_inputs_tiny_tabulates_each_case_with_its_one_line_error():
    out = _run_script(["benchmarks/bad_inputs.py", "--tiny"]).stdout
    rows = _table_rows(out)
    assert set(rows) == {"1", "39"}
    assert rows["1"][0] == "unknown option" and rows["1"][2] == "1"
    assert rows["1"][3].startswith("rails_lightning: error: unrecognized arguments: --model.nonexistent=3")
    assert rows["39"][1] == "`sweep nope.yaml`" and rows["39"][3].startswith("rails_lightning: error: nope.yaml: sweep file not found")


@pytest.mark.slow
def test_bad_inputs_of_action_types_are_one_line_errors():
    """The action-type rows of the table: each refused with exit 1 and one line that names the bad value."""
    out = _run_script(["benchmarks/bad_inputs.py", "--cases", *map(str, range(49, 56))], timeout=900).stdout
    rows = _table_rows(out)
    expected = {
        "49": ("unknown action column", "missing column(s) ['liked']"),
        "50": ("action column that is not 0/1, a list or names", "action column 'liked' must hold 0/1 flags, found 2"),
        "51": ("action type named in two action columns", "action type(s) ['liked'] come from more than one action column"),
        "52": ("target group that is no action type", "--data.target_groups='loved' is not a group of"),
        "53": ("history filter that is no action type", "--model.history_filter='loved' is not an action type of the data"),
        "54": ("shuffled actions of a log without actions", "--data.shuffle_history_actions: <tmp>/g.csv has no action types"),
        "55": ("retrieve --history with an action the model lacks", "unknown action type(s) ['loved']; this model knows ['like', 'skip']"),
    }
    assert set(rows) == set(expected)
    for number, (name, message) in expected.items():
        case, _, exit_code, last_line = rows[number]
        assert (case, exit_code) == (name, "1") and last_line.startswith("rails_lightning: error:") and message in last_line, rows[number]


@pytest.mark.slow
def test_corpus_eval_tiny_compares_each_index_with_the_exact_search(tmp_path):
    out = _run_script(["benchmarks/corpus_eval.py", "--tiny", "--out", str(tmp_path / "corpus_eval.json")]).stdout
    table = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 2,000 ")]
    assert [cells[2].strip() for cells in table] == ["Flat (exact)", "IVF16,Flat", "HNSW32"]
    for cells in table[1:]:
        assert 0 < float(cells[7]) <= 1  # recall@100 against the exact search
    results = json.loads((tmp_path / "corpus_eval.json").read_text())
    assert results[0]["items"] == 2000 and results[0]["queries"] == 200 and len(results[0]["indexes"]) == 2


@pytest.mark.slow
def test_known_truth_tiny_puts_both_models_beside_the_bayes_optimal_rate(tmp_path):
    out = _run_script(["benchmarks/known_truth.py", "--tiny", "--root", str(tmp_path), "--out", str(tmp_path / "kt.md")]).stdout
    rows = _table_rows(out)
    assert set(rows) == {"setting", "mixture", "single"}
    assert rows["setting"][:3] == ["dot HR@10", "MoL HR@10", "Bayes-optimal HR@10"]
    for setting in ("mixture", "single"):
        dot, mol, bayes = (float(cell.split(" ± ")[0]) for cell in rows[setting][:3])
        assert 0 <= dot <= 1 and 0 <= mol <= 1 and 0 < bayes <= 1
    assert (tmp_path / "kt.md").read_text().startswith("| setting |")


@pytest.mark.slow
def test_mol_topk_tiny_times_every_rails_search_against_the_exact_one():
    out = _run_script(["benchmarks/mol_topk.py", "--tiny"]).stdout
    assert "### 1,000 items" in out and "Exact MoL top-100: **" in out
    rows = _table_rows(out)
    assert {"per-embedding", "averaged", "combined"} <= set(rows)
    k_prime, backend, candidates, build, search, speed_up, recall = rows["averaged"]
    assert k_prime == "128" and backend == "faiss" and float(candidates) == 128 and 0 < float(recall) <= 1
    assert float(speed_up.rstrip("x")) > 0


def test_serve_latency_tiny_reports_percentiles_and_recall():
    out = _run_script(["benchmarks/serve_latency.py", "--tiny"]).stdout
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                             for line in out.splitlines() if "| 5,000 |" in line)}
    assert set(rows) == {"dot, FAISS Flat (exact)", "dot, FAISS HNSW32 efSearch=32", "MoL 8x4x64, exact",
                         "MoL, RAILS averaged top-k k'=256"}
    for name, (items, p50, p95, p99, throughput, recall, build) in rows.items():
        assert float(p50) <= float(p95) <= float(p99) and 0 < float(recall) <= 1, name
    assert float(rows["dot, FAISS Flat (exact)"][5]) == 1.0


@pytest.mark.slow
def test_train_cost_tiny_reports_the_epoch_ratio():
    out = _run_script(["benchmarks/train_cost.py", "--tiny"]).stdout
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(rounds) == 1 and "two-tower" in rounds[0] and "MoL" in rounds[0]
    median = next(line for line in out.splitlines() if line.startswith("median: "))
    assert float(median.split("ratio ")[1].split()[0]) > 0


@pytest.mark.slow
def test_train_throughput_tiny_runs_both_loops():
    out = _run_script(["benchmarks/train_throughput.py", "--tiny"]).stdout
    median = next(line for line in out.splitlines() if line.startswith("median: "))
    framework, plain = (float(median.split(name)[1].split()[0]) for name in ("framework ", "plain "))
    assert framework > 0 and plain > 0
    assert float(median.split("ratio ")[1].split()[0]) == pytest.approx(framework / plain, rel=0.05)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """Three real tiny fits of 2 epochs: seeds 0 and 1 of one config, and one run of another (item_dim 8)."""
    root = tmp_path_factory.mktemp("curves")
    variants = {"a0": ["--seed_everything=0"], "a1": ["--seed_everything=1"], "b0": ["--seed_everything=0", "--model.item_dim=8"]}
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    fits = {name: subprocess.Popen([sys.executable, "-m", "rails_lightning", "fit", *TINY_CLI_ARGS,
                                    "--trainer.logger=false", *options, f"--run_dir={root / name}"],
                                   cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for name, options in variants.items()}
    for name, fit in fits.items():
        assert fit.wait(timeout=600) == 0, fit.stderr.read()[-3000:]
    return {name: root / name for name in variants}


@pytest.mark.slow
def test_plot_curves_draws_one_colour_per_model_with_the_seeds_mean_and_band(tiny_runs, tmp_path):
    import importlib.util

    out = tmp_path / "curves.png"
    result = _run_script(["benchmarks/plot_curves.py", *(str(path) for path in tiny_runs.values()), "--out", str(out)])
    assert out.stat().st_size > 5000
    groups = [line for line in result.stdout.splitlines() if line.endswith("run(s)")]
    assert sorted(line.rsplit(": ", 1)[1] for line in groups) == ["1 run(s)", "2 run(s)"]  # seeds 0 and 1 together

    spec = importlib.util.spec_from_file_location("plot_curves", REPO / "benchmarks" / "plot_curves.py")
    plot_curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_curves)
    groups = plot_curves.group_runs([f"{tiny_runs['a0']}=dot", f"{tiny_runs['a1']}=dot", f"{tiny_runs['b0']}=dot, d=8"])
    assert list(groups) == ["dot", "dot, d=8"] and len(groups["dot"]) == 2
    for band in ("minmax", "std"):
        figure = plot_curves.draw(groups, "val/hr@10", band)
        ax = figure.axes[0]
        assert len(ax.lines) == 2 and ax.lines[0].get_color() != ax.lines[1].get_color()  # one line, one colour, per model
        assert len(ax.collections) == 1  # one band: the model with two seeds
        band_colour = ax.collections[0].get_facecolor()[0][:3]
        assert tuple(band_colour) == pytest.approx(matplotlib_rgb(ax.lines[0].get_color()))
        (e0, v0), (e1, v1) = (plot_curves.read_curve(tiny_runs[name], "val/hr@10") for name in ("a0", "a1"))
        assert e0 == e1 == [0, 1]
        assert list(ax.lines[0].get_ydata()) == pytest.approx([(a + b) / 2 for a, b in zip(v0, v1)])
        low, high = ax.collections[0].get_paths()[0].vertices[:, 1].min(), ax.collections[0].get_paths()[0].vertices[:, 1].max()
        if band == "minmax":
            assert (low, high) == pytest.approx((min(v0 + v1), max(v0 + v1)))
        else:
            assert low <= min(ax.lines[0].get_ydata()) and high >= max(ax.lines[0].get_ydata())
        plot_curves.plt.close(figure)


def matplotlib_rgb(colour) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


# ------------------------------------------------------------------------------------------------------------------
# benchmarks/gpu_check.py: the one command for a lent GPU, at its tiny CPU size.
def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_help_explains_every_option_and_the_device_command():
    parser = _gpu_check().build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 20, action.option_strings
    text = parser.format_help()
    assert "--data_dir .gpu_data/ml-1m --out OUT/gpu_check.json" in text and "--tiny" in text


@pytest.mark.slow
def test_gpu_check_tiny_writes_every_part_with_numbers(tmp_path):
    out = tmp_path / "gpu_check.json"
    _run_script(["benchmarks/gpu_check.py", "--tiny", "--out", str(out), "--work_dir", str(tmp_path / "work")], timeout=900)
    result = json.loads(out.read_text())
    assert result["tiny"] is True and result["torch"] and result["device"] and result["date"] and "faiss" in result
    assert result["command"].startswith("python benchmarks/gpu_check.py --tiny")

    (row,) = result["step_ratio"]["rows"]  # a. the RAILS config's MoL against its dot-product twin
    assert result["step_ratio"]["status"] == "done" and row["config"] == "configs/ml-1m/hstu_mol.yaml" and row["counted_steps"] == 2
    for name in ("MoL", "two-tower"):
        phases = row[name]
        assert phases["step_ms"] > 0 and phases["forward_ms"] > 0 and phases["backward_ms"] > 0
    assert row["ratio"] == pytest.approx(row["MoL"]["step_ms"] / row["two-tower"]["step_ms"])

    topk = result["topk"]  # b. exact torch top-k against FAISS's flat index
    assert topk["status"] == "done" and topk["items"] == 5000 and topk["k"] == 100
    torch_row = topk["rows"][0]
    assert torch_row["search"].startswith("torch on cpu") and torch_row["median_s"] > 0 and torch_row["timed_searches"] == 2
    if result["faiss"]:
        assert topk["faiss"] == "FAISS-CPU"
        (faiss_row,) = topk["rows"][1:]
        assert faiss_row["median_s"] > 0 and faiss_row["build_s"] >= 0 and faiss_row["recall_vs_torch"] == pytest.approx(1.0)

    fits = result["fits"]  # c. three seeds side by side through the sweep (or fit processes)
    assert fits["status"] == "done" and fits["runner"] in ("sweep", "fit") and [run["seed"] for run in fits["runs"]] == [0, 1, 2]
    for run in fits["runs"]:
        assert run["read_from"] == "run.json" and run["epochs"] == 2 and [point["epoch"] for point in run["curve"]] == [0, 1]
        assert 0 < run["first_epoch_s"] and 0 < run["later_epoch_s"] and 0 <= run["test_hr@10"] <= 1 and 0 <= run["best_val_hr@10"] <= 1
    extrapolation = fits["extrapolation"]
    assert extrapolation["full_epochs"] == 101 and extrapolation["side_by_side_s"] == pytest.approx(
        max(run["first_epoch_s"] + 100 * run["later_epoch_s"] for run in fits["runs"]))

    text = out.with_suffix(".md").read_text()
    for heading in ("### a. Training step", "### b. Exact top-100 over 5,000 items", "### c. configs/ml-1m/hstu_mol.yaml", "Extrapolation: 101 epochs x 3 seeds"):
        assert heading in text
    assert result["command"] in text and result["device"] in text


@pytest.mark.slow
def test_gpu_check_reads_a_stopped_fit_from_its_last_checkpoint(tmp_path):
    """A fit stopped at the part's deadline leaves no run record: its epochs come from checkpoints/last.ckpt."""
    import time

    gpu_check = _gpu_check()
    run_dir = tmp_path / "run"
    fit = subprocess.Popen([sys.executable, "-m", "rails_lightning", "fit", *TINY_CLI_ARGS, "--trainer.max_epochs=1000",
                            "--trainer.logger=false", f"--run_dir={run_dir}"], cwd=REPO, start_new_session=True,
                           env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waited = time.monotonic() + 600
    try:
        while not (run_dir / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < waited and fit.poll() is None:
            time.sleep(0.5)
    finally:
        assert gpu_check.wait_or_stop([fit], time.monotonic()) is True  # still running: interrupted, then killed
    assert fit.returncode is not None and not (run_dir / "run.json").exists()
    progress = gpu_check.run_progress(0, run_dir)
    assert progress["read_from"] == "checkpoints/last.ckpt" and progress["status"] == "missing" and progress["epochs"] >= 1
    assert progress["first_epoch_s"] > 0 and 0 <= progress["best_val_hr@10"] <= 1 and progress["test_hr@10"] is None


@pytest.mark.slow
def test_time_to_quality_tests_every_epochs_weights_and_plots_them(tmp_path):
    """Two tiny fits of 3 epochs through the script: a test point per epoch at its fit time, and the point of the
    validation-selected epoch is the fit's own test figure (the same weights, tested again)."""
    out = tmp_path / "ttq"
    _run_script(["benchmarks/time_to_quality.py", "--seeds", "0", "1", "--out", str(out), "--target", "0.05",
                 "--", *TINY_CLI_ARGS, "--trainer.max_epochs=3"], timeout=600)
    result = json.loads((out / "time_to_quality.json").read_text())
    assert set(result["points"]) == {"seed0", "seed1"} and (out / "time_to_quality.png").stat().st_size > 5000
    for name, points in result["points"].items():
        assert [p["epoch"] for p in points] == [0, 1, 2]
        times = [p["fit_seconds"] for p in points]
        assert times == sorted(times) and times[0] > 0
        record = json.loads((out / name / "run.json").read_text())
        best = max(points, key=lambda p: p["val/hr@10"])  # ModelCheckpoint keeps the first best on a tie
        assert record["checkpoint"].split("/")[-1].startswith(f"epoch{best['epoch']:03d}")
        assert best["test/hr@10"] == pytest.approx(record["test"]["test/hr@10"])
        summary = result["runs"][name]
        reached = next((p for p in points if p["test/hr@10"] >= 0.05), None)
        assert summary["first_reached_epoch"] == (reached["epoch"] if reached else None)
    assert "| mean ± std |" in (out / "time_to_quality.md").read_text()
    # Again on the finished runs, every 2nd epoch only: epoch 1 (the 2nd), the last, and the selected one.
    sparse = tmp_path / "sparse"
    _run_script(["benchmarks/time_to_quality.py", str(out / "seed0"), "--every", "2", "--out", str(sparse)], timeout=600)
    points = json.loads((sparse / "time_to_quality.json").read_text())["points"]["seed0"]
    selected = max(result["points"]["seed0"], key=lambda p: p["val/hr@10"])["epoch"]
    assert [p["epoch"] for p in points] == sorted({1, 2, selected})
    every_epoch = {p["epoch"]: p["test/hr@10"] for p in result["points"]["seed0"]}
    assert all(p["test/hr@10"] == pytest.approx(every_epoch[p["epoch"]]) for p in points)  # the same weights, the same test
