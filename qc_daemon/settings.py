"""The daemon's settings: one frozen, typed object built once from ``config.toml``.

Every key has a default, so no file at all (or a file holding only some sections) is valid. Unknown sections,
unknown keys and bad values fail at start-up with :class:`SettingsError`, naming the key and the value
(``dicom.port = 70000: input should be less than or equal to 65535``). ``config.toml`` at the repository root
documents each key; keep the two in step (a test checks it). The strict TOML reading is
:mod:`qc_daemon.config_base`, shared with the trainer.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from qc_daemon.config_base import InvalidValue, Section, read_toml, validate_toml


class SettingsError(ValueError):
    """A configuration value is wrong; the message names the key and the value."""


class LogFormat(enum.StrEnum):
    AUTO = "auto"  # console output on a terminal, JSON lines otherwise (journald)
    JSON = "json"
    CONSOLE = "console"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Device(enum.StrEnum):
    AUTO = "auto"  # CUDA when it can really be used (ONNX Runtime's provider, torch's device), CPU otherwise
    CPU = "cpu"
    CUDA = "cuda"


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` under systemd, else ``$XDG_STATE_HOME/qc-daemon`` (``~/.local/state/qc-daemon``)."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "qc-daemon"


def _ae_title(value: str) -> str:
    if not (0 < len(value) <= 16 and value.strip() == value and value.isprintable() and "\\" not in value):
        raise ValueError("expected 1 to 16 printable characters, no backslash, no leading/trailing spaces")
    return value


def _calling_ae_title(value: str) -> str:
    if not 0 < len(value) <= 16:
        raise ValueError("expected an AE title of 1 to 16 characters")
    return value


def _ip_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("expected an IP address or network, e.g. 10.1.2.0/24") from None
    return value


def _existing_file(value: str) -> str:
    if value and not Path(value).expanduser().is_file():
        raise ValueError("no such file")
    return value


ExistingFile = Annotated[str, AfterValidator(_existing_file)]  # empty: not set

def _server_tls_context(section: str, cert_file: str, key_file: str) -> ssl.SSLContext | None:
    """A server context from a certificate and key set together (None when neither is): a typo in either is a
    start-up error naming ``section``'s key, never a silently unencrypted port."""
    if bool(cert_file) != bool(key_file):
        missing = "tls_key_file" if cert_file else "tls_cert_file"
        raise InvalidValue(missing, "", f"{section}.tls_cert_file and {section}.tls_key_file must be set together")
    if not cert_file:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(Path(cert_file).expanduser(), Path(key_file).expanduser())
    except (ssl.SSLError, OSError) as exc:
        raise InvalidValue(
            "tls_cert_file",
            cert_file,
            f"cannot load the certificate and key ({section}.tls_key_file = {key_file!r}): {exc}",
        ) from None
    return context


class DicomSettings(Section):
    ae_title: Annotated[str, AfterValidator(_ae_title)] = "QC_DAEMON"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)  # 0: any free port
    max_associations: int = Field(16, ge=1)
    # Empty: any calling AE title / any peer address may connect.
    allowed_calling_aets: tuple[Annotated[str, AfterValidator(_calling_ae_title)], ...] = ()
    allowed_peers: tuple[Annotated[str, AfterValidator(_ip_network)], ...] = ()
    # Associations whose called AE title is not ours are rejected.
    require_called_aet: bool = True
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    # A single instance larger than this is refused (out of resources) before it is written.
    max_instance_mb: int = Field(1024, ge=1)
    # pynetdicom writes each incoming dataset to a temporary file ($TMPDIR) instead of memory (process-wide).
    receive_to_disk: bool = False
    # DICOM TLS (PS3.15 B.1), TLS 1.2+. Empty cert/key: plain TCP. With a CA file, clients must present a
    # certificate signed by it (mutual TLS); without one, any client may connect over TLS.
    tls_cert_file: ExistingFile = ""
    tls_key_file: ExistingFile = ""
    tls_ca_file: ExistingFile = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @model_validator(mode="after")
    def _tls_files_load(self) -> DicomSettings:
        """A typo in the TLS files is a start-up error, never a silently unencrypted port."""
        context = _server_tls_context("dicom", self.tls_cert_file, self.tls_key_file)
        if self.tls_ca_file and context is None:
            raise InvalidValue("tls_ca_file", self.tls_ca_file, "needs dicom.tls_cert_file and dicom.tls_key_file")
        if context is None:
            return self
        if self.tls_ca_file:
            try:
                context.load_verify_locations(cafile=Path(self.tls_ca_file).expanduser())
            except (ssl.SSLError, OSError) as exc:
                raise InvalidValue("tls_ca_file", self.tls_ca_file, f"cannot load: {exc}") from None
        return self


