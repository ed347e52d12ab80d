"""The atomic writer: whole-or-nothing outputs that follow the umask, no leftovers of killed writers,
and one writer per target at a time (tested with real processes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.io.atomic import atomic_directory, atomic_file

ROOT = Path(__file__).resolve().parents[2]


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _host() -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _dead_pid() -> int:
    """The id of a process that has just exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"helper process exited early: {proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# -- whole or nothing ----------------------------------------------------------------------------
def test_directory_replaced_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()  # nothing visible before the end
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or lock leftovers


def test_failure_leaves_target_untouched_and_no_temp(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("writer died")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_file_failure_leaves_target_untouched(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_file_temp_keeps_extension(tmp_path):
    """Writers that pick the format from the extension (savefig, np.save) write the target's format."""
    import numpy as np

    with atomic_file(tmp_path / "x.npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path and tmp.name.startswith(".x.npy.tmp-")
        np.save(tmp, np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), [0, 1, 2])
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]


# -- umask ---------------------------------------------------------------------------------------
def test_file_follows_umask(tmp_path, umask022):
    with atomic_file(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
    assert _mode(tmp_path / "f.txt") == 0o644  # mkstemp gave 0o600: unreadable by the group
    os.umask(0o007)
    with atomic_file(tmp_path / "g.txt") as tmp:
        tmp.write_text("x")
    assert _mode(tmp_path / "g.txt") == 0o660


def test_directory_follows_umask(tmp_path, umask022):
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "a.txt").write_text("x")
    assert _mode(tmp_path / "d") == 0o755  # mkdtemp gave 0o700
    assert _mode(tmp_path / "d" / "a.txt") == 0o644


def test_write_sites_follow_umask(tmp_path, umask022):
    """The package's writers (FITS, posterior, checkpoint directory, JSON, report) all give 0o644 / 0o755."""
    import numpy as np
    import torch
    from astropy.io import fits

    from pipeline.io.atomic import write_text
    from pipeline.io.checkpoint import save_checkpoint
    from pipeline.io.fits import write_fits_atomic
    from pipeline.io.posterior import write_posterior

    write_fits_atomic(tmp_path / "a.fits", [fits.PrimaryHDU(np.zeros((2, 2), np.float32))])
    write_posterior(tmp_path / "post.fits", np.zeros((3, 4, 4), np.float32), src_pixscale=0.05, method="m")
    step = save_checkpoint(tmp_path / "run", 5, {"model": {"w": torch.zeros(2)}}, {"a": 1})
    write_text(tmp_path / "r.md", "# report\n")
    for f in ("a.fits", "post.fits", "r.md", "run/LATEST"):
        assert _mode(tmp_path / f) == 0o644, f
    assert _mode(step) == 0o755
    assert all(_mode(p) == 0o644 for p in step.iterdir())


# -- stale temporaries ---------------------------------------------------------------------------
def test_sigkilled_writer_leftover_removed_by_next_write(tmp_path):
    """A writer killed with SIGKILL inside the block leaves its temporary directory; the next write of
    the same target removes it (and leaves nothing else behind)."""
    target = tmp_path / "samples"
    ready = tmp_path / "ready"
    proc = _spawn(f"""
        import time
        from pathlib import Path
        from pipeline.io.atomic import atomic_directory
        with atomic_directory({str(target)!r}) as tmp:
            (tmp / "part.fits").write_bytes(b"x" * 1000)
            Path({str(ready)!r}).write_text("1")
            time.sleep(60)
    """)
    try:
        _wait_for(ready, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ready.unlink()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) >= 1 and not target.exists()  # what SIGKILL leaves: a hidden temporary

    with atomic_directory(target) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]
    assert [p.name for p in target.iterdir()] == ["done.txt"]


def test_stale_file_temp_of_dead_pid_removed_others_kept(tmp_path):
    target = tmp_path / "gmm.json"
    dead = tmp_path / f".gmm.json.tmp-{_host()}-{_dead_pid()}-0123abcd.json"
    live = tmp_path / f".gmm.json.tmp-{_host()}-{os.getpid()}-0123abcd.json"
    remote = tmp_path / f".gmm.json.tmp-otherhost-{_dead_pid()}-0123abcd.json"
    unrelated = tmp_path / f".other.json.tmp-{_host()}-{_dead_pid()}-0123abcd.json"
    for p in (dead, live, remote, unrelated):
        p.write_text("half")
    with atomic_file(target) as tmp:
        tmp.write_text("{}")
    assert not dead.exists()
    assert live.exists() and remote.exists() and unrelated.exists()
    assert target.read_text() == "{}"


