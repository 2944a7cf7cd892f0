"""The ``privrec`` command: the user's entry point to the pipeline."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from privrec_pipeline.config import lake_root, privrec_home
from privrec_pipeline.errors import PrivrecError

app = typer.Typer(help="privrec: privacy-preserving recommendation training pipeline.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
import_app = typer.Typer(help="Import real interaction logs into the landing zone.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage the local key file (pseudonymization and encryption keys).",
                       no_args_is_help=True)
app.add_typer(import_app, name="import")
app.add_typer(keys_app, name="keys")
report_app = typer.Typer(help="Reports built from the runs' summaries (no data is read).", no_args_is_help=True)
app.add_typer(report_app, name="report")
catalog_app = typer.Typer(help="The item catalog: a public input (items, categories, prices, titles).",
                          no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
engine_app = typer.Typer(help="The warm Spark engine: one Spark Connect server that every step uses.",
                         no_args_is_help=True)
app.add_typer(engine_app, name="engine")
audit_app = typer.Typer(help="Audit a day's releases empirically (results in the lake's reports/audits/dt=D/).",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")
# Lines are not wrapped at the console's width (80 when not a terminal): paths, fingerprints and
# messages stay whole for logs, pipes and copy-paste; tables still fit the width.
console = Console(soft_wrap=True)

LakeOption = typer.Option(None, "--lake", help="Lake folder or URI (default: $PRIVREC_LAKE or ./lake).")


def _day(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from None


def _fail(message: str) -> NoReturn:
    from rich.text import Text

    console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)  # Text: no markup, no emoji
    raise typer.Exit(1)


def _say(text: str) -> None:
    """Print text that holds input (ids, paths, file values) as it is: no markup, no emoji."""
    console.print(text, markup=False, emoji=False, highlight=False)


@app.command()
def generate(
    date: str = typer.Option(..., "--date", help="UTC day to generate, YYYY-MM-DD."),
    events: int = typer.Option(100_000, "--events", help="Number of records to write."),
    users: int = typer.Option(5_000, "--users", help="Size of the (stable) user population."),
    items: int = typer.Option(2_000, "--items", help="Number of catalog items."),
    seed: int = typer.Option(0, "--seed", help="Seed of the user population and the day."),
    bad_rate: float = typer.Option(0.0, "--bad-rate", help="Share of malformed records (every kind) and duplicates."),
    lake: str | None = LakeOption,
) -> None:
    """Write one day of synthetic e-commerce logs into the landing zone."""
    from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

    try:
        cfg = GeneratorConfig(date=_day(date), events=events, users=users, items=items, seed=seed,
                              bad_rate=bad_rate)
    except ValueError as exc:
        _fail(str(exc))
    report = generate_day(cfg, lake or lake_root())
    bad = sum(report.bad_records.values())
    console.print(f"generated {report.records:,} records for {report.date} "
                  f"({bad:,} malformed, {report.duplicates:,} duplicates) in {len(report.files)} files")
    console.print(f"  -> {report.path}")


@catalog_app.command("load")
def catalog_load(
    path: Path = typer.Argument(..., help="Catalog file: .csv (header) / .tsv, .jsonl or .parquet with columns "
                                          "item_id, category and optionally price, title, available."),
    date: str = typer.Option(..., "--date", help="First day the catalog is in force (YYYY-MM-DD)."),
    lake: str | None = LakeOption,
) -> None:
    """Check a catalog and write it as the catalog from --date on (see docs: catalog format)."""
    from privrec_pipeline.catalog import read_file, write_snapshot

    try:
        snap = write_snapshot(lake or lake_root(), _day(date), read_file(path), str(path))
    except PrivrecError as exc:
        _fail(str(exc))
    _say(f"catalog from {snap.day}: {snap.items:,} items in {snap.categories:,} categories -> {snap.uri}")


@catalog_app.command("show")
def catalog_show(
    date: str | None = typer.Option(None, "--date", help="Day whose catalog to show (default: every snapshot)."),
    lake: str | None = LakeOption,
) -> None:
    """List the catalog's snapshots, or the one in force on --date."""
    from privrec_pipeline.catalog import read_snapshot, snapshot_days, snapshot_for

    root = lake or lake_root()
    snaps = ([snapshot_for(root, _day(date))] if date else [read_snapshot(root, d) for d in snapshot_days(root)])
    snaps = [s for s in snaps if s is not None]
    if not snaps:
        _fail(f"no catalog in {root}{' for ' + date if date else ''}: load one with privrec catalog load "
              "(without a catalog, items are chosen by DP partition selection)")
    for snap in snaps:
        _say(f"{snap.day}  {snap.items:>10,} items  {snap.categories:>6,} categories  sha256 {snap.sha256[:12]}  "
             f"from {snap.source}")


