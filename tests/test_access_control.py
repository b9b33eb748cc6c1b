"""Who may store: calling/called AE titles, peer addresses, the free-disk floor, and DICOM TLS.

Each refusal must be an A-ASSOCIATE-RJ (or, for TLS, no association at all) and leave nothing in the spool or
the database; the allowed senders must still get their series stored.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from conftest import make_settings
from dicom_factory import classic_series, phantom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from qc_daemon.listener import REJECT_NO_DISK, REJECT_PEER_NOT_ALLOWED
from qc_daemon.settings import SettingsError, settings_from_dict
from qc_daemon.store import SeriesStatus, history

REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED_AET = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised


def associate(port, *, calling="TEST_SCU", called="QC_DAEMON", tls_args=None):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)


def store_series(assoc, slices=3):
    """Send a short MR series on an established association; returns (statuses, series UID)."""
    assert assoc.is_established, "association was not established"
    series = classic_series(phantom((32, 32, slices)))
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in series]
    finally:
        assoc.release()
    return statuses, str(series[0].SeriesInstanceUID)


def rejection(assoc) -> tuple[int, int, int]:
    assert assoc.is_rejected, "association was not rejected"
    primitive = assoc.acceptor.primitive
    return primitive.result, primitive.result_source, primitive.diagnostic


def stored_nothing(daemon) -> bool:
    spool = daemon.spool.root
    series_dirs = [p for p in spool.iterdir() if p.name != ".incoming"]
    with daemon.store.session() as session:
        rows = list(history(session))
    nothing_incoming = not any(p.stat().st_size for p in daemon.spool.incoming.iterdir())  # empty: made ahead
    return not series_dirs and nothing_incoming and not rows


def recorded(daemon, series_uid):
    assert daemon.wait_idle(60)
    with daemon.store.session() as session:
        return [row for row in history(session) if row.series_instance_uid == series_uid]


# ---- AE titles and peers -------------------------------------------------------------------------------------


def test_calling_and_called_ae_titles(daemon_factory, log_stream):
    daemon = daemon_factory(dicom={"allowed_calling_aets": ["MR1", "ORTHANC"]})

    assert rejection(associate(daemon.port, calling="EVIL_SCU")) == REJECT_CALLING_AET
    assert rejection(associate(daemon.port, calling="MR1", called="NOT_QC")) == REJECT_CALLED_AET
    assert stored_nothing(daemon)

    statuses, uid = store_series(associate(daemon.port, calling="MR1"))
    assert statuses == [0, 0, 0]
    (row,) = recorded(daemon, uid)
    assert row.calling_ae == "MR1" and row.status is SeriesStatus.SKIPPED and row.instances == 3


def test_disallowed_peer_is_rejected(daemon_factory, log_stream):
    daemon = daemon_factory(dicom={"allowed_peers": ["10.9.9.9"]})
    assert rejection(associate(daemon.port)) == REJECT_PEER_NOT_ALLOWED
    assert stored_nothing(daemon)
    assert "peer address not allowed" in log_stream.getvalue()


def test_allowed_peer_network_may_store(daemon_factory):
    daemon = daemon_factory(dicom={"allowed_peers": ["10.9.9.9", "127.0.0.0/8", "::1"]})
    statuses, uid = store_series(associate(daemon.port))
    assert statuses == [0, 0, 0]
    assert recorded(daemon, uid)


# ---- free-disk floor -----------------------------------------------------------------------------------------


def test_free_disk_floor_rejects_associations(daemon_factory, log_stream):
    daemon = daemon_factory(storage={"min_free_mb": 10**9})  # a petabyte: never free, nothing to fill
    assert rejection(associate(daemon.port)) == REJECT_NO_DISK
    assert stored_nothing(daemon)
    assert "free disk below the floor" in log_stream.getvalue()


def test_free_disk_floor_refuses_instances_mid_association(daemon_factory):
    daemon = daemon_factory()
    assoc = associate(daemon.port)
    assert assoc.is_established
    daemon.intake.min_free_mb = 10**9  # the disk "fills up" while the association is open
    statuses, _ = store_series(assoc)
    assert statuses == [0xA700] * 3
    assert stored_nothing(daemon)


# ---- DICOM TLS -----------------------------------------------------------------------------------------------


class Pki:
    """A test CA, a server certificate for localhost/127.0.0.1, client certificates: from ours and a rogue CA."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ca_cert, self.ca_key = self._certificate("QC Test CA", issuer=None, ca=True)
        self.server_cert, self.server_key = self._certificate("localhost", issuer=(self.ca_cert, self.ca_key),
                                                              server=True)
        self.client_cert, self.client_key = self._certificate("MR1", issuer=(self.ca_cert, self.ca_key))
        rogue = self._certificate("Rogue CA", issuer=None, ca=True, name="rogue_ca")
        self.rogue_cert, self.rogue_key = self._certificate("MR1", issuer=rogue, name="rogue_client")

    def _certificate(self, common_name, issuer, ca=False, server=False, name=None):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        issuer_cert, issuer_key = issuer if issuer else (None, None)
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(_load_cert(issuer_cert).subject if issuer_cert else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        signing_key = _load_key(issuer_key) if issuer_key else key
        cert = builder.sign(signing_key, hashes.SHA256())
        stem = name or common_name.lower().replace(" ", "_")
        cert_path = self.folder / f"{stem}.crt"
        key_path = self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    def server_settings(self, with_ca: bool) -> dict:
        values = {"tls_cert_file": str(self.server_cert), "tls_key_file": str(self.server_key)}
        if with_ca:
            values["tls_ca_file"] = str(self.ca_cert)
        return values

    def client(self, cert=None, key=None) -> tuple[ssl.SSLContext, str]:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key))
        return context, "localhost"


