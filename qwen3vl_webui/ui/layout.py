"""The gradio Blocks: a Chat tab (chat, budget sliders, precision switch, live panel) and the operator's Batch jobs
tab; one concurrency id for GPU work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from qwen3vl_webui import precisions, ranges
from qwen3vl_webui.config import Settings
from qwen3vl_webui.documents import DOCUMENT_EXTENSIONS
from qwen3vl_webui.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from qwen3vl_webui.service.limits import Limits
from qwen3vl_webui.ui import gradio_compat
from qwen3vl_webui.ui.handlers import Handlers
from qwen3vl_webui.ui.jobs_tab import JobsTab, build_jobs_tab
from qwen3vl_webui.ui.streaming import on_event_loop
from qwen3vl_webui.zerogpu import gpu_function, on_zero_gpu

ASSETS = Path(__file__).resolve().parents[2] / "assets"
GPU_CONCURRENCY_ID = "gpu"
PLOT_EVERY_S = 2.0  # the plots redraw less often than the panel's figures: each is a chart for every open tab


def build_demo(handlers: Handlers, settings: Settings, jobs: JobsTab | None = None) -> gr.Blocks:
    gradio_compat.quiet_range_errors()  # the API caller gets the range error; the console, no traceback
    with gr.Blocks(title="Qwen3-VL WebUI", fill_height=True) as demo:
        gr.Markdown("## Qwen3-VL WebUI", elem_id="title")
        status = gr.Markdown("Starting…", elem_id="status")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=320, elem_id="side"):
                        panel = gr.Markdown("", elem_id="panel")
                        plots = _live_plots()
                        inputs, estimate = _budget_controls(handlers.service.configured_limits)
                        sampling, stop = _sampling_controls()
                        whole_video = gr.Checkbox(
                            False, label="Whole video", elem_id="whole-video",
                            info="A video longer than max frames at this fps is watched in segments, each described with "
                            "times, then merged (slower). Off: sampled within the budget.",
                        )  # fmt: skip
                        operator, choice = _operator_controls(handlers)
                    with gr.Column(scale=3, min_width=420):
                        chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=560, buttons=["copy"])
                        textbox = gr.MultimodalTextbox(
                            file_types=[*IMAGE_EXTENSIONS, *VIDEO_EXTENSIONS, *DOCUMENT_EXTENSIONS],
                            file_count="multiple",
                            placeholder="Ask about an image, a video or a document (.txt .md .json .csv .pdf), or just chat…",
                            sources=["upload"],
                            elem_id="message",
                            stop_btn=True,  # ChatInterface takes its Stop button from a custom textbox
                            max_plain_text_length=100_000,
                        )
                        chat = gr.ChatInterface(
                            # On ZeroGPU the GPU exists inside the decorated call only: gradio runs it as is.
                            fn=gpu_function(handlers.chat) if on_zero_gpu() else on_event_loop(handlers.chat),
                            multimodal=True,
                            chatbot=chatbot,
                            textbox=textbox,
                            # stop and whole_video last: older positional API calls still fit
                        additional_inputs=[*sampling, *inputs, stop, whole_video],
                            api_name="chat",
                            api_description="Chat with Qwen3-VL. message = {'text': str, 'files': [file, ...]}; "
                            "the client keeps the history between calls.",
                            concurrency_limit=_chat_concurrency(settings),
                            fill_height=True,
                        )
                        gr.Examples(
                            examples=[
                                [{"text": "Describe this image.", "files": [str(ASSETS / "example.png")]}],
                                [{"text": "What happens in this video?", "files": [str(ASSETS / "example.mp4")]}],
                            ],
                            inputs=[textbox],
                            label="Examples",
                        )
            if jobs is not None:  # the operator's: the page load shows it to them alone (ui/jobs_tab.py)
                with gr.Tab("Batch jobs", id="jobs", elem_id="batch-jobs", visible=False) as jobs_tab:
                    jobs_timer = build_jobs_tab(jobs)
                demo.load(jobs.shown, outputs=[jobs_tab, jobs_timer], queue=False, api_visibility="private")
        _share_gpu_concurrency(demo, chat, _chat_concurrency(settings))
        # gradio runs at most this many events at once (its queue's workers and its thread limiter): enough
        # for every chat the admission lets run or wait, plus the page's small events.
        gradio_compat.set_max_threads(demo, max(40, _chat_concurrency(settings) + 16))
        chatbot.clear(handlers.clear, queue=False, api_visibility="private")
        for control in inputs:
            # On release, not on every step of a drag: one event per adjustment (each event is a server call).
            control.release(handlers.estimate, inputs=inputs, outputs=estimate, queue=False, api_visibility="private")
        # Requests still in gradio's queue, for the panel (0 if gradio's internals change: the page keeps working).
        handlers.queued = lambda: gradio_compat.queue_length(demo, default=0)  # type: ignore[method-assign]
        timer = gr.Timer(1.0)
        timer.tick(handlers.panel, outputs=[panel, status], queue=False, api_visibility="private")
        demo.load(handlers.panel, outputs=[panel, status], queue=False, api_visibility="private")
        plot_timer = gr.Timer(PLOT_EVERY_S)
        plot_timer.tick(handlers.plots, outputs=plots, queue=False, api_visibility="private")
        demo.load(handlers.plots, outputs=plots, queue=False, api_visibility="private")
        demo.load(handlers.context_sliders, outputs=inputs[:2], queue=False, api_visibility="private").then(
            handlers.estimate, inputs=inputs, outputs=estimate, queue=False, api_visibility="private"
        )
        demo.load(handlers.operator_view, outputs=operator, queue=False, api_visibility="private")
        demo.load(handlers.loaded_precision, outputs=choice, queue=False, api_visibility="private")
    return demo


def _live_plots() -> list[gr.LinePlot]:
    """The last 5 minutes, one sample a second (service/metrics.LoadHistory): memory, tokens/s, queue, KV slots."""
    with gr.Accordion("Live plots (last 5 minutes)", open=True, elem_id="plots"):
        kw: dict[str, Any] = {"x": "seconds ago", "color": "series", "height": 160, "x_lim": [-300, 0],
                              "show_label": False, "x_title": "seconds ago"}  # fmt: skip
        with gr.Row():
            memory = gr.LinePlot(y="GiB", title="Memory", elem_id="plot-memory", **kw)
            speed = gr.LinePlot(y="tok/s", title="Output tokens/s", elem_id="plot-speed", **kw)
        with gr.Row():
            queue = gr.LinePlot(y="chats", title="Queue", elem_id="plot-queue", **kw)
            kv = gr.LinePlot(y="slots", title="KV slots", elem_id="plot-kv", **kw)
    return [memory, speed, queue, kv]


def _slider(name: str, label: str, cap: float | None = None, **kw: Any) -> gr.Slider:
    """A slider over `name`'s range in ranges.REQUEST (its top lowered to `cap`), starting at its default."""
    r = ranges.REQUEST[name]
    top = r.hi if cap is None else min(r.hi, cap)
    return gr.Slider(r.lo, top, value=min(r.default, top), step=r.step, label=label, **kw)


