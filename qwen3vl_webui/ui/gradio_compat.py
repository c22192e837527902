"""Every use of gradio's internals (private attributes, undocumented helpers), in one place, each checked.

gradio 6.31 has no public API for what these do: how many events wait in its queue, which events the ChatInterface
made, the upload folder, a mounted app's session capacity and upload-path check, the tunnel of `--share`. Each
function here checks that the internal it uses is still there and raises GradioChanged otherwise, so a gradio
upgrade fails tests/test_gradio_compat.py loudly instead of quietly returning 0 or setting an attribute nobody
reads. Where the app must keep serving anyway (a panel figure, the shutdown wait), callers pass a `default`.
Nothing here imports gradio at module import time.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class GradioChanged(RuntimeError):
    """A gradio internal this app relies on is gone or different; the message names it."""

    def __init__(self, what: str) -> None:
        try:
            import gradio

            version = gradio.__version__
        except Exception:  # pragma: no cover - gradio is a hard dependency of the UI
            version = "?"
        super().__init__(f"gradio {version} changed: {what}; update qwen3vl_webui/ui/gradio_compat.py")


def _require(obj: Any, name: str, where: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise GradioChanged(f"{where} has no `{name}`") from None


def _lenient(read: Callable[[], T], default: T | None) -> T:
    """`read()`, or `default` (logged once) when it raises GradioChanged and a default was given."""
    try:
        return read()
    except GradioChanged as exc:
        if default is None:
            raise
        _warn_once(str(exc))
        return default


@functools.cache
def _warn_once(text: str) -> None:
    log.warning("%s", text)


# ------------------------------------------------------------------------------- the queue


def queue_length(demo: Any, default: int | None = None) -> int:
    """Events waiting in gradio's queue (`Blocks._queue`, a `queueing.Queue` with `__len__`)."""

    def read() -> int:
        queue = _require(demo, "_queue", "Blocks")
        try:
            return len(queue)
        except TypeError:
            raise GradioChanged("Blocks._queue has no length") from None

    return _lenient(read, default)


def queue_busy(demo: Any, default: bool | None = None) -> bool:
    """Events waiting in, or being processed by, gradio's queue (`_queue` and its `active_jobs`)."""

    def read() -> bool:
        queue = _require(demo, "_queue", "Blocks")
        jobs = _require(queue, "active_jobs", "Blocks._queue")
        return queue_length(demo) > 0 or any(job is not None for job in jobs)

    return _lenient(read, default)


def share_concurrency(demo: Any, names: Iterable[str], concurrency_id: str, limit: int) -> int:
    """Puts every event whose function is named in `names` (or already has `concurrency_id`) into that concurrency
    group with `limit`; returns how many. gr.ChatInterface names its UI event's function `_submit_fn` (`_stream_fn`
    when streaming) and its API event's after `fn`; `Blocks.fns` maps ids to `BlockFunction`s."""
    names = tuple(names)
    fns = _require(demo, "fns", "Blocks")
    matched = 0
    for fn in fns.values():
        name = _require(fn, "name", "BlockFunction")
        if getattr(fn, "concurrency_id", None) == concurrency_id or name in names:
            _require(fn, "concurrency_limit", "BlockFunction")
            fn.concurrency_id = concurrency_id
            fn.concurrency_limit = limit
            matched += 1
    if not matched:
        raise GradioChanged(f"no event function is named any of {', '.join(names)}")
    return matched


def has_event(
    gradio_app: Any, fn_index: int | None, api_name: str | None, session_hash: str | None = None,
    default: bool | None = None, public: bool = False,
) -> bool:  # fmt: skip
    """Whether gradio finds the event a call names (`route_utils.get_fn`: by `fn_index`, else by `api_name`) instead
    of raising KeyError or FnIndexInferError (an HTTP 500). A session that exists has its own table (`gr.render` adds
    to it); a new one starts as a copy of the Blocks'. `public`: only an event of the API docs counts (`call/v2`
    looks its name up there, `Blocks.get_api_info`, and answers 500 for any other)."""

    def read() -> bool:
        holder = _require(gradio_app, "state_holder", "gradio.routes.App")
        session = _require(holder, "session_data", "StateHolder").get(session_hash) if session_hash else None
        if session is not None:
            fns = _require(_require(session, "blocks_config", "SessionState"), "fns", "BlocksConfig")
        else:
            fns = _require(_require(gradio_app, "get_blocks", "gradio.routes.App")(), "fns", "Blocks")
        if fn_index is not None:
            return fn_index in fns
        return any(
            _require(fn, "api_name", "BlockFunction") == api_name
            and (not public or (_require(fn, "api_visibility", "BlockFunction") == "public" and _require(fn, "fn", "BlockFunction") is not None))
            for fn in fns.values()
        )

    return _lenient(read, default)


