"""The sweep plans in benchmarks/sweep_plans/ hold what a GPU session will run: a misspelt key or a
value the params refuse would cost that run's start-up on the device and mark it FAILED. Each run
of each plan is applied to params.yaml the way benchmarks/gpu_session.sh applies it (its $KL and
$TOPK spelled out, each value read as YAML) and the result must load."""
import re
from pathlib import Path

import pytest
import yaml

from samba.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]
PLANS = sorted((ROOT / "benchmarks" / "sweep_plans").glob("*.txt"))


def _macros() -> dict[str, str]:
    """$KL and $TOPK as gpu_session.sh defines them (the one place they are written)."""
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    found = dict(re.findall(r'^\s*(KL|TOPK)="([^"]*)"', script, flags=re.M))
    assert set(found) == {"KL", "TOPK"}, f"gpu_session.sh no longer defines KL and TOPK: {found}"
    return found


def _runs(plan: Path) -> list[tuple[str, list[str]]]:
    macros = _macros()
    runs = []
    for line in plan.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for name, value in macros.items():
            line = line.replace("$" + name, value)
        name, *pairs = line.split()
        runs.append((name, pairs))
    return runs


def _apply(base: dict, pairs: list[str]) -> dict:
    """gpu_session.sh's set_params: section.key=value, the value read as YAML."""
    params = yaml.safe_load(yaml.safe_dump(base))
    for pair in pairs:
        key, value = pair.split("=", 1)
        section, name = key.split(".")
        params[section][name] = yaml.safe_load(value)
    return params


def test_the_plans_are_found():
    assert {p.name for p in PLANS} >= {"twin.txt", "next.txt"}


@pytest.mark.parametrize("plan", PLANS, ids=[p.name for p in PLANS])
def test_every_run_of_a_plan_loads_and_names_each_run_once(plan, tmp_path):
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    runs = _runs(plan)
    assert runs, f"{plan.name}: no runs"
    names = [name for name, _ in runs]
    assert len(names) == len(set(names)), f"{plan.name}: a name twice"
    for name, pairs in runs:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_apply(base, pairs), sort_keys=False))
        load_params(path)  # raises ConfigError naming the key


def test_a_misspelt_key_in_a_plan_is_caught(tmp_path):
    """The check above refuses what the device would: a key params.yaml does not have."""
    plan = tmp_path / "bad.txt"
    plan.write_text("# a comment\nrun-a $KL training.epochs=6\nrun-b $KL training.lrr=1.0e-3\n")
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    (name_a, pairs_a), (name_b, pairs_b) = _runs(plan)
    assert pairs_a[0] == "training.lr=3.0e-4"  # $KL spelled out
    ok = tmp_path / "a.yaml"
    ok.write_text(yaml.safe_dump(_apply(base, pairs_a)))
    assert load_params(ok).training.epochs == 6
    bad = tmp_path / "b.yaml"
    bad.write_text(yaml.safe_dump(_apply(base, pairs_b)))
    with pytest.raises(ConfigError, match="lrr"):
        load_params(bad)
