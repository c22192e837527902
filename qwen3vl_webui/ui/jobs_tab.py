"""The "Batch jobs" tab: upload a JSONL or a zip of media with a prompt, watch it run in the slots chats leave free,
download the results. The operator's alone (a job takes GPU time from nobody, but it does take the machine's)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from qwen3vl_webui.service.jobs import BoardView, JobBoard, format_duration
from qwen3vl_webui.service.jobstore import JobError

OPERATOR_ONLY = "Batch jobs are the operator's: log in as the --admin-auth user, or run the app on 127.0.0.1."


class JobsTab:
    """The tab's events over one JobBoard; `is_operator` is the chat handlers' check."""

    def __init__(self, board: JobBoard, is_operator: Any) -> None:
        self.board = board
        self.is_operator = is_operator

    def start(self, upload: Any, prompt: str, request: gr.Request | None = None) -> str:
        if not self.is_operator(request):
            return OPERATOR_ONLY
        path = getattr(upload, "name", None) or (upload if isinstance(upload, str) else None)
        if not path:
            return "Choose a .jsonl of items or a .zip of media first."
        try:
            job, count = self.board.submit(path, prompt or "")
        except JobError as exc:
            return f"⚠️ {exc}"
        return f"Started job {job}: {count} items."

    def stop(self, request: gr.Request | None = None) -> str:
        if not self.is_operator(request):
            return OPERATOR_ONLY
        self.board.stop()
        return "Stopping: items in flight go back to the queue."

    def shown(self, request: gr.Request | None = None) -> tuple[Any, Any]:
        """On page load: the tab, and its 1 s timer, for the operator alone."""
        operator = self.is_operator(request)
        return gr.update(visible=operator), gr.Timer(active=operator)

    def view(self, request: gr.Request | None = None) -> tuple[str, Any]:
        if not self.is_operator(request):
            return OPERATOR_ONLY, gr.update(visible=False)
        v = self.board.view()
        return describe(v), (gr.update(value=v.results, visible=True) if v.results else gr.update(visible=False))


def describe(v: BoardView) -> str:
    if v.job is None:
        return "No job yet. Upload a `.jsonl` (one `{\"id\", \"prompt\"}` a line) or a `.zip` of images and videos."
    held = "".join(f"\n\n⚠️ {why}" for why in v.held)  # other jobs left unfinished, and why
    if v.state == "failed":
        return f"Job {v.job} failed: {v.message}" + held
    resumed = " (resumed after the server restarted)" if v.resumed and v.state != "paused" else ""
    line = f"**Job {v.job}**: {v.state}{resumed}"
    p = v.progress
    if p is not None:
        c = p.counts
        line += (
            f" · {c.finished}/{c.total} items ({c.done} done, {c.failed} failed) · {p.items_per_s:.2f} items/s · "
            f"{p.tokens_per_s:.1f} tokens/s · ETA {format_duration(p.eta_s) if v.state == 'running' else '—'}"
        )
        if p.preempted:
            line += f" · {p.preempted} items gave their slot to a chat"
    if v.state == "interrupted":
        line += " · the server is closing; the job goes on when it starts again"
    if v.state == "paused":
        line += f"\n\n⚠️ {v.message}"
    return line + held


def build_jobs_tab(tab: JobsTab) -> gr.Timer:
    """The tab's contents and events; returns its timer (started by the page load for the operator only)."""
    gr.Markdown(
        "Run one prompt over many files, or a list of prompts, using only the GPU slots chats leave free: a chat that "
        "arrives takes a slot back within one decode step, and the item it interrupted runs again later."
    )
    with gr.Row():
        upload = gr.File(label="Items (.jsonl) or media (.zip)", file_types=[".jsonl", ".zip"], elem_id="job-upload")
        prompt = gr.Textbox(label="Prompt for every file of a zip", lines=3, elem_id="job-prompt")
    with gr.Row():
        start = gr.Button("Start job", variant="primary", elem_id="job-start")
        stop = gr.Button("Stop job", elem_id="job-stop")
    status = gr.Markdown("", label="job status", elem_id="job-status")
    results = gr.File(label="Results (JSON lines, input order)", visible=False, elem_id="job-results")
    start.click(tab.start, inputs=[upload, prompt], outputs=status, concurrency_limit=1, api_name="start_job")
    stop.click(tab.stop, outputs=status, concurrency_limit=1, api_name="stop_job")
    timer = gr.Timer(1.0, active=False)
    timer.tick(tab.view, outputs=[status, results], queue=False, api_visibility="private")
    return timer
