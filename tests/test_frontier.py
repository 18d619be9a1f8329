"""samba.frontier: each sparse group against its dense twin and the best dense model, seed means,
the grouping that ignores params that do nothing, a deterministic headline, the refusals."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from samba.frontier import EVAL_FILE, TRAIN_FILE, FrontierError, write_frontier

from conftest import tool_env


def _exp(name, ppl, *, target=0.0, pruning=0.0, seed=0, lr=1e-4, distill=0.0, teacher="models/init", zeros=None,
         readout_ppl=None, accuracy=0.4, readout_accuracy=0.38, baseline_ppl=50.0, tokens=1_000_000,
         near_zero_rel=None, rms=1.0, max_over_rms=5.0, penalty="hoyer", ramp=100, max_windows=0,
         train_range=(0.5, 1.0), epochs=None, seq_len=512, train_summary=True):
    """One experiment as ``dvc exp show --json`` lists it: params, evaluation and training headlines."""
    zeros = target if zeros is None else zeros
    params = {"dataset": {"train_range": list(train_range)}, "model": {"sparsity_target": target},
              "training": {"pruning_weight": pruning, "pruning_penalty": penalty, "sparsity_warmup_steps": ramp,
                           "lr": lr, "seed": seed, "distill_weight": distill, "teacher": teacher, "seq_len": seq_len,
                           "epochs": epochs or max(1, tokens // 1_000_000)},
              "eval": {"max_windows": max_windows}, "compute": {"device": f"cuda:{seed % 2}"}}
    scores = {"ppl": ppl, "readout_ppl": readout_ppl or ppl + 1, "accuracy": accuracy,
              "readout_accuracy": readout_accuracy, "ppl_ratio": ppl / baseline_ppl,
              "sparsity": {"l0": zeros, "l0_min_chunk": max(zeros - 0.01, 0.0),
                           "near_zero_rel": zeros + 0.005 if near_zero_rel is None else near_zero_rel,
                           "last_chunk_rms": rms, "max_over_rms": max_over_rms},
              "baseline": {"ppl": baseline_ppl, "readout_ppl": baseline_ppl + 1, "accuracy": 0.3}}
    metrics = {EVAL_FILE: {"data": scores}}
    if train_summary:
        metrics[TRAIN_FILE] = {"data": {"steps": tokens // 8192, "tokens": tokens}}
    return {"rev": name * 4, "name": name, "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics}}


def _shown(exps):
    return [{"rev": "workspace", "data": {}, "experiments": [{"revs": [e]} for e in exps]}]


def _rows(tmp_path, exps):
    return {r["experiment"]: r for r in write_frontier(_shown(exps), tmp_path)}


def test_each_sparse_group_against_its_twin_and_the_best_dense_model(tmp_path):
    kl = dict(lr=3e-4, distill=10.0, teacher="/abs/control")
    exps = [_exp(f"control-s{s}", p, seed=s) for s, p in ((0, 64.85), (1, 64.82), (2, 64.75))]
    exps += [_exp(f"twin-s{s}", p, seed=s, **kl) for s, p in ((0, 58.32), (1, 58.53), (2, 58.24))]
    exps += [_exp(f"topk90-s{s}", p, seed=s, target=0.9, pruning=0.5, **kl) for s, p in ((1, 67.0), (0, 67.13))]
    exps += [_exp("topk95-kl30", 80.0, target=0.95, pruning=0.5, lr=3e-4, distill=30.0, teacher="/abs/control")]
    rows = _rows(tmp_path, exps)
    twin, sparse = rows["twin-s0"], rows["topk90-s0"]
    assert sparse["experiments"] == ["topk90-s0", "topk90-s1"] and sparse["seeds"] == [0, 1]  # listed out of order
    assert sparse["twin_experiment"] == "twin-s0"
    assert sparse["ppl_vs_twin"] == pytest.approx(statistics.fmean([67.0, 67.13]) / twin["ppl"] - 1)
    assert twin["ppl"] == pytest.approx(statistics.fmean([58.32, 58.53, 58.24]))
    # the best dense model is the distilled twin, not the plain control: for every row, dense ones too
    assert {r["best_dense_experiment"] for r in rows.values()} == {"twin-s0"}
    assert sparse["ppl_vs_best_dense"] == pytest.approx(sparse["ppl"] / twin["ppl"] - 1)
    assert rows["control-s0"]["ppl_vs_best_dense"] == pytest.approx(rows["control-s0"]["ppl"] / twin["ppl"] - 1)
    # no dense run at KL 30: no twin, said so
    assert rows["topk95-kl30"]["twin_experiment"] is None and rows["topk95-kl30"]["ppl_vs_twin"] is None
    text = (tmp_path / "frontier.md").read_text()
    assert "Best dense model: `twin-s0`, ppl 58.363 ± 0.150 (3 seeds)" in text
    assert "| no twin |" in text and "80.000 (1 seed)" in text and "± 0.000" not in text
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert saved["best_dense"] == "twin-s0" and len(saved["rows"]) == 4
    assert (tmp_path / "frontier.png").stat().st_size > 10_000


def test_the_best_dense_model_saw_no_more_tokens_and_was_scored_alike(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn, real = [], matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, *a, **k: drawn.append((x, y)) or real(self, x, y, *a, **k))
    exps = [_exp("dense-3ep", 60.0, tokens=3_000_000), _exp("dense-6ep", 55.0, tokens=6_000_000),
            _exp("dense-160win", 40.0, tokens=3_000_000, max_windows=160),  # other test windows
            _exp("standin", 30.0, tokens=1_000_000, train_range=(0.0, 0.5), lr=6e-4),  # other data
            _exp("topk90-3ep", 66.0, target=0.9, tokens=3_000_000),
            _exp("topk90-6ep", 60.5, target=0.9, tokens=6_000_000),
            _exp("dense-1024", 35.0, tokens=3_000_000, seq_len=1024)]  # scored on windows of another length
    rows = _rows(tmp_path, exps)
    assert {r["best_dense_experiment"] for n, r in rows.items() if n.startswith("topk")} == {"dense-3ep", "dense-6ep"}
    # the headline: the best dense model of the most common start, whatever its budget
    assert json.loads((tmp_path / "frontier.json").read_text())["best_dense"] == "dense-6ep"
    # the front is drawn within a start: the stand-in (ppl 30, other data) dominates no one here
    assert rows["dense-6ep"]["pareto"] and rows["dense-160win"]["pareto"] and rows["dense-1024"]["pareto"]
    # the picture sets every row against its own best dense model: the 3-epoch run is drawn too
    assert len(drawn) == len(rows) and (90.0, pytest.approx(100 * (66 / 60 - 1))) in drawn
    assert rows["topk90-3ep"]["best_dense_experiment"] == "dense-3ep"  # dense-6ep saw more tokens
    assert rows["topk90-6ep"]["best_dense_experiment"] == "dense-6ep"
    assert rows["topk90-6ep"]["ppl_vs_best_dense"] == pytest.approx(60.5 / 55 - 1)
    assert rows["dense-160win"]["best_dense_experiment"] == "dense-160win"
    assert rows["standin"]["best_dense_experiment"] == "standin"
    assert rows["topk90-3ep"]["budget_tokens"] == 3_000_000


def test_seeds_are_not_split_by_params_that_do_nothing(tmp_path):
    # one dense recipe, three seeds, each written differently where it does not matter
    exps = [_exp("dense-s0", 60.0, seed=0, penalty="hoyer", ramp=100, teacher="models/init"),
            _exp("dense-s1", 61.0, seed=1, penalty="l1", ramp=0, teacher="/abs/elsewhere"),
            _exp("dense-s2", 62.0, seed=2, penalty="hoyer", ramp=30, teacher="models/init"),
            # a sparse run: its ramp and penalty do matter
            _exp("topk-s0", 70.0, target=0.5, pruning=0.5, ramp=100), _exp("topk-s1", 71.0, target=0.5, pruning=0.5,
                                                                            seed=1, ramp=30)]
    exps[1]["data"]["params"]["params.yaml"]["data"]["model"]["sparsity_target"] = 0  # DVC's -S writes 0, not 0.0
    rows = _rows(tmp_path, exps)
    assert rows["dense-s0"]["n_seeds"] == 3 and rows["dense-s0"]["ppl"] == pytest.approx(61.0)
    assert rows["topk-s0"]["n_seeds"] == 1 and rows["topk-s1"]["n_seeds"] == 1
    assert rows["topk-s0"]["twin_experiment"] == "dense-s0"
    assert set(rows["topk-s0"]["params"]) == {"model.sparsity_target", "training.pruning_weight",
                                             "training.sparsity_warmup_steps"}
    assert set(rows["dense-s0"]["params"]) == {"model.sparsity_target", "training.pruning_weight"}  # no ramp shown


def test_validation_cadence_and_the_teachers_spelling_do_not_split_a_recipe(tmp_path):
    kl = dict(lr=3e-4, distill=10.0)
    exps = [_exp("twin", 58.0, teacher="teachers/control", **kl),
            _exp("topk90", 66.0, target=0.9, pruning=0.5, teacher="./teachers/control", **kl)]
    for exp, every in zip(exps, (10, 200)):  # under keep: last, validation only logs
        exp["data"]["params"]["params.yaml"]["data"]["training"]["eval_every"] = every
    assert _rows(tmp_path, exps)["topk90"]["twin_experiment"] == "twin"


def test_every_measure_is_the_mean_over_seeds(tmp_path):
    seeds = [dict(seed=0, ppl=70.0, zeros=0.9, readout_ppl=80.0, accuracy=0.30, readout_accuracy=0.27,
                  baseline_ppl=100.0, near_zero_rel=0.91, rms=2.0, max_over_rms=10.0),
             dict(seed=1, ppl=72.0, zeros=0.8, readout_ppl=84.0, accuracy=0.34, readout_accuracy=0.33,
                  baseline_ppl=104.0, near_zero_rel=0.81, rms=4.0, max_over_rms=20.0)]
    budgets = (1_000_000, 3_000_000)
    exps = [_exp(f"run-s{s['seed']}", target=0.9, epochs=3, tokens=t, **s) for s, t in zip(seeds, budgets)]
    row = _rows(tmp_path, exps)["run-s0"]
    assert row["budget_tokens"] == 2_000_000
    for key, name in (("exact_zeros", "zeros"), ("readout_ppl", "readout_ppl"), ("accuracy", "accuracy"),
                      ("readout_accuracy", "readout_accuracy"), ("baseline_ppl", "baseline_ppl"),
                      ("near_zero_rel", "near_zero_rel"), ("last_chunk_rms", "rms"), ("max_over_rms", "max_over_rms")):
        assert row[key] == pytest.approx(statistics.fmean(s[name] for s in seeds)), key
    assert row["exact_zeros_min_chunk"] == pytest.approx(0.84)
    assert row["readout_acc_vs_main"] == pytest.approx(0.30 / 0.32)
    assert row["ppl_vs_baseline"] == pytest.approx(71 / 102 - 1)


def test_the_best_dense_model_is_dense_and_unknown_budgets_compare(tmp_path):
    exps = [_exp("dense", 60.0), _exp("sparse-lower", 50.0, target=0.5),  # lower ppl, but sparse
            _exp("no-summary", 58.0, train_summary=False, lr=2e-4)]  # dense, its budget unknown
    rows = _rows(tmp_path, exps)
    assert json.loads((tmp_path / "frontier.json").read_text())["best_dense"] == "no-summary"
    assert math.isnan(rows["no-summary"]["budget_tokens"])
    assert rows["sparse-lower"]["best_dense_experiment"] == "no-summary"


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_the_headline_does_not_depend_on_hash_order(tmp_path):
    # two starts with as many rows each: the headline must be the same whatever PYTHONHASHSEED
    exps = [_exp("a-dense", 60.0), _exp("a-topk", 65.0, target=0.5),
            _exp("b-dense", 50.0, train_range=(0.0, 0.5)), _exp("b-topk", 55.0, target=0.5, train_range=(0.0, 0.5))]
    saved = tmp_path / "exp_show.json"
    saved.write_text(json.dumps(_shown(exps)))
    outputs = set()
    for hash_seed in ("0", "1", "2", "3", "4", "5"):
        out = tmp_path / f"out{hash_seed}"
        env = {**tool_env(), "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-m", "samba.frontier", str(out), "--from-json", str(saved)],
                       check=True, capture_output=True, env=env)
        outputs.add((out / "frontier.json").read_text())
    assert len(outputs) == 1
    # two starts with two rows each: the tie goes to the start whose description sorts first
    assert json.loads(outputs.pop())["best_dense"] == "b-dense"  # train_range [0.0, 0.5] < [0.5, 1.0]


def test_the_pareto_front_and_the_columns(tmp_path):
    exps = [_exp("control", 60.0), _exp("l1", 61.0, pruning=0.05, penalty="l1"), _exp("topk50", 62.0, target=0.5),
            _exp("topk75", 63.0, target=0.75), _exp("topk75-worse", 66.0, target=0.75, pruning=0.05),
            _exp("topk90", 80.0, target=0.9, readout_ppl=81.0)]
    rows = _rows(tmp_path, exps)
    assert {n for n, r in rows.items() if r["pareto"]} == {"control", "topk50", "topk75", "topk90"}
    assert rows["topk90"]["readout_vs_main"] == pytest.approx(81 / 80 - 1)
    assert rows["control"]["dense"] and not rows["l1"]["dense"]  # a penalty makes a run not dense
    assert set(rows["l1"]["params"]) == {"training.pruning_weight", "training.pruning_penalty", "model.sparsity_target"}
    assert [r["experiment"] for r in write_frontier(_shown(exps), tmp_path)][:2] == ["control", "l1"]


def test_a_dense_models_few_natural_zeros_do_not_put_it_on_the_front(tmp_path):
    # measured 2026-12-07: dense twins of 3, 6 and 12 epochs differ in exact zeros by ~1e-7 of their elements
    exps = [_exp("twin-6ep", 61.7, zeros=0.0, tokens=6_000_000), _exp("twin-3ep", 62.2, zeros=2e-7, tokens=3_000_000),
            _exp("twin-12ep", 62.8, zeros=4e-7, tokens=12_000_000),
            _exp("topk90", 64.2, target=0.9, zeros=0.8997, tokens=12_000_000)]
    rows = _rows(tmp_path, exps)
    assert {n for n, r in rows.items() if r["pareto"]} == {"twin-6ep", "topk90"}


def test_the_front_tells_apart_exact_zeros_a_tenth_of_a_point_apart():
    from samba.frontier import pareto

    # 0.2 points more zeros at a higher ppl is a trade-off, and so is 95% against 90%
    assert pareto([(0.900, 64.0), (0.902, 65.0)]) == [True, True]
    assert pareto([(0.90, 64.0), (0.95, 70.0), (0.75, 63.0)]) == [True, True, True]
    # 0.04 points of natural zeros are no trade-off: the worse model is off the front
    assert pareto([(0.0, 61.7), (4e-4, 62.2)]) == [True, False]


def test_a_row_without_a_number_for_ppl_or_zeros_is_refused_in_one_line(tmp_path):
    for broken in ({"l0": None}, {"l0": float("nan")}, {"ppl": "n/a"}):
        exp = _exp("topk90", 64.0, target=0.9)
        scores = exp["data"]["metrics"][EVAL_FILE]["data"]
        scores.update({k: v for k, v in broken.items() if k == "ppl"})
        scores["sparsity"].update({k: v for k, v in broken.items() if k == "l0"})
        with pytest.raises(FrontierError, match="topk90: its .* has (ppl|sparsity.l0) = .*, not a number"):
            write_frontier(_shown([_exp("twin", 62.0), exp]), tmp_path)


def test_the_plot_has_the_seeds_error_bars_and_no_label_on_the_points(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn, labels, offsets = [], [], []
    real_bar, real_note = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.annotate

    def errorbar(self, x, y, yerr=None, **kwargs):
        drawn.append((x, y, yerr))
        return real_bar(self, x, y, yerr=yerr, **kwargs)

    def annotate(self, text, *args, **kwargs):
        labels.append(text)
        offsets.append(kwargs.get("xytext"))
        return real_note(self, text, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", annotate)
    exps = [_exp(f"control-s{s}", p, seed=s) for s, p in ((0, 60.0), (1, 62.0))]
    exps += [_exp("topk75-with-a-long-name", 63.0, target=0.75)]
    write_frontier(_shown(exps), tmp_path)
    bars = {x: yerr for x, _, yerr in drawn}
    # the control's two seeds: std 1.414 of a mean of 61, in % of the best dense model's ppl; one seed: no bar
    assert bars[0.0] == pytest.approx(100 * 2 ** 0.5 / 61.0) and bars[75.0] is None
    assert labels == ["1", "2"]  # numbers by the points, the names in the key beside them
    assert offsets[0] == offsets[1]  # apart on the plot: each label at the same place by its point

    # two dense rows, each the best dense model of its budget, sit at (0, 0): their labels apart
    labels.clear(), offsets.clear()
    write_frontier(_shown([_exp("twin-6ep", 61.7, tokens=6_000_000), _exp("twin-3ep", 62.2, tokens=3_000_000)]),
                   tmp_path)
    assert labels == ["1", "2"] and offsets[0] != offsets[1]


def test_experiments_that_have_not_finished_are_left_out(tmp_path):
    shown = _shown([_exp("control", 60.0), _exp("topk75", 63.0, target=0.75)])
    running = {"executor": {"state": "running", "name": "dvc-task"}, "name": "still-running",
               "revs": [_exp("still-running", 60.0, target=0.75, zeros=0.0, lr=2e-4)]}  # the base commit's metrics
    shown[0]["experiments"] += [running, {**running, "executor": {"state": "failed"}, "name": "failed"},
                                {**running, "executor": {"state": "success"}, "name": "done",
                                 "revs": [_exp("done", 61.0, target=0.5)]}]
    assert {r["experiment"] for r in write_frontier(shown, tmp_path)} == {"control", "topk75", "done"}


def test_a_committed_run_counts_and_the_workspace_does_not(tmp_path):
    # the CPU set-up's control committed on a branch: the commit the experiments start from
    committed = {**_exp("cpu", 60.0), "rev": "abc1234" * 5}
    workspace = {**_exp("workspace-copy", 58.0, target=0.9), "rev": "workspace"}  # repeats the last run
    shown = [{**workspace, "experiments": None},
             {**committed, "experiments": [{"revs": [_exp("topk90", 66.0, target=0.9)]}]}]
    rows = {r["experiment"]: r for r in write_frontier(shown, tmp_path)}
    assert set(rows) == {"cpu", "topk90"} and rows["topk90"]["best_dense_experiment"] == "cpu"
    assert rows["topk90"]["n_seeds"] == 1 and rows["topk90"]["ppl"] == 66.0  # the workspace row is no second seed


def test_unreadable_inputs_are_refused_in_one_line(tmp_path):
    from samba.frontier import read_experiments

    with pytest.raises(FrontierError, match=r"--from-json .*missing.json: cannot read it"):
        read_experiments(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FrontierError, match=r"--from-json .*bad.json: not JSON"):
        read_experiments(str(tmp_path / "bad.json"))
    old = _exp("old", 60.0)
    del old["data"]["metrics"][EVAL_FILE]["data"]["readout_ppl"]  # another version's summary
    with pytest.raises(FrontierError, match=f"experiment old: its {EVAL_FILE} lacks readout_ppl"):
        write_frontier(_shown([old]), tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FrontierError, match="a-file/sub: cannot write there"):
        write_frontier(_shown([_exp("x", 60.0)]), tmp_path / "a-file" / "sub")
    (tmp_path / "taken" / "frontier.md").mkdir(parents=True)  # the folder is there, a file in it cannot be
    with pytest.raises(FrontierError, match="taken: cannot write there"):
        write_frontier(_shown([_exp("x", 60.0)]), tmp_path / "taken")
    (tmp_path / "utf16.json").write_bytes(b"\xff\xfe[\x00]\x00")
    with pytest.raises(FrontierError, match=r"--from-json .*utf16.json: not JSON"):
        read_experiments(str(tmp_path / "utf16.json"))
    for shape in ({"a": 1}, [1, 2], "str", [{"rev": "abc", "experiments": "zz"}]):
        with pytest.raises(FrontierError, match="not what `dvc exp show --json` writes"):
            write_frontier(shape, tmp_path)


def test_two_saved_sweeps_join_into_one_table(tmp_path):
    # the seed-0 runs in one sweep's output, seeds 1 and 2 in another's (another call, another day)
    from samba.frontier import read_experiments

    first = [_exp("twin-s0", 62.0), _exp("topk90-s0", 70.0, target=0.9, pruning=0.5)]
    second = [_exp("twin-s1", 64.0, seed=1), _exp("twin-s2", 63.0, seed=2),
              _exp("topk90-s1", 72.0, target=0.9, pruning=0.5, seed=1)]
    paths = []
    for name, exps in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps(_shown(exps)))
        paths.append(str(tmp_path / name))
    rows = {r["experiment"]: r for r in write_frontier(read_experiments(paths), tmp_path / "out")}
    assert rows["twin-s0"]["experiments"] == ["twin-s0", "twin-s1", "twin-s2"] and rows["twin-s0"]["ppl"] == 63.0
    assert rows["topk90-s0"]["n_seeds"] == 2 and rows["topk90-s0"]["ppl_vs_twin"] == pytest.approx(71.0 / 63.0 - 1)
    # a copy of one file joined to it: the same runs (the same revs), counted once
    (tmp_path / "a-copy.json").write_text((tmp_path / "a.json").read_text())
    twice = {r["experiment"]: r for r in
             write_frontier(read_experiments([paths[0], str(tmp_path / "a-copy.json")]), tmp_path / "twice")}
    assert twice["twin-s0"]["n_seeds"] == 1 and twice["topk90-s0"]["n_seeds"] == 1
    # the same file named twice (however spelt) is a typo for another sweep's: refused, both names given
    with pytest.raises(FrontierError, match=r"--from-json .*/\./a.json: given twice \(.*/a.json is the same file\)"):
        read_experiments([paths[0], paths[1], f"{tmp_path}/./a.json"])
    (tmp_path / "c.json").write_text(json.dumps({"rev": "workspace"}))
    with pytest.raises(FrontierError, match=r"--from-json .*c.json: not what `dvc exp show --json` writes"):
        read_experiments(paths + [str(tmp_path / "c.json")])
    with pytest.raises(FrontierError, match=r"--from-json .*missing.json: cannot read it"):
        read_experiments(paths + [str(tmp_path / "missing.json")])
    # a list, but not of commits with experiments, in one of several files: that file is named
    for malformed in ([{"rev": "abc", "experiments": "zz"}], [{"rev": "abc", "experiments": 5}]):  # Attribute/TypeError
        (tmp_path / "d.json").write_text(json.dumps(malformed))
        with pytest.raises(FrontierError, match=r"--from-json .*d.json: not what `dvc exp show --json` writes"):
            read_experiments([paths[0], str(tmp_path / "d.json"), paths[1]])
    # a file without a finished run would add nothing to a join: refused, named, not silently skipped
    for empty in ([], [{"rev": "workspace", "data": {}}]):
        (tmp_path / "e.json").write_text(json.dumps(empty))
        with pytest.raises(FrontierError, match=r"--from-json .*e.json: no finished experiment in it .*, so joined"):
            read_experiments([paths[0], str(tmp_path / "e.json")])
        with pytest.raises(FrontierError, match=r"--from-json .*e.json: no finished experiment in it .*, so joined"):
            read_experiments([str(tmp_path / "e.json"), paths[0]])  # named wherever it sits
        with pytest.raises(FrontierError, match=r"--from-json .*e.json: no finished experiment in it has [^,]* \(a"):
            read_experiments([str(tmp_path / "e.json")])  # alone: named too


def test_the_command_joins_every_from_json(tmp_path, capsys):
    from samba.frontier import main

    for name, exps in (("a.json", [_exp("twin-s0", 62.0)]), ("b.json", [_exp("twin-s1", 64.0, seed=1)]),
                       ("c.json", [_exp("topk90-s0", 70.0, target=0.9, pruning=0.5)])):
        (tmp_path / name).write_text(json.dumps(_shown(exps)))
    main([str(tmp_path / "out"), *(a for n in ("a", "b", "c") for a in ("--from-json", str(tmp_path / f"{n}.json")))])
    rows = json.loads((tmp_path / "out/frontier.json").read_text())["rows"]
    assert {r["experiment"]: r["n_seeds"] for r in rows} == {"twin-s0": 2, "topk90-s0": 1}
    assert "wrote" in capsys.readouterr().out


def test_a_seed_run_twice_is_refused_not_counted_as_two_seeds(tmp_path):
    # the set-up of a second sweep retrains the twin at seed 0: joined, it is the same seed twice
    exps = [_exp("twin-s0", 62.0), _exp("twin-s1", 63.0, seed=1), _exp("twin-s0-again", 62.1)]
    with pytest.raises(FrontierError, match="experiments twin-s0 and twin-s0-again have the same params, seed 0"):
        write_frontier(_shown(exps), tmp_path)
    exps[2]["data"]["params"]["params.yaml"]["data"]["training"]["seed"] = 2
    assert _rows(tmp_path, exps)["twin-s0"]["n_seeds"] == 3
    # one name in two joined sweeps (two runs, two revs), the seed written 0 by one and 0.0 by the other
    again = _exp("twin-s0", 62.2)
    again["rev"] = "another-rev"
    again["data"]["params"]["params.yaml"]["data"]["training"]["seed"] = 0.0
    with pytest.raises(FrontierError, match="experiments twin-s0 and twin-s0 have the same params"):
        write_frontier(_shown(exps + [again]), tmp_path)


def _seeded(name, seed, **kw):
    exp = _exp(name, 70.0 + (seed or 0), target=0.9, pruning=0.5, **kw)
    if seed is None:
        del exp["data"]["params"]["params.yaml"]["data"]["training"]["seed"]
    else:
        exp["data"]["params"]["params.yaml"]["data"]["training"]["seed"] = seed
    return exp


@pytest.mark.parametrize("seeds,twice", [
    ((0, 1, 2, 1), "b and d"),          # a later seed twice, in a sparse group beside a dense one
    ((2, 0, 1, 2), "a and d"),          # the highest seed twice, listed first and last
    ((0, None, 0), "a and b"),          # a run without a seed trains with the default, 0
    ((None, 0), "a and b"),             # no seed is seed 0
])
def test_a_seed_twice_is_found_wherever_it_sits(tmp_path, seeds, twice):
    exps = [_exp("dense-s0", 60.0), _exp("dense-s1", 61.0, seed=1)]
    exps += [_seeded(name, seed) for name, seed in zip("abcd", seeds)]
    first, second = twice.split(" and ")
    with pytest.raises(FrontierError, match=f"experiments {first} and {second} have the same params"):
        write_frontier(_shown(exps), tmp_path)


def test_all_commits_with_saved_json_is_refused(tmp_path, capsys):
    from samba.frontier import main

    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "out"), "--from-json", str(tmp_path / "a.json"), "--all-commits"])
    assert info.value.code == 2 and "with --from-json it would do nothing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_experiment_with_metrics_is_refused(tmp_path):
    with pytest.raises(FrontierError, match=f"no finished experiment has {EVAL_FILE}"):
        write_frontier([{"rev": "workspace", "data": {}}], tmp_path)


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_the_command_refuses_in_one_line(tmp_path):
    saved = tmp_path / "exp_show.json"
    saved.write_text(json.dumps([{"rev": "workspace", "data": {}}]))
    proc = subprocess.run([sys.executable, "-m", "samba.frontier", str(tmp_path / "out"), "--from-json", str(saved)],
                          capture_output=True, text=True, env={**tool_env(), **{"PYTHONHASHSEED": os.environ.get(
                              "PYTHONHASHSEED", "0")}})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()]  # the whole of stderr is the one line
    assert proc.stderr.startswith(f"[frontier] error: --from-json {saved}: no finished experiment in it has {EVAL_FILE}")


def _lr_sweep():
    """Twins and top-k 0.9 at three learning rates (two seeds at one), a 3-epoch twin at two, and
    two rows alone in their recipe (no line through them)."""
    kl = dict(distill=10.0, teacher="/abs/control", tokens=6_000_000)
    exps = [_exp(f"twin-lr{i}", p, lr=lr, **kl) for i, (lr, p) in enumerate(((1e-3, 57.8), (3e-4, 61.6), (2e-3, 56.7)))]
    exps += [_exp("twin-lr0-s1", 57.9, lr=1e-3, seed=1, **kl)]
    exps += [_exp(f"topk90-lr{i}", p, lr=lr, target=0.9, pruning=0.5, **kl)
             for i, (lr, p) in enumerate(((2e-3, 58.4), (1e-3, 60.1), (3e-4, 66.2)))]
    exps += [_exp(f"twin3-lr{i}", p, lr=lr, distill=10.0, teacher="/abs/control", tokens=3_000_000)
             for i, (lr, p) in enumerate(((3e-4, 62.2), (6e-4, 59.7)))]
    exps += [_exp("topk90-ramp", 74.3, lr=3e-4, target=0.9, pruning=0.5, ramp=400, **kl), _exp("control", 68.8)]
    return exps


def test_rows_along_a_param_make_one_line_per_recipe(tmp_path):
    from samba.frontier import series_against

    rows = write_frontier(_shown(_lr_sweep()), tmp_path)
    series = {s["label"]: s for s in series_against(rows, "training.lr")}
    # the params in which the drawn lines differ, and only those (the KL, teacher and ramp are common to them)
    assert set(series) == {"sparsity_target=0.0, epochs=6, pruning_weight=0.0",
                           "sparsity_target=0.9, epochs=6, pruning_weight=0.5",
                           "sparsity_target=0.0, epochs=3, pruning_weight=0.0"}
    twin, topk = series["sparsity_target=0.0, epochs=6, pruning_weight=0.0"], series["sparsity_target=0.9, epochs=6, pruning_weight=0.5"]
    assert [p["x"] for p in twin["points"]] == [3e-4, 1e-3, 2e-3] and twin["dense"] and not topk["dense"]
    assert [p["ppl"] for p in twin["points"]] == pytest.approx([61.6, 57.85, 56.7])  # two seeds at 1e-3: their mean
    assert twin["points"][1]["n_seeds"] == 2 and twin["points"][1]["ppl_std"] == pytest.approx(0.1 / 2 ** 0.5)
    assert [p["ppl_vs_twin"] for p in topk["points"]] == pytest.approx([66.2 / 61.6 - 1, 60.1 / 57.85 - 1, 58.4 / 56.7 - 1])
    assert [p["experiment"] for p in topk["points"]] == ["topk90-lr2", "topk90-lr1", "topk90-lr0"]


def test_the_plot_along_a_param_draws_each_line_and_the_gap(tmp_path, monkeypatch):
    import matplotlib.axes

    from samba.frontier import main

    bars, lines, scales, panels = [], [], [], {}
    real_bar, real_plot, real_scale = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.plot, matplotlib.axes.Axes.set_xscale

    def errorbar(self, x, y, yerr=None, **kwargs):
        if isinstance(x, list):  # frontier.png's points are drawn one at a time
            bars.append((x, y, yerr))
            panels.setdefault("ppl", set()).add(id(self))
        return real_bar(self, x, y, yerr=yerr, **kwargs)

    def plot(self, *args, **kwargs):
        if len(args) >= 2 and len(args[0]) > 0 and "marker" in kwargs:  # not frontier.png's front
            lines.append((list(args[0]), list(args[1]), kwargs.get("label")))
            panels.setdefault("gap", set()).add(id(self))
        return real_plot(self, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xscale", lambda self, v, **kw: (scales.append(v), real_scale(self, v, **kw)))
    (tmp_path / "e.json").write_text(json.dumps(_shown(_lr_sweep())))
    main([str(tmp_path / "out"), "--from-json", str(tmp_path / "e.json"), "--against", "training.lr"])
    assert (tmp_path / "out" / "frontier_vs_lr.png").stat().st_size > 10_000
    # left: the three lines, each point's seeds' std as its bar (0 for one seed); right: top-k's cost
    # against its twin only (the dense lines have none); a learning rate on a log axis
    expected = [([3e-4, 6e-4], [62.2, 59.7], [0.0, 0.0]),
                ([3e-4, 1e-3, 2e-3], [61.6, 57.85, 56.7], [0.0, 0.1 / 2 ** 0.5, 0.0]),
                ([3e-4, 1e-3, 2e-3], [66.2, 60.1, 58.4], [0.0, 0.0, 0.0])]
    assert len(bars) == len(expected)
    for x, y, err in expected:
        assert sum(b[0] == x and b[1] == pytest.approx(y) and b[2] == pytest.approx(err) for b in bars) == 1, (x, y, bars)
    # one panel each: the lines of ppl on the left, the cost against the twin on the right, top-k's only
    assert len(panels["ppl"]) == 1 and len(panels["gap"]) == 1 and panels["ppl"] != panels["gap"]
    gap = [ln for ln in lines if ln[2] == "sparsity_target=0.9, epochs=6, pruning_weight=0.5"]
    assert len(lines) == 1 and len(gap) == 1 and gap[0][1] == pytest.approx([100 * (66.2 / 61.6 - 1), 100 * (60.1 / 57.85 - 1), 100 * (58.4 / 56.7 - 1)])
    assert scales == ["log", "log"]


@pytest.mark.parametrize("key, refusal", [
    ("training.momentum", r"--against training.momentum: not a param that differs among the rows \(those that do: .*training.lr"),
    ("training.teacher", r"--against training.teacher: \S+ has training.teacher = '/abs/\w+', not a number to plot along"),
])
def test_a_param_that_cannot_be_plotted_along_is_refused(tmp_path, key, refusal):
    from samba.frontier import series_against

    rows = write_frontier(_shown(_lr_sweep() + [_exp("twin-other-teacher", 60.0, distill=10.0, teacher="/abs/twin")]), tmp_path)
    with pytest.raises(FrontierError, match=refusal):
        series_against(rows, key)


def test_no_two_rows_along_the_param_is_refused(tmp_path):
    from samba.frontier import series_against

    rows = write_frontier(_shown([_exp("control", 68.8), _exp("twin", 62.0, lr=3e-4, distill=10.0)]), tmp_path)
    with pytest.raises(FrontierError, match="no two rows differ in training.lr alone"):
        series_against(rows, "training.lr")


def test_a_recipe_spelt_0_or_0_0_is_one_line(tmp_path):
    """DVC's -S writes 0, params.yaml 0.0: one recipe, as the table takes it, so one line (it vanished)."""
    from samba.frontier import series_against

    kl = dict(distill=10.0, teacher="/abs/control", tokens=6_000_000)
    exps = [_exp("twin-a", 61.6, lr=3e-4, target=0, pruning=0, **kl), _exp("twin-b", 57.8, lr=1e-3, **kl),
            _exp("topk-a", 66.2, lr=3e-4, target=0.9, pruning=0.5, **kl), _exp("topk-b", 60.1, lr=1e-3, target=0.9, pruning=0.5, **kl)]
    series = series_against(write_frontier(_shown(exps), tmp_path), "training.lr")
    assert sorted([p["experiment"] for p in s["points"]] for s in series) == [["topk-a", "topk-b"], ["twin-a", "twin-b"]]


