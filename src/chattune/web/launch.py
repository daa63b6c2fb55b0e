"""`chattune web`: set up the login (beyond loopback) and become the Streamlit server for a workspace."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console

from chattune.system import is_loopback
from chattune.web.auth import ROLES, TOKEN_ENV, new_token, read_tokens, remove_auth, write_auth

APP = Path(__file__).with_name("app.py")
SESSION_HOURS = 12.0


def streamlit_command(workspace: Path, host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The `streamlit run` argument list (never a shell string) for a workspace."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",  # no browser opened on the server, no e-mail prompt
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",  # an installed package does not change under us
        "--client.toolbarMode", "minimal",  # no "Deploy" button: this app runs on the user's machine
        "--", str(Path(workspace).resolve()),
    ]  # fmt: skip


def set_up_login(
    workspace: Path,
    host: str,
    console: Console,
    *,
    login: bool | None = None,
    token_file: Path | None = None,
    session_hours: float = SESSION_HOURS,
) -> dict[str, str] | None:
    """Write the workspace's auth settings when the app needs a login (any non-loopback address, or `login`);
    returns the tokens, printing those it generated. Loopback without `login`: no login, earlier settings
    removed."""
    needed = not is_loopback(host) if login is None else login
    if not needed:
        remove_auth(workspace)
        return None
    given = read_tokens(token_file)
    tokens = {role: token or new_token() for role, token in given.items()}
    write_auth(workspace, tokens, session_hours)
    console.print(f"[bold]chattune web on {host}: sign-in required[/] (sessions last {session_hours:g} h)")
    for role in ROLES:
        if given[role] is None:
            console.print(f"  {role} token: {tokens[role]}", highlight=False)
        else:
            console.print(f"  {role} token: as given ({'file' if token_file else TOKEN_ENV[role]})")
    console.print(
        "  admins train and chat, annotators label. Give each person only the token of their role; next time, "
        f"set {TOKEN_ENV['admin']} / {TOKEN_ENV['annotator']} or pass --token-file to keep the same tokens.",
        highlight=False,
    )
    return tokens


def run_web(
    workspace: Path,
    host: str = "127.0.0.1",
    port: int = 8501,
    *,
    login: bool | None = None,
    token_file: Path | None = None,
    session_hours: float = SESSION_HOURS,
) -> None:
    """Become the Streamlit server for `workspace` (this process is replaced, so signals reach the server
    itself: SIGTERM, SIGINT and SIGHUP stop it and free the port, with no child left behind).

    Training runs started from the app lead their own sessions and keep running; the monitor finds them
    again after a restart."""
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise SystemExit("the web app needs Streamlit: pip install 'chattune[web]'") from None
    Path(workspace).mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    set_up_login(
        Path(workspace), host, console, login=login, token_file=token_file, session_hours=session_hours
    )
    command = streamlit_command(Path(workspace), host, port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
