"""Every gradio internal the app uses (ui/gradio_compat.py), checked on a real Blocks: a gradio upgrade that removes or
changes one fails here, loudly, instead of quietly returning 0 or setting an attribute nobody reads."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import pytest

from qwen3vl_webui.ui import gradio_compat
from qwen3vl_webui.ui.gradio_compat import GradioChanged

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _echo(message: Any, history: Any) -> str:
    return "ok"


@pytest.fixture
def mounted() -> tuple[Any, Any]:
    """A chat page like the app's (ChatInterface with a custom textbox, an example with a file), queued and mounted."""
    import fastapi
    import gradio as gr

    with gr.Blocks() as demo:
        textbox = gr.MultimodalTextbox(file_types=[".png"], stop_btn=True)
        gr.ChatInterface(fn=_echo, multimodal=True, chatbot=gr.Chatbot(), textbox=textbox, api_name="chat")
        gr.Examples([[{"text": "x", "files": [str(ASSETS / "example.png")]}]], inputs=[textbox])
    gradio_compat.set_max_threads(demo, 57)
    demo.queue(max_size=3)
    gradio_compat.set_session_capacity(demo, 123)
    http = fastapi.FastAPI()
    gr.mount_gradio_app(http, demo, path="/")
    gradio_compat.check_uploaded_paths(demo)
    return demo, http


def test_the_queue_length_and_its_running_jobs(mounted: tuple[Any, Any]) -> None:
    demo, _ = mounted
    assert gradio_compat.queue_length(demo) == 0 and gradio_compat.queue_busy(demo) is False
    assert demo._queue.max_thread_count == 57  # what set_max_threads set is what the queue runs
    assert isinstance(demo._queue.active_jobs, list)  # filled with None per worker when the queue starts
    demo._queue.active_jobs = [None, object()]  # one event being processed
    assert gradio_compat.queue_busy(demo) is True


def test_a_changed_internal_raises_unless_the_caller_can_do_without_it() -> None:
    class Changed:  # a Blocks from a gradio without `_queue`
        pass

    with pytest.raises(GradioChanged, match=r"gradio .* changed: Blocks has no `_queue`; update .*gradio_compat\.py"):
        gradio_compat.queue_length(Changed())
    assert gradio_compat.queue_length(Changed(), default=0) == 0  # the panel keeps working
    assert gradio_compat.queue_busy(Changed(), default=False) is False  # shutdown is not blocked
    with pytest.raises(GradioChanged):
        gradio_compat.set_max_threads(Changed(), 4)


def test_the_chat_events_share_one_concurrency_group(mounted: tuple[Any, Any]) -> None:
    demo, _ = mounted
    matched = gradio_compat.share_concurrency(demo, ("_submit_fn", "_stream_fn", "chat"), "gpu", 9)
    chat_fns = [fn for fn in demo.fns.values() if fn.name in ("_submit_fn", "_stream_fn", "chat")]
    names = {fn.name for fn in chat_fns}
    assert matched == len(chat_fns) >= 2 and "_submit_fn" in names  # the UI's event and the /chat API's
    assert all(fn.concurrency_id == "gpu" and fn.concurrency_limit == 9 for fn in chat_fns)
    with pytest.raises(GradioChanged, match="no event function is named"):
        gradio_compat.share_concurrency(demo, ("renamed_submit",), "other", 1)


def test_the_mounted_app_its_sessions_uploads_and_streams(mounted: tuple[Any, Any]) -> None:
    from gradio import processing_utils
    from gradio.routes import App

    demo, http = mounted
    app = gradio_compat.mounted_app(http)
    assert isinstance(app, App)
    assert app.state_holder.capacity == 123  # the session capacity reached gradio's StateHolder
    assert Path(gradio_compat.upload_dir(app)).is_absolute()
    assert callable(gradio_compat.end_streams(app))
    # The upload-path check runs only when has_launched is set (launch() sets it, mounting does not).
    assert demo.has_launched is True and "has_launched" in inspect.getsource(processing_utils._check_allowed)
    with pytest.raises(GradioChanged, match="mounted no gradio.routes.App"):
        gradio_compat.mounted_app(type("Bare", (), {"routes": []})())


