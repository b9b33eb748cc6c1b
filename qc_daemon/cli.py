"""``qc-daemon``: run the node, ask it about history, score a file offline, echo a node, check a config.

Exit codes (deploy/README.md lists them too): 0 success; 1 the command failed (message on stderr); 2 bad usage
or a configuration error; 3 ``serve`` cannot open its DICOM port (in use, or not permitted); 4 the database
cannot be opened (server unreachable, credentials refused, driver missing; the message names the URL without its
password); 141 the reader of our output went away (``qc-daemon history | head -2``), as for a tool ended by
SIGPIPE.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

from qc_daemon.settings import LoggingSettings, LogLevel, Settings, SettingsError, load_settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2  # also argparse's status for bad usage
EXIT_CANNOT_LISTEN = 3
EXIT_NO_DATABASE = 4
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

CONFIG_ENV = "QC_DAEMON_CONFIG"  # the config file to read when --config is not given
DEFAULT_CONFIG_PATH = Path("/etc/qc-daemon/config.toml")  # read when it exists and neither of those is set


class CliError(Exception):
    pass


class CannotListen(Exception):
    pass


class NoDatabase(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
    except BrokenPipeError:
        # Python's recipe (library/signal.html, "Note on SIGPIPE"): no traceback, no second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args.config)
        if args.run is not cmd_serve:
            # Offline commands print their result on stdout (often JSON for scripts): only warnings and errors
            # are logged, and to stderr.
            from qc_daemon.logs import configure_logging

            configure_logging(_offline_logging(settings.logging), stream=sys.stderr)
        return args.run(args, settings)
    except SettingsError as exc:
        print(f"qc-daemon: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CannotListen as exc:
        print(f"qc-daemon: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    except NoDatabase as exc:
        print(f"qc-daemon: {exc}", file=sys.stderr)
        return EXIT_NO_DATABASE
    except CliError as exc:
        print(f"qc-daemon: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _settings(path: Path | None) -> Settings:
    if path is not None:
        return load_settings(path)
    if os.environ.get(CONFIG_ENV):
        return load_settings(Path(os.environ[CONFIG_ENV]))
    return load_settings(DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None)


def _offline_logging(settings: LoggingSettings) -> LoggingSettings:
    levels = list(LogLevel)
    return settings.model_copy(update={"level": max(settings.level, LogLevel.WARNING, key=levels.index)})


def _parser() -> argparse.ArgumentParser:
    config_help = (
        f"config.toml (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH} if it exists, else built-in defaults)"
    )
    parser = argparse.ArgumentParser(prog="qc-daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help=config_help)
    # --config is accepted after the command too (`qc-daemon serve --config x.toml`); SUPPRESS keeps a value
    # given before the command when none is given after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the DICOM node (until SIGTERM/SIGINT)")
    serve.set_defaults(run=cmd_serve)

    hist = sub.add_parser("history", parents=[common], help="list results, newest first")
    hist.add_argument("--below", type=float, help="only scored series with score < BELOW")
    hist.add_argument("--since", type=_since, help="ISO date/time (UTC) or an age such as 24h, 7d, 30m")
    hist.add_argument("--station", help="only this StationName")
    hist.add_argument("--status", choices=["pending", "scored", "skipped", "failed"])
    hist.add_argument("--limit", type=int, default=None)
    hist.add_argument("--json", action="store_true", help="print a JSON array")
    hist.set_defaults(run=cmd_history)

    show = sub.add_parser("show", parents=[common], help="every revision of one series, with patch scores")
    show.add_argument("series_uid")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=cmd_show)

    score = sub.add_parser(
        "score", parents=[common], help="score a NIfTI file or a DICOM folder offline, with the daemon's code"
    )
    score.add_argument("path", type=Path)
    score.add_argument("--series", help="SeriesInstanceUID to score when the folder holds several")
    score.add_argument("--json", action="store_true")
    score.set_defaults(run=cmd_score)

    echo = sub.add_parser("echo", parents=[common], help="send a C-ECHO (default: to this daemon's configured port)")
    echo.add_argument("--host", default="127.0.0.1")
    echo.add_argument("--port", type=int, default=None)
    echo.add_argument("--aet", default=None, help="called AE title (default: the configured one)")
    echo.add_argument("--calling-aet", default="QC_ECHO")
    echo.set_defaults(run=cmd_echo)

    _add_send_parser(sub, common)

    check = sub.add_parser(
        "check-config", parents=[common], help="validate the configuration and the model, print the result"
    )
    check.set_defaults(run=cmd_check_config)
    return parser


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _since(text: str) -> dt.datetime:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", text.strip())
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        return now - dt.timedelta(**{{"m": "minutes", "h": "hours", "d": "days"}[unit]: amount})
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since {text!r}: expected ISO date/time or e.g. 24h, 7d") from None
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


# ---- commands ---------------------------------------------------------------------------------------------


def cmd_serve(args, settings: Settings) -> int:
    from qc_daemon.logs import configure_logging, get_logger
    from qc_daemon.scorer import ModelError
    from qc_daemon.service import Daemon
    from qc_daemon.store import SchemaError, StoreUnavailable

    configure_logging(settings.logging)
    log = get_logger("qc_daemon.cli")
    try:
        daemon = Daemon(settings)
    except ModelError as exc:
        log.error("model_refused", error=str(exc))
        raise CliError(str(exc)) from exc
    except StoreUnavailable as exc:
        log.error("database_unavailable", error=str(exc))
        raise NoDatabase(str(exc)) from exc
    except SchemaError as exc:
        log.error("database_refused", error=str(exc))
        raise CliError(str(exc)) from exc
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    from qc_daemon.web import WebServerError

    try:
        daemon.start()
    except WebServerError as exc:
        daemon.stop()
        log.error("web_failed", error=str(exc))
        raise CannotListen(str(exc)) from exc
    except OSError as exc:
        daemon.stop()
        if exc.filename is None and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            where = f"{settings.dicom.host}:{settings.dicom.port}"
            log.error("listener_failed", address=where, error=exc.strerror)
            raise CannotListen(f"cannot listen on {where}: {exc.strerror} (set [dicom] host/port)") from exc
        raise
    try:
        stop.wait()
    finally:
        daemon.stop()
    return EXIT_OK


def _open_store(settings: Settings):
    from qc_daemon.store import SchemaError, Store, StoreUnavailable

    if not settings.storage.database_url and not (settings.storage.state_dir / "qc.sqlite3").exists():
        raise CliError(f"no database yet under {settings.storage.state_dir} (has the daemon run?)")
    try:
        return Store(settings.storage.database)
    except StoreUnavailable as exc:
        raise NoDatabase(str(exc)) from exc
    except SchemaError as exc:
        raise CliError(str(exc)) from exc


def cmd_history(args, settings: Settings) -> int:
    from qc_daemon.store import SeriesStatus, history

    store = _open_store(settings)
    with store.session() as session:
        rows = history(
            session,
            below=args.below,
            since=args.since,
            station=args.station,
            status=SeriesStatus(args.status) if args.status else None,
            limit=args.limit,
        )
        if args.json:
            print(json.dumps([row.to_dict() for row in rows], indent=2))
        else:
            _print_table(rows)
    store.close()
    return EXIT_OK


def _print_table(rows) -> None:
    header = (f"{'completed (UTC)':19}  {'status':7}  {'score':>5}  {'n':>4}  {'station':12}  {'description':24}  "
              f"{'node':20}  series")
    print(header)
    for row in rows:
        score = f"{row.score:.3f}" if row.score is not None else "-"
        flag = "!" if row.below_threshold else " "
        print(
            f"{row.completed_at:%Y-%m-%d %H:%M:%S}  {row.status.value:7}  {score:>5}{flag} {row.instances:>4}  "
            f"{(row.station_name or '-')[:12]:12}  {(row.series_description or '-')[:24]:24}  "
            f"{(row.node_name or '-')[:20]:20}  {row.series_instance_uid}" + (f"  ({row.reason})" if row.reason else "")
        )


def cmd_show(args, settings: Settings) -> int:
    from qc_daemon.store import ALERT_CHANNELS, RESULT_CHANNELS, alerts_for, revisions

    store = _open_store(settings)
    with store.session() as session:
        rows = revisions(session, args.series_uid)
        if not rows:
            raise CliError(f"no series {args.series_uid!r} in the database")
        out = []
        for row in rows:
            item = row.to_dict(with_patches=True)
            item["alerts"] = [
                {"channel": a.channel.value, "state": a.state.value, "attempts": a.attempts, "last_error": a.last_error}
                for a in alerts_for(session, row.id, ALERT_CHANNELS)
            ]
            item["pacs_results"] = [
                {"channel": a.channel.value, "state": a.state.value, "attempts": a.attempts, "last_error": a.last_error,
                 "sop_instance_uid": a.payload.get("sop_instance_uid"),
                 "delivered_at": a.delivered_at and a.delivered_at.isoformat(timespec="seconds") + "Z"}
                for a in alerts_for(session, row.id, RESULT_CHANNELS)
            ]
            out.append(item)
    store.close()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for item in out:
            for key, value in item.items():
                if key == "patch_scores" and value:
                    value = f"{_count(len(value), 'patch', 'patches')}, min {min(value):.3f}"
                elif key == "patch_origins" and value:
                    value = "..."
                elif key in ("montage_path", "quality_map_path") and value and not Path(value).exists():
                    value = f"{value} (removed by retention)"
                elif key == "iqm_errors":
                    continue
                elif key == "iqms" and value:
                    print(key)
                    for line in _iqm_lines(value, item.get("iqm_errors") or {}):
                        print(f"  {line}")
                    continue
                elif key == "pacs_results" and value:
                    print(key)
                    for line in _delivery_lines(value):
                        print(f"  {line}")
                    continue
                print(f"{key:20} {value}")
            print()
    return EXIT_OK


def _delivery_lines(deliveries: list[dict]) -> list[str]:
    """One line per result sent to PACS: channel, state, attempts, SOP instance UID, and the last error."""
    return [
        f"{d['channel']:13} {d['state']:9} {_count(d['attempts'], 'attempt', 'attempts'):11} "
        f"{d['sop_instance_uid'] or '-'}" + (f"  ({d['last_error']})" if d["last_error"] else "")
        for d in deliveries
    ]


def _iqm_lines(iqms: dict, errors: dict) -> list[str]:
    """One line per IQM: its value, or '-' and why it could not be computed."""
    return [
        f"{name:18} {value:.4g}" if value is not None else f"{name:18} -  ({errors.get(name, 'not computed')})"
        for name, value in iqms.items()
    ]


def cmd_score(args, settings: Settings) -> int:
    from qc_daemon.scorer import ModelError, Scorer
    from qc_daemon.series import SeriesFailed, SeriesSkipped, classify, read_series
    from qc_daemon.volume import build_volume, load_nifti

    path: Path = args.path
    if not path.exists():
        raise CliError(f"{path} does not exist")
    try:
        scorer = Scorer(settings.scoring)
        if path.is_dir():
            series = read_series(args.series or "offline", _pick_series(path, args.series))
            volume = build_volume(classify(series, settings.assembly.min_slices, settings.assembly.phantom_keywords))
        else:
            volume = load_nifti(path)
        result = scorer.score_volume(volume)
    except (SeriesSkipped, SeriesFailed, ModelError) as exc:
        raise CliError(f"cannot score {path}: {exc}") from exc
    out = {
        "path": str(path),
        "score": result.score,
        "below_threshold": result.score < settings.alerts.threshold,
        "model_score": result.model_score,
        "ghost_ratio": result.ghost.ratio if result.ghost else None,
        "ghost_direction": result.ghost.direction if result.ghost else None,
        "spike_amplitude": result.spike.amplitude if result.spike else None,
        "threshold": settings.alerts.threshold,
        "patches": len(result.patch_scores),
        "seconds": round(result.seconds, 3),
        "model_sha256": scorer.model_sha256,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        patches = _count(len(result.patch_scores), "patch", "patches")
        print(f"{path}: score {result.score:.3f} ({patches}, {result.seconds:.2f} s)")
        if result.ghost is not None and result.ghost.score < result.model_score:
            print(f"  lowered from the model's {result.model_score:.3f} by an N/2 ghost of {result.ghost.ratio:.1%} "
                  f"of the head's signal along {result.ghost.direction}")
        if result.spike is not None and result.spike.score < result.model_score:
            print(f"  lowered from the model's {result.model_score:.3f} by a k-space spike: stripes of "
                  f"{result.spike.amplitude:.1%} of the head's p99")
    return EXIT_OK


def _pick_series(folder: Path, series_uid: str | None) -> list[Path]:
    import pydicom

    groups: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            uid = str(ds.SeriesInstanceUID)
        except Exception:  # noqa: BLE001 - not DICOM: ignored in an offline folder scan
            continue
        groups.setdefault(uid, []).append(path)
    if not groups:
        raise CliError(f"no DICOM files under {folder}")
    if series_uid is not None:
        if series_uid not in groups:
            raise CliError(f"series {series_uid} not found under {folder}")
        return groups[series_uid]
    if len(groups) > 1:
        raise CliError(f"{folder} holds {len(groups)} series; choose one with --series: " + ", ".join(sorted(groups)))
    return next(iter(groups.values()))


def cmd_echo(args, settings: Settings) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=args.calling_aet)
    ae.add_requested_context(Verification)
    port = args.port if args.port is not None else settings.dicom.port
    called = args.aet or settings.dicom.ae_title
    assoc = ae.associate(args.host, port, ae_title=called)
    if not assoc.is_established:
        raise CliError(f"no association with {called}@{args.host}:{port}")
    status = assoc.send_c_echo()
    assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        raise CliError(f"C-ECHO to {called}@{args.host}:{port} answered {code!r}")
    print(f"C-ECHO to {called}@{args.host}:{port}: success")
    return EXIT_OK


def _add_send_parser(sub, common: argparse.ArgumentParser) -> None:
    send = sub.add_parser(
        "send", parents=[common], help="C-STORE a folder's DICOM files as stored, each in its own transfer syntax"
    )
    send.add_argument("folder", type=Path)
    send.add_argument("-r", "--recursive", action="store_true", help="include subfolders")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=None, help="default: the configured dicom.port")
    send.add_argument("--aet", default=None, help="called AE title (default: the configured dicom.ae_title)")
    send.add_argument("--calling-aet", default="QC_SEND")
    send.set_defaults(run=cmd_send)


def cmd_send(args, settings: Settings) -> int:
    """Exit 0 when every instance was stored (success or warning), 1 when any failed or none was found."""
    from qc_daemon.storage_scu import read_dicom_files, send_files

    if not args.folder.is_dir():
        raise CliError(f"{args.folder} is not a folder")
    files, skipped = read_dicom_files(args.folder, recursive=args.recursive)
    if not files:
        raise CliError(f"no DICOM instances in {args.folder}" + ("" if args.recursive else " (subfolders: -r)"))
    port = args.port if args.port is not None else settings.dicom.port
    report = send_files(
        files, args.host, port, called_aet=args.aet or settings.dicom.ae_title, calling_aet=args.calling_aet,
        timeout_s=settings.dicom.network_timeout_s,
    )
    report.skipped = skipped
    print("\n".join(report.summary_lines()))
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_check_config(args, settings: Settings) -> int:
    from qc_daemon.scorer import ModelError, Scorer
    from qc_daemon.store import url_without_password

    try:
        scorer = Scorer(settings.scoring)
    except ModelError as exc:
        raise CliError(f"model: {exc}") from exc
    summary = {
        "dicom": f"{settings.dicom.ae_title}@{settings.dicom.host}:{settings.dicom.port}",
        "node_name": settings.node_name,
        "state_dir": str(settings.storage.state_dir),
        "database": url_without_password(settings.storage.database),
        "spool": str(settings.storage.spool_path),
        "model": scorer.describe(),
        "alert_threshold": settings.alerts.threshold,
        "http": _describe_http(settings.http),
        "results": _describe_results(settings),
    }
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def _describe_http(http) -> str:
    if not http.enabled:
        return "disabled"
    scheme = "https" if http.tls else "http"
    logins = (("basic auth", bool(http.username)), ("bearer token", bool(http.token.get_secret_value())))
    access = ", ".join(name for name, on in logins if on) or "no login"
    return f"{scheme}://{http.host}:{http.port} ({access}; /health open)"


def _describe_results(settings: Settings) -> str:
    results = settings.results
    if not results.enabled:
        return "disabled"
    sent = " and ".join(name for name, on in (("SR", results.send_report), ("montage SC", results.send_montage)) if on)
    calling = results.calling_ae_title or settings.dicom.ae_title
    return f"{sent} to {results.target} from {calling}" + (" over TLS" if results.tls else "")


if __name__ == "__main__":
    sys.exit(main())
