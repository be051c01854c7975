"""Debian's chromium for the tests that open a page in a real browser: found, or installed once per machine, and
a headless screenshot of a local file."""
import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# One lock for every test process on the machine: parallel tests must not run two apt-gets at once.
INSTALL_LOCK = Path(tempfile.gettempdir()) / "elbodiff-chromium-install.lock"


def chromium() -> str:
    """The chromium binary; installs Debian's package as root when it is missing, skips the test where it cannot."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get): "
                    "install it with `apt-get install chromium`")
    with open(INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(CHROMIUM):  # another test may have installed it while this one waited
            # Without recommends (a desktop's worth of packages), but with a font so that the page's text draws.
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            done = subprocess.run("apt-get update && apt-get install -y --no-install-recommends chromium "
                                  "fonts-dejavu-core",
                                  shell=True, env=env, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0 or not os.path.exists(CHROMIUM):
                last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
                pytest.skip(f"apt-get could not install chromium (exit {done.returncode}): {last[0]}")
    return CHROMIUM


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2400) -> Path:
    """A PNG of `page` (a local HTML file) as headless chromium draws it in a width x height window."""
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: parallel browsers must not share one
        done = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={width},{height}",
             page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"chromium could not screenshot {page} (exit {done.returncode}): {done.stderr[-2000:]}")
    return out