def set_max_threads(demo: Any, threads: int) -> None:
    """How many events gradio runs at once (its queue's workers and its thread limiter): `Blocks.max_threads`,
    which `launch()` takes as an argument and a mounted app reads from the Blocks."""
    _require(demo, "max_threads", "Blocks")
    demo.max_threads = threads


# ------------------------------------------------------------------------------- mounting


def set_session_capacity(demo: Any, sessions: int) -> None:
    """Sessions whose state gradio keeps (`launch(state_session_capacity=...)`; a mounted app reads the Blocks')."""
    _require(demo, "state_session_capacity", "Blocks")
    demo.state_session_capacity = sessions


def check_uploaded_paths(demo: Any) -> None:
    """Turns on gradio's check that a file path in an API call was uploaded (`processing_utils._check_allowed`),
    which it makes only when `Blocks.has_launched` is set: launch() sets it, mount_gradio_app does not."""
    _require(demo, "has_launched", "Blocks")
    demo.has_launched = True


def mounted_app(http: Any) -> Any:
    """The `gradio.routes.App` that `gr.mount_gradio_app` mounted into the FastAPI app `http`."""
    from gradio.routes import App as GradioApp

    for route in _require(http, "routes", "FastAPI"):
        if isinstance(getattr(route, "app", None), GradioApp):
            return route.app
    raise GradioChanged("mount_gradio_app mounted no gradio.routes.App")


def lazy_session_configs(gradio_app: Any) -> None:
    """New sessions of the mounted app build each block's config when first read, not all of them at once.

    gradio 6.31's `SessionState.__init__` builds the config of every block of the page for each new session (kept
    for deep links). For this page (68 blocks) that is ~20 ms of the event loop per new visitor, API client or
    `gradio_client` conversation on a CI-class core, and a burst of new sessions queues behind it: the load test's
    32-chat waves waited ~0.9 s before the first of them reached the chat handler (bench/RESULTS.md, issue 12).
    A session's configs are read when a block is updated and by the deep-link route (`components`), which still
    sees every block's (built then). tests/test_gradio_compat.py checks they equal gradio's own.
    """
    from gradio.state_holder import StateHolder

    holder = _require(gradio_app, "state_holder", "gradio.routes.App")
    if type(holder) is not StateHolder:
        raise GradioChanged(f"the mounted app's state holder is a {type(holder).__name__}, not a StateHolder")
    _require(holder, "session_data", "StateHolder")
    holder.__class__ = _lazy_session_classes()[1]


@functools.cache
def _lazy_session_classes() -> tuple[type, type]:
    """(LazySessionState, LazyStateHolder): gradio's classes, with a session's configs built on first use."""
    from gradio.state_holder import SessionState, StateHolder

    class NoBlocks:
        """What SessionState.__init__ reads of the Blocks, with no block to build a config for."""

        def __init__(self, blocks: Any) -> None:
            self.default_config = blocks.default_config
            self.blocks: dict[int, Any] = {}

    class LazyConfigs(dict):
        """`SessionState.config_values`: a block's entry is built from the session's block on first use."""

        def __init__(self, state: Any, keys: set[int]) -> None:
            super().__init__()
            self._state, self._keys = state, keys
            self._values: dict[int, Any] = {}  # a value set before the entry was built: put in when it is

        def _buildable(self, key: Any) -> bool:
            return key in self._keys and key in self._state.blocks_config.blocks

        def __missing__(self, key: Any) -> Any:
            if not self._buildable(key):
                raise KeyError(key)
            config = self._state.blocks_config
            value = config.config_for_block(key, [], config.blocks[key])
            if key in self._values and "props" in value:
                value["props"]["value"] = self._values.pop(key)
            dict.__setitem__(self, key, value)
            return value

        def __setitem__(self, key: Any, value: Any) -> None:
            self._values.pop(key, None)  # a new config replaces the value too (as gradio's own does)
            super().__setitem__(key, value)

        def defer_value(self, key: Any, value: Any) -> bool:
            """`SessionState._update_value_in_config` for an entry not built yet: kept for when it is."""
            if dict.__contains__(self, key) or not self._buildable(key):
                return False
            self._values[key] = value
            return True

        def __contains__(self, key: Any) -> bool:
            return dict.__contains__(self, key) or self._buildable(key)

        def get(self, key: Any, default: Any = None) -> Any:
            return self[key] if key in self else default

        def _fill(self) -> None:
            for key in self._state.blocks_config.blocks:
                if not dict.__contains__(self, key) and self._buildable(key):
                    self.__missing__(key)

        def __iter__(self) -> Any:
            self._fill()
            return super().__iter__()

        def __len__(self) -> int:
            self._fill()
            return super().__len__()

        def keys(self) -> Any:
            self._fill()
            return super().keys()

        def values(self) -> Any:
            self._fill()
            return super().values()

        def items(self) -> Any:
            self._fill()
            return super().items()

    class LazySessionState(SessionState):
        def __init__(self, blocks: Any) -> None:
            super().__init__(NoBlocks(blocks))  # every attribute gradio sets, with no config built
            _require(self, "config_values", "SessionState")
            _require(self, "_update_value_in_config", "SessionState")
            self.config_values = LazyConfigs(self, {k for k in self.blocks_config.blocks if k in blocks.blocks})

        def _update_value_in_config(self, key: int, value: Any) -> None:
            # Each call's inputs and each streamed output land here: only built entries are written now.
            if not self.config_values.defer_value(key, value):
                super()._update_value_in_config(key, value)

    class LazyStateHolder(StateHolder):
        def __getitem__(self, session_id: str) -> Any:
            if session_id not in self.session_data:
                self.session_data[session_id] = LazySessionState(self.blocks)
            return super().__getitem__(session_id)

    return LazySessionState, LazyStateHolder