@import_app.command("movielens")
def import_movielens_cmd(
    path: Path = typer.Argument(..., help="ratings.csv (ml-latest) or u.data (ml-100k), or their folder."),
    lake: str | None = LakeOption,
    replay_days: int = typer.Option(0, "--replay-days", min=0,
                                    help="Replay the ratings, in time order and the same number a day, on this many "
                                         "consecutive days ending on --replay-end (0: the ratings' own days)."),
    replay_end: str | None = typer.Option(None, "--replay-end", help="Last day of the replay, YYYY-MM-DD."),
) -> None:
    """Turn MovieLens ratings into landing partitions, one per UTC day (or replayed onto N days)."""
    from privrec_pipeline.sources.movielens import Replay, import_movielens

    if bool(replay_days) != (replay_end is not None):
        _fail("--replay-days and --replay-end go together (a replay needs its number of days and its last day)")
    try:
        replay = Replay(replay_days, _day(replay_end)) if replay_days else None
        report = import_movielens(path, lake or lake_root(), replay)
    except PrivrecError as exc:
        _fail(str(exc))
    replayed = " (replayed, same number of ratings a day)" if report.replayed_days else ""
    console.print(f"imported {report.ratings:,} ratings of {report.users:,} users on {report.items:,} items "
                  f"into {report.days:,} day partitions ({report.first_day} .. {report.last_day}){replayed}")
    if report.catalog:
        _say(f"catalog: {report.catalog_items:,} movies from {report.catalog}, in force from {report.first_day}")
    else:
        _say("catalog: no movie list (movies.csv / u.item) beside the ratings; items will be chosen by DP "
             "partition selection (load one with privrec catalog load)")


@keys_app.command("init")
def keys_init(path: Path | None = typer.Option(None, "--path", help="Key file (default: $PRIVREC_KEY_FILE or ~/.config/privrec/keys.json).")) -> None:
    """Create the local key file (mode 0600) unless it exists. Keys are never printed."""
    from privrec_pipeline.secrets import ENV_KEYS_JSON, init_key_file

    if os.environ.get(ENV_KEYS_JSON) and path is None:
        console.print(f"keys come from ${ENV_KEYS_JSON}; no key file needed")
        return
    target, created = init_key_file(path)
    console.print(f"{'created' if created else 'using existing'} key file {target} (mode 0600)")


KEY_ROTATION_EFFECTS = {
    "pseudonym": (
        "Rotating the pseudonym key starts new pseudonyms: from the next pseudonymize run on, the same person "
        "gets a new pseudonym. Days pseudonymized before and after the rotation must not be combined in one "
        "training window or DP release (one person would count as several users and their privacy loss would "
        "add up): build_partitions refuses such a window by the keys' fingerprints. Train on windows that start "
        "after the rotation, or rerun pseudonymize for the earlier days with the new key. The old key stays in "
        "the file, recorded as retired."),
    "encryption": (
        "New bronze is encrypted under the new key; the old key stays in the file (recorded as retired) to "
        "decrypt older bronze. Pseudonyms do not change."),
}


@keys_app.command("rotate")
def keys_rotate(
    purpose: str = typer.Option(..., "--purpose", help="pseudonym or encryption."),
    path: Path | None = typer.Option(None, "--path", help="Key file (default: $PRIVREC_KEY_FILE or ~/.config/privrec/keys.json)."),
    yes: bool = typer.Option(False, "--yes", help="Rotate the pseudonym key without asking."),
) -> None:
    """Make a new random key current under the next version label (v2, v3, ...). Keys are never printed."""
    from privrec_pipeline.secrets import ENV_KEYS_JSON, KEY_PURPOSES, rotate_key_file

    if purpose not in KEY_PURPOSES:
        raise typer.BadParameter(f"{purpose!r}: expected one of {', '.join(KEY_PURPOSES)}", param_hint="--purpose")
    if os.environ.get(ENV_KEYS_JSON) and path is None:
        _fail(f"keys come from ${ENV_KEYS_JSON} (e.g. the Airflow connection 'privrec_keys'), not from a key file: "
              "rotate them there (add a new version under 'keys', make it 'current', record the old one under "
              "'retired'), or pass --path for a key file")
    console.print(f"[yellow]warning:[/] {KEY_ROTATION_EFFECTS[purpose]}", highlight=False)
    if purpose == "pseudonym" and not yes and not typer.confirm("Rotate the pseudonym key?", default=False):
        _fail("not rotated")
    try:
        rotation = rotate_key_file(path, purpose)
    except PrivrecError as exc:
        _fail(str(exc))
    console.print(f"rotated the {purpose} key in {rotation.path}: {rotation.old.version} (fingerprint "
                  f"{rotation.old.fingerprint}) is retired, {rotation.new.version} (fingerprint "
                  f"{rotation.new.fingerprint}) is current", highlight=False)
    console.print("Every worker must use this key document: copy it to each (mode 0600) or to the 'privrec_keys' "
                  "connection; a worker with an older copy keeps using the old key.", highlight=False)


@keys_app.command("show")
def keys_show(path: Path | None = typer.Option(None, "--path", help="Key file (default: $PRIVREC_KEYS_JSON, $PRIVREC_KEY_FILE or ~/.config/privrec/keys.json).")) -> None:
    """List key versions with their fingerprints (keyed, so they identify a key without revealing it)."""
    from privrec_pipeline.secrets import key_inventory

    try:
        source, keys = key_inventory(path=path)
    except PrivrecError as exc:
        _fail(str(exc))
    console.print(f"keys of {source}:", highlight=False)
    for key in keys:
        state = f"retired {key.retired_at}" if key.retired_at else key.state
        console.print(f"  {key.purpose:<10} {key.version:<5} fingerprint {key.fingerprint}  {state}",
                      highlight=False, soft_wrap=True)


ParamOption = typer.Option([], "--param", "-p", metavar="NAME=VALUE",
                           help="A DAG Param for the run(s) (value as JSON, else text); repeatable.")