class StorageSettings(Section):
    state_dir: Path = Field(default_factory=default_state_dir)
    # Empty: derived from state_dir (spool/, archive/, qc.sqlite3).
    spool_dir: str = ""
    archive_dir: str = ""
    database_url: str = ""
    # This daemon's name in the results it records (several daemons may share one PostgreSQL database).
    # Empty: "<host name>:<dicom.port>" (Settings.node_name).
    node_name: str = Field("", max_length=128)
    # Keep each scored series' NIfTI volume under archive_dir (for later training).
    keep_nifti: bool = False
    # Refuse instances (out of resources) when free space in the state folder falls below this.
    min_free_mb: int = Field(500, ge=0)
    # Remove spooled instances and archived volumes older than this many days; results are kept, and so are the
    # instances of a series not yet recorded (e.g. after a long outage). 0 = never.
    retention_days: float = Field(7.0, ge=0)

    @model_validator(mode="after")
    def _database_url_usable(self) -> StorageSettings:
        """A typo in the URL or a driver not installed fails at start-up, naming the URL without its password."""
        if not self.database_url:
            return self
        try:
            url = make_url(self.database_url)
        except ArgumentError:
            raise InvalidValue("database_url", "(not shown: it may hold a password)",
                               "expected a database URL, e.g. postgresql://qc@db.example.org/qc") from None
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")  # as qc_daemon.store opens it
        shown = url.render_as_string(hide_password=True)
        try:
            url.get_dialect().import_dbapi()
        except NoSuchModuleError:
            raise InvalidValue("database_url", shown, "unknown database: expected sqlite:// or postgresql://") from None
        except ImportError as exc:
            hint = " (pip install 'qc-daemon[postgres]')" if url.get_backend_name() == "postgresql" else ""
            raise InvalidValue("database_url", shown, f"its driver is not installed: {exc}{hint}") from None
        return self

    @property
    def spool_path(self) -> Path:
        return Path(self.spool_dir) if self.spool_dir else self.state_dir / "spool"

    @property
    def archive_path(self) -> Path:
        return Path(self.archive_dir) if self.archive_dir else self.state_dir / "archive"

    @property
    def results_path(self) -> Path:
        """Quality maps and montages, one folder per series revision (removed by retention)."""
        return self.state_dir / "results"

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'qc.sqlite3'}"


class WatchSettings(Section):
    # Empty: no drop folder. Files dropped here are ingested like received instances and then removed.
    folder: str = ""
    # A dropped file is read once its size has not changed for this long.
    settle_s: float = Field(1.0, ge=0)


class AssemblySettings(Section):
    # A series is complete after this long without a new instance.
    quiet_period_s: float = Field(10.0, ge=0)
    # ...or as soon as ImagesInAcquisition instances have arrived, when the scanner sends that tag.
    use_expected_count: bool = True
    # Fewer slices than this is not a 3D volume (a single slice, a short 2D stack).
    min_slices: int = Field(16, ge=2)
    # Scoring workers. ONNX Runtime already uses every core for one series, so 1 is right on a CPU.
    workers: int = Field(1, ge=1)
    # Series waiting to be scored before new ones back up into the spool (they are never dropped).
    max_queue: int = Field(64, ge=1)
    # A series whose patient name or ID, study or series description, protocol name or body part holds one of
    # these words (whole words, any case) is a QA phantom: recorded as skipped ("QA phantom"), never scored or
    # alerted on; the learned score describes heads. Empty: score phantoms like any volume.
    phantom_keywords: tuple[str, ...] = ("phantom", "qa", "fbirn", "acr")