def upload_dir(gradio_app: Any) -> str:
    """Where a mounted gradio app stores uploads (`routes.App.uploaded_file_dir`)."""
    return str(_require(gradio_app, "uploaded_file_dir", "routes.App"))


def upload_folder() -> str:
    """gradio's upload folder as it is now (GRADIO_TEMP_DIR is read on every call): `utils.get_upload_folder`."""
    from gradio import utils

    return str(_require(utils, "get_upload_folder", "gradio.utils")())


def kept_files(demo: Any) -> set[str]:
    """Files gradio cached for the page itself (examples, default values): `Block.keep_in_cache`."""
    kept: set[str] = set()
    for block in _require(demo, "blocks", "Blocks").values():
        kept.update(_require(block, "keep_in_cache", type(block).__name__))
    return kept


def end_streams(gradio_app: Any) -> Callable[[], None]:
    """What ends a mounted app's open queue streams (heartbeats) at shutdown: `routes.App.stop_event.set`."""
    return _require(_require(gradio_app, "stop_event", "routes.App"), "set", "routes.App.stop_event")


def close_blocks(demo: Any) -> None:
    """Stops gradio's queue. `Blocks.close` reads `server`, which only `launch()` sets."""
    if not hasattr(demo, "server"):
        demo.server = None
    demo.close(verbose=False)


def open_share_link(demo: Any, host: str, port: int) -> tuple[str, list[Any]]:
    """What `launch(share=True)` does: an frp tunnel to `host:port` (needs the internet); returns (URL, tunnels to
    kill at close). `networking.setup_tunnel(host, port, share_token, server, certificate)`, `tunneling.CURRENT_TUNNELS`.
    """
    from gradio import networking, tunneling

    setup = _require(networking, "setup_tunnel", "gradio.networking")
    url = setup(host, port, _require(demo, "share_token", "Blocks"), None, None)
    demo.share, demo.share_url = True, url
    return url, list(_require(tunneling, "CURRENT_TUNNELS", "gradio.tunneling"))


# ------------------------------------------------------------------------------- process set-up


def plot_payload(columns: list[str], rows: list[tuple[Any, ...]], mark: str = "line") -> dict[str, Any]:
    """A gr.LinePlot value in the form gradio sends to the browser (its PlotData), which the plot passes through as is:
    `NativePlot.postprocess` returns a dict unchanged and turns a DataFrame into this (~9 ms a plot)."""
    from gradio.components import native_plot

    source = _postprocess_source(native_plot.LinePlot)
    if "isinstance(value, dict)" not in source or "PlotData(" not in source:
        raise GradioChanged("LinePlot.postprocess no longer passes a PlotData dict through")
    types = {}
    for i, name in enumerate(columns):
        first = next((row[i] for row in rows), 0)
        types[name] = "quantitative" if isinstance(first, (int, float)) else "nominal"
    return {"columns": columns, "data": [list(row) for row in rows], "datatypes": types, "mark": mark}