@app.command()
def run(
    date: str = typer.Option(..., "--date", help="Data interval (UTC day) to run, YYYY-MM-DD."),
    allow_empty: bool = typer.Option(False, "--allow-empty", help="Accept a day without landing data."),
    param: list[str] = ParamOption,
    keep_engine: bool = typer.Option(False, "--keep-engine", help="Leave the Spark engine running after the run "
                                     "(the next run finds it warm); by default an engine this command started "
                                     "is stopped at the end."),
) -> None:
    """Run the nightly DAG for one day on the embedded default and print a summary."""
    day = _day(date)
    _run_days([day], _run_conf(allow_empty, param), keep_engine)


@app.command()
def backfill(
    start: str = typer.Option(..., "--start", help="First UTC day to run, YYYY-MM-DD."),
    end: str = typer.Option(..., "--end", help="Last UTC day to run (included), YYYY-MM-DD."),
    allow_empty: bool = typer.Option(False, "--allow-empty", help="Accept days without landing data."),
    param: list[str] = ParamOption,
    keep_engine: bool = typer.Option(False, "--keep-engine", help="Leave the Spark engine running after the run "
                                     "(the next run finds it warm); by default an engine this command started "
                                     "is stopped at the end."),
) -> None:
    """Run the nightly DAG for every day from --start to --end, in order, on the embedded default.

    Stops at the first failed day (the days before it are done; rerun from that day). On an
    Airflow deployment, backfill from the UI or the REST API instead."""
    first, last = _day(start), _day(end)
    if last < first:
        _fail(f"--end {last} is before --start {first}")
    _run_days([first + dt.timedelta(days=i) for i in range((last - first).days + 1)], _run_conf(allow_empty, param),
              keep_engine)


def _run_conf(allow_empty: bool, param: list[str]) -> dict:
    from privrec_pipeline.settings import parse_key_values

    try:
        return {"allow_empty": allow_empty, **parse_key_values(param, "DAG Param")}
    except PrivrecError as exc:
        _fail(str(exc))


def _run_days(days: list[dt.date], conf: dict, keep_engine: bool) -> None:
    """Run privrec_nightly for each day with ``airflow dags test``; print each day's summary."""
    from privrec_pipeline.config import EARLIEST_DAY
    from privrec_pipeline.orchestration.local import airflow_env

    if days[0] < EARLIEST_DAY:
        _fail(f"{days[0]} is before {EARLIEST_DAY}, the DAGs' start date: Airflow would mark the run successful "
              "without running a task; move the data to a later day")
    env = airflow_env()
    if not conf.get("allow_empty"):
        # The collect task would fail on these days after Airflow started: say so at once.
        from privrec_pipeline.ingest import landing_files

        problems = []
        for day in days:
            try:
                landing_files(env["PRIVREC_LAKE"], day)
            except PrivrecError as exc:
                problems.append(str(exc))
        if problems:
            _fail("; ".join(problems) + ("" if len(days) == 1 else "; nothing was run"))
    log_dir = privrec_home() / "runs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with _embedded_engine(env, keep_engine):
        _run_each(days, conf, env, log_dir)


def _run_each(days: list[dt.date], conf: dict, env: dict[str, str], log_dir: Path) -> None:
    from privrec_pipeline.orchestration.local import (
        dags_test,
        ensure_metadata_db,
        failure_reasons,
        ran_collect,
    )
    from privrec_pipeline.reporting import print_run_summary

    for n, day in enumerate(days, 1):
        log = log_dir / f"privrec_nightly-{day}.log"
        log.write_bytes(b"")
        with console.status("preparing Airflow metadata (first run only)"):
            ensure_metadata_db(env, log)
        progress = f" (day {n} of {len(days)})" if len(days) > 1 else ""
        with console.status(f"running privrec_nightly for {day}{progress} (airflow dags test)"):
            code = dags_test("privrec_nightly", day.isoformat(), env, log, conf=conf)
        rest = (f"; {days[0]} .. {days[n - 2]} are done, rerun from {day}" if n > 1 else "")
        if code != 0:
            reasons = failure_reasons(log.read_text(encoding="utf-8", errors="replace"))
            for reason in reasons:
                console.print(f"  {reason}", markup=False, highlight=False)
            print_run_summary(console, env["PRIVREC_LAKE"], day, None)  # what did get done, and the report
            _fail(f"privrec_nightly failed for {day} (exit {code}); full log: {log}{rest}")
        if not ran_collect(log.read_text(encoding="utf-8", errors="replace")):
            _fail(f"privrec_nightly ran no task for {day} although Airflow reported success (is the day before "
                  f"the DAG's start date, or the DAG paused or missing?); full log: {log}{rest}")
        print_run_summary(console, env["PRIVREC_LAKE"], day, log)


