"""The real DVC pipeline, offline, in a temporary git repository: dvc repro, dvc exp run -S,
dvc metrics diff, a queued sweep; every stage reruns when any module it imports changes; a
copy of the repository runs its own code. Generated sources stand in for the Hub."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import dvc, make_pipeline_repo, sh, tiny_params, tool_env

pytestmark = pytest.mark.e2e
STAGES = ("check", "prepare", "convert", "train", "evaluate")


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory, sources) -> Path:
    return make_pipeline_repo(tmp_path_factory.mktemp("repo"), tiny_params(sources))


def test_repro_exp_run_and_metrics_diff(pipeline_repo):
    repo = pipeline_repo
    dvc("repro", cwd=repo)
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    for key in ("ppl", "readout_ppl", "accuracy", "readout_accuracy"):
        assert key in metrics and key in metrics["baseline"], key
    for part in (metrics["sparsity"], metrics["baseline"]["sparsity"]):
        assert {"l0", "near_zero", "near_zero_rel", "chunk_rms", "max_over_rms", "dead_fraction",
                "per_chunk"} <= set(part)
        assert set(part["per_chunk"]) == {"0", "1"}
    assert set(metrics["prune_curve"]) == {"0", "0.5", "0.75"}
    test_tokens = json.loads((repo / "data/tokenized/meta.json").read_text())["tokens"]["test"]
    protocol = metrics["protocol"]
    assert protocol["windows"] == (test_tokens - 1) // 32 and protocol["tokens"] == protocol["windows"] * 32
    assert (protocol["precision"], protocol["device"], protocol["backend"]) == ("fp32", "cpu", "reference")
    # the trained model records the tokenizer it was trained with
    assert (repo / "models/samba/tokenizer.json").is_file()
    assert (repo / "metrics/plots/prune_curve.png").is_file()
    # dvclive must not have written a dvc.yaml of its own
    assert not list((repo / "metrics").rglob("dvc.yaml"))

    # a second repro has nothing to do
    again = dvc("repro", cwd=repo).stdout
    assert again.count("didn't change, skipping") == len(STAGES) and "Running stage" not in again
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "baseline run", cwd=repo)

    # an experiment with exact top-k sparsity gives exact zeros the dense run does not have
    dvc("exp", "run", "-S", "model.sparsity_target=0.5", "-n", "topk-half", cwd=repo)
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)
    exp_metrics = _experiment_metrics(shown, "topk-half")
    assert exp_metrics["sparsity"]["l0"] >= 0.5 > metrics["sparsity"]["l0"]
    assert exp_metrics["baseline"]["ppl"] == metrics["baseline"]["ppl"]  # the same baseline
    # what DVC tabulates is the headline: a few numbers, the per-chunk detail left in eval.json
    assert "per_chunk" not in exp_metrics["sparsity"] and "prune_curve" not in exp_metrics

    # carried to a commit, dvc metrics diff between the two commits shows the change
    dvc("exp", "apply", "topk-half", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "top-k half", cwd=repo)
    applied = json.loads((repo / "metrics/eval.json").read_text())
    assert applied["baseline"]["sparsity"]["l0"] == metrics["baseline"]["sparsity"]["l0"]  # baseline stays dense
    diff = json.loads(dvc("metrics", "diff", "HEAD~1", "HEAD", "--json", cwd=repo).stdout)
    assert set(diff) <= {"metrics/eval_summary.json", "metrics/train/summary.json"}
    eval_diff = diff["metrics/eval_summary.json"]
    assert eval_diff["sparsity.l0"]["diff"] > 0.4
    assert eval_diff["ppl"]["old"] == pytest.approx(metrics["ppl"])
    # and the plots compare across the two commits
    plots = json.loads(dvc("plots", "diff", "HEAD~1", "HEAD", "--json", cwd=repo).stdout)
    assert not plots.get("errors")
    assert "metrics/train/plots/metrics/val/ppl.tsv" in plots["data"]
    assert any(k.startswith("Prune curve") for k in plots["data"])


def test_a_key_no_stage_tracks_is_refused(pipeline_repo):
    # -S +KEY adds a key; under pretrained no stage tracks it, so without the check stage nothing
    # would run and the experiment would pass for one. The check stage tracks every value.
    repo = pipeline_repo
    dvc("repro", cwd=repo)
    proc = dvc("exp", "run", "-S", "+pretrained.freeze_backbon=true", cwd=repo, check=False)
    sh("bash", "-c", "touch params.yaml && git checkout params.yaml", cwd=repo)
    assert proc.returncode != 0
    assert ("[check] error: unknown key(s) pretrained.freeze_backbon; did you mean pretrained.freeze_backbone?"
            in proc.stdout + proc.stderr), proc.stdout + proc.stderr


def test_queued_sweep_runs(pipeline_repo):
    # dvc exp run --queue -S ...=a,b then dvc queue start -j 1 (after the test above): the seed's
    # recipe (L1 at 0.05) against a control without the penalty
    repo = pipeline_repo
    dvc("exp", "run", "--queue", "-S", "model.sparsity_target=0.0", "-S", "training.pruning_penalty=l1",
        "-S", "training.pruning_weight=0.0,0.05", cwd=repo)
    dvc("queue", "start", "-j", "1", cwd=repo)
    deadline = time.time() + 300
    while time.time() < deadline:
        status = dvc("queue", "status", cwd=repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") >= 2, status
    swept = {}
    for rev in _experiment_revs(json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)):
        training = rev["data"]["params"]["params.yaml"]["data"]["training"]
        if rev["data"].get("metrics", {}).get("metrics/eval_summary.json", {}).get("data") is None:
            continue
        if training["pruning_penalty"] == "l1" and training["pruning_weight"] in (0.0, 0.05):
            full = json.loads(sh("git", "show", f"{rev['rev']}:metrics/eval.json", cwd=repo).stdout)
            swept[training["pruning_weight"]] = full["sparsity"]  # every chunk's measures
    assert set(swept) == {0.0, 0.05}
    # L1 is met by shrinking the whole stream, not by reshaping it: every chunk's RMS falls
    # (6-7% here; a scale-free Hoyer term at 0.05 leaves it within 0.3%) while the scale-free
    # max/RMS stays put (Hoyer at the default 0.5 raises it by 5-12%)
    for c in ("0", "1"):
        control, l1 = swept[0.0], swept[0.05]
        assert l1["chunk_rms"][c] < 0.97 * control["chunk_rms"][c], c
        assert l1["max_over_rms"][c] == pytest.approx(control["max_over_rms"][c], rel=0.02), c

    # the sweep's picture, from the experiments themselves
    out = sh(sys.executable, "-m", "samba.frontier", "frontier", cwd=repo).stdout
    table = json.loads((repo / "frontier/frontier.json").read_text())
    assert table["best_dense"] is not None and "Best dense model:" in out
    weights = {r["params"].get("training.pruning_weight") for r in table["rows"]}
    assert {0.0, 0.05} <= weights and (repo / "frontier/frontier.png").is_file()


def _stage_modules(repo: Path, stage: str) -> list[str]:
    """The src/samba files a stage script imports, found by importing it (not running it)."""
    code = ("import importlib.util, sys, json; "
            f"spec = importlib.util.spec_from_file_location('stage', 'stages/{stage}.py'); "
            "sys.path.insert(0, 'stages'); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(json.dumps(sorted(getattr(v, '__file__', '') or '' for v in list(sys.modules.values()))))")
    files = json.loads(sh(sys.executable, "-c", code, cwd=repo).stdout)
    src = str(repo / "src" / "samba")
    return sorted(str(Path(f).relative_to(repo)) for f in files if f.startswith(src))


def test_every_module_a_stage_imports_reruns_it(pipeline_repo):
    repo = pipeline_repo
    dvc("repro", cwd=repo)  # whatever the tests above left, up to date now
    imported = {stage: _stage_modules(repo, stage) for stage in STAGES}
    assert "src/samba/data.py" in imported["evaluate"] and "src/samba/loss.py" in imported["train"]  # through others
    for module in sorted(set().union(*imported.values())):
        path = repo / module
        original = path.read_text()
        path.write_text(original + "\n# changed\n")
        try:
            changed = json.loads(dvc("status", "--json", cwd=repo).stdout)
        finally:
            path.write_text(original)
        for stage in STAGES:
            if module in imported[stage]:
                assert stage in changed, f"{module} changed but dvc status does not name {stage}: {changed}"
    assert json.loads(dvc("status", "--json", cwd=repo).stdout) == {}


def test_a_copy_of_the_repository_runs_its_own_code(pipeline_repo, tmp_path):
    # The package is installed editable from this checkout; a stage of another copy must still
    # import that copy's src/ (what DVC hashed for it), as dvc exp run --temp / --queue do.
    copy = tmp_path / "copy"
    sh("git", "clone", "-q", str(pipeline_repo), str(copy), cwd=tmp_path)
    marker = copy / "src/samba/__init__.py"
    marker.write_text(marker.read_text() + "\nimport sys as _s; print('samba imported from', __file__, file=_s.stderr)\n")
    for stage in STAGES:
        proc = subprocess.run([sys.executable, f"stages/{stage}.py", "--help"], cwd=copy, capture_output=True,
                              text=True, env=tool_env())
        assert proc.returncode == 0, proc.stderr
        assert f"samba imported from {copy / 'src/samba/__init__.py'}" in proc.stderr, (stage, proc.stderr)


def _experiment_revs(shown: list):
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            yield from exp.get("revs", [])


def _experiment_metrics(shown: list, name: str) -> dict:
    for rev in _experiment_revs(shown):
        if rev.get("name") == name:
            return rev["data"]["metrics"]["metrics/eval_summary.json"]["data"]
    raise AssertionError(f"experiment {name} not in dvc exp show: {json.dumps(shown)[:2000]}")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_plots_pages_render_offline(pipeline_repo, tmp_path):
    # dvc plots show / diff write a page whose vega, vega-lite and vega-embed are inline (the
    # template .dvc/config names): no remote script, and headless Chromium draws the charts.
    from samba.plots_template import expected_versions

    repo = pipeline_repo
    if not (repo / "metrics/eval.json").is_file():  # run alone: the module's earlier tests ran nothing
        dvc("repro", cwd=repo)
    pages = {}
    dvc("plots", "show", "-o", str(tmp_path / "show"), cwd=repo)
    dvc("plots", "diff", "HEAD", "-o", str(tmp_path / "diff"), cwd=repo)  # HEAD against the workspace
    for name in ("show", "diff"):
        html = (tmp_path / name / "index.html").read_text()
        assert not re.findall(r"<script[^>]*\bsrc=", html), "the page loads a script from elsewhere"
        assert "cdn.jsdelivr" not in html
        for package, version in expected_versions().items():
            assert f"/* {package}@{version} " in html
        assert html.count("vegaEmbed(") >= 4
        pages[name] = tmp_path / name / "index.html"
    chromium = _chromium()
    if chromium is None:
        pytest.skip("needs Debian's chromium (the README's test set-up installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    for name, page in pages.items():
        dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        drawn = len(re.findall(r'class="marks"', dom)) + len(re.findall(r"<canvas", dom))
        assert drawn >= 4, f"{name}: vega drew {drawn} charts"
        shot = tmp_path / f"{name}.png"
        subprocess.run([chromium, *flags, "--window-size=1200,3000", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, timeout=120)
        import numpy as np
        from PIL import Image

        dark = float((np.asarray(Image.open(shot).convert("L")) < 200).mean())
        assert dark > 0.01, f"{name}: the screenshot is blank ({dark:.4f} dark)"