@functools.cache
def _postprocess_source(cls: Any) -> str:
    import inspect

    return inspect.getsource(_require(cls, "postprocess", cls.__name__))


def quiet_range_errors() -> bool:
    """An API value outside a slider's range: the client gets gradio's error, and the console no traceback.

    gradio's queue prints the traceback of every gr.Error whose `print_exception` is set (queueing.py
    `process_events`), and its Slider/Number raise theirs with the default (True) in `Number.raise_if_out_of_bounds`:
    one call with `temperature=99` put 25 lines of traceback in the console for a refusal the caller already had.
    Returns False when already done.
    """
    from gradio import exceptions
    from gradio.components import number

    original = _require(number.Number, "raise_if_out_of_bounds", "gradio.components.number.Number")
    if getattr(original, "_quiet", False):
        return False
    if "print_exception" not in exceptions.Error.__init__.__code__.co_varnames:
        raise GradioChanged("gradio.exceptions.Error takes no print_exception")

    def quiet(num: float, minimum: float | None, maximum: float | None) -> None:
        try:
            original(num, minimum, maximum)
        except exceptions.Error as exc:
            raise exceptions.Error(exc.message, print_exception=False) from None

    quiet._quiet = True  # type: ignore[attr-defined]
    number.Number.raise_if_out_of_bounds = staticmethod(quiet)  # type: ignore[method-assign]
    return True


def skip_absent_matplotlib() -> bool:
    """Marks matplotlib absent for good when it is not installed; True if it did.

    gradio imports matplotlib around every event it processes, each streamed update included, to switch its
    plotting backend (`gradio.utils.MatplotlibBackendMananger`). Without matplotlib every attempt searches
    sys.path again: 10.2% of the server process's py-spy samples with 32 streaming chats (CPU, `--random-weights
    tiny`), 0.1% after this. `None` in sys.modules makes the import fail at once.
    """
    import importlib.util
    import sys

    if "matplotlib" in sys.modules or importlib.util.find_spec("matplotlib") is not None:
        return False
    sys.modules["matplotlib"] = None  # type: ignore[assignment]
    return True


# ------------------------------------------------------------------------------- inputs and outputs on the loop

# Components whose preprocess and postprocess only convert a value in memory (no file, image, audio or network work,
# no pandas): the chat's inputs and outputs, the panel's Markdown. Exact types: a subclass may do more. The Chatbot
# is not among them: its preprocess builds (and preprocesses) any component a client names inside a message, an
# image decoded or an audio file run through ffmpeg; only its postprocess of a short text-only history is inlined.
INLINE_COMPONENTS = ("Slider", "Number", "Checkbox", "Textbox", "State", "JSON", "Markdown", "Dropdown", "Radio",
                     "MultimodalTextbox")  # fmt: skip
INLINE_HISTORY_MESSAGES = 64  # a longer history's postprocess (~0.9 ms at 50 turns, 11 ms at 200) keeps its thread


def inline_processing() -> bool:
    """gradio runs each input's `preprocess` and each output's `postprocess` of an event in a worker thread of its
    own (`Blocks.preprocess_data` / `postprocess_data`: `anyio.to_thread.run_sync`, one after the other). The chat
    event has 15 such inputs (the message, the sampling and budget controls): 15 hand-offs to a thread and back
    before the handler starts, each waiting its turn for the GIL and the event loop under load, ~46 ms p50 of a
    16-chat load's wait from the request's arrival to the handler on a 2-core VM (0.2 ms inline; on an H100 at 32
    chats the whole wait went 0.226 -> 0.058 s p50); and one more per streamed update. For the components named in
    INLINE_COMPONENTS, and the Chatbot's postprocess of a text-only history of at most INLINE_HISTORY_MESSAGES
    messages, the conversion runs where gradio awaits it, on the event loop: the same function, the same errors, no
    thread; so does the call of an async generator function (the chat handler as `ui.streaming` gives it), which
    gradio also hands to a thread. Everything else keeps its thread. Process-wide (it changes what `gradio.blocks`
    sees as `anyio`); False if it was in place already.
    """
    import gradio
    import gradio.blocks as blocks

    real = _require(blocks, "anyio", "gradio.blocks")
    if isinstance(real, _InlineAnyio):
        return False
    _require(_require(real, "to_thread", "anyio"), "run_sync", "anyio.to_thread")
    kinds = tuple(_require(gradio, name, "gradio") for name in INLINE_COMPONENTS)
    blocks.anyio = _InlineAnyio(real, kinds, _require(gradio, "Chatbot", "gradio"))
    return True