@contextlib.contextmanager
def _embedded_engine(env: dict[str, str], keep: bool) -> Iterator[None]:
    """The Spark engine of a command that runs the DAG on the embedded default. It is started at
    once (in the background, while Airflow starts) when the DAG's steps would start it anyway.
    At the end it is stopped if no other command uses it (each holds ``engine.run_lease``) and
    it was not started by hand (``privrec engine start``), unless ``keep``."""
    import threading

    from privrec_pipeline.orchestration.local import embedded_master
    from privrec_pipeline.spark import engine

    try:
        remote = engine.remote_settings()
    except PrivrecError as exc:
        _fail(str(exc))
    if remote is not None:  # a server run elsewhere: nothing to start or stop
        yield
        return
    with engine.run_lease() as alone:
        master = embedded_master(env)
        starting = None
        if master is not None and engine.read_state() is None:
            def start() -> None:
                with contextlib.suppress(PrivrecError):  # the first step then starts it and says why it fails
                    engine.start(master=master, owner="run")

            starting = threading.Thread(target=start, daemon=True)
            starting.start()
        try:
            yield
        finally:
            if starting is not None:
                starting.join()
            state = engine.read_state()
            if state is not None and state.owner != "manual":
                if keep:
                    _say(f"Spark engine left running: {state.remote} (pid {state.pid}); `privrec engine stop` "
                         "ends it")
                elif alone():
                    engine.stop()


@app.command()
def erase(
    user_id: list[str] = typer.Option([], "--user-id", help="A user id to erase (repeatable)."),
    file: Path | None = typer.Option(None, "--file", help="A file of user ids, one per line ('#' comments)."),
    status: bool = typer.Option(False, "--status", help="Show pending and completed requests."),
    process: bool = typer.Option(False, "--process", help="Process pending requests now (the nightly run's "
                                 "erasure task does it otherwise)."),
    lake: str | None = LakeOption,
) -> None:
    """Record right-to-erasure requests; the user's rows are removed from every zone by the
    nightly run's erasure task (or --process), and collect keeps them out from then on."""
    from privrec_pipeline.erasure.requests import check_user_id, open_register, read_id_file
    from privrec_pipeline.secrets import load_keyring

    root = lake or lake_root()
    if not (user_id or file or status or process):
        _fail("nothing to do: give --user-id ID, --file PATH, --status or --process")
    try:
        ids = [check_user_id(u, f"--user-id {n}") for n, u in enumerate(user_id, 1)]
        if file is not None:
            ids += read_id_file(file)
        register = open_register(root)
        if ids:
            recorded = register.record(load_keyring(), ids)
            for r in recorded.new:
                _say(f"recorded erasure request {r.id} (fingerprint {r.fingerprint[:12]}); pending until the next "
                     "nightly run's erasure task, or privrec erase --process")
            for r in recorded.already:
                _say(f"already requested: request {r.id}, {r.state}"
                     + (f" {r.completed_at:%Y-%m-%d %H:%M} UTC" if r.completed_at else ""))
        if process:
            from privrec_pipeline.erasure.apply import process_pending

            done = process_pending(root, load_keyring(), register)
            for d in done:
                rows = ", ".join(f"{n} {zone}" for zone, n in d.erased.items())
                _say(f"request {d.request_id}: removed {rows}" if rows else
                     f"request {d.request_id}: no rows of this user in any zone (unknown user id?)")
            if not done:
                _say("no pending erasure request")
        if status:
            requests = register.requests()
            if not requests:
                _say("no erasure request recorded")
            for r in requests:
                when = f"completed {r.completed_at:%Y-%m-%d %H:%M} UTC" if r.completed_at else "pending"
                rows = "" if r.erased is None else (f", {r.erased['total']} rows removed" if r.erased["total"]
                                                    else ", no rows found (unknown user id?)")
                _say(f"{r.id:>5}  requested {r.requested_at:%Y-%m-%d %H:%M} UTC  {when}{rows}  "
                     f"fingerprint {r.fingerprint[:12]}")
    except PrivrecError as exc:
        _fail(str(exc))


