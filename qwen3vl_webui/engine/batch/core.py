"""The batch engine's core: each step admits, runs at most one prefill forward, then a decode step, and publishes
what every request got as plain data (EngineOutputs). It runs on the one worker thread that owns the GPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from qwen3vl_webui.engine.batch.graphs import DecodeGraphs
from qwen3vl_webui.engine.batch.kv import SlotKV
from qwen3vl_webui.engine.batch.options import BatchOptions
from qwen3vl_webui.engine.batch.requests import EngineClosed, EngineOutputs, Outbox, Request
from qwen3vl_webui.engine.batch.runner import ModelRunner, Prefilled
from qwen3vl_webui.engine.batch.sampler import Sampler
from qwen3vl_webui.engine.batch.scheduler import PrefillJob, PrefillPlan, Scheduler
from qwen3vl_webui.engine.batch.transfer import OnDevice
from qwen3vl_webui.engine.faults import is_out_of_memory
from qwen3vl_webui.weights.model import LoadedModel


@dataclass(frozen=True)
class EngineSnapshot:
    """Load of the engine for the live panel (plain data)."""

    active: int
    waiting: int
    max_batch: int
    max_len: int
    peak_active: int
    steps: int
    tokens: int
    oldest_wait_s: float
    graph_buckets: tuple[int, ...]
    startup_s: float
    prefilling: int = 0  # admitted requests whose prompt is still being prefilled (chunk by chunk)
    decode_path: str = ""  # e.g. "cuda graphs + torch.compile", "cuda graphs", "eager (why)"
    prefill_path: str = ""  # "torch.compile" or "eager (why)"
    prefill_tokens: int = 0  # prompt tokens run through prefill forwards (reused ones are not)
    prefix_slots: int = 0  # KV slots that keep finished requests for reuse (0: reuse off)
    prefix_entries: int = 0  # of them, holding a finished request now
    prefix_hits: int = 0  # prompts that started from a retained prefix
    prefix_tokens_reused: int = 0  # prompt tokens taken from retained KV instead of prefilled
    prefix_evicted: int = 0  # entries pushed out (least recently used) to keep a newer one
    prefix_dropped: int = 0  # entries dropped because a prefill ran out of memory
    prefill_forwards: int = 0  # prefill forwards run (a batch of short prompts, a chunk, a vision tower)
    # Of them, by kind: batched (short texts in one eager forward), graphed, eager or compiled (a prompt's chunk),
    # tower (the vision tower alone), as (kind, count) pairs.
    prefill_kinds: tuple[tuple[str, int], ...] = ()
    decode_mode: str = ""  # "compiled graphs", "graphs", "compiled" or "eager" (most buckets, now)
    compile_state: str = "none"  # the decode step's compile: none (not compiled), waiting, compiling, done, failed
    layers_path: str = ""  # the eager step's decoder layers: "fused kernels", or "transformers (why not)"
    compile_done: int = 0  # batch buckets decoding from their compiled step
    compile_total: int = 0  # batch buckets to compile (0: nothing to compile)
    compiled_at: tuple[tuple[int, float], ...] = ()  # (bucket, wall time its compiled step began to serve)
    serving_at: float = 0.0  # wall time the engine could first answer
    artifacts: str = "off"  # compile artifacts: off, absent, ignored, loaded, saved

    @property
    def full_speed(self) -> bool:
        """Every bucket decodes from its compiled step, or there is nothing to compile."""
        return self.compile_state in ("none", "done")


@dataclass
class _Step:
    """A decode step enqueued on the GPU: row i is reqs[i] (the running batch when it was launched; slots may move
    and requests leave before it is read back)."""

    reqs: list[Request]
    out: OnDevice


@dataclass
class _Join:
    """A prompt whose first token is chosen on the GPU and whose KV is on its way into its slot; the host has yet to
    read the token and emit it (after the next decode step is enqueued)."""

    req: Request
    first: OnDevice


class EngineCore:
    """Scheduler, KV slots, model runner, graphs and sampler, driven one `step()` at a time by the worker.

    `publish` receives each EngineOutputs: once per step, and once more when prompts' first tokens are read (after
    the next decode step, their rows in it, is enqueued).
    """

    def __init__(self, loaded: LoadedModel, options: BatchOptions, publish: Callable[[EngineOutputs], None]) -> None:
        self.loaded = loaded
        self.options = options
        # A burst's batched forward may stage more KV than a slot holds: the VRAM planner counts it (plan.burst_tokens).
        self.scheduler = Scheduler(
            options.max_batch, options.prefill_chunk, options.idle_prefill_factor, options.burst_forwards
        )
        self.kv = SlotKV(loaded, options.max_batch, options.max_len, options.retained_slots)
        self.runner = ModelRunner(loaded, self.kv, options.prefill_chunk)
        self.runner.prefer_graphs = options.prefer_prefill_graphs
        self.sampler = Sampler(loaded.device, options.max_batch)
        self.graphs = DecodeGraphs(loaded, self.runner, self.kv, options)
        eos_ids = options.eos_token_ids
        if eos_ids is None:
            eos = loaded.model.generation_config.eos_token_id
            eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        self.eos = frozenset(int(t) for t in eos_ids)
        self.steps = 0
        self.tokens = 0
        self.startup_s = 0.0
        self.serving_at = 0.0  # wall time the engine could first answer
        self._publish = publish
        self._out = Outbox()
        self._inflight: _Step | None = None  # the enqueued decode step, not yet read back

    def start(self) -> None:
        """Allocates the KV, compiles and captures: all before the first request (worker thread, inference mode)."""
        started = time.perf_counter()
        try:
            self.kv.allocate()
            self.sampler.allocate(self.runner.lm_head.out_features)
            self.graphs.prepare()
        except BaseException:
            self.graphs.restore()
            raise
        self.startup_s = time.perf_counter() - started
        self.serving_at = time.time()
        # Serve at once, speed up in the background: each compiled bucket wakes the worker to be swapped in.
        self.graphs.on_compiled = self.scheduler.nudge
        # It starts when the engine is first idle (after the start-up warm-up's requests, whose prefills would
        # otherwise share the GIL with dynamo) or after `compile_delay_s`, whichever comes first.
        self.graphs.start_background(self.options.compile_delay_s)
        if self.graphs.prefill_capturing:
            self.scheduler.nudge()  # the first-chunk graphs: captured from the first step on, between requests' steps

    def step(self) -> bool:
        """Admission, at most one prefill forward (so a new prompt stalls running streams for one forward at most),
        then the decode step; publishes what it produced. Blocks while there is no work; False once closed."""
        admission = self.scheduler.admit()
        if admission is None:
            return False
        for req in admission.dropped:
            self._out.finish(req, "cancelled")
        for req in admission.admitted:
            # A short reused prefix would turn a prompt that one graph replay takes into an eager later chunk.
            graphed = self.options.prefer_prefill_graphs and not req.multimodal and self.runner.graphed(req.length)
            hit = self.kv.reuse_prefix(req, at_least=req.length // 2 if graphed else 0)
            job = self.scheduler.start_prefill(req, reused=hit[1] if hit else 0)
            if hit:
                self.runner.adopt(job, hit[0])
        plan = self.scheduler.next_prefill()
        joins = self._prefill(plan) if plan is not None else []
        try:
            if self._inflight is None:
                self.graphs.swap_ready()  # between two decode steps: a compiled bucket replaces its eager graph
                if self.graphs.prefill_capture_due(idle=self._idle()):
                    self.graphs.capture_prefill_next()  # a first-chunk graph left from start-up
                for slot in self.scheduler.cancelled_slots():
                    self._release(slot, "cancelled")
                if self.scheduler.decode_now():
                    self._launch()
                self._finish_joins(joins)  # before the step they are in is read back
                if self._inflight is not None:
                    self._collect()
            else:
                # The step in flight first: reading it waits for it alone, and the next one (the joined rows in it)
                # is enqueued behind the prefill before the host waits for the new prompts' first tokens.
                self._collect()
                self._finish_joins(joins)
        except BaseException as exc:  # fail this batch's requests, keep serving the next ones
            self._inflight = None
            for req in self.scheduler.fail_running():
                self._out.fail(req, exc)
            self.kv.clear_all()
        self._flush()
        if self.graphs.prefill_capture_due(idle=True) and self._idle():
            self.scheduler.nudge()  # the next capture at once, unless a request arrives first (none while compiling)
        # Not at the start-up's own idle moments (the prefill captures' steps): after the first requests (the app's
        # warm-up) are done, or `compile_delay_s` after serving began. With compile artifacts the compile takes
        # seconds, and started at once it made the warm-up 3.7x as long (bench/results/h200/s18_cs_*).
        if self.graphs.compile_pending and self.steps and self._idle():
            self.graphs.start_now()
        return True

    def _idle(self) -> bool:
        sched = self.scheduler
        return not sched.running and not sched.prefilling and not sched.waiting_load()[0]

    def shutdown(self) -> None:
        """Running and waiting requests end with EngineClosed; frees the KV memory and undoes the model changes."""
        closed = EngineClosed("The generation engine was closed.")
        for req in self.scheduler.drain():
            self._out.fail(req, closed)
        self._flush()
        self.runner.forget_all()
        self.graphs.release()
        self.kv.free()
        self.sampler.free()
        self.graphs.restore()

    def snapshot(self) -> EngineSnapshot:
        now = time.perf_counter()
        waiting, oldest = self.scheduler.waiting_load()
        pool = self.kv.pool
        return EngineSnapshot(
            active=len(self.scheduler.running),
            waiting=waiting,
            max_batch=self.options.max_batch,
            max_len=self.options.max_len,
            peak_active=self.scheduler.peak,
            steps=self.steps,
            tokens=self.tokens,
            oldest_wait_s=0.0 if oldest is None else now - oldest,
            graph_buckets=self.graphs.captured,
            startup_s=self.startup_s,
            prefilling=len(self.scheduler.prefilling),
            decode_path=self.graphs.decode_path,
            decode_mode=self.graphs.decode_mode,
            compile_state=self.graphs.compile_state,
            layers_path=self.graphs.layers_path,
            compile_done=len(self.graphs.compiled_at),
            compile_total=len(self.graphs.buckets) if self.graphs.compile_state != "none" else 0,
            compiled_at=tuple(sorted(self.graphs.compiled_at.items())),
            serving_at=self.serving_at,
            artifacts=self.graphs.artifacts,
            prefill_path=self.graphs.prefill_path,
            prefill_tokens=self.runner.prefill_tokens,
            prefix_slots=self.options.retained_slots,
            prefix_entries=len(pool.entries),
            prefix_hits=pool.hits,
            prefix_tokens_reused=pool.tokens_reused,
            prefix_evicted=pool.evicted,
            prefix_dropped=pool.dropped,
            prefill_forwards=self.scheduler.prefill_forwards,
            prefill_kinds=tuple(sorted(self.runner.prefill_kinds.items())),
        )

    # ------------------------------------------------------------------ prefill

    def _prefill(self, plan: PrefillPlan) -> list[_Join]:
        """One prefill forward; a failing prompt (bad media, out of memory) fails its own requests only. Returns the
        prompts it finished, joined on the device (their first tokens are read by `_finish_joins`)."""
        for job in plan.cancelled:
            self.runner.forget(job)
            self._out.finish(job.req, "cancelled")
        if not plan.jobs:
            return []
        try:
            results = self.runner.prefill(plan)
        except Exception as exc:
            if is_out_of_memory(exc) and self.scheduler.may_retry(plan.jobs):
                # The jobs restart from their last whole step (a chunk's keys/values join their KV only once done).
                self.kv.relieve_memory()
                return []
            for job in plan.jobs:
                self.scheduler.prefill_done(job)
                self.runner.forget(job)
                self._out.fail(job.req, exc)
            return []
        joins = []
        for job, (done, prefilled) in zip(plan.jobs, results):
            self.scheduler.advance(job, done)
            if prefilled is None:
                continue  # more chunks to go
            self.scheduler.prefill_done(job)
            join = self._activate(job, prefilled)
            if join is not None:
                joins.append(join)
        return joins

    def _activate(self, job: PrefillJob, prefilled: Prefilled) -> _Join | None:
        """Joins the running batch in the next free slot, on the device only: the first token is chosen and becomes
        the slot's next input, the prompt's KV is copied into the slot (the next replay may overwrite the prefill's
        output). No host sync: the next decode step can be enqueued before the host reads the first token."""
        req, length = job.req, job.length
        if req.cancel.is_set():
            self._out.finish(req, "cancelled")
            return None
        slot = len(self.scheduler.running)
        try:
            req.kv_len = length
            self.kv.join(slot, length, prefilled.delta)
            self.sampler.join(slot, req)
            self.scheduler.join(req)
            token = self.sampler.choose(prefilled.logits.float(), [req], slot)
            self.kv.set_next(slot, token[0])
            self.sampler.saw([req], slot, token)
            first = OnDevice.of(token)  # before the KV copies: the first token does not wait for them
            self.kv.write_prompt(slot, prefilled.layer_kv, length)
            return _Join(req, first)
        except Exception as exc:
            if self.scheduler.unjoin(req) is not None:
                self.kv.clear_slot(slot)
            self._out.fail(req, exc)
            return None

    def _finish_joins(self, joins: list[_Join]) -> None:
        """The joined prompts' first tokens reach the host and go out at once; one that ends its request there
        (a stop token, one new token asked) leaves its slot."""
        for join in joins:
            req = join.req
            if req.finish_reason is not None:  # left already (cancelled while its token was on its way)
                continue
            try:
                first = join.first.values()[0]
                reason = req.ends(first, self.eos)
                self._emit(req, first, time.perf_counter())
            except Exception as exc:
                self._release(self.scheduler.running.index(req), "error", error=exc)
                continue
            if reason:
                self._release(self.scheduler.running.index(req), reason)
        if joins:
            self._flush()

    # ------------------------------------------------------------------ decode

    def _launch(self) -> None:
        """Enqueues one decode step for the running batch; device work only, no host sync."""
        reqs = list(self.scheduler.running)
        n = len(reqs)
        self.scheduler.launched()
        logits = self.graphs.logits(n).float()
        tokens = self.sampler.choose(logits, reqs, 0)
        self.kv.advance(n, tokens)
        self.sampler.saw(reqs, 0, tokens)
        self._inflight = _Step(reqs, OnDevice.of(tokens))

    def _collect(self) -> None:
        """Reads the step in flight back; the next step is enqueued before its tokens are handed out.

        Handing tokens to readers wakes their threads (GIL), so the GPU runs step k+1 while the host emits step k.
        Step k+1 holds every running row, the joined ones (their prompt KV and first token are already enqueued) and
        those that end with step k (their extra token is dropped: one row of a memory-bound step costs next to
        nothing, against the GPU idling while the host emits, keeps and compacts). Slots then move under the step in
        flight: it is read back through its own row list (`_Step.reqs`), and a moved slot takes the row that step
        writes along (`_release`). Until session 12 a leave waited for the host (17 leaves a second at 32
        closed-loop chats), and a join until session 11.
        """
        step = self._inflight
        assert step is not None
        self._inflight = None
        values = step.out.values()
        now = time.perf_counter()
        self.steps += 1
        rows = [(req, token) for req, token in zip(step.reqs, values) if req.finish_reason is None]
        reasons = [req.ends(token, self.eos) for req, token in rows]
        sched = self.scheduler
        going_on = any(req.finish_reason is None for req in sched.running)
        if going_on and not self.graphs.boundary_wanted and sched.decode_now():
            self._launch()
        for req, token in rows:
            req.kv_len += 1
            self._emit(req, token, now)
        slots = {id(req): slot for slot, req in enumerate(sched.running)}
        ended = sorted(((slots[id(req)], reason) for (req, _), reason in zip(rows, reasons) if reason), reverse=True)
        for slot, reason in ended:  # highest first: moving the last slot down never moves an ended one
            self._release(slot, reason)

    def _emit(self, req: Request, token: int, now: float) -> None:
        req.tokens.append(token)
        req.first_at = req.first_at or now
        req.last_at = now
        self.tokens += 1
        self._out.token(req, token)

    def _release(self, slot: int, reason: str, error: BaseException | None = None) -> None:
        """Ends the request in `slot` and moves the last running request into the hole (slots stay dense).

        A decode step may be in flight with the moved request's row in the old slot: the move is enqueued behind it
        and takes the KV row it writes too (one past the request's `kv_len`), and its inputs for the next step."""
        req = self.scheduler.running[slot]
        req.finish_reason = reason
        if error is None:
            self.kv.retain(req, slot)  # before the reader hears of the end: its next turn finds the entry
            self._out.finish(req, reason)
        else:
            self._out.fail(req, error)
        last = self.scheduler.release(slot)
        if last != slot:
            moved = self.scheduler.running[slot]
            self.kv.move(last, slot, min(moved.kv_len + 1, self.options.max_len))
            self.sampler.move(last, slot)
        self.kv.clear_slot(last)

    def _flush(self) -> None:
        if not self._out:
            return
        sched = self.scheduler
        self._publish(EngineOutputs(self._out.take(), self.steps, sched.prefill_forwards, sched.decode_launches))
