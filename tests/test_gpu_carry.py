"""What a GPU call carries (the repository and .gpu/: 64 MiB in all) and what a session refuses without it.
gpu_prepare.sh says how much a call would carry and fails above 63 MiB (LMEVAL=0 leaves lm-eval out);
gpu_session.sh refuses the parts that run the GPU tests or lm-eval when .gpu/lmeval/ has no wheels, before its
first GPU step, and slows progress bars for every process it starts (their logs come back into the repository)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tool_env
from test_sweep_plans import ROOT, script

pytestmark = pytest.mark.slow
NEXT = ROOT / "benchmarks" / "sweep_plans" / "next.txt"
MiB = 1 << 20


def stub(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    (bindir / name).write_text("#!/bin/sh\n" + body)
    (bindir / name).chmod(0o755)


def session(parts, tmp_path, lmeval_files=(), **env):
    """gpu_session.sh PARTS in a bare checkout whose .gpu/lmeval/ holds lmeval_files (None: no folder).
    nvidia-smi is a stub that marks $OUT/gpu_reached and stops the script: the first GPU step, whatever
    this machine has (/tmp/site, a GPU)."""
    checkout = tmp_path / "checkout"
    (checkout / ".gpu" / "dvc").mkdir(parents=True)
    if lmeval_files is not None:
        (checkout / ".gpu" / "lmeval").mkdir()
        for name in lmeval_files:
            (checkout / ".gpu" / "lmeval" / name).write_bytes(b"")
    stub(tmp_path / "bin", "nvidia-smi", f'touch "{tmp_path}/gpu_reached"; kill -TERM $PPID\n')
    env.setdefault("PATH", f"{tmp_path / 'bin'}{os.pathsep}{tool_env()['PATH']}")
    if parts is None:  # the script's default parts
        proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=checkout, capture_output=True,
                              text=True, timeout=60, env=tool_env(OUT=str(tmp_path / "out"), SWEEP_PLAN=str(NEXT), **env))
    else:
        proc = script(parts, env.pop("SWEEP_PLAN", NEXT), tmp_path, cwd=checkout, **env)
    return proc, (tmp_path / "gpu_reached").exists()


@pytest.mark.parametrize("parts", [None, "tests,bench,gen", "bench,tests", "testsbg,sweep", "sweep,zeroshot", "tests"])
@pytest.mark.parametrize("lmeval_files", [None, (), ("README.txt",)], ids=["no-folder", "empty", "no-wheel"])
def test_refused_before_any_gpu_step(parts, lmeval_files, tmp_path):
    proc, reached = session(parts, tmp_path, lmeval_files)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"gpu_session: {parts or 'tests,bench,gen'} needs lm-eval" in proc.stdout
    assert not reached  # before nvidia-smi and the kernels' install


@pytest.mark.parametrize("parts,lmeval_files", [("tests", ("lm_eval-0.4.13-py3-none-any.whl",)), ("sweep", None),
                                                ("collect", None), ("bench,gen", None)])
def test_not_refused_goes_on_to_the_gpu(parts, lmeval_files, tmp_path):
    proc, reached = session(parts, tmp_path, lmeval_files)
    assert "needs lm-eval" not in proc.stdout + proc.stderr
    assert reached and proc.returncode == -15, proc.stdout + proc.stderr  # stopped by the stub, nothing else


def test_a_cpu_dry_run_of_testsbg_is_not_refused(tmp_path):
    """SWEEP_DRY=1 runs on this CPU: no lm-eval asked for; it goes on to the plan check (here: no such plan)."""
    proc, reached = session("testsbg,sweep", tmp_path, None, SWEEP_DRY="1", SWEEP_PLAN=tmp_path / "nxt.txt")
    assert "needs lm-eval" not in proc.stdout
    assert proc.returncode == 1 and f"SWEEP_PLAN {tmp_path / 'nxt.txt'}: no such file" in proc.stdout, proc.stdout
    assert not reached


def test_progress_bars_are_slowed_for_every_python_the_session_starts(tmp_path):
    """TQDM_MININTERVAL reaches the processes the session starts (plancheck's first python3 here)."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    for given, want in ((None, "10"), ("3", "3")):
        (tmp_path / "tqdm").unlink(missing_ok=True)
        stub(tmp_path / "bin", "python3", f'echo "$TQDM_MININTERVAL" > "{tmp_path}/tqdm"; exit 1\n')
        env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{tool_env()['PATH']}"}
        if given:
            env["TQDM_MININTERVAL"] = given
        script("plancheck", NEXT, tmp_path, cwd=tmp_path, **env)
        assert (tmp_path / "tqdm").read_text().strip() == want


# gpu_prepare: a copy of the script in a scratch git checkout; pip is a stub that logs its arguments
def prepare(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    repo = tmp_path / "repo"
    if not repo.exists():
        (repo / "benchmarks").mkdir(parents=True)
        shutil.copy(ROOT / "benchmarks" / "gpu_prepare.sh", repo / "benchmarks")
        shutil.copy(ROOT / "requirements.txt", repo)
        (repo / ".gitignore").write_text(".gpu/\nignored.bin\n")
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        subprocess.run(["git", "add", "."], cwd=repo, check=True)
        shared = tmp_path / "shared"
        for d in ("wheels", "data/wikitext-2-tokenized", "data/tokenizers/gpt-neox-20b"):
            (shared / d).mkdir(parents=True)
        (shared / "wheels" / "mamba_ssm-2-cp312-cp312-linux_x86_64.whl").write_bytes(b"k" * (3 * MiB))
        (shared / "data" / "wikitext-2-tokenized" / "train.bin").write_bytes(b"t" * 1000)
        stub(tmp_path / "bin", "python3", f'echo "$*" >> "{tmp_path}/pip.log"\n'
             'case "$*" in *lm-eval*) d=$(echo "$*" | sed "s/.* -d \\([^ ]*\\) .*/\\1/"); '
             'touch "$d/lm_eval-0.4.13-py3-none-any.whl";; esac\n')
    env = {**os.environ, "SHARED": str(tmp_path / "shared"), "GPU_PYTHON": "",  # no pip check unless a test asks
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", **env}
    env = {k: v for k, v in env.items() if v is not None}  # None: unset
    return subprocess.run(["bash", "benchmarks/gpu_prepare.sh"], cwd=repo, capture_output=True, text=True, env=env,
                          timeout=60)


def carried(repo: Path) -> int:
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo, capture_output=True,
                            check=True).stdout.split(b"\0")
    files = [repo / os.fsdecode(f) for f in listed if f] + [p for p in (repo / ".gpu").rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.is_file())


def test_prepare_says_what_a_call_carries_and_counts_no_ignored_file(tmp_path):
    proc = prepare(tmp_path)
    repo = tmp_path / "repo"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (repo / "untracked.bin").write_bytes(b"u" * (5 * MiB))
    with open(repo / "ignored.bin", "wb") as f:  # git-ignored: not carried
        f.truncate(100 * MiB)
    proc = prepare(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = re.search(r"a call carries ([\d.]+) MiB of 64 \(the repository's files ([\d.]+) MiB, .gpu ([\d.]+) MiB\)",
                     proc.stdout)
    assert line, proc.stdout
    assert float(line.group(1)) == pytest.approx(carried(repo) / MiB, abs=0.051)
    assert float(line.group(2)) == pytest.approx(5.0, abs=0.051)
    gpu = sum(p.stat().st_size for p in (repo / ".gpu").rglob("*") if p.is_file())
    assert gpu > 3 * MiB and float(line.group(3)) == pytest.approx(gpu / MiB, abs=0.051)


def test_prepare_fails_above_63_mib_and_not_at_63(tmp_path):
    repo = tmp_path / "repo"
    assert prepare(tmp_path).returncode == 0
    pad = repo / "pad.bin"
    with open(pad, "wb") as f:
        f.truncate(63 * MiB - carried(repo))  # carried() before pad exists: pad makes it exactly 63 MiB
    proc = prepare(tmp_path)
    assert carried(repo) == 63 * MiB
    assert proc.returncode == 0 and "too large" not in proc.stderr, proc.stdout + proc.stderr
    with open(pad, "ab") as f:
        f.write(b"x")
    proc = prepare(tmp_path)
    assert proc.returncode == 1 and "too large for a call; LMEVAL=0 leaves lm-eval out" in proc.stderr, proc.stderr


def test_prepare_with_lmeval_0_leaves_lm_eval_out(tmp_path):
    assert prepare(tmp_path).returncode == 0
    log = (tmp_path / "pip.log").read_text()
    assert "--no-deps -d .gpu/lmeval lm-eval==0.4.13" in log  # alone: the machine has what else it needs
    assert not re.search(r"\b(chardet|charset-normalizer|requests)\b", log)
    assert list((tmp_path / "repo" / ".gpu" / "lmeval").glob("*.whl"))
    (tmp_path / "pip.log").unlink()
    proc = prepare(tmp_path, LMEVAL="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lm-eval" not in (tmp_path / "pip.log").read_text()
    assert not (tmp_path / "repo" / ".gpu" / "lmeval").exists()  # the earlier wheels gone: not carried


def test_prepare_counts_a_checkout_with_a_deleted_tracked_file(tmp_path):
    """A tracked file deleted in the working tree (an edit in progress) is not carried; the check still runs."""
    repo = tmp_path / "repo"
    assert prepare(tmp_path).returncode == 0
    (repo / "gone.txt").write_text("x")
    subprocess.run(["git", "add", "gone.txt"], cwd=repo, check=True)
    (repo / "gone.txt").unlink()
    proc = prepare(tmp_path)
    assert proc.returncode == 0 and "a call carries" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize("lmeval", ["1", "0"])
def test_prepare_leaves_out_what_the_machine_has_after_the_download(tmp_path, lmeval):
    """gpu_slim runs once, on .gpu/dvc alone (lm-eval is installed without its requirements), after dvc's download."""
    assert prepare(tmp_path, LMEVAL=lmeval).returncode == 0
    lines = (tmp_path / "pip.log").read_text().splitlines()
    slim = [i for i, line in enumerate(lines) if "gpu_slim" in line]
    download = [i for i, line in enumerate(lines) if "dvc==3.67.1" in line]
    assert len(slim) == 1 and lines[slim[0]] == "benchmarks/gpu_slim.py benchmarks/gpu_machine_packages.txt .gpu/dvc"
    assert download and slim[0] > max(download)


PINS = re.findall(r"^(dvc(?:live)?==\S+)", (ROOT / "requirements.txt").read_text(), re.M)


def test_prepare_has_pip_check_the_carry_on_a_python_3_12_with_requirements_pins(tmp_path):
    """gpu_slim has pip install requirements.txt's dvc and dvclive from what is left, on GPU_PYTHON or else the first
    Python 3.12 that runs (a pyenv shim of a version not selected does not); GPU_PYTHON= skips it and says so."""
    assert len(PINS) == 2
    stub(tmp_path / "bin", "python3.12", "exit 1\n")  # first on PATH, and does not run
    stub(tmp_path / "bin", "pyenv", f'echo "{tmp_path / "pyenv"}"\n')
    found = tmp_path / "pyenv" / "versions" / "3.12.9" / "bin" / "python3.12"
    stub(found.parent, "python3.12", "exit 0\n")
    given = tmp_path / "elsewhere" / "python3.12"
    stub(given.parent, "python3.12", "exit 0\n")
    for env, want in (({"GPU_PYTHON": str(given)}, given), ({"GPU_PYTHON": None}, found)):
        (tmp_path / "pip.log").unlink(missing_ok=True)
        proc = prepare(tmp_path, **env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [line for line in (tmp_path / "pip.log").read_text().splitlines() if "gpu_slim" in line] == [
            f"benchmarks/gpu_slim.py benchmarks/gpu_machine_packages.txt .gpu/dvc --check {want} "
            + " ".join(f"--require {p}" for p in PINS)]
    proc = prepare(tmp_path)  # GPU_PYTHON=
    assert proc.returncode == 0 and ("pip's install of .gpu/dvc on the machine's packages not checked: skipped "
                                     "(GPU_PYTHON=)") in proc.stdout
    download = [line for line in (tmp_path / "pip.log").read_text().splitlines() if " download " in line]
    assert any(line.endswith(" " + " ".join(PINS)) for line in download), download


def test_prepare_refuses_requirements_without_the_dvc_pins(tmp_path):
    assert prepare(tmp_path).returncode == 0
    req = tmp_path / "repo" / "requirements.txt"
    req.write_text("".join(line + "\n" for line in req.read_text().splitlines() if not line.startswith("dvclive")))
    proc = prepare(tmp_path)
    assert proc.returncode == 2 and ("requirements.txt must pin dvc==... and dvclive==..., once each; found: "
                                     "dvc==") in proc.stderr


def test_prepare_refuses_a_gpu_python_that_is_no_python_3_12_before_any_download(tmp_path):
    assert prepare(tmp_path).returncode == 0
    (tmp_path / "pip.log").unlink()
    stub(tmp_path / "py311", "python3", "exit 1\n")  # runs, but not as a 3.12
    for given in (tmp_path / "py311" / "python3", tmp_path / "nowhere" / "python3.12"):
        proc = prepare(tmp_path, GPU_PYTHON=str(given))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"gpu_prepare: GPU_PYTHON={given} does not run as a Python 3.12" in proc.stderr
        assert not (tmp_path / "pip.log").exists()  # nothing downloaded, nothing slimmed


def test_prepare_without_a_python_3_12_says_the_check_was_not_made(tmp_path):
    stub(tmp_path / "bin", "python3.12", "exit 1\n")
    stub(tmp_path / "bin", "pyenv", f'echo "{tmp_path / "no-pyenv"}"\n')
    proc = prepare(tmp_path, GPU_PYTHON=None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not checked: no Python 3.12 found here (GPU_PYTHON=...)" in proc.stdout


def test_prepare_fails_where_gpu_slim_fails(tmp_path):
    """A requirement nobody provides (or a bad list) stops gpu_prepare: a carry that would fail on the machine."""
    assert prepare(tmp_path).returncode == 0
    stub(tmp_path / "bin", "python3", 'case "$*" in *gpu_slim*) echo "gpu_slim: required by a carried wheel" >&2; exit 1;; '
         'esac\n')
    proc = prepare(tmp_path)
    assert proc.returncode != 0 and "gpu_slim: required by a carried wheel" in proc.stderr
    assert "a call carries" not in proc.stdout



def _pins_repo(tmp_path, text):
    assert prepare(tmp_path).returncode == 0  # the scratch repo
    (tmp_path / "repo" / "requirements.txt").write_text(text)


def test_prepare_uses_requirements_pins_not_its_own(tmp_path):
    _pins_repo(tmp_path, "# dvc==1.0.0 was too slow\ntorch\ndvc==3.70.0\ndvclive==3.50.0\n")
    (tmp_path / "pip.log").unlink()
    stub(tmp_path / "x", "python3.12", "exit 0\n")  # runs as a 3.12
    proc = prepare(tmp_path, GPU_PYTHON=str(tmp_path / "x" / "python3.12"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (tmp_path / "pip.log").read_text().splitlines()
    assert any(line.endswith(" -d .gpu/dvc dvc==3.70.0 dvclive==3.50.0") for line in log), log
    assert [line for line in log if "gpu_slim" in line] == [
        f"benchmarks/gpu_slim.py benchmarks/gpu_machine_packages.txt .gpu/dvc --check {tmp_path / 'x' / 'python3.12'} "
        "--require dvc==3.70.0 --require dvclive==3.50.0"]


def test_prepare_refuses_requirements_without_any_dvc_pin(tmp_path):
    _pins_repo(tmp_path, "torch\n")
    proc = prepare(tmp_path)
    assert proc.returncode == 2 and "requirements.txt must pin dvc==... and dvclive==..., once each; found: none" in proc.stderr, proc.stderr


def _py(path: Path, version: tuple):
    """An interpreter named python3.12 that reports this version (a python3.11 behind a python3.12 name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.version_info = {version!r}\nexec(sys.argv[2])\n")
    path.chmod(0o755)


def _slim_line(tmp_path):
    return [line for line in (tmp_path / "pip.log").read_text().splitlines() if "gpu_slim" in line]


@pytest.mark.parametrize("on_path, pyenv, want", [
    ((3, 11, 9), ["3.12.9"], "pyenv:3.12.9"),  # a python3.12 on PATH that is not a 3.12: skipped
    ((3, 12, 1), ["3.12.9"], "python3.12"),  # the one on PATH first
    (None, ["3.12.1", "3.12.9"], "pyenv:3.12.1"),  # the first pyenv version that runs
])
def test_prepare_picks_the_first_python_that_is_a_3_12(tmp_path, on_path, pyenv, want):
    for v in pyenv:
        _py(tmp_path / "pyenv" / "versions" / v / "bin" / "python3.12", (3, 12, int(v.split(".")[2])))
    if on_path:
        _py(tmp_path / "bin" / "python3.12", on_path)
    stub(tmp_path / "bin", "pyenv", f'echo "{tmp_path / "pyenv"}"\n')
    assert prepare(tmp_path).returncode == 0
    (tmp_path / "pip.log").unlink()
    proc = prepare(tmp_path, GPU_PYTHON=None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    want = want if not want.startswith("pyenv:") else str(tmp_path / "pyenv" / "versions" / want[6:] / "bin" / "python3.12")
    assert len(_slim_line(tmp_path)) == 1 and f" --check {want} --require" in _slim_line(tmp_path)[0], _slim_line(tmp_path)


def test_prepare_fails_where_gpu_slims_pip_check_fails(tmp_path):
    assert prepare(tmp_path).returncode == 0
    stub(tmp_path / "bin", "python3", 'case "$*" in *gpu_slim*) echo "gpu_slim: pip would not install" >&2; exit 1;; esac\n')
    stub(tmp_path / "x", "python3.12", "exit 0\n")  # runs as a 3.12
    proc = prepare(tmp_path, GPU_PYTHON=str(tmp_path / "x" / "python3.12"))
    assert proc.returncode != 0 and "gpu_slim: pip would not install" in proc.stderr
    assert "a call carries" not in proc.stdout


def test_install_dvc_installs_requirements_pins(tmp_path):
    """gpu_session.sh's install_dvc, alone: pip install of requirements.txt's dvc and dvclive pins from .gpu/dvc."""
    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "requirements.txt").write_text("torch\ndvc==3.70.0\ndvclive==3.50.0\n")
    stub(tmp_path / "bin", "python3", f'case "$1" in -c) exit 1;; esac; echo "$*" >> "{tmp_path}/pip.log"\n')
    script = ROOT / "benchmarks" / "gpu_session.sh"
    body = f"REPO={repo}\nsource <(sed -n '/^install_dvc() {{/,/^}}/p' {script})\ninstall_dvc"
    proc = subprocess.run(["bash", "-c", body], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 1 and "do not import" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "pip.log").read_text().splitlines() == [
        f"-m pip install -q --no-index --find-links {repo}/.gpu/dvc dvc==3.70.0 dvclive==3.50.0"]
