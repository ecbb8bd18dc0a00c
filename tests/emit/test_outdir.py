"""emit/outdir.py and the commands that write outputs: --force replaces only our own outputs,
one writer per --out at a time, killed runs' temporaries cleaned, unwritable paths refused up front."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from partitioner.cli.main import app
from partitioner.emit.outdir import (
    MARKER,
    OutDir,
    atomic_dir,
    check_out_file,
    is_our_output,
)
from partitioner.errors import UsageError

TINY = {
    "format": "partitioner.costgraph/1", "name": "tiny",
    "nodes": [{"id": "a", "op": "conv2d", "flops": 2.3e8, "param_bytes": 36864, "output_bytes": 802816},
              {"id": "b", "op": "matmul", "flops": 1.0e6, "output_bytes": 4000}],
    "edges": [{"src": "a", "dst": "b", "bytes": 802816}],
    "inputs": [{"dst": "a", "bytes": 602112}], "outputs": [{"src": "b", "bytes": 4000}],
}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY))
    return p


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def compile_args(tiny, out, *more):
    return ("compile", tiny, "--solver", "heft", "--no-gantt", "-q", "--out", out, *more)


def test_force_replaces_only_an_earlier_output(tiny, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = run(*compile_args(tiny, mine, "--force"))
    assert r.exit_code == 2 and "not an output of partitioner" in r.output and "Hint:" in r.output
    assert (mine / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in mine.iterdir()) == [
        "thesis.tex"]
    out = tmp_path / "out"
    assert run(*compile_args(tiny, out)).exit_code == 0
    assert is_our_output(out) and (out / "plan.json").is_file()
    (out / "plan.json").write_text("old")
    assert run(*compile_args(tiny, out, "--force")).exit_code == 0  # our own earlier output: replaced
    assert (out / "plan.json").read_text() != "old"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(*compile_args(tiny, empty, "--force")).exit_code == 0  # an empty directory holds nothing to lose
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "out", "tiny.json"]


def test_a_second_writer_of_the_same_out_is_refused(tiny, tmp_path):
    out = tmp_path / "out"
    with OutDir(out) as od:  # a compile in progress (the lock is per open file: this process counts too)
        r = run(*compile_args(tiny, out))
        assert r.exit_code == 2 and f"another partitioner run (pid {os.getpid()}) is writing" in r.output
        with pytest.raises(UsageError, match="another partitioner run"):
            OutDir(out, force=True).open()
        with od.writing() as tmp:
            (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1" and not (tmp_path / ".out.lock").exists()
    r = run(*compile_args(tiny, out))  # the first one finished: the second is an ordinary "exists"
    assert r.exit_code == 2 and "already exists" in r.output


WRITER = textwrap.dedent("""
    import sys, time
    from partitioner.emit.outdir import OutDir
    from partitioner.errors import UsageError
    try:
        with OutDir(sys.argv[1]) as od:  # what `compile` does: check and lock, work, then write
            time.sleep(1.0)
            with od.writing() as tmp:
                (tmp / "plan.json").write_text(sys.argv[2])
    except UsageError as err:
        print(err.message)
        sys.exit(2)
""")


def test_two_concurrent_writers_do_not_both_succeed(tmp_path):
    """Both processes pass the up-front check; the lock lets exactly one write ``out``."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(k)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in range(2)]
    results = [(p.wait(timeout=60), p.stdout.read()) for p in procs]
    assert sorted(c for c, _ in results) == [0, 2], results
    winner = next(k for k, (c, _) in enumerate(results) if c == 0)
    loser = next(text for c, text in results if c == 2)
    assert "another partitioner run" in loser or "already exists" in loser
    assert (out / "plan.json").read_text() == str(winner)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILLED = textwrap.dedent("""
    import os, signal, sys
    from partitioner.emit.outdir import OutDir
    od = OutDir(sys.argv[1]); od.open()
    with od.writing() as tmp:
        (tmp / "half.json").write_text("{")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_temporaries_of_a_killed_run_are_cleaned_by_the_next(tiny, tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", KILLED, str(out)], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith(".out.") and n.endswith(".tmp") for n in left) and ".out.lock" in left
    users = tmp_path / ".out.keep.tmp"  # not ours (no marker): never touched
    users.mkdir()
    assert run(*compile_args(tiny, out)).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.keep.tmp", "out", "tiny.json"]


def test_out_dot_and_its_parents_are_refused_before_any_work(tiny, tmp_path, monkeypatch):
    """``--out .`` (also with --force, also when it is an earlier output) is refused before the
    model is even loaded: the error is about --out, not about the unknown model."""
    mine = tmp_path / "work"
    (mine / "sub").mkdir(parents=True)
    (mine / MARKER).write_text("{}")
    monkeypatch.chdir(mine / "sub")
    for out in (".", "..", str(mine)):
        r = run("compile", "no-such-model", "--out", out, "--force")
        assert r.exit_code == 2 and "is the current directory or holds it" in r.output, (out, r.output)
    assert sorted(p.name for p in mine.iterdir()) == [MARKER, "sub"]


@pytest.mark.parametrize("bad", ["file", "proc"])
def test_unwritable_out_and_stats_are_refused_before_any_work(tiny, tmp_path, bad):
    if bad == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc (a place no one may create files in, root included)")
    (tmp_path / "file.txt").write_text("x")
    where = tmp_path / "file.txt" / "sub" if bad == "file" else Path("/proc/partitioner-test")
    needle = "is not a directory" if bad == "file" else "cannot write"
    r = run(*compile_args(tiny, where / "out"))
    assert r.exit_code == 2 and needle in r.output and "internal error" not in r.output, r.output
    # run: refused before the artifact is read (it does not even exist here)
    for opt in ("--out", "--stats"):
        r = run("run", tmp_path / "no-artifact", opt, where / "x.pt")
        assert r.exit_code == 2 and needle in r.output and opt in r.output, r.output
    r = run("compare", tiny, "--solvers", "heft", "--json", where / "c.json")
    assert r.exit_code == 2 and needle in r.output
    r = run("profile", "no-such-model", "--out", where / "p.json")
    assert r.exit_code == 2 and needle in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "tiny.json"]


def test_check_out_file_and_a_failed_block_leave_nothing(tmp_path):
    check_out_file(tmp_path / "new" / "deeper" / "s.json", "--stats")  # missing parents are fine
    with pytest.raises(UsageError, match="is a directory"):
        check_out_file(tmp_path, "--stats")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "x").write_text("1")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary, no lock, no parents we made
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(UsageError, match="symbolic link"):
        OutDir(link, force=True).open()
