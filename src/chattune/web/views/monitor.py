"""Training monitor: runs with status, progress, ETA and loss; one run's curve, log and config; start and stop."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from chattune.errors import ConfigError
from chattune.train.callbacks import format_eta
from chattune.web import nav
from chattune.web.i18n import t
from chattune.web.session import require_page
from chattune.web.workspace import CONFIG_FILE, RunInfo, Workspace, current

REFRESH_S = 2.0  # how often a running run's page redraws itself from its files
CURVE_POINTS = 500  # the most points a loss curve draws


def refresh_every(runs: list[RunInfo]) -> float | None:
    """The live-refresh period while any of these runs is running; None (no timer) otherwise."""
    return REFRESH_S if any(r.status == "running" for r in runs) else None


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


def thin(curve: pd.DataFrame, points: int = CURVE_POINTS) -> pd.DataFrame:
    """At most about `points` rows, evenly spread and keeping the last.

    A long run logs thousands of steps; redrawing all of them every refresh costs the server and the
    browser CPU that the training run on the same machine needs.
    """
    if len(curve) <= points:
        return curve
    stride = -(-len(curve) // points)
    picked = list(range(0, len(curve), stride))
    if picked[-1] != len(curve) - 1:
        picked.append(len(curve) - 1)
    return curve.iloc[picked]


def runs_table(runs: list[RunInfo]) -> None:
    """One row per run (column names and statuses in the page's language)."""
    rows = [
        {
            t("run"): r.name,
            t("status"): t(r.status),
            t("progress"): f"{100 * r.progress:.0f}%",
            t("step"): r.step,
            t("ETA"): format_eta(r.eta_s) if r.eta_s is not None and r.status == "running" else "",
            t("last loss"): None if r.last_loss is None else round(r.last_loss, 4),
        }
        for r in runs
    ]
    st.dataframe(rows, width="stretch", hide_index=True)


def run_details(ws: Workspace, info: RunInfo) -> None:
    """The loss curve, metrics, log tail and config of one run, with stop / resume."""
    st.subheader(t("Run {name} — {status}", name=info.name, status=t(info.status)))
    st.progress(min(max(info.progress, 0.0), 1.0), text=t("step {step}", step=info.step))
    train = [(r["step"], r["loss"]) for r in info.log if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in info.log if r.get("eval_loss") is not None]
    if train or evals:
        # the column names are the chart's legend and axis title
        step = t("step")
        curve = pd.DataFrame(train, columns=[step, t("train loss")]).set_index(step)
        if evals:
            curve = curve.join(
                pd.DataFrame(evals, columns=[step, t("eval loss")]).set_index(step), how="outer"
            )
        st.line_chart(thin(curve))
        with st.expander(t("Metrics")):
            st.dataframe(pd.DataFrame(info.log[-50:]), width="stretch")
    else:
        st.caption(t("no loss logged yet"))
    col_stop, col_resume, col_refresh = st.columns(3)
    if info.status == "running":
        if col_stop.button(t("Stop"), key=f"stop_{info.name}"):
            ws.stop_run(info.name)
            st.rerun()
    elif (
        info.status in ("failed", "stopped")
        and (info.path / CONFIG_FILE).is_file()
        # resume: the same config again; `resume: auto` continues from the last checkpoint in output/
        and col_resume.button(t("Resume"), key=f"resume_{info.name}")
    ):
        try:
            ws.start_run(info.name, (info.path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (ValueError, ConfigError) as e:
            st.error(str(e))
        else:
            st.rerun()
    col_refresh.button(t("Refresh"), key="refresh")
    if info.status == "finished":
        final = ws.relative(info.output / "final")
        base = _base_model(info)
        st.page_link(nav.link("playground"), label=t("Chat with {adapter} in the playground →", adapter=final), icon=":material/chat:",
                     query_params={"adapter": final, **({"base": base} if base else {})})  # fmt: skip
    st.text(t("log (last lines)"))
    st.code(ws.log_tail(info.name) or t("(no log)"), language=None)
    cfg = info.path / CONFIG_FILE if (info.path / CONFIG_FILE).is_file() else info.output / CONFIG_FILE
    if cfg.is_file():
        with st.expander(t("Config")):
            st.code(cfg.read_text(encoding="utf-8"), language="yaml")


def _base_model(info: RunInfo) -> str | None:
    """The `model:` of the run's config, as the user typed it (a workspace path or a hub id)."""
    import yaml

    for cfg in (info.path / CONFIG_FILE, info.output / CONFIG_FILE):
        if cfg.is_file():
            try:
                model = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("model")
            except (yaml.YAMLError, AttributeError):
                return None
            return model if isinstance(model, str) else None
    return None


def live_table(ws: Workspace, every: float | None) -> None:
    """The runs table, redrawn every `every` seconds (None: only with the page)."""

    @st.fragment(run_every=every)
    def table() -> None:
        runs_table(ws.runs())

    table()


def live_details(ws: Workspace, name: str, every: float | None) -> None:
    """One run's details, redrawn from its files every `every` seconds while it runs (no clicks needed)."""

    @st.fragment(run_every=every)
    def details() -> None:
        info = ws.run(name)
        if every is not None and info.status != "running":
            st.rerun(scope="app")  # it just ended: redraw the page once, which stops the timer
        run_details(ws, info)

    details()


def start_section(ws: Workspace) -> None:
    """Edit a config, validate it, start it."""
    st.subheader(t("Start a run"))
    # "train on this" from labeling: session state in this tab, the URL after a refresh or in a new tab
    train_file = st.session_state.get("prefill_train_file") or st.query_params.get("train_file")
    fmt = st.session_state.get("prefill_format") or st.query_params.get("format")
    default = DEFAULT_CONFIG.format(
        train_file=train_file or "data/labels-conversations.jsonl", format=fmt or "auto"
    )
    name = st.text_input(t("Run name"), "my-run", key="new_run_name")
    text = st.text_area(t("Config (YAML)"), default, height=260, key="new_run_config")
    col_check, col_start = st.columns(2)
    check, start = (
        col_check.button(t("Validate"), key="validate"),
        col_start.button(t("Start"), key="start", type="primary"),
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
            st.session_state["show_run"] = info.name  # select it in the picker, which is drawn above
            st.query_params["run"] = info.name
            st.session_state["started"] = t(
                "started run {name} (pid {pid}); output in {output}",
                name=info.name,
                pid=info.pid,
                output=ws.relative(info.output),
            )
            st.rerun()  # redraw from the top, so the new run is listed and followed live
        else:
            st.success(
                t(
                    "config is valid: {method} on {model}, output in {output}",
                    method=cfg.method,
                    model=cfg.model,
                    output=cfg.output_dir,
                )
            )
    if started := st.session_state.pop("started", None):
        st.success(started)


def page() -> None:
    """The training monitor page."""
    ws = current()
    require_page(ws, "monitor")
    st.title(t("Training monitor"))
    runs = ws.runs()
    if runs:
        live_table(ws, refresh_every(runs))
        names = [r.name for r in runs]
        # the selected run is kept in the URL, so a browser refresh comes back to it
        wanted = st.session_state.get("monitor_run") or st.query_params.get("run")
        if (show := st.session_state.pop("show_run", None)) in names:
            st.session_state["pick_run"] = show  # a widget's state may only be set before it is drawn
        index = names.index(wanted) if wanted in names else 0
        chosen = st.selectbox(t("Run"), names, index=index, key="pick_run")
        st.session_state["monitor_run"] = chosen
        st.query_params["run"] = chosen
        info = next(r for r in runs if r.name == chosen)
        live_details(ws, chosen, refresh_every([info]))
    else:
        st.info(t("No runs yet in this workspace: start one below."))
    start_section(ws)