def test_remove_stale_temporaries_whole_directory(tmp_path):
    from pipeline.io.atomic import remove_stale_temporaries

    dead_pid = _dead_pid()
    a = tmp_path / f".step-000010.tmp-{_host()}-{dead_pid}-deadbeef"
    b = tmp_path / f".LATEST.tmp-{_host()}-{dead_pid}-deadbeef"
    keep = tmp_path / ".hidden-but-not-ours"
    a.mkdir()
    (a / "model.pt").write_bytes(b"x")
    b.write_text("x")
    keep.write_text("x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([a, b])
    assert [p.name for p in tmp_path.iterdir()] == [keep.name]


# -- lock ----------------------------------------------------------------------------------------
_HOLDER = """
    import time
    from pathlib import Path
    from pipeline.io.atomic import atomic_file
    with atomic_file({target!r}) as tmp:
        tmp.write_text("A")
        Path({ready!r}).write_text("1")
        time.sleep({hold})
        Path({done!r}).write_text(repr(time.time()))  # the end of the body, just before the rename
"""


def test_second_writer_waits_for_the_first(tmp_path):
    """Two processes write the same file: the second starts writing only after the first has renamed
    its output into place (before: both wrote at once and the last rename won)."""
    target, ready, done = tmp_path / "out.json", tmp_path / "ready", tmp_path / "done"
    holder = _spawn(_HOLDER.format(target=str(target), ready=str(ready), done=str(done), hold=1.5))
    try:
        _wait_for(ready, holder)
        second = _spawn(f"""
            import os, time
            from pipeline.io.atomic import atomic_file
            with atomic_file({str(target)!r}) as tmp:
                entered = time.time()
                before = open({str(target)!r}).read() if os.path.exists({str(target)!r}) else "nothing"
                tmp.write_text("B")
            print(repr(entered), before)
        """)
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        holder.communicate(timeout=60)
    finally:
        holder.kill()
    entered, before = out.split()
    assert float(entered) >= float(done.read_text())  # the first had finished its write
    assert before == "A"  # and the second saw its complete output
    assert target.read_text() == "B"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "out.json", "ready"]  # lock file removed


def test_second_writer_gives_up_with_one_line(tmp_path):
    target, ready, done = tmp_path / "samples", tmp_path / "ready", tmp_path / "done"
    holder = _spawn(_HOLDER.format(target=str(target), ready=str(ready), done=str(done), hold=30))
    try:
        _wait_for(ready, holder)
        from pipeline.errors import PipelineError

        t0 = time.monotonic()
        with pytest.raises(PipelineError) as exc:
            with atomic_directory(target, lock_timeout=0.5) as tmp:
                (tmp / "x").write_text("never")
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(target) + ":") and f"pid {holder.pid}" in msg
    assert 0.4 <= waited < 5.0
    assert not target.exists()


def test_lock_is_free_after_a_killed_holder(tmp_path):
    """A holder killed with SIGKILL leaves an unlocked lock file: the next writer proceeds at once."""
    target, ready, done = tmp_path / "x.json", tmp_path / "ready", tmp_path / "done"
    holder = _spawn(_HOLDER.format(target=str(target), ready=str(ready), done=str(done), hold=30))
    _wait_for(ready, holder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with atomic_file(target, lock_timeout=0) as tmp:
        tmp.write_text("C")
    assert target.read_text() == "C"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready", "x.json"]


def test_threads_writing_one_target_take_turns(tmp_path):
    """The lock also serialises threads of one process: no two bodies overlap."""
    import threading

    target = tmp_path / "t.json"
    inside, overlaps = [], []

    def work(i):
        with atomic_file(target) as tmp:
            inside.append(i)
            if len(inside) > 1:
                overlaps.append(list(inside))
            time.sleep(0.02)
            tmp.write_text(json.dumps(i))
            inside.remove(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    assert json.loads(target.read_text()) in range(6)


# -- convenience writers -------------------------------------------------------------------------
def test_write_json_text_bytes(tmp_path):
    from pipeline.io.atomic import write_bytes, write_json, write_text

    assert write_json(tmp_path / "a.json", {"x": [1, 2]}, indent=2) == tmp_path / "a.json"
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    write_text(tmp_path / "b.txt", "héllo\n")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    write_bytes(tmp_path / "c.bin", b"\x00\x01")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    (tmp_path / "a.json").write_text("old")
    with pytest.raises(ValueError):
        write_json(tmp_path / "a.json", {"x": float("nan")}, allow_nan=False)
    assert (tmp_path / "a.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt", "c.bin"]


def test_write_json_passes_writer_options(tmp_path):
    """``fsync`` and ``lock_timeout`` reach the writer instead of ``json.dumps`` (which rejects them)."""
    from pipeline.io.atomic import write_json

    write_json(tmp_path / "a.json", [1.5], fsync=False, lock_timeout=0, indent=None)
    assert (tmp_path / "a.json").read_text() == "[1.5]"