def test_a_fraction_is_plotted_on_a_linear_axis_and_one_line_says_what_it_is(tmp_path, monkeypatch):
    """A line drawn alone is labelled by all its params, not as if it held every row."""
    import matplotlib.axes

    from samba.frontier import plot_against, series_against

    scales = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xscale", lambda self, v, **kw: scales.append(v))
    kl = dict(lr=1e-3, distill=10.0, teacher="/abs/control", tokens=6_000_000, pruning=0.5)
    exps = [_exp(f"topk{int(100 * t)}", p, target=t, **kl) for t, p in ((0.75, 59.1), (0.9, 60.1), (0.95, 61.5))]
    exps.append(_exp("topk90-lr3", 66.2, target=0.9, **{**kl, "lr": 3e-4}))  # alone in its recipe: no line
    rows = write_frontier(_shown(exps), tmp_path)
    series = series_against(rows, "model.sparsity_target")
    plot_against(series, "model.sparsity_target", tmp_path / "x.png")
    assert scales == [] and len(series) == 1
    assert "lr=0.001" in series[0]["label"] and "sparsity_target" not in series[0]["label"]


def test_two_plots_of_one_name_are_refused(tmp_path, capsys):
    from samba.frontier import main

    (tmp_path / "e.json").write_text(json.dumps(_shown(_lr_sweep())))
    for against in (["training.lr", "training.lr"], ["training.batch_size", "eval.batch_size"]):
        with pytest.raises(SystemExit):
            main([str(tmp_path / "out"), "--from-json", str(tmp_path / "e.json"), *(a for k in against for a in ("--against", k))])
        assert "each name once (the plots are named frontier_vs_<name>.png)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_bad_against_is_refused_before_anything_is_written(tmp_path, capsys):
    from samba.frontier import main

    other_teacher = _exp("twin-other-teacher", 60.0, distill=10.0, teacher="/abs/twin")
    (tmp_path / "e.json").write_text(json.dumps(_shown(_lr_sweep() + [other_teacher])))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "frontier.md").write_text("an earlier table")
    for key, refusal in (("training.momentum", "not a param that differs"), ("training.teacher", "not a number")):
        with pytest.raises(FrontierError, match=refusal):
            main([str(tmp_path / "out"), "--from-json", str(tmp_path / "e.json"), "--against", "training.lr",
                  "--against", key])
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["frontier.md"]  # no plot, the table as it was
        assert (tmp_path / "out" / "frontier.md").read_text() == "an earlier table"


def test_a_learning_rate_axis_is_ticked_at_the_measured_values(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from samba.frontier import plot_against, series_against

    figs, real_close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), real_close(fig))[1])
    series = series_against(write_frontier(_shown(_lr_sweep()), tmp_path), "training.lr")
    plot_against(series, "training.lr", tmp_path / "x.png")
    fig = figs[-1]
    fig.canvas.draw()
    for axis in fig.axes[:2]:
        assert list(axis.get_xticks()) == pytest.approx([3e-4, 6e-4, 1e-3, 2e-3])
        assert [t.get_text() for t in axis.get_xticklabels()] == ["0.0003", "0.0006", "0.001", "0.002"]
        assert list(axis.xaxis.get_minorticklocs()) == []
