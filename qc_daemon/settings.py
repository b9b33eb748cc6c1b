"""The daemon's settings: one frozen, typed object built once from ``config.toml``.

Every key has a default, so no file at all (or a file holding only some sections) is valid. Unknown sections,
unknown keys and bad values fail at start-up with :class:`SettingsError`, naming the key and the value.
``config.toml`` at the repository root documents each key; keep the two in step (a test checks it).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, get_type_hints


class SettingsError(ValueError):
    """A configuration value is wrong; the message names the key and the value."""


class LogFormat(enum.StrEnum):
    AUTO = "auto"  # console output on a terminal, JSON lines otherwise (journald)
    JSON = "json"
    CONSOLE = "console"


class Device(enum.StrEnum):
    AUTO = "auto"  # CUDA when ONNX Runtime can really use it, CPU otherwise
    CPU = "cpu"
    CUDA = "cuda"


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` under systemd, else ``$XDG_STATE_HOME/qc-daemon`` (``~/.local/state/qc-daemon``)."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "qc-daemon"


@dataclasses.dataclass(frozen=True)
class DicomSettings:
    ae_title: str = "QC_DAEMON"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 16
    # Empty list: any calling AE title / any peer address may connect.
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_peers: tuple[str, ...] = ()
    # Associations whose called AE title is not ours are rejected.
    require_called_aet: bool = True
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    # A single instance larger than this is refused (out of resources) before it is written.
    max_instance_mb: int = 1024
    # DICOM TLS (PS3.15 B.1), TLS 1.2+. Empty cert/key: plain TCP. With a CA file, clients must present a
    # certificate signed by it (mutual TLS); without one, any client may connect over TLS.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)


@dataclasses.dataclass(frozen=True)
class StorageSettings:
    state_dir: Path = dataclasses.field(default_factory=default_state_dir)
    # Empty: derived from state_dir (spool/, archive/, qc.sqlite3).
    spool_dir: str = ""
    archive_dir: str = ""
    database_url: str = ""
    # Keep each scored series' NIfTI volume under archive_dir (for later training).
    keep_nifti: bool = False
    # Refuse instances (out of resources) when free space in the state folder falls below this.
    min_free_mb: int = 500
    # Remove spooled instances and archived volumes older than this many days; results are kept, and so are the
    # instances of a series not yet recorded (e.g. after a long outage). 0 = never.
    retention_days: float = 7.0

    @property
    def spool_path(self) -> Path:
        return Path(self.spool_dir) if self.spool_dir else self.state_dir / "spool"

    @property
    def archive_path(self) -> Path:
        return Path(self.archive_dir) if self.archive_dir else self.state_dir / "archive"

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'qc.sqlite3'}"


@dataclasses.dataclass(frozen=True)
class WatchSettings:
    # Empty: no drop folder. Files dropped here are ingested like received instances and then removed.
    folder: str = ""
    # A dropped file is read once its size has not changed for this long.
    settle_s: float = 1.0


@dataclasses.dataclass(frozen=True)
class AssemblySettings:
    # A series is complete after this long without a new instance.
    quiet_period_s: float = 10.0
    # ...or as soon as ImagesInAcquisition instances have arrived, when the scanner sends that tag.
    use_expected_count: bool = True
    # Fewer slices than this is not a 3D volume (a single slice, a short 2D stack).
    min_slices: int = 16
    # Scoring workers. ONNX Runtime already uses every core for one series, so 1 is right on a CPU.
    workers: int = 1
    # Series waiting to be scored before new ones back up into the spool (they are never dropped).
    max_queue: int = 64


@dataclasses.dataclass(frozen=True)
class ScoringSettings:
    # Empty: the model bundled with the daemon.
    model_path: str = ""
    device: Device = Device.AUTO
    batch_size: int = 4
    # 0: ONNX Runtime's default (all physical cores).
    threads: int = 0


@dataclasses.dataclass(frozen=True)
class AlertSettings:
    # A scored series with score < threshold raises an alert.
    threshold: float = 0.5
    # Empty: no webhook. Otherwise alerts are POSTed as JSON here, retried with backoff until delivered.
    webhook_url: str = ""
    webhook_timeout_s: float = 5.0
    retry_initial_s: float = 2.0
    retry_max_s: float = 300.0
    # Empty: no exec hook. Otherwise run this argv with the alert as JSON on stdin.
    exec_command: tuple[str, ...] = ()
    exec_timeout_s: float = 30.0


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    format: LogFormat = LogFormat.AUTO
    level: str = "info"


@dataclasses.dataclass(frozen=True)
class Settings:
    dicom: DicomSettings = dataclasses.field(default_factory=DicomSettings)
    storage: StorageSettings = dataclasses.field(default_factory=StorageSettings)
    watch: WatchSettings = dataclasses.field(default_factory=WatchSettings)
    assembly: AssemblySettings = dataclasses.field(default_factory=AssemblySettings)
    scoring: ScoringSettings = dataclasses.field(default_factory=ScoringSettings)
    alerts: AlertSettings = dataclasses.field(default_factory=AlertSettings)
    logging: LoggingSettings = dataclasses.field(default_factory=LoggingSettings)


_LOG_LEVELS = ("debug", "info", "warning", "error")


def load_settings(path: Path | None = None) -> Settings:
    """Read ``path`` (None: built-in defaults) into a validated :class:`Settings`."""
    if path is None:
        return settings_from_dict({})
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise SettingsError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise SettingsError(f"config file {path} cannot be read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
    return settings_from_dict(raw)


def settings_from_dict(raw: dict[str, Any]) -> Settings:
    sections: dict[str, Any] = {}
    hints = get_type_hints(Settings)
    for name, value in raw.items():
        if name not in hints:
            raise SettingsError(f"unknown section [{name}] (known: {', '.join(hints)})")
        if not isinstance(value, dict):
            raise SettingsError(f"[{name}] must be a table, got {value!r}")
        sections[name] = _build_section(name, hints[name], value)
    settings = Settings(**sections)
    _validate(settings)
    return settings


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            raise SettingsError(f"unknown key {section}.{key} (known: {', '.join(hints)})")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    def bad(expected: str) -> SettingsError:
        return SettingsError(f"{key} = {value!r}: expected {expected}")

    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise bad("a non-empty path string")
        return Path(value).expanduser()
    if hint == tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise bad("one of " + ", ".join(repr(m.value) for m in hint)) from None
    raise SettingsError(f"{key}: unsupported setting type {hint!r}")  # a programming error, named anyway


def _validate(s: Settings) -> None:
    def check(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise SettingsError(f"{key} = {value!r}: expected {expected}")

    ae = s.dicom.ae_title
    check(0 < len(ae) <= 16 and ae.strip() == ae and ae.isprintable() and "\\" not in ae,
          "dicom.ae_title", ae, "1 to 16 printable characters, no backslash, no leading/trailing spaces")
    for calling in s.dicom.allowed_calling_aets:
        check(0 < len(calling) <= 16, "dicom.allowed_calling_aets", calling, "AE titles of 1 to 16 characters")
    for peer in s.dicom.allowed_peers:
        try:
            ipaddress.ip_network(peer, strict=False)
        except ValueError:
            raise SettingsError(f"dicom.allowed_peers: {peer!r} is not an IP address or network") from None
    check(0 <= s.dicom.port <= 65535, "dicom.port", s.dicom.port, "a port number 0..65535 (0: any free port)")
    check(s.dicom.max_associations >= 1, "dicom.max_associations", s.dicom.max_associations, ">= 1")
    for key in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
        check(getattr(s.dicom, key) > 0, f"dicom.{key}", getattr(s.dicom, key), "> 0")
    check(s.dicom.max_instance_mb >= 1, "dicom.max_instance_mb", s.dicom.max_instance_mb, ">= 1")
    _validate_tls(s.dicom)
    check(s.storage.min_free_mb >= 0, "storage.min_free_mb", s.storage.min_free_mb, ">= 0")
    check(s.storage.retention_days >= 0, "storage.retention_days", s.storage.retention_days, ">= 0")
    check(s.watch.settle_s >= 0, "watch.settle_s", s.watch.settle_s, ">= 0")
    check(s.assembly.quiet_period_s >= 0, "assembly.quiet_period_s", s.assembly.quiet_period_s, ">= 0")
    check(s.assembly.min_slices >= 2, "assembly.min_slices", s.assembly.min_slices, ">= 2")
    check(s.assembly.workers >= 1, "assembly.workers", s.assembly.workers, ">= 1")
    check(s.assembly.max_queue >= 1, "assembly.max_queue", s.assembly.max_queue, ">= 1")
    check(s.scoring.batch_size >= 1, "scoring.batch_size", s.scoring.batch_size, ">= 1")
    check(s.scoring.threads >= 0, "scoring.threads", s.scoring.threads, ">= 0")
    check(0.0 <= s.alerts.threshold <= 1.0, "alerts.threshold", s.alerts.threshold, "a score between 0 and 1")
    check(not s.alerts.webhook_url or s.alerts.webhook_url.startswith(("http://", "https://")),
          "alerts.webhook_url", s.alerts.webhook_url, "an http:// or https:// URL, or empty")
    check(s.alerts.webhook_timeout_s > 0, "alerts.webhook_timeout_s", s.alerts.webhook_timeout_s, "> 0")
    check(0 < s.alerts.retry_initial_s <= s.alerts.retry_max_s, "alerts.retry_initial_s",
          s.alerts.retry_initial_s, "> 0 and <= alerts.retry_max_s")
    check(s.alerts.exec_timeout_s > 0, "alerts.exec_timeout_s", s.alerts.exec_timeout_s, "> 0")
    check(s.logging.level in _LOG_LEVELS, "logging.level", s.logging.level, "one of " + ", ".join(_LOG_LEVELS))
    if s.scoring.model_path and not Path(s.scoring.model_path).expanduser().is_file():
        raise SettingsError(f"scoring.model_path = {s.scoring.model_path!r}: no such file")


def _validate_tls(d: DicomSettings) -> None:
    """TLS files must exist and load (a typo is a start-up error, never a silently unencrypted port)."""
    if bool(d.tls_cert_file) != bool(d.tls_key_file):
        raise SettingsError("dicom.tls_cert_file and dicom.tls_key_file must be set together (or both left empty)")
    if d.tls_ca_file and not d.tls_cert_file:
        raise SettingsError(f"dicom.tls_ca_file = {d.tls_ca_file!r} needs dicom.tls_cert_file and dicom.tls_key_file")
    for key in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
        value = getattr(d, key)
        if value and not Path(value).expanduser().is_file():
            raise SettingsError(f"dicom.{key} = {value!r}: no such file")
    if d.tls:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(Path(d.tls_cert_file).expanduser(), Path(d.tls_key_file).expanduser())
        except (ssl.SSLError, OSError) as exc:
            raise SettingsError(
                f"dicom.tls_cert_file = {d.tls_cert_file!r} / dicom.tls_key_file = {d.tls_key_file!r}: "
                f"cannot load the certificate and key: {exc}"
            ) from None
        if d.tls_ca_file:
            try:
                context.load_verify_locations(cafile=Path(d.tls_ca_file).expanduser())
            except (ssl.SSLError, OSError) as exc:
                raise SettingsError(f"dicom.tls_ca_file = {d.tls_ca_file!r}: cannot load: {exc}") from None
