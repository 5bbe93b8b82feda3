"""Logging: structured fields on stderr lines; the journal is chosen only when stderr is it."""

import logging
import os
import subprocess
import sys

from joinproxyd import logs


def test_stderr_lines_carry_the_structured_fields(capsys):
    log = logs.setup("info", name="joinproxyd-test")
    log.info("circuit opened", extra={"INTERFACE": "join0", "MODE": "circuit",
                                      "REGISTRAR": "[fd00::1]:8443"})
    log.debug("not shown at info")
    err = capsys.readouterr().err
    assert err == ("INFO joinproxyd-test: circuit opened "
                   "[interface=join0 mode=circuit registrar=[fd00::1]:8443]\n")
    logs.set_level("debug")
    log.debug("now shown")
    assert "now shown" in capsys.readouterr().err
    logging.getLogger().handlers.clear()


def test_journal_only_when_stderr_is_the_journal_stream(tmp_path):
    # A JOURNAL_STREAM naming some other file (inherited by a child) must not count.
    other = tmp_path / "f"
    other.write_text("")
    st = os.stat(other)
    code = ("from joinproxyd import logs; import sys; "
            "sys.exit(0 if not logs.under_journal() else 1)")
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=30).returncode == 0
    # ...while one naming our real stderr does.
    with open(other, "w") as stderr:
        st = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        done = subprocess.run([sys.executable, "-c", code], env=env, stderr=stderr, timeout=30)
    assert done.returncode == 1