class _InlineAnyio:
    """`anyio` as gradio.blocks sees it: `to_thread.run_sync(component.preprocess | postprocess, value)` of the
    given component types runs inline; everything else is the real anyio."""

    def __init__(self, real: Any, kinds: tuple[type, ...], chatbot: type) -> None:
        self._real, self.to_thread = real, _InlineToThread(real.to_thread, kinds, chatbot)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _InlineToThread:
    def __init__(self, real: Any, kinds: tuple[type, ...], chatbot: type) -> None:
        self._real, self._kinds, self._chatbot = real, frozenset(kinds), chatbot
        self.inlined: collections.Counter[str] = collections.Counter()  # "Slider.preprocess" -> calls run inline

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        kind, name = type(getattr(fn, "__self__", None)), getattr(fn, "__name__", "")
        inline = name in ("preprocess", "postprocess") and kind in self._kinds
        if kind is self._chatbot and name == "postprocess":
            inline = len(args) == 1 and _plain_history(args[0])
        if inline:
            self.inlined[f"{kind.__name__}.{name}"] += 1
            return fn(*args)
        if inspect.isasyncgenfunction(fn):
            # `Blocks.call_function` awaits an event function that is not a coroutine function in a thread, an async
            # generator function included (the chat's): calling one only makes the generator object.
            self.inlined["async generator"] += 1
            return fn(*args)
        return await self._real.run_sync(fn, *args, **kwargs)


def _plain_history(value: Any) -> bool:
    """A chat history whose every message's content is a string (no file, no component), and not a long one."""
    if value is None:
        return True
    if not isinstance(value, list) or len(value) > INLINE_HISTORY_MESSAGES:
        return False
    for message in value:
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        if not isinstance(content, str):
            return False
    return True


def login_check_on_loop(gradio_app: Any) -> int:
    """gradio guards its routes (`/queue/join` among them) with `Depends(login_check)`, a plain function, which FastAPI
    runs in a worker thread: one hand-off to a thread and back for every chat's join, waiting for the GIL behind every
    stream under load (session 17's probe: the join's own handling was most of the 6.7 ms p50 / 49 ms p90 from a
    request's arrival to gradio's queue on a 2-core VM). It only compares the caller's user with the app's auth
    settings: here every route's dependency on it is a coroutine function with the same signature, arguments,
    result and errors, which FastAPI awaits on the event loop. Routes of an included router (FastAPI builds their
    handlers lazily from each route's `dependencies`) are rebuilt at their next request. Returns how many routes
    changed (0 the second time)."""
    import dataclasses

    import fastapi.routing

    wrapped: dict[Any, Callable[..., Any]] = {}

    def on_loop(call: Any) -> Callable[..., Any] | None:
        if getattr(call, "__name__", "") != "login_check" or getattr(call, "__module__", "") != "gradio.routes":
            return None
        if call not in wrapped:
            wrapped[call] = _on_loop(call)
        return wrapped[call]

    changed = 0

    def visit(routes: Iterable[Any]) -> None:
        nonlocal changed
        for route in routes:
            included = getattr(route, "original_router", None)  # FastAPI's lazily built included router
            if included is not None:
                visit(included.routes)
                for cache in ("_effective_candidates_version", "_effective_low_priority_routes_version"):
                    if hasattr(route, cache):
                        setattr(route, cache, None)  # rebuilt from the routes changed here
                continue
            if not isinstance(route, fastapi.routing.APIRoute):
                continue
            hit = False
            for index, depends in enumerate(route.dependencies):
                new = on_loop(getattr(depends, "dependency", None))
                if new is not None:
                    route.dependencies[index] = dataclasses.replace(depends, dependency=new)
                    hit = True
            for sub in route.dependant.dependencies:
                new = on_loop(sub.call)
                if new is not None:
                    sub.call = new
                    hit = True
            changed += hit

    visit(gradio_app.routes)
    return changed


def _on_loop(call: Callable[..., Any]) -> Callable[..., Any]:
    """`call` as a coroutine function with its signature (FastAPI reads it for the dependency's own parameters)."""

    async def login_check_on_loop(**kwargs: Any) -> Any:
        return call(**kwargs)

    login_check_on_loop.__signature__ = inspect.signature(call)  # type: ignore[attr-defined]
    return login_check_on_loop