def _budget_controls(caps: Limits) -> tuple[list[Any], gr.Markdown]:
    """`caps`: the configured context caps (the sliders' tops; the page load lowers them if the warm-up did)."""
    with gr.Accordion("Context & media budget", open=True, elem_id="budget"):
        max_context = gr.Slider(
            ranges.REQUEST["max_context"].lo, caps.max_context, value=caps.max_context,
            step=ranges.REQUEST["max_context"].step, label="Max context (tokens)",
            info="Prompt + answer; older turns are dropped, oldest first, to fit.", elem_id="max-context",
        )  # fmt: skip
        max_new = _slider("max_new_tokens", "Max new tokens", caps.max_new_tokens, elem_id="max-new-tokens")
        image_mp = _slider("image_megapixels", "Max pixels per image (MP)", elem_id="image-mp")
        fps = _slider("video_fps", "Video sampling (fps)", elem_id="video-fps")
        frames = _slider("video_max_frames", "Max video frames", elem_id="video-frames")
        video_mp = _slider("video_megapixels", "Total video pixels (MP)", elem_id="video-mp")
        estimate = gr.Markdown("", elem_id="estimate")
    return [max_context, max_new, image_mp, fps, frames, video_mp], estimate


def _sampling_controls() -> tuple[list[Any], gr.Textbox]:
    with gr.Accordion("Sampling & system prompt", open=False):
        system = gr.Textbox("", label="System prompt", lines=2)
        temperature = _slider("temperature", "Temperature (0 = greedy)")
        top_p = _slider("top_p", "Top-p")
        top_k = _slider("top_k", "Top-k (0 = off)")
        repetition = _slider("repetition_penalty", "Repetition penalty")
        seed = gr.Number(ranges.REQUEST["seed"].default, label="Seed (-1 = random)", precision=0)
        stop = gr.Textbox(
            "", label="Stop strings", lines=2, max_lines=8, elem_id="stop-strings",
            placeholder="one per line", info=r"The answer ends before the first of these (at most 8; \n = line break).",
        )  # fmt: skip
    return [system, temperature, top_p, top_k, repetition, seed], stop


def _operator_controls(handlers: Handlers) -> tuple[gr.Accordion, gr.Dropdown]:
    """Server-wide actions: hidden unless the page load finds the operator, and refused to anyone else."""
    with gr.Accordion("Precision & memory (operator)", open=False, visible=False, elem_id="operator") as box:
        # Its value is the loaded precision, set at page load (handlers.loaded_precision).
        choice = gr.Dropdown(list(precisions.MENU), value=None, label="Reload the model in", elem_id="precision")
        apply = gr.Button("Switch precision", elem_id="switch-precision")
        result = gr.Markdown("", label="result")
        release = gr.Button("Release cached GPU memory", elem_id="release-memory", size="sm")
    apply.click(
        handlers.switch, inputs=choice, outputs=result, concurrency_id=GPU_CONCURRENCY_ID, api_name="switch_precision"
    ).then(handlers.loaded_precision, outputs=choice, queue=False, api_visibility="private")
    release.click(handlers.release, outputs=result, concurrency_limit=1, api_name="release_memory")
    return box, choice


# Chat events gradio starts beyond what the admission may hold: a burst past the wait line gets the service's
# "busy" answer at once instead of waiting in gradio's queue for a place.
REFUSAL_HEADROOM = 16


def _chat_concurrency(settings: Settings) -> int:
    """Chat events gradio starts at once: every one the admission may run or keep waiting, plus headroom.

    The wait line is the service's (`ChatService` admission and the `Scheduler`): it sees every front door, says
    where a request stands, and refuses one client's flood without making everyone else wait behind it in
    gradio's queue. gradio's own queue only holds what arrives beyond that.
    """
    return settings.max_concurrency + settings.queue_size + REFUSAL_HEADROOM


def _share_gpu_concurrency(demo: gr.Blocks, chat: gr.ChatInterface, limit: int) -> None:
    """Puts every event that runs the chat function into one concurrency group.

    ChatInterface gives its UI event and its /chat API event separate groups of `limit` each; one shared id
    makes the limit global (the scheduler holds generations to --max-concurrency within it).
    """
    gradio_compat.share_concurrency(demo, ("_submit_fn", "_stream_fn", "chat"), GPU_CONCURRENCY_ID, limit)
    del chat