class ScoringSettings(Section):
    # Empty: the model bundled with the daemon.
    model_path: ExistingFile = ""
    device: Device = Device.AUTO
    batch_size: int = Field(4, ge=1)
    # 0: ONNX Runtime's default (all physical cores).
    threads: int = Field(0, ge=0)
    # The score is floored by a measured N/2 ghost (qc_daemon/ghost_check.py): the model misses ghosts that land
    # in the air on scanners it was not trained on. False: the score is the model's alone.
    ghost_check: bool = True
    # The score is floored by a measured k-space spike (qc_daemon/spike_check.py): the model misses the stripes.
    spike_check: bool = True


class AlertSettings(Section):
    # A scored series with score < threshold raises an alert (scores are in [0, 1]).
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    # Empty: no webhook. Otherwise alerts are POSTed as JSON here, retried with backoff until delivered.
    webhook_url: str = ""
    webhook_timeout_s: float = Field(5.0, gt=0)
    retry_initial_s: float = Field(2.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    # Empty: no exec hook. Otherwise run this argv with the alert as JSON on stdin.
    exec_command: tuple[str, ...] = ()
    exec_timeout_s: float = Field(30.0, gt=0)

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL, or empty")
        return value

    @model_validator(mode="after")
    def _retry_order(self) -> AlertSettings:
        if self.retry_initial_s > self.retry_max_s:
            raise InvalidValue("retry_initial_s", self.retry_initial_s, "expected <= alerts.retry_max_s")
        return self


@dataclass(frozen=True)
class Destination:
    """A DICOM node to send to: ``AE_TITLE@host:port``."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def parse_destination(value: str) -> Destination:
    """``AE_TITLE@host:port`` (an IPv6 address in brackets: ``PACS@[fd00::5]:104``); ValueError says what is wrong."""
    ae_title, at, address = value.rpartition("@")
    if not at:
        raise ValueError("expected AE_TITLE@host:port, e.g. PACS@10.1.2.3:104")
    try:
        _ae_title(ae_title)
    except ValueError as exc:
        raise ValueError(f"AE title {ae_title!r}: {exc}") from None
    host, colon, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or any(c.isspace() or c in "/@[]" for c in host):
        raise ValueError("expected AE_TITLE@host:port, e.g. PACS@10.1.2.3:104")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r}: expected 1 to 65535")
    return Destination(ae_title, host, int(port))


def _destination(value: str) -> str:
    if value:
        parse_destination(value)
    return value


def _client_tls_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS 1.2+ client context verifying the server against ``ca_file`` (empty: the system's CAs), with a
    client certificate for mutual TLS when ``cert_file`` and ``key_file`` are set (together)."""
    if bool(cert_file) != bool(key_file):
        missing = "tls_key_file" if cert_file else "tls_cert_file"
        raise InvalidValue(missing, "", "results.tls_cert_file and results.tls_key_file must be set together")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        try:
            context.load_verify_locations(cafile=Path(ca_file).expanduser())
        except (ssl.SSLError, OSError) as exc:
            raise InvalidValue("tls_ca_file", ca_file, f"cannot load: {exc}") from None
    if cert_file:
        try:
            context.load_cert_chain(Path(cert_file).expanduser(), Path(key_file).expanduser())
        except (ssl.SSLError, OSError) as exc:
            raise InvalidValue("tls_cert_file", cert_file,
                               f"cannot load the certificate and key (results.tls_key_file = {key_file!r}): {exc}"
                               ) from None
    return context


class ResultsSettings(Section):
    """Results to PACS (:mod:`qc_daemon.pacs_report`, :mod:`qc_daemon.pacs_sender`): off unless a destination is set."""

    # Empty: off. Otherwise "AE_TITLE@host:port": each scored revision's SR and montage are stored there.
    destination: Annotated[str, AfterValidator(_destination)] = ""
    # Our AE title when sending; empty: dicom.ae_title.
    calling_ae_title: str = ""
    send_report: bool = True
    send_montage: bool = True
    # ACSE, DIMSE and network timeout of one delivery.
    timeout_s: float = Field(30.0, gt=0)
    retry_initial_s: float = Field(10.0, gt=0)
    retry_max_s: float = Field(600.0, gt=0)
    # DICOM TLS to the destination (TLS 1.2+). CA file empty: the system's CAs verify the server.
    tls: bool = False
    tls_ca_file: ExistingFile = ""
    tls_cert_file: ExistingFile = ""
    tls_key_file: ExistingFile = ""

    @field_validator("calling_ae_title")
    @classmethod
    def _calling_ae(cls, value: str) -> str:
        return _ae_title(value) if value else value

    @property
    def enabled(self) -> bool:
        return bool(self.destination) and (self.send_report or self.send_montage)

    @property
    def target(self) -> Destination:
        return parse_destination(self.destination)

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return _client_tls_context(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)

    @model_validator(mode="after")
    def _consistent(self) -> ResultsSettings:
        if self.retry_initial_s > self.retry_max_s:
            raise InvalidValue("retry_initial_s", self.retry_initial_s, "expected <= results.retry_max_s")
        if self.destination and not (self.send_report or self.send_montage):
            raise InvalidValue("send_report", False, "results.destination is set but nothing to send "
                                                     "(send_report and send_montage are both false)")
        if not self.tls:
            for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
                if getattr(self, key):
                    raise InvalidValue(key, getattr(self, key), "needs results.tls = true")
        self.tls_context()  # a typo in the TLS files is a start-up error, never a silently plain connection
        return self


class HttpSettings(Section):
    """The web view, ``/health`` and ``/metrics`` (:mod:`qc_daemon.web`): off unless enabled, loopback unless told."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0: any free port
    # Empty: no login. Set both for HTTP basic auth on every page but /health.
    username: str = ""
    password: SecretStr = SecretStr("")
    # Empty: none. Otherwise ``Authorization: Bearer <token>`` is accepted too (for a metrics scraper).
    token: SecretStr = SecretStr("")
    # Empty: plain HTTP. PEM certificate (chain) and its key for HTTPS.
    tls_cert_file: ExistingFile = ""
    tls_key_file: ExistingFile = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def protected(self) -> bool:
        return bool(self.username) or bool(self.token.get_secret_value())

    @model_validator(mode="after")
    def _pairs_set_together(self) -> HttpSettings:
        if bool(self.username) != bool(self.password.get_secret_value()):
            missing = "password" if self.username else "username"
            raise InvalidValue(missing, "", "http.username and http.password must be set together")
        _server_tls_context("http", self.tls_cert_file, self.tls_key_file)
        return self


class LoggingSettings(Section):
    format: LogFormat = LogFormat.AUTO
    level: LogLevel = LogLevel.INFO


class Settings(Section):
    dicom: DicomSettings = DicomSettings()
    storage: StorageSettings = Field(default_factory=StorageSettings)
    watch: WatchSettings = WatchSettings()
    assembly: AssemblySettings = AssemblySettings()
    scoring: ScoringSettings = ScoringSettings()
    alerts: AlertSettings = AlertSettings()
    results: ResultsSettings = ResultsSettings()
    http: HttpSettings = HttpSettings()
    logging: LoggingSettings = LoggingSettings()

    @property
    def node_name(self) -> str:
        """``storage.node_name``, else this host's name and the configured DICOM port (``mr-room-3:11112``)."""
        return self.storage.node_name or f"{socket.gethostname()}:{self.dicom.port}"


def load_settings(path: Path | None = None) -> Settings:
    """Read ``path`` (None: built-in defaults) into a validated :class:`Settings`."""
    return settings_from_dict({} if path is None else read_toml(path, SettingsError))


def settings_from_dict(raw: dict[str, Any]) -> Settings:
    return validate_toml(Settings, raw, SettingsError)
