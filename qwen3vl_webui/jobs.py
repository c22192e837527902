"""`python -m qwen3vl_webui.jobs run|status|export`: resumable batch jobs over the app's model, state in SQLite.

    python -m qwen3vl_webui.jobs run --input items.jsonl --db jobs.sqlite --output results.jsonl [app flags]
    python -m qwen3vl_webui.jobs run --folder photos/ --prompt "Caption this." --db photos.sqlite --output out.jsonl
    python -m qwen3vl_webui.jobs status --db jobs.sqlite
    python -m qwen3vl_webui.jobs export --db jobs.sqlite --output results.jsonl

`run` takes every flag of `python app.py` (--model, --precision, --demo, --engine, --max-concurrency...); running the
same command again after a crash, `kill -9` or a reboot resumes the job (service/jobstore.py says why nothing is lost
or answered twice). A resume that loaded another model or precision than the job's is refused (exit 2) unless
--allow-setup-change says so: the results file would hold the answers of two models.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_STOPPED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qwen3vl_webui.jobs",
        description="Resumable batch jobs: one prompt (with files) per item, state in SQLite.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run (or resume) a job", epilog="Every flag of `python app.py` is taken too (--model, "
        "--precision, --demo, --engine, --max-concurrency, --max-context, --max-new-tokens, ...): see python app.py -h.",
    )  # fmt: skip
    source = run.add_mutually_exclusive_group()
    source.add_argument("--input", metavar="JSONL", help='items, one JSON a line: {"id", "prompt", "files": [...]}')
    source.add_argument("--folder", metavar="DIR", help="one item per image or video under DIR (with --prompt)")
    run.add_argument("--prompt", default="", help="with --folder: the question asked of every file")
    run.add_argument("--db", required=True, metavar="SQLITE", help="the job's state; the same --db resumes it")
    run.add_argument("--output", metavar="JSONL", help="write the results here at the end, in input order")
    run.add_argument("--workers", type=int, default=0, metavar="N",
                     help="items in flight (default: 2 x --max-concurrency, so prompts are built while others decode)")  # fmt: skip
    run.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy, reproducible answers")
    run.add_argument("--system", default="", help="system prompt for items that carry none")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (a line per 5%% instead)")
    run.add_argument("--allow-setup-change", action="store_true",
                     help="resume a job with another model or precision than it was started with (its results will "
                          "mix both), and with this run's --temperature, --max-new-tokens and --system")  # fmt: skip
    status = sub.add_parser("status", help="counts of a job's items by status")
    status.add_argument("--db", required=True, metavar="SQLITE")
    status.add_argument("--json", action="store_true", help="one JSON object")
    export = sub.add_parser("export", help="write the results (finished items, in input order)")
    export.add_argument("--db", required=True, metavar="SQLITE")
    export.add_argument("--output", required=True, metavar="JSONL")
    export.add_argument("--all", action="store_true", help="also list pending and running items")
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    from qwen3vl_webui.service.jobstore import JobError

    try:
        if args.command != "run":
            if rest:
                _parser().error(f"unrecognized arguments: {' '.join(rest)}")
            return _status(args) if args.command == "status" else _export(args)
        return _run(args, rest)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _open_store(db: str, must_exist: bool = True) -> Any:
    from qwen3vl_webui.service.jobstore import JobError, JobStore

    if must_exist and not Path(db).is_file():
        raise JobError(f"--db {db} does not exist")
    return JobStore(db)


def _status(args: argparse.Namespace) -> int:
    with _open_store(args.db) as store:
        c = store.counts()
    figures = {"total": c.total, "pending": c.pending, "running": c.running, "done": c.done, "failed": c.failed,
               "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}  # fmt: skip
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{args.db}: {c.finished}/{c.total} finished ({c.done} done, {c.failed} failed), {c.pending} pending, "
              f"{c.running} running; {c.prompt_tokens:,} prompt + {c.completion_tokens:,} completion tokens")  # fmt: skip
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    with _open_store(args.db) as store:
        lines = store.export(args.output, include_unfinished=args.all)
    print(f"wrote {lines} results to {args.output}")
    return EXIT_OK


def _items(args: argparse.Namespace) -> list[Any] | None:
    from qwen3vl_webui.service.jobs import folder_items, read_jsonl
    from qwen3vl_webui.service.jobstore import JobError

    if args.folder:
        return folder_items(args.folder, args.prompt)
    if args.prompt:
        raise JobError("--prompt goes with --folder (each JSONL item carries its own prompt)")
    return read_jsonl(args.input) if args.input else None


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.service.jobstore import JobError, RunLock

    settings = parse_settings(rest)  # a bad app flag: one line, exit 2
    items = _items(args)  # bad input is reported before the model loads
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)  # `--db state/jobs.sqlite` in a new folder
    lock = RunLock(args.db)
    lock.acquire()  # one runner per database; released by the kernel if this process dies
    try:
        store = _open_store(args.db, must_exist=False)
        with store:
            if items is not None:
                added = store.add(items, source=str(args.input or args.folder))
                if not added:
                    print(f"resuming {args.db}", file=sys.stderr)
            elif not store.has_items():
                raise JobError(f"--db {args.db} holds no job yet: give --input or --folder")
            code = _serve_job(settings, store, args)
            if args.output:
                lines = store.export(args.output)
                print(f"wrote {lines} results to {args.output}", file=sys.stderr)
            return code
    finally:
        lock.release()


def _serve_job(settings: Any, store: Any, args: argparse.Namespace) -> int:
    from qwen3vl_webui import ranges
    from qwen3vl_webui.service.jobs import JobDefaults, JobRunner
    from qwen3vl_webui.wiring import build_service

    counts = store.counts()
    if counts.pending + counts.running == 0:  # running: a dead run's items, redone below
        print(f"nothing to run: {counts.done} done, {counts.failed} failed", file=sys.stderr)
        return EXIT_OK
    service = build_service(settings)
    service.start_in_background(settings.demo, settings.warmup, ranges.largest_image_pixels())
    print(f"loading {'the demo model' if settings.demo else settings.model}…", file=sys.stderr, flush=True)
    try:  # the rates count from the first item, not from the load
        service.manager.wait_ready(None)
        service.warmed.wait()
        asked = JobDefaults(
            max_context=settings.max_context, max_new_tokens=settings.max_new_tokens, temperature=args.temperature,
            system=args.system, max_files_per_turn=settings.max_files_per_turn,
        )  # fmt: skip
        defaults = _job_defaults(service, store, asked, args)  # before anything of the job changes
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _close(service)
        return EXIT_STOPPED
    except BaseException:
        _close(service)
        raise
    requeued, gave_up = store.recover()
    if requeued or gave_up:
        print(f"{requeued} half-done item(s) will be redone; {gave_up} failed after repeated crashes",
              file=sys.stderr)  # fmt: skip
    counts = store.counts()
    bar = _ProgressBar(counts.total, counts.finished, quiet=args.no_progress)
    workers = args.workers or 2 * settings.max_concurrency
    runner = JobRunner(service, store, defaults, workers, on_progress=bar.update)
    previous = {s: signal.signal(s, lambda *_: runner.stop()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        progress = runner.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        bar.close()
        _close(service)
    c = progress.counts
    print(f"{c.done} done, {c.failed} failed, {c.pending + c.running} left; this run: {progress.finished_now} items "
          f"in {progress.elapsed_s:.1f} s ({progress.items_per_s:.2f} items/s, {progress.tokens_per_s:.1f} tokens/s)",
          file=sys.stderr)  # fmt: skip
    if c.pending or c.running:
        print(f"stopped; run the same command again to resume {args.db}", file=sys.stderr)
        return EXIT_STOPPED
    return EXIT_OK


def _job_defaults(service: Any, store: Any, asked: Any, args: argparse.Namespace) -> Any:
    """The defaults this run answers with, recorded as the job's setup. JobError (exit 2) if the job was started with
    another model or precision, unless --allow-setup-change; a resumed job keeps its own sampling defaults unless
    --allow-setup-change too (a line says so when this run's flags differ)."""
    from qwen3vl_webui.service.jobs import check_setup, loaded_setup
    from qwen3vl_webui.service.jobstore import JobError

    check = check_setup(store, loaded_setup(service, asked))
    recorded, current, allow = check.recorded, check.current, args.allow_setup_change
    if recorded is not None and check.model_changed:
        if not allow:
            raise JobError(
                f"{args.db} was started with {recorded.model_and_precision}, and this run loaded "
                f"{current.model_and_precision}: their answers would mix in one job. Run it with the job's --model and "
                "--precision, or pass --allow-setup-change to go on with this one."
            )
        print(f"going on with {current.model_and_precision} although {args.db} was started with "
              f"{recorded.model_and_precision} (--allow-setup-change): its results mix both", file=sys.stderr)  # fmt: skip
    if recorded is not None and check.sampling_changed:
        if allow:
            print(f"answering the rest with {current.sampling} (the job's was {recorded.sampling})", file=sys.stderr)
        else:
            print(f"keeping the job's own {recorded.sampling}; this run's flags ask {current.sampling} "
                  "(--allow-setup-change to use them)", file=sys.stderr)  # fmt: skip
    setup = check.go_on(allow)
    store.record_setup(setup.record())
    return setup.defaults(asked)


def _close(service: Any) -> None:
    service.close()
    service.manager.close()


class _ProgressBar:
    """tqdm on stderr: items/s, ETA, and tokens/s and failures in the postfix (updated from worker threads)."""

    def __init__(self, total: int, finished: int, quiet: bool) -> None:
        from tqdm import tqdm

        self._lock = threading.Lock()
        self._bar = tqdm(
            total=total, initial=finished, unit="item", dynamic_ncols=True, file=sys.stderr, disable=quiet,
            smoothing=0.1,
        )  # fmt: skip
        self._quiet_step = max(1, total // 20)
        self._quiet = quiet
        self._last = finished

    def update(self, progress: Any) -> None:
        c = progress.counts
        with self._lock:
            if self._quiet:
                if c.finished - self._last >= self._quiet_step or c.finished == c.total:
                    self._last = c.finished
                    print(f"{c.finished}/{c.total} items, {progress.tokens_per_s:.1f} tokens/s", file=sys.stderr)
                return
            self._bar.update(c.finished - self._bar.n)
            self._bar.set_postfix_str(f"{progress.tokens_per_s:.1f} tok/s, {c.failed} failed", refresh=False)

    def close(self) -> None:
        self._bar.close()


if __name__ == "__main__":
    raise SystemExit(main())
