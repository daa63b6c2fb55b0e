"""Training monitor: runs with status, progress, ETA and loss; one run's curve, log and config; start and stop."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from chattune.errors import ConfigError
from chattune.train.callbacks import format_eta
from chattune.web.workspace import CONFIG_FILE, RunInfo, Workspace, current

DEFAULT_CONFIG = """\
model: smollm2-135m-instruct
train_file: {train_file}
format: {format}
method: lora
batch_size: 4
grad_accum: 1
learning_rate: 1.0e-3
epochs: 3
logging_steps: 1
save_steps: 50
"""


def runs_table(runs: list[RunInfo]) -> None:
    """One row per run."""
    rows = [
        {
            "run": r.name,
            "status": r.status,
            "progress": f"{100 * r.progress:.0f}%",
            "step": r.step,
            "ETA": format_eta(r.eta_s) if r.eta_s is not None and r.status == "running" else "",
            "last loss": None if r.last_loss is None else round(r.last_loss, 4),
        }
        for r in runs
    ]
    st.dataframe(rows, width="stretch", hide_index=True)


def run_details(ws: Workspace, info: RunInfo) -> None:
    """The loss curve, metrics, log tail and config of one run, with stop / resume."""
    st.subheader(f"Run {info.name} — {info.status}")
    st.progress(min(max(info.progress, 0.0), 1.0), text=f"step {info.step}")
    train = [(r["step"], r["loss"]) for r in info.log if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in info.log if r.get("eval_loss") is not None]
    if train or evals:
        curve = pd.DataFrame(train, columns=["step", "train loss"]).set_index("step")
        if evals:
            curve = curve.join(
                pd.DataFrame(evals, columns=["step", "eval loss"]).set_index("step"), how="outer"
            )
        st.line_chart(curve)
        with st.expander("Metrics"):
            st.dataframe(pd.DataFrame(info.log).tail(50), width="stretch")
    else:
        st.caption("no loss logged yet")
    col_stop, col_resume, col_refresh = st.columns(3)
    if info.status == "running":
        if col_stop.button("Stop", key=f"stop_{info.name}"):
            ws.stop_run(info.name)
            st.rerun()
    elif (
        info.status in ("failed", "stopped")
        and (info.path / CONFIG_FILE).is_file()
        # resume: the same config again; `resume: auto` continues from the last checkpoint in output/
        and col_resume.button("Resume", key=f"resume_{info.name}")
    ):
        try:
            ws.start_run(info.name, (info.path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (ValueError, ConfigError) as e:
            st.error(str(e))
        else:
            st.rerun()
    col_refresh.button("Refresh", key="refresh")
    st.text("log (last lines)")
    st.code(ws.log_tail(info.name) or "(no log)", language=None)
    cfg = info.path / CONFIG_FILE if (info.path / CONFIG_FILE).is_file() else info.output / CONFIG_FILE
    if cfg.is_file():
        with st.expander("Config"):
            st.code(cfg.read_text(encoding="utf-8"), language="yaml")


def start_section(ws: Workspace) -> None:
    """Edit a config, validate it, start it."""
    st.subheader("Start a run")
    default = DEFAULT_CONFIG.format(
        train_file=st.session_state.get("prefill_train_file", "data/labels-conversations.jsonl"),
        format=st.session_state.get("prefill_format", "auto"),
    )
    name = st.text_input("Run name", "my-run", key="new_run_name")
    text = st.text_area("Config (YAML)", default, height=260, key="new_run_config")
    col_check, col_start = st.columns(2)
    check, start = (
        col_check.button("Validate", key="validate"),
        col_start.button("Start", key="start", type="primary"),
    )
    if check or start:
        try:
            cfg = ws.validate_config(text, name)
            if start:
                info = ws.start_run(name, text)
        except (ValueError, ConfigError) as e:
            st.error(str(e))
            return
        if start:
            st.session_state["monitor_run"] = info.name
            st.success(f"started run {info.name} (pid {info.pid}); output in {ws.relative(info.output)}")
        else:
            st.success(f"config is valid: {cfg.method} on {cfg.model}, output in {cfg.output_dir}")


def page() -> None:
    """The training monitor page."""
    ws = current()
    st.title("Training monitor")
    runs = ws.runs()
    if runs:
        runs_table(runs)
        names = [r.name for r in runs]
        # the selected run is kept in the URL, so a browser refresh comes back to it
        wanted = st.session_state.get("monitor_run") or st.query_params.get("run")
        index = names.index(wanted) if wanted in names else 0
        chosen = st.selectbox("Run", names, index=index, key="pick_run")
        st.session_state["monitor_run"] = chosen
        st.query_params["run"] = chosen
        run_details(ws, next(r for r in runs if r.name == chosen))
    else:
        st.info("No runs yet in this workspace: start one below.")
    start_section(ws)
