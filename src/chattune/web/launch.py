"""`chattune web`: start the Streamlit server on a workspace."""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys
import warnings
from pathlib import Path

APP = Path(__file__).with_name("app.py")


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def streamlit_command(workspace: Path, host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The `streamlit run` argument list (never a shell string) for a workspace."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",  # no browser opened on the server, no e-mail prompt
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--client.toolbarMode", "minimal",  # no "Deploy" button: this app runs on the user's machine  # an installed package does not change under us
        "--", str(Path(workspace).resolve()),
    ]  # fmt: skip


def run_web(workspace: Path, host: str = "127.0.0.1", port: int = 8501) -> None:
    """Serve the web app on `workspace` until interrupted; warns when reachable from other machines."""
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise SystemExit("the web app needs Streamlit: pip install 'chattune[web]'") from None
    if not is_loopback(host):
        warnings.warn(
            f"serving on {host}: anyone who can reach this address can read the workspace's data and start "
            "training runs; the app has no login. Use 127.0.0.1 with an SSH tunnel unless that is intended.",
            stacklevel=2,
        )
    Path(workspace).mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(streamlit_command(Path(workspace), host, port), check=False)