@app.command()
def retention(
    date: str | None = typer.Option(None, "--date", help="The run day the ages count from (default: today, UTC)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    lake: str | None = LakeOption,
) -> None:
    """Delete expired partitions of the zones holding users' rows (PRIVREC_RETENTION; the nightly
    run does it for its day)."""
    from privrec_pipeline.retention import enforce

    day = _day(date) if date else dt.datetime.now(dt.UTC).date()
    try:
        report = enforce(lake or lake_root(), day, dry_run=dry_run)
    except PrivrecError as exc:
        _fail(str(exc))
    _say("retention: " + ", ".join(f"{zone} {n}" for zone, n in sorted(report.policy.items())) + " days")
    for zone, days in report.removed.items():
        _say(f"  {'would remove' if dry_run else 'removed'} {zone}: {', '.join(days)}")
    if report.kept_uncollected:
        _say(f"  kept landing never collected: {', '.join(report.kept_uncollected)}")
    if not report.total:
        _say("  nothing expired")


@app.command()
def airflow() -> None:
    """Start Airflow (standalone: API server, scheduler, DAG processor) with privrec's DAGs."""
    from privrec_pipeline.orchestration.local import airflow_env, ensure_metadata_db

    env = airflow_env()
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    ensure_metadata_db(env, home / "migrate.log")
    users = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    console.print(f"Airflow home: {home}; lake: {env['PRIVREC_LAKE']}")
    port = env.get("AIRFLOW__API__PORT") or "8080"  # Airflow's default; the tests choose free ports
    console.print(f"UI: http://localhost:{port}  login: user '{users.split(':')[0]}', password in "
                  f"{home / 'simple_auth_manager_passwords.json.generated'} (printed by Airflow below)")
    import signal
    import sys

    # The Spark engine is started now (the DAGs' steps would start it) and stopped with Airflow,
    # also when this command is ended by SIGTERM (its cleanup runs through SystemExit): Airflow
    # is stopped first, so no task starts the engine again.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with _embedded_engine(env, keep=False):
        standalone = subprocess.Popen(["airflow", "standalone"], env=env)
        try:
            code = standalone.wait()
        except KeyboardInterrupt:  # Ctrl-C reached Airflow too: wait for it to stop
            code = standalone.wait()
        finally:
            _stop_standalone(standalone)
    raise typer.Exit(128 - code if code < 0 else code)  # a signal -N is exit 128+N, as a shell says


def _stop_standalone(standalone: subprocess.Popen) -> None:
    """Stop ``airflow standalone`` and its components: SIGINT runs its own shutdown (it stops
    each component on KeyboardInterrupt; SIGTERM would end it alone, orphaning them); after 60 s
    every process it started is killed."""
    import signal

    import psutil

    if standalone.poll() is not None:
        return
    try:
        children = psutil.Process(standalone.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    standalone.send_signal(signal.SIGINT)
    try:
        standalone.wait(timeout=60)
    except subprocess.TimeoutExpired:
        standalone.kill()
        standalone.wait()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.is_running():
                child.kill()


@engine_app.command("start")
def engine_start(
    master: str = typer.Option("local[*]", "--master", help="Spark master of the server (the embedded default's "
                               "spark_default connection is local[*])."),
    driver_memory: str | None = typer.Option(None, "--driver-memory", help="Memory of the server's JVM "
                                             "(default: PRIVREC_SPARK_DRIVER_MEMORY, else 4g)."),
) -> None:
    """Start the embedded Spark Connect server (127.0.0.1, a fresh token); `privrec run` and
    `privrec backfill` then run every Spark step on it."""
    from privrec_pipeline.spark import engine

    try:
        with console.status("starting the Spark Connect server"):
            state, started, _ = engine.start(master=master, driver_memory=driver_memory)
    except PrivrecError as exc:
        _fail(str(exc))
    _say(f"{'started' if started else 'already running'}: {state.remote} (pid {state.pid}, master {state.master}, "
         f"log {state.log})")


@engine_app.command("stop")
def engine_stop() -> None:
    """Stop the embedded Spark Connect server."""
    from privrec_pipeline.spark import engine

    state = engine.stop()
    _say(f"stopped {state.remote} (pid {state.pid})" if state else "no engine was running")


@engine_app.command("status")
def engine_status() -> None:
    """Where the steps run: the embedded engine, the engine of PRIVREC_SPARK_REMOTE, or each
    step in a Spark application of its own."""
    from privrec_pipeline.spark import engine

    if os.environ.get(engine.ENV_REMOTE):
        _say(f"{engine.ENV_REMOTE}={os.environ[engine.ENV_REMOTE]}: every step runs on that server")
        return
    state = engine.read_state()
    _say(f"running: {state.remote} (pid {state.pid}, master {state.master}, started by {state.owner}, log "
         f"{state.log})" if state else "not running: the first Spark step of a run starts it (`privrec engine "
         "start` starts one now and keeps it until `privrec engine stop`)")


@app.command()
def status(date: str = typer.Option(..., "--date", help="UTC day, YYYY-MM-DD."),
           lake: str | None = LakeOption) -> None:
    """Show the manifests of one day (records in, quarantined by reason, silver rows, paths)."""
    from privrec_pipeline.reporting import print_run_summary

    print_run_summary(console, lake or lake_root(), _day(date), None)


@audit_app.command("training")
def audit_training_cmd(
    date: str = typer.Option(..., "--date", help="The day whose training run to repeat with canaries, YYYY-MM-DD."),
    canaries: int = typer.Option(2000, "--canaries", min=20, help="Canaries (more: a tighter bound, more memory)."),
    no_noise: bool = typer.Option(False, "--no-noise", help="Turn the noise off: the audit must then fail (its power)."),
    confidence: float = typer.Option(0.99, "--confidence", min=0.5, max=0.9999),
    lake: str | None = LakeOption,
) -> None:
    """Repeat the day's training run with canaries and bound its epsilon from below (one-run audit)."""
    from privrec_pipeline.audits import audit_training

    try:
        out = audit_training(lake or lake_root(), _day(date), canaries=canaries, noise=not no_noise,
                             confidence=confidence)
    except PrivrecError as error:
        _fail(str(error))
    _say(f"training audit of {date} ({out['mode']} mode{', noise OFF' if no_noise else ''}): "
         f"{'passed' if out['passed'] else 'FAILED'}; empirical epsilon >= {out['epsilon_lower']:.3g} at confidence "
         f"{out['confidence']:g}, claimed {out['claimed_epsilon']:.3g} ({out['correct']} of {out['guesses']} guesses "
         f"right on {out['canaries']} canaries; {out['seconds']:g} s)\nmethod: {out['method']}\nwritten to {out['path']}")
    if not out["passed"]:
        raise typer.Exit(2)


@audit_app.command("stats")
def audit_stats_cmd(
    date: str = typer.Option(..., "--date", help="The day whose DP statistics release to audit, YYYY-MM-DD."),
    runs: int = typer.Option(1500, "--runs", min=20, help="Runs of the mechanisms on each neighbouring day."),
    confidence: float = typer.Option(0.999, "--confidence", min=0.5, max=0.99999),
    lake: str | None = LakeOption,
) -> None:
    """Run the DP statistics tester on the day's release configuration; adds the result to its DP report."""
    from privrec_pipeline.audits import audit_dp_stats
    from privrec_pipeline.spark.session import get_spark

    try:
        out = audit_dp_stats(get_spark("privrec-audit"), lake or lake_root(), _day(date), runs=runs,
                             confidence=confidence)
    except PrivrecError as error:
        _fail(str(error))
    from rich.table import Table

    table = Table("statistic", "claimed epsilon", "empirical lower bound", "result")
    for name, bound in out["statistics"].items():
        table.add_row(name, f"{bound['claimed_epsilon']:.4g}", f"{bound['epsilon_lower']:.4g}",
                      "REFUTED" if bound["refutes"] else "not refuted")
    console.print(table)
    _say(f"DP statistics audit of {date}: {'passed' if out['passed'] else 'FAILED'} at confidence "
         f"{out['confidence']:g} ({out['runs']} runs per day, {out['seconds']:g} s); written to {out['path']}")
    if not out["passed"]:
        raise typer.Exit(2)


@report_app.command("quality")
def report_quality(
    from_: str | None = typer.Option(None, "--from", help="First day, YYYY-MM-DD (default: 30 days before --to)."),
    to: str | None = typer.Option(None, "--to", help="Last day, YYYY-MM-DD (default: the latest validated day)."),
    lake: str | None = LakeOption,
    out: Path | None = typer.Option(None, "--out", help="HTML file to write (default: reports/quality/trend.html in the lake)."),
) -> None:
    """Build the data-quality trend page (charts per day) from the validation summaries."""
    from privrec_pipeline import lake as lk
    from privrec_pipeline.quality.trend import build_trend_page
    from privrec_pipeline.reporting import load_quality_summary, validated_days

    root = lake or lake_root()
    days = validated_days(root)
    if not days:
        _fail(f"no validation summaries under {lk.zone_uri(root, 'reports')}: run the nightly DAG first")
    end = _day(to) if to else days[-1]
    start = _day(from_) if from_ else end - dt.timedelta(days=30)
    if end < start:
        _fail(f"--to ({end}) is before --from ({start})")
    start = max(start, min(days)) if not from_ else start

    reports = lk.path(lk.zone_uri(root, "reports"))
    target = lk.path(out.resolve()) if out else reports / "trend.html"
    if lk.atomic(target):
        target = target.resolve()

    def link(d: dt.date) -> str:  # relative on a local lake, so the lake folder can be moved or served as is
        page = reports / lk.partition_name(d) / "index.html"
        if lk.atomic(page) and lk.atomic(target):
            return os.path.relpath(page.resolve(), target.parent)
        return str(page)

    page = build_trend_page(start, end, lambda d: load_quality_summary(root, d), link)
    lk.write_text(target, page.html)
    console.print(f"{len(page.days)} day(s) from {start} to {end}"
                  + (f"; no summary for {len(page.missing)} day(s)" if page.missing else ""))
    console.print(f"trend report: {target}")


@app.command()
def train(
    data: str = typer.Option(..., "--data", help="A day (YYYY-MM-DD: training/dt=D of the lake) or a training folder "
                                                 "written by build_partitions."),
    epsilon: float = typer.Option(1.0, "--epsilon", help="Target epsilon (user-level)."),
    delta: float = typer.Option(1e-7, "--delta", help="Target delta."),
    mode: str = typer.Option("local", "--mode", help="local, distributed or nonprivate."),
    rounds: int = typer.Option(3, "--rounds", help="Federated rounds."),
    local_steps: int = typer.Option(10, "--local-steps", help="DP steps per round and partition (local mode)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Expected users per step."),
    dim: int = typer.Option(64, "--dim", help="Embedding dimension."),
    clip_norm: float = typer.Option(0.1, "--clip-norm", help="Per-user clipping norm C."),
    seed: int = typer.Option(0, "--seed", help="Seed of the model's initialization (noise and sampling come from "
                                               "fresh secrets)."),
    out: Path | None = typer.Option(None, "--out", help="Write the model folder here (default: do not write)."),
    no_ledger: bool = typer.Option(False, "--no-ledger", help="Do not account the run in the privacy ledger: only "
                                   "for synthetic data (every day of the window written by `privrec generate`)."),
    lake: str | None = LakeOption,
) -> None:
    """Train on build_partitions' shards outside Airflow (experiments), accounted in the privacy ledger as a
    release of the window (key training_experiment); prints the privacy plan and hold-out metrics."""
    import uuid

    from privrec_pipeline import lake as lk
    from privrec_pipeline.errors import ConfigurationError
    from privrec_pipeline.training.artifact import write_model
    from privrec_pipeline.training.evaluation import metrics, model_scores
    from privrec_pipeline.training.federated import (
        TrainConfig,
        flatten,
        plan_privacy,
        train_in_process,
    )
    from privrec_pipeline.training.partitions import training_uri
    from privrec_pipeline.training.tasks import load_holdout, load_shard

    root = lake or lake_root()
    try:
        day: dt.date | None = dt.date.fromisoformat(data)
        folder = lk.path(training_uri(root, day))
    except ValueError:
        folder = Path(data)
        day, root = _training_folder_day(folder)
    shard_dirs = sorted(folder.glob("partition=*"), key=lambda p: int(p.name.split("=", 1)[1]))
    if not shard_dirs or not (folder / "vocabulary").exists():
        _fail(f"{folder} holds no training shards (partition=K/ and vocabulary/): run build_partitions first")
    try:
        config = TrainConfig(mode=mode, epsilon=epsilon, delta=delta, rounds=rounds, local_steps=local_steps,
                             batch_size=batch_size, dim=dim, clip_norm=clip_norm, seed=seed)
    except ConfigurationError as exc:
        _fail(str(exc))
    import pyarrow.dataset as ds

    from privrec_pipeline.training.data import read_vocabulary

    vocab_size = ds.dataset(str(folder / "vocabulary"), format="parquet").count_rows()
    item_category = read_vocabulary(folder / "vocabulary", vocab_size).item_category  # None: no catalog
    shards = [load_shard(d) for d in shard_dirs]
    run_id = f"cli-{uuid.uuid4().hex[:12]}"
    release = _experiment_release(root, day, folder, config, plan_privacy(config, [s.users for s in shards]),
                                  run_id, accounted=not no_ledger, vocab_size=vocab_size)
    try:
        with console.status(f"training {mode} on {len(shards)} partition(s), {sum(s.users for s in shards):,} users"):
            # one process holds every shard here: masking is exercised when there is someone to mask with
            result = train_in_process(config, shards, vocab_size, run_id=run_id, secure=len(shards) >= 2,
                                      item_category=item_category)
    except BaseException as exc:
        if release is not None:
            release[0].fail(release[1], f"{type(exc).__name__} before training finished", run_id=run_id)
        raise
    plan = result.plan
    if release is not None:
        ledger, release_id = release
        ledger.commit(release_id, {"out": str(out) if out else None}, run_id=run_id)
        console.print(f"accounted in the privacy ledger as release {release_id} (training_experiment): "
                      f"epsilon {plan.epsilon:.4g}, delta {plan.delta:g}", markup=False)
    else:
        console.print("NOT accounted in the privacy ledger (--no-ledger): synthetic data only", style="yellow",
                      markup=False)
    if mode != "nonprivate":
        console.print(f"noise multiplier {plan.noise_multiplier:.4g}, {plan.steps} steps, sampling rates "
                      + ", ".join(f"{q:.3g}" for q in plan.sampling_rates))
        console.print("epsilon per partition: " + ", ".join(f"{e:.3g}" for e in plan.epsilon_per_partition)
                      + f"; the run's guarantee: ({plan.epsilon:.3g}, {plan.delta:g})-DP per user")
    for r, h in enumerate(result.history):
        console.print(f"round {r}: loss {h['loss']:.4f}, users per step {h['sampled']:.1f}, clipped {h['clipped']:.0%}")
    if (folder / "holdout").exists():
        scores = model_scores(result.model)
        for label, trained in (("training users", True), ("held-out users", False)):
            split = load_holdout(folder / "holdout", vocab_size, trained=trained)
            if split.train.users:
                m = metrics(lambda users, split=split: scores(users, split.train), split)
                console.print(f"{label} ({split.train.users:,}): " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    if out is not None:
        write_model(out, config, vocab_size, flatten(result.model), folder / "vocabulary",
                    {"plan": plan.to_dict(), "config": config.__dict__, "data": str(folder),
                     "ledger": {"release_id": release[1]} if release else None})
        console.print(f"model: {out}")


def _training_folder_day(folder: Path) -> tuple[dt.date | None, str]:
    """(day, lake) of a build_partitions folder ``<lake>/training/dt=D``; (None, '') elsewhere."""
    name = folder.resolve().name
    if name.startswith("dt=") and folder.resolve().parent.name == "training":
        try:
            return dt.date.fromisoformat(name[3:]), str(folder.resolve().parent.parent)
        except ValueError:
            pass
    return None, ""


def _experiment_release(root: str, day: dt.date | None, folder: Path, config, plan, run_id: str, *,
                        accounted: bool, vocab_size: int):
    """Reserve an experiment's training in the ledger (a new release each time: every run draws
    new noise). With ``accounted`` false, check that the window is synthetic instead. Returns
    (ledger, release id) or None."""
    from dataclasses import asdict

    from privrec_pipeline import lake as lk
    from privrec_pipeline.privacy.ledger import open_ledger
    from privrec_pipeline.training.tasks import training_components

    manifest = lk.path(lk.manifest_uri(root, "build_partitions", day)) if day else None
    if manifest is None or not manifest.exists():
        _fail(f"{folder} has no build_partitions manifest ({manifest or 'not in a lake: <lake>/training/dt=D'}): "
              "its data window is unknown, so the run can be neither accounted nor shown to be synthetic")
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    start, end = dt.date.fromisoformat(doc["window"][0]), dt.date.fromisoformat(doc["window"][-1])
    if not accounted:
        days = [dt.date.fromisoformat(d) for d in doc["days_used"]]  # the days whose data the shards hold
        real = [d for d in days if not (lk.path(lk.partition_uri(root, "landing", d)) / "_generation.json").exists()]
        if real:
            _fail("--no-ledger is for synthetic data only: the landing partitions of "
                  + ", ".join(map(str, real)) + " were not written by `privrec generate` (no _generation.json); "
                  "train without --no-ledger to account the run")
        return None
    if config.mode == "nonprivate":
        _fail("a non-private model cannot be accounted in the privacy ledger (its epsilon is infinite); train it "
              "with --no-ledger, on synthetic data only")
    ledger = open_ledger(root)
    try:
        reservation = ledger.reserve(
            "training_experiment", start, end, training_components(config, plan), epsilon=plan.epsilon,
            delta=plan.delta, dag_id="privrec train", run_id=run_id, force=True,
            parameters={"config": asdict(config), "plan": plan.to_dict(), "vocabulary_size": vocab_size,
                        "pseudonym_key_fingerprint": doc.get("pseudonym_key_fingerprint")})
    except PrivrecError as exc:
        _fail(str(exc))
    return ledger, reservation.release.id


@app.command()
def recommend(
    history: str = typer.Option(..., "--history", help="Item ids the user interacted with, comma-separated."),
    k: int = typer.Option(10, "-k", help="How many items to recommend."),
    model: str = typer.Option("latest", "--model", help="A published version, or latest."),
    name: str = typer.Option("privrec-recommender", "--name", help="The model's name under models/."),
    lake: str | None = LakeOption,
) -> None:
    """Top-k items for a history, from a published model (the user vector is computed here, never stored)."""
    import logging

    from rich.table import Table

    from privrec_pipeline.models.recommend import Recommender, resolve_version

    logging.getLogger("privrec_pipeline.models.recommend").setLevel(logging.ERROR)  # printed below instead
    try:
        folder = resolve_version(lake or lake_root(), name, model)
        recs, ignored = Recommender.load(folder).recommend(history.split(","), k)
    except PrivrecError as exc:
        _fail(str(exc))
    if ignored:
        console.print(f"[yellow]ignored (not in the model's DP vocabulary): {', '.join(ignored)}[/]")
    table = Table(title=f"{name} {folder.name}: top {len(recs)}", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("item")
    table.add_column("score", justify="right")
    for i, rec in enumerate(recs, 1):
        table.add_row(str(i), rec.item_id, f"{rec.score:.4f}")
    console.print(table)


@app.command()
def budget(
    window: int | None = typer.Option(None, "--window", min=1,
                                      help="Window length in days (default: the policy's, 30 unless configured)."),
    at: str | None = typer.Option(None, "--at", help="Last day of the window, YYYY-MM-DD (default: the latest day any release covers)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    verify: bool = typer.Option(False, "--verify", help="Check the ledger's hash chain against its rows; exit 1 "
                                                        "if any entry or release was edited or deleted."),
    lake: str | None = LakeOption,
) -> None:
    """Privacy budget: spent and remaining for the window ending at a day, release by release."""
    import json as _json

    from rich.table import Table

    from privrec_pipeline.privacy.ledger import open_ledger

    try:
        ledger = open_ledger(lake)
    except PrivrecError as exc:
        _fail(str(exc))
    if verify:
        problems, count, head = ledger.verify()
        if problems:
            _fail("the privacy ledger does not verify:\n" + "\n".join(f"- {p}" for p in problems))
        console.print(f"ledger verified: {count} entries, {len(ledger.releases())} releases; head {head} "
                      "(keep this hash where the ledger's writers cannot change it)", markup=False)
        return
    window = window or ledger.policy.window_days
    every = ledger.releases()
    if at:
        end = _day(at)
    elif every:
        end = max(r.window_end for r in every)
    else:
        end = dt.datetime.now(dt.UTC).date()
    spend = ledger.spend_at(end, window)
    listed = [r for r in every if r.overlaps(spend.start, spend.end)]
    policy = ledger.policy
    if as_json:
        print(_json.dumps({
            "window": {"start": spend.start.isoformat(), "end": spend.end.isoformat(), "days": window},
            "policy": {"epsilon": policy.epsilon, "delta": policy.delta, "window_days": policy.window_days},
            "spent": {"epsilon": spend.epsilon, "delta": policy.delta, "basic_epsilon": spend.basic_epsilon,
                      "basic_delta": spend.basic_delta},
            "remaining_epsilon": spend.remaining,
            "releases": [{"id": r.id, "key": r.release_key, "window_start": r.window_start.isoformat(),
                          "window_end": r.window_end.isoformat(), "generation": r.generation, "state": r.state,
                          "forced": r.forced, "epsilon": r.epsilon, "delta": r.delta, "dag_id": r.dag_id,
                          "run_id": r.run_id, "mechanism": [c.to_dict() for c in r.components]} for r in listed],
        }, indent=2))
        return
    table = Table(title=f"privacy budget {spend.start} .. {spend.end} ({window} days)", title_justify="left")
    for col in ("id", "release", "data window", "state", "epsilon", "delta", "run"):
        table.add_column(col, justify="right" if col in ("id", "epsilon", "delta") else "left")
    for r in listed:
        counted = "" if r.state in ("reserved", "committed") else " (not counted)"
        table.add_row(str(r.id), r.release_key + (" (forced)" if r.forced else ""),
                      f"{r.window_start}..{r.window_end}", r.state + counted, f"{r.epsilon:.4g}", f"{r.delta:.2g}",
                      r.run_id)
    console.print(table)
    console.print(f"spent: epsilon {spend.epsilon:.4g} at delta {policy.delta:g} (tight, PLD); basic composition: "
                  f"epsilon {spend.basic_epsilon:.4g}, delta {spend.basic_delta:.3g}")
    console.print(f"cap: epsilon {policy.epsilon:g}, delta {policy.delta:g} per {policy.window_days} days; "
                  f"remaining: epsilon {spend.remaining:.4g}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