def test_the_upload_folder_follows_gradio_temp_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    assert Path(gradio_compat.upload_folder()).resolve() == tmp_path.resolve()


def test_the_page_examples_are_kept_files(mounted: tuple[Any, Any]) -> None:
    demo, _ = mounted
    kept = gradio_compat.kept_files(demo)
    assert any(Path(p).name == "example.png" for p in kept), kept


def test_closing_a_mounted_blocks(mounted: tuple[Any, Any]) -> None:
    demo, _ = mounted
    gradio_compat.close_blocks(demo)  # launch() never ran: Blocks.close reads `server`, which it sets
    assert demo.server is None


def test_the_share_tunnel(mounted: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from gradio import networking, tunneling

    params = list(inspect.signature(networking.setup_tunnel).parameters)
    assert params[:3] == ["local_host", "local_port", "share_token"] and len(params) == 5
    demo, _ = mounted
    calls: list[tuple] = []
    monkeypatch.setattr(networking, "setup_tunnel", lambda *a: calls.append(a) or "https://x.gradio.live")
    monkeypatch.setattr(tunneling, "CURRENT_TUNNELS", ["tunnel"])
    assert gradio_compat.open_share_link(demo, "127.0.0.1", 7860) == ("https://x.gradio.live", ["tunnel"])
    assert calls == [("127.0.0.1", 7860, demo.share_token, None, None)] and demo.share_url == "https://x.gradio.live"


def test_gradio_still_imports_matplotlib_around_events() -> None:
    """skip_absent_matplotlib exists because of this class (tests/test_app.py measures the searches it saves)."""
    from gradio import utils

    assert "matplotlib" in inspect.getsource(utils.MatplotlibBackendMananger)
    assert os.environ.get("GRADIO_TEMP_DIR")  # conftest isolates uploads: the fixtures above write none elsewhere


def test_lazy_sessions_build_configs_on_first_use_and_equal_gradios_own(mounted: tuple[Any, Any], monkeypatch) -> None:
    """A new session builds no block config until one is read; what it then holds is what gradio's SessionState
    holds, after the same value updates (the inputs of a call, a streamed output)."""
    from gradio.blocks import BlocksConfig
    from gradio.state_holder import SessionState, StateHolder

    demo, http = mounted
    app = gradio_compat.mounted_app(http)
    assert type(app.state_holder) is StateHolder
    gradio_compat.lazy_session_configs(app)
    built: list[int] = []
    real = BlocksConfig.config_for_block

    def counted(_id: int, *args: Any, **kwargs: Any) -> dict:
        built.append(_id)
        return real(_id, *args, **kwargs)

    monkeypatch.setattr(BlocksConfig, "config_for_block", staticmethod(counted))
    lazy = app.state_holder["visitor"]
    assert built == [] and app.state_holder["visitor"] is lazy  # nothing built; the same session next time
    stock = SessionState(demo)
    assert len(built) >= 10  # gradio's own builds every block's config at once
    textbox = next(b for b in demo.blocks.values() if type(b).__name__ == "MultimodalTextbox")
    chatbot = next(b for b in demo.blocks.values() if type(b).__name__ == "Chatbot")
    for state in (lazy, stock):
        state._update_value_in_config(textbox._id, {"text": "hello", "files": []})  # an input, before any read
    built.clear()
    assert lazy.config_values[textbox._id]["props"]["value"] == {"text": "hello", "files": []}
    assert built == [textbox._id]  # that one block, on first read
    for state in (lazy, stock):
        state[chatbot._id] = chatbot  # gradio's postprocess: a block set again rebuilds its config...
        state._update_value_in_config(chatbot._id, [{"role": "assistant", "content": "hi"}])  # ...then its value
    assert {c["id"]: c for c in lazy.components} == {c["id"]: c for c in stock.components}  # the deep-link read
    assert textbox._id in lazy.config_values and -1 not in lazy.config_values
    with pytest.raises(KeyError):
        lazy.config_values[-1]


def test_lazy_sessions_refuse_a_changed_state_holder(mounted: tuple[Any, Any]) -> None:
    _, http = mounted
    app = gradio_compat.mounted_app(http)

    class Other:
        pass

    app.state_holder = Other()
    with pytest.raises(GradioChanged, match="state holder is a Other"):
        gradio_compat.lazy_session_configs(app)


def test_has_event_finds_what_gradios_own_lookup_finds(mounted: tuple[Any, Any]) -> None:
    """`has_event` answers as gradio's `route_utils.get_fn` does (found, or KeyError / FnIndexInferError), by fn_index
    or API name, in the Blocks' table or in a session's own (one with an extra event, as `gr.render` makes)."""
    from gradio import route_utils
    from gradio.data_classes import PredictBody

    demo, http = mounted
    app = gradio_compat.mounted_app(http)
    session = app.state_holder["rendered"]
    extra = max(demo.fns) + 1
    session.blocks_config.fns = {**session.blocks_config.fns, extra: next(iter(demo.fns.values()))}

    def gradio_finds(fn_index: int | None, api_name: str | None, session_hash: str | None) -> bool:
        try:
            route_utils.get_fn(demo, api_name, PredictBody(data=[], fn_index=fn_index, session_hash=session_hash))
        except (KeyError, route_utils.FnIndexInferError):
            return False
        return True

    cases = [(index, None) for index in (*demo.fns, extra, -1, 10**6)] + [(None, "chat"), (None, "nosuch")]
    for session_hash in (None, "rendered"):
        for fn_index, api_name in cases:
            expected = gradio_finds(fn_index, api_name, session_hash)
            assert gradio_compat.has_event(app, fn_index, api_name, session_hash) is expected, (fn_index, session_hash)
    assert gradio_compat.has_event(app, extra, None, "rendered") and not gradio_compat.has_event(app, extra, None)
    assert "new-visitor" not in app.state_holder.session_data  # asking creates no session
    assert not gradio_compat.has_event(app, extra, None, "new-visitor")  # a new session starts with the Blocks' table
    with pytest.raises(GradioChanged, match="no `state_holder`"):
        gradio_compat.has_event(object(), 0, None)
    assert gradio_compat.has_event(object(), 0, None, default=True)  # the front door lets gradio decide then


def test_cheap_conversions_run_on_the_loop_and_others_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # What gradio.blocks awaits for a component's preprocess / postprocess: a listed type's runs on the event loop's
    # own thread (no hand-off), with its result and its errors as they are; an unlisted type's (an image) still
    # goes to a worker thread, and so does any other function. The Chatbot's preprocess (which builds any component
    # a client names in a message) keeps its thread; its postprocess is inlined for a short text-only history only.
    import asyncio
    import threading

    import gradio as gr
    import gradio.blocks as blocks

    real = getattr(blocks.anyio, "_real", blocks.anyio)  # an app started earlier in this process installed it
    monkeypatch.setattr(blocks, "anyio", real)  # restored after the test
    assert gradio_compat.inline_processing() is True
    assert gradio_compat.inline_processing() is False  # once per process
    ran: dict[str, str] = {}

    def recorder(name: str, result: Any, method: str = "preprocess") -> Any:
        def convert(self: Any, value: Any) -> Any:
            ran[name] = threading.current_thread().name
            if value == "bad":
                raise gr.Error("refused")
            return result

        convert.__name__ = method
        return convert

    monkeypatch.setattr(gr.Slider, "preprocess", recorder("slider", 0.5))
    monkeypatch.setattr(gr.Image, "preprocess", recorder("image", "pixels"))
    monkeypatch.setattr(gr.Chatbot, "preprocess", recorder("chatbot in", []))
    monkeypatch.setattr(gr.Chatbot, "postprocess", recorder("chatbot out", [], "postprocess"))
    limiter_args = {"limiter": None}
    text_history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    file_history = [{"role": "user", "content": {"path": "/tmp/x.png"}}]

    async def main() -> tuple[Any, ...]:
        threading.current_thread().name = "the-loop"
        to_thread = blocks.anyio.to_thread
        before = to_thread.inlined.copy()
        slider = await to_thread.run_sync(gr.Slider().preprocess, 0.3, **limiter_args)
        image = await to_thread.run_sync(gr.Image().preprocess, None, **limiter_args)
        other = await to_thread.run_sync(lambda: threading.current_thread().name)
        await to_thread.run_sync(gr.Chatbot().preprocess, text_history, **limiter_args)
        seen = {"chatbot in": ran["chatbot in"]}
        for label, history in (("text", text_history), ("file", file_history), ("long", text_history * 40)):
            await to_thread.run_sync(gr.Chatbot().postprocess, history, **limiter_args)
            seen[label] = ran["chatbot out"]

        async def texts(prefix: str) -> Any:  # an event function that is an async generator function (the chat's)
            yield prefix

        made = await to_thread.run_sync(texts, "made")  # counted in `inlined`: no thread to make it
        assert [text async for text in made] == ["made"]
        with pytest.raises(gr.Error, match="refused"):
            await to_thread.run_sync(gr.Slider().preprocess, "bad", **limiter_args)
        return slider, image, other, seen, to_thread.inlined - before

    name = threading.current_thread().name
    try:
        slider, image, other, seen, inlined = asyncio.run(main())
    finally:
        threading.current_thread().name = name
    assert (slider, image) == (0.5, "pixels")
    assert inlined == {"Slider.preprocess": 2, "Chatbot.postprocess": 1, "async generator": 1}
    assert ran["slider"] == "the-loop" and ran["image"] != "the-loop" and other != "the-loop"
    assert seen["text"] == "the-loop" and "the-loop" not in (seen["chatbot in"], seen["file"], seen["long"])


@pytest.mark.parametrize("auth", [None, ("ada", "pw-123456")], ids=["open", "login"])
def test_gradios_login_check_runs_on_the_loop_with_the_same_answers(
    monkeypatch: pytest.MonkeyPatch, auth: tuple[str, str] | None
) -> None:
    """`login_check_on_loop`: every route's `Depends(login_check)` is awaited on the event loop (no worker thread for
    a chat's join); behind a login an anonymous join is still refused with 401, and without one it is queued."""
    import fastapi
    import fastapi.dependencies.utils as dependency_utils
    import gradio as gr
    from fastapi.testclient import TestClient

    with gr.Blocks() as demo:
        gr.ChatInterface(fn=_echo, api_name="chat")
    demo.queue()
    http = fastapi.FastAPI()
    gr.mount_gradio_app(http, demo, path="/", auth=[auth] if auth else None)
    app = gradio_compat.mounted_app(http)
    threaded: list[str] = []
    real = dependency_utils.run_in_threadpool

    async def counting(call: Any, *args: Any, **kwargs: Any) -> Any:
        threaded.append(getattr(call, "__name__", ""))
        return await real(call, *args, **kwargs)

    monkeypatch.setattr(dependency_utils, "run_in_threadpool", counting)
    body = {"data": ["hi", []], "fn_index": 0, "session_hash": "s1", "event_data": None, "trigger_id": None}

    def join() -> int:
        with TestClient(http) as client:
            return client.post("/gradio_api/queue/join", json=body).status_code

    before = join()
    assert threaded.count("login_check") == 1  # gradio as shipped: a worker thread per join
    changed = gradio_compat.login_check_on_loop(app)
    assert changed >= 10 and gradio_compat.login_check_on_loop(app) == 0  # every guarded route, once
    threaded.clear()
    assert join() == before == (401 if auth else 200)
    assert "login_check" not in threaded