def _load_cert(path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _load_key(path):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pytest.importorskip("cryptography")  # the dev extra; only the TLS tests need it
    return Pki(tmp_path_factory.mktemp("pki"))


def test_tls_listener_scores_a_series_and_refuses_plain_tcp(daemon_factory, pki):
    daemon = daemon_factory(dicom=pki.server_settings(with_ca=False))
    assert daemon.server.ssl_context.minimum_version >= ssl.TLSVersion.TLSv1_2

    plain = associate(daemon.port)
    assert not plain.is_established
    assert stored_nothing(daemon)

    assoc = associate(daemon.port, tls_args=pki.client())
    assert assoc.is_established
    series = classic_series(phantom((48, 48, 20)), spacing_mm=(2.0, 2.0, 2.0))
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in series] == [0] * 20
    finally:
        assoc.release()
    (row,) = recorded(daemon, str(series[0].SeriesInstanceUID))
    assert row.status is SeriesStatus.SCORED, row.reason


def test_tls_client_refuses_a_server_it_does_not_trust(daemon_factory, pki):
    daemon = daemon_factory(dicom=pki.server_settings(with_ca=False))
    untrusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.rogue_cert.parent /
                                                                                "rogue_ca.crt"))
    assert not associate(daemon.port, tls_args=(untrusting, "localhost")).is_established
    assert stored_nothing(daemon)


def test_mutual_tls_requires_a_client_certificate_from_the_ca(daemon_factory, pki):
    daemon = daemon_factory(dicom=pki.server_settings(with_ca=True))

    assert not associate(daemon.port, tls_args=pki.client()).is_established  # no client certificate
    assert not associate(daemon.port, tls_args=pki.client(pki.rogue_cert, pki.rogue_key)).is_established
    assert not associate(daemon.port).is_established  # plain TCP
    assert stored_nothing(daemon)

    statuses, uid = store_series(associate(daemon.port, calling="MR1",
                                           tls_args=pki.client(pki.client_cert, pki.client_key)))
    assert statuses == [0, 0, 0]
    (row,) = recorded(daemon, uid)
    assert row.calling_ae == "MR1" and row.instances == 3


def test_idle_connection_does_not_block_tls_clients(daemon_factory, pki):
    """A connection that never starts its TLS handshake must not hold up other scanners: pynetdicom wraps each
    accepted socket in its accept loop, where a blocking handshake would wait for the idle peer forever."""
    daemon = daemon_factory(dicom=pki.server_settings(with_ca=False))
    results = []
    idle = socket.create_connection(("127.0.0.1", daemon.port))
    try:
        time.sleep(0.2)
        sender = threading.Thread(target=lambda: results.append(store_series(associate(daemon.port,
                                                                                       tls_args=pki.client()))))
        sender.start()
        sender.join(15)
        blocked = sender.is_alive()
    finally:
        idle.close()  # unblocks a server stuck in the handshake, so that a failure fails instead of hanging
    sender.join(30)
    assert not blocked, "a TLS client waited behind an idle connection"
    assert results and results[0][0] == [0, 0, 0]


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"tls_cert_file": "/nonexistent/server.crt", "tls_key_file": "/nonexistent/server.key"},
         "dicom.tls_cert_file = '/nonexistent/server.crt': no such file"),
        ({"tls_key_file": "KEY"}, "dicom.tls_cert_file and dicom.tls_key_file must be set together"),
        ({"tls_ca_file": "CA"}, "dicom.tls_ca_file = "),
        ({"tls_cert_file": "CERT", "tls_key_file": "KEY", "tls_ca_file": "/nonexistent/ca.crt"},
         "dicom.tls_ca_file = '/nonexistent/ca.crt': no such file"),
        ({"tls_cert_file": "CA", "tls_key_file": "KEY"}, "cannot load the certificate and key"),
        ({"tls_cert_file": "CERT", "tls_key_file": "KEY", "tls_ca_file": "KEY"}, "dicom.tls_ca_file = "),
    ],
)
def test_tls_settings_are_checked_at_start_up(pki, tmp_path, values, named):
    paths = {"CERT": pki.server_cert, "KEY": pki.server_key, "CA": pki.ca_cert}
    values = {k: str(paths.get(v, v)) for k, v in values.items()}
    with pytest.raises(SettingsError) as info:
        settings_from_dict({"dicom": values})
    assert named in str(info.value)


def test_tls_settings_accept_valid_files(pki, tmp_path):
    settings = make_settings(tmp_path, dicom=pki.server_settings(with_ca=True))
    assert settings.dicom.tls and settings.dicom.tls_ca_file == str(pki.ca_cert)
