"""`make lab`: JupyterLab opens a git-ignored working copy of notebooks/ (lab/), copied once per lesson, so a
learner's session never modifies the committed lessons; --allow-root only as root; a chosen port; the URL
printed. One test starts the real server for a few seconds and checks that `git status` did not change."""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".git").exists(),
                                reason="needs make and a git checkout")


def _git_status() -> set[str]:
    """`git status --porcelain` entries where a lab session could write: the lessons, their results, lab/ and
    Jupyter's checkpoint folders (a clone is clean there; other paths may change under parallel work)."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return {line for line in out.splitlines()
            if line[3:].startswith(("notebooks/", "results/", "lab/")) or ".ipynb_checkpoints" in line}


def _make(*args, **kw):
    # -o: never (re)build the virtual environment from inside the test run
    return subprocess.run(["make", "-s", "-o", ".venv/.installed", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_lab_files_copy_every_lesson_once_and_keep_edits(tmp_path):
    lab = tmp_path / "lab"
    lessons = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    before = _git_status()
    assert _make("lab-files", f"LAB_DIR={lab}").returncode == 0
    assert sorted(p.name for p in lab.glob("*.ipynb")) == lessons
    assert (lab / lessons[0]).read_bytes() == (ROOT / "notebooks" / lessons[0]).read_bytes()
    (lab / lessons[0]).write_text("my edits")  # the learner's work
    (lab / lessons[-1]).unlink()  # stands for a lesson added to notebooks/ later
    assert _make("lab-files", f"LAB_DIR={lab}").returncode == 0
    assert (lab / lessons[0]).read_text() == "my edits"
    assert (lab / lessons[-1]).read_bytes() == (ROOT / "notebooks" / lessons[-1]).read_bytes()
    assert _git_status() == before


def test_default_lab_dir_is_ignored_and_a_sibling_of_results():
    res = _make("-n", "lab")
    assert res.returncode == 0, res.stderr
    assert "--ServerApp.root_dir=lab" in res.stdout  # lessons' "../results" paths resolve as from notebooks/
    ignored = subprocess.run(["git", "check-ignore", "-q", "lab/00_quickstart.ipynb"], cwd=ROOT)
    assert ignored.returncode == 0


@pytest.mark.parametrize("port", [8888, 8931])
def test_lab_command_port_root_flag_and_url(port):
    res = _make("-n", "lab", f"PORT={port}")
    assert res.returncode == 0, res.stderr
    assert f"--port={port}" in res.stdout and "--no-browser" in res.stdout
    assert f"http://localhost:{port}/lab" in res.stdout
    assert ("--allow-root" in res.stdout) == (os.geteuid() == 0)


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "jupyter").exists(), reason="no .venv with JupyterLab")
def test_lab_server_starts_and_leaves_git_status_unchanged(tmp_path):
    before, port = _git_status(), _free_port()
    proc = subprocess.Popen(["make", "-s", "-o", ".venv/.installed", "lab", f"PORT={port}", f"LAB_DIR={tmp_path}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, deadline = [], time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if f"localhost:{port}/lab?token=" in line:  # the server is up and tells its URL
                break
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a learner stops it
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(lines)
    assert f"http://localhost:{port}/lab" in out.splitlines()[0], out
    assert f"localhost:{port}/lab?token=" in out, out
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert _git_status() == before


def test_environment_yml_points_to_the_readme_section_on_cpu_torch():
    comment = " ".join(line for line in (ROOT / "environment.yml").read_text().splitlines() if line.startswith("#"))
    section = comment.split('section "')[1].split('"')[0]
    readme = (ROOT / "README.md").read_text()
    body = readme.split(f"### {section}\n")[1].split("\n## ")[0].split("\n### ")[0]
    assert "--index-url" in body and "conda" in body and "TORCH_INDEX_URL" in body
