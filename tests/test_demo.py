"""The demo (python -m fusedmtl.demo): a tiny run writes its JSON and PNG with finite metrics, is
reproducible for a fixed seed, and the generated problem has the property the demo advertises
(robust losses beat L2 on the task with heavy-tailed label glitches)."""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import subprocess
import sys

import pytest

from fusedmtl import demo
from fusedmtl.demo.data import make_problem
from fusedmtl.demo.train import Config, deterministic, train_method

HAS_EXTRAS = all(importlib.util.find_spec(m) is not None for m in ("rich", "matplotlib"))

TINY = [
    "--steps",
    "20",
    "--methods",
    "fixed,mgda",
    "--n-train",
    "512",
    "--n-test",
    "256",
    "--compare-method",
    "mgda",
    "--compare-losses",
    "mse,smooth_l1",
    "--seed",
    "3",
    "--no-progress",
]


def _metrics(data: dict) -> dict:
    return {
        "methods": {m: r["metrics"] for m, r in data["methods"].items()},
        "loss_comparison": {
            loss: r["metrics"] for loss, r in data["loss_comparison"]["runs"].items()
        },
    }


def _all_finite(tree) -> bool:
    if isinstance(tree, dict):
        return all(_all_finite(v) for v in tree.values())
    return math.isfinite(tree)


@pytest.mark.skipif(not HAS_EXTRAS, reason="rich and matplotlib are not installed")
def test_tiny_run_writes_outputs_and_is_reproducible(tmp_path):
    assert demo.main([*TINY, "--out", str(tmp_path / "a")]) == 0
    png, js = tmp_path / "a" / demo.PNG_NAME, tmp_path / "a" / demo.JSON_NAME
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert list(data["methods"]) == ["fixed", "mgda"]
    assert set(data["loss_comparison"]["runs"]) == {"mse", "smooth_l1"}
    assert data["config"]["steps"] == 20 and data["config"]["seed"] == 3
    measured = datetime.datetime.fromisoformat(data["environment"]["date"])
    assert abs(datetime.datetime.now(datetime.timezone.utc) - measured).total_seconds() < 3600
    metrics = _metrics(data)
    assert _all_finite(metrics)
    for run in data["methods"].values():
        assert set(run["metrics"]) == {"energy", "sensor", "class"}
        assert 0.0 <= run["metrics"]["class"]["accuracy"] <= 1.0
        assert run["wall_time_s"] > 0
        assert len(run["weights"]["step"]) == 20 and all(
            w is not None for w in run["weights"]["energy"]
        )
    assert data["methods"]["fixed"]["final_weights"] == pytest.approx(
        {"energy": 1 / 3, "sensor": 1 / 3, "class": 1 / 3}
    )

    # Same seed, second run (no plot): bit-identical metrics.
    assert demo.main([*TINY, "--out", str(tmp_path / "b"), "--no-plot"]) == 0
    again = json.loads((tmp_path / "b" / demo.JSON_NAME).read_text())
    assert _metrics(again) == metrics
    assert not (tmp_path / "b" / demo.PNG_NAME).exists()


def test_runs_in_plain_text_without_rich_and_matplotlib(tmp_path):
    # The console script as a user without the extras runs it: both imports fail.
    code = (
        "import sys; sys.modules['rich'] = sys.modules['matplotlib'] = None; "
        "from fusedmtl.demo import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *TINY, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "rich and matplotlib not installed" in result.stdout
    assert "pip install 'fusedmtl[demo]'" in result.stdout
    assert "Weighting methods: test metrics" in result.stdout and "mgda" in result.stdout
    assert "[bold" not in result.stdout  # rich markup dropped
    assert (tmp_path / demo.JSON_NAME).exists() and not (tmp_path / demo.PNG_NAME).exists()


def test_unknown_method_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--methods", "fixed,nope", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_robust_loss_beats_l2_on_the_glitchy_task():
    # Why this holds: 20 % of the 'sensor' training labels get a glitch of +3|t_3| (one-sided,
    # mean +3.3). L2 fits the conditional mean of the labels, which the glitches lift by about
    # 0.2 * 3.3 = 0.66 everywhere (and their heavy tail makes its gradient noisy); smooth-L1 with
    # beta = 0.25 has a bounded gradient on the glitches and fits close to the conditional median,
    # lifted only to the 62.5 % quantile of the 0.2-sd clean noise (+0.06). The test labels are
    # clean, so L2's clean-test MAE carries that ~0.66 bias and smooth-L1's does not. Under
    # grad_normalization (invariant to each loss's scale, so the comparison is about the loss's
    # shape only) and 300 steps, seed 0 gives MAE 0.74 (L2) vs 0.33 (smooth-L1); seeds 0-4 give
    # ratios of 2.1 to 3.1. The check asks for a ratio of 1.5.
    config = Config(steps=300, n_train=2048, n_test=1024, seed=0, eval_every=300)
    problem = make_problem(n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    with deterministic(1):
        mae = {
            loss: train_method(
                "grad_normalization", problem, config, losses={"sensor": loss}
            ).metrics["sensor"]["mae"]
            for loss in ("mse", "smooth_l1")
        }
    assert mae["smooth_l1"] * 1.5 < mae["mse"], mae


def test_method_specs_with_refresh_every():
    from fusedmtl.demo.train import DEFAULT_METHODS, MultiTaskNet, is_method, make_weighting

    assert is_method("mgda") and is_method("mgda@16") and is_method("fixed")
    for bad in ("fixed@4", "mgda@0", "mgda@x", "mgda@", "nope@4"):
        assert not is_method(bad), bad
    assert {"mgda", "mgda@16", "grad_normalization", "grad_normalization@16"} <= set(
        DEFAULT_METHODS
    )
    problem = make_problem(n_train=64, n_test=32, seed=0)
    config = Config(n_train=64, n_test=32)
    model = MultiTaskNet(problem.in_dim, {t.name: t.out_dim for t in problem.tasks})
    losses = {t.name: t.loss for t in problem.tasks}
    assert make_weighting("mgda@16", model, problem, losses, config).refresh_every == 16
    assert make_weighting("mgda", model, problem, losses, config).refresh_every == 1


def test_refresh_every_run_is_its_own_row(tmp_path):
    argv = [*TINY, "--out", str(tmp_path)]
    argv[argv.index("fixed,mgda")] = "mgda,mgda@4"
    assert demo.main([*argv, "--no-plot"] if "--no-plot" in _flags() else argv) == 0
    data = json.loads((tmp_path / demo.JSON_NAME).read_text())
    assert set(data["methods"]) == {"mgda", "mgda@4"}
    assert _all_finite(_metrics(data)["methods"])
    # 20 steps with 4-step-old coefficients: a different run from the exact method's
    assert data["methods"]["mgda"]["metrics"] != data["methods"]["mgda@4"]["metrics"]


def _flags() -> str:
    return demo._parser().format_help()
