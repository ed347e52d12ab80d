"""A writer stopped with SIGTERM (what schedulers and `timeout` send) leaves no temporary behind."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.io.atomic import atomic_directory, atomic_file
    kind, target = sys.argv[1], Path(sys.argv[2])
    with (atomic_directory(target) if kind == "dir" else atomic_file(target)) as tmp:
        (tmp / "part.fits" if kind == "dir" else tmp).write_text("partial")
        print("ready", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_sigterm_removes_the_temporary(tmp_path, kind):
    target = tmp_path / "out" / ("posteriors" if kind == "dir" else "posterior.fits")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, kind, str(target)], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 128 + signal.SIGTERM
    assert os.listdir(target.parent) == []           # no temporary, no lock file, no partial target
