"""Helpers several test modules share: a free loopback port, waiting for a server to answer, and a page as
headless Chromium draws it."""

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serves(url: str, timeout_s: float, process: subprocess.Popen | None = None, poll_s: float = 1.0) -> bool:
    """Whether ``url`` answers 200 within ``timeout_s``; fails at once if ``process`` (the server) exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, f"the server behind {url} exited ({process.returncode})"
        try:
            if urllib.request.urlopen(url, timeout=5).status == 200:
                return True
        except OSError:
            time.sleep(poll_s)
    return False


def screenshot_hsv(page: Path, folder: Path, width: int, height: int = 2400) -> np.ndarray:
    """``page`` as headless Chromium (Debian's package, .ci/setup-system) draws it at ``width`` x ``height``,
    as HSV pixels [height, width, 3]; ``folder`` takes the screenshot and the browser's profile."""
    from PIL import Image

    browser = shutil.which("chromium")
    assert browser, "chromium is not installed: `make test` installs it through .ci/setup-system"
    shot = folder / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                    f"--user-data-dir={folder / 'profile'}", f"--window-size={width},{height}", f"--screenshot={shot}",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    image = Image.open(shot)
    assert image.size == (width, height)
    return np.asarray(image.convert("HSV"))
