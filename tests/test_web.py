"""The web view over real HTTP against a running daemon: /health, /metrics, the live stream, a series page."""

from __future__ import annotations

import base64
import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import send_datasets
from dicom_factory import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, classic_series, phantom
from prometheus_client.parser import text_string_to_metric_families


def _get(daemon, path: str, headers: dict | None = None, timeout_s: float = 10) -> tuple[int, dict, str]:
    status, headers, body = _get_bytes(daemon, path, headers, timeout_s)
    return status, headers, body.decode()


def _get_bytes(daemon, path: str, headers: dict | None = None, timeout_s: float = 10) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(daemon.web.url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


WEB = {"enabled": True, "port": 0}


def test_health_is_200_with_its_checks(daemon_factory):
    daemon = daemon_factory(http=WEB)
    status, headers, body = _get(daemon, "/health")
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["checks"] == {"listener": "ok", "model": "ok", "disk": "ok", "database": "ok"}
    assert "default-src 'none'" in headers["content-security-policy"]


def test_health_is_503_naming_the_disk_when_instances_would_be_refused(daemon_factory):
    daemon = daemon_factory(http=WEB, storage={"min_free_mb": 10**12})
    status, _, body = _get(daemon, "/health")
    assert status == 503
    assert json.loads(body)["failing"] == ["disk"]


def test_metrics_move_when_a_series_is_sent(daemon_factory):
    daemon = daemon_factory(http=WEB, alerts={"threshold": 1.0})
    _, _, before = _get(daemon, "/metrics")
    before = _samples(before)
    assert before.get(("qc_instances_received_total", (("source", "dicom"),)), 0) == 0
    assert before[("qc_series_total", (("status", "scored"),))] == 0
    series = classic_series(phantom((48, 48, 20)))
    assert send_datasets(series, daemon.port) == [0x0000] * 20
    assert daemon.wait_idle(60)

    status, headers, text = _get(daemon, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    after = _samples(text)
    assert after[("qc_instances_received_total", (("source", "dicom"),))] == 20
    assert after[("qc_series_total", (("status", "scored"),))] == 1
    assert after[("qc_alerts_raised_total", ())] == 1
    assert after[("qc_scoring_seconds_count", ())] == 1
    assert after[("qc_end_to_end_seconds_count", ())] == 1
    assert after[("qc_end_to_end_seconds_bucket", (("le", "+Inf"),))] == 1
    assert after[("qc_queue_depth", ())] == 0
    assert after[("qc_listener_up", ())] == 1
    assert after[("qc_disk_free_bytes", ())] > 0
    assert not any(series[0].SeriesInstanceUID in str(labels) for _, labels in after)


def test_refused_instances_are_counted_by_reason(daemon_factory):
    daemon = daemon_factory(http=WEB, dicom={"max_instance_mb": 1})
    too_large = classic_series(phantom((800, 800, 2)))[:1]  # 1.3 MB of pixels
    assert send_datasets(too_large, daemon.port) == [0xA700]
    samples = _samples(_get(daemon, "/metrics")[2])
    assert samples[("qc_instances_refused_total", (("reason", "out_of_resources"),))] == 1
    assert samples.get(("qc_instances_received_total", (("source", "dicom"),)), 0) == 0


def test_live_stream_sends_the_scored_row_and_pages_show_it(daemon_factory):
    daemon = daemon_factory(http=WEB, alerts={"threshold": 1.0})
    connection = socket.create_connection(("127.0.0.1", daemon.web.port), timeout=60)
    connection.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n")
    stream = connection.makefile("rb")
    assert b"200" in stream.readline()
    series = classic_series(phantom((48, 48, 20)))
    uid = str(series[0].SeriesInstanceUID)
    send_datasets(series, daemon.port)

    event = None
    for _ in range(2000):
        line = stream.readline().decode()
        if line.startswith("data: ") and '"status": "scored"' in line:
            event = json.loads(line[len("data: "):])
            break
    connection.close()
    assert event is not None and event["series_instance_uid"] == uid and event["alert"] is True
    assert event["url"] == f"/series/{uid}"

    status, headers, now = _get(daemon, "/")
    assert status == 200 and uid[-16:] in now and 'class="banner"' in now
    nonce = headers["content-security-policy"].split("'nonce-")[1].split("'")[0]
    assert f'src="/static/live.js" nonce="{nonce}"' in now
    assert _get(daemon, "/static/live.js")[0] == 200
    status, _, page = _get(daemon, f"/series/{uid}")
    assert status == 200 and "Revision 1: scored" in page and "patch scores" in page
    status, _, trends = _get(daemon, "/trends?since=1h&station=MR_TEST_1")
    assert status == 200 and "1 scored series" in trends and "MR_TEST_1" in trends
    for body in (now, page, trends):
        for secret in (PATIENT_NAME, "Doe", PATIENT_ID, BIRTH_DATE):
            assert secret not in body
    assert _get(daemon, "/series/1.2.3.4")[0] == 404
    assert _get(daemon, "/trends?since=yesterday")[0] == 400


def test_the_series_page_shows_montage_quality_map_and_iqms_and_serves_only_results_files(daemon_factory):
    from qc_daemon.store import SeriesResult, revisions

    daemon = daemon_factory(http=WEB)
    series = classic_series(phantom((48, 48, 20)))
    uid = str(series[0].SeriesInstanceUID)
    send_datasets(series, daemon.port)
    assert daemon.wait_idle(60)

    status, _, page = _get(daemon, f"/series/{uid}")
    assert status == 200
    assert f'<img src="/series/{uid}/1/montage.png"' in page
    assert f'href="/series/{uid}/1/quality_map.nii.gz" download' in page
    assert re.search(r'>snr_total</a></td><td class="num">[0-9.e+-]+</td>', page)
    assert re.search(r"<dt>Model score</dt><dd>[01]\.[0-9]{3}</dd>", page)
    assert re.search(r"<dt>N/2 ghost</dt><dd>[0-9.]+ % of the head's signal, (left-right|anterior-posterior|superior-"
                     r"inferior)</dd>", page)
    assert "<dt>k-space spike</dt><dd>none found</dd>" in page
    status, headers, png = _get_bytes(daemon, f"/series/{uid}/1/montage.png")
    assert status == 200 and headers["content-type"] == "image/png" and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert headers["content-disposition"].startswith("inline;")
    status, headers, nifti = _get_bytes(daemon, f"/series/{uid}/1/quality_map.nii.gz")
    assert status == 200 and nifti.startswith(b"\x1f\x8b")
    assert headers["content-disposition"] == f'attachment; filename="{uid}_r1_quality_map.nii.gz"'
    for body in (page, png.decode("latin-1")):
        for secret in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE):
            assert secret not in body

    state_dir = daemon.settings.storage.state_dir
    (daemon.settings.storage.results_path / "link.png").symlink_to("/etc/passwd")
    crafted = {2: "/etc/passwd", 3: str(state_dir / "qc.sqlite3"), 4: str(state_dir / "results" / "link.png"),
               5: str(state_dir / "results" / ".." / "qc.sqlite3")}
    with daemon.store.session() as session:
        scored = revisions(session, uid)[0]
        facts = {c.name: getattr(scored, c.name) for c in SeriesResult.__table__.columns if c.name != "id"}
        for revision, path in crafted.items():
            session.add(SeriesResult(**{**facts, "revision": revision, "montage_path": path,
                                        "quality_map_path": path, "iqms": {**scored.iqms, "cjv": None},
                                        "iqm_errors": {"cjv": "no air around the head"}}))
        session.commit()
    for revision in crafted:
        for name in ("montage.png", "quality_map.nii.gz"):
            status, _, body = _get(daemon, f"/series/{uid}/{revision}/{name}")
            assert status == 404 and "root:" not in body and "SQLite" not in body
    page = _get(daemon, f"/series/{uid}")[2]
    assert '<td class="num">—</td><td>no air around the head</td>' in page

    Path(scored.montage_path).unlink()  # as retention removes it
    assert _get(daemon, f"/series/{uid}/1/montage.png")[0] == 404
    assert _get(daemon, f"/series/{uid}/1/other.txt")[0] == 404
    assert _get(daemon, f"/series/{uid}/9/montage.png")[0] == 404


def test_trends_plot_an_iqm_without_threshold_line_and_refuse_an_unknown_metric(daemon_factory):
    daemon = daemon_factory(http=WEB)
    for _ in range(2):
        assert send_datasets(classic_series(phantom((48, 48, 20))), daemon.port) == [0x0000] * 20
    assert daemon.wait_idle(60)

    status, _, page = _get(daemon, "/trends?since=1h&metric=cjv")
    assert status == 200
    assert "cjv by station" in page and "2 of them with cjv" in page
    assert page.count('<svg class="chart"') == 2 and page.count("<circle ") == 4
    assert 'class="threshold"' not in page
    assert '<option selected>cjv</option>' in page
    status, _, page = _get(daemon, "/trends?since=1h")
    assert status == 200 and 'class="threshold"' in page and page.count("<circle ") == 4
    status, _, message = _get(daemon, "/trends?metric=bogus")
    assert status == 400 and "metric='bogus'" in message and "snr_total" in message


def test_login_and_token_protect_everything_but_health(daemon_factory):
    daemon = daemon_factory(http={**WEB, "username": "physicist", "password": "s3cret", "token": "scrape-me"})
    assert _get(daemon, "/")[0] == 401
    assert _get(daemon, "/metrics")[0] == 401
    assert _get(daemon, "/health")[0] == 200
    basic = "Basic " + base64.b64encode(b"physicist:s3cret").decode()
    wrong = "Basic " + base64.b64encode(b"physicist:guess").decode()
    assert _get(daemon, "/", {"Authorization": basic})[0] == 200
    assert _get(daemon, "/", {"Authorization": wrong})[0] == 401
    assert _get(daemon, "/metrics", {"Authorization": "Bearer scrape-me"})[0] == 200


def test_only_get(daemon_factory):
    daemon = daemon_factory(http=WEB)
    request = urllib.request.Request(daemon.web.url + "/health", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=10)
    assert exc.value.code == 405


def test_http_settings_are_validated_and_reported(tmp_path, capsys):
    from qc_daemon.cli import main
    from qc_daemon.settings import SettingsError, settings_from_dict

    with pytest.raises(SettingsError, match=r"http\.password = ''"):
        settings_from_dict({"http": {"username": "physicist"}})
    with pytest.raises(SettingsError, match=r"http\.port = 80800"):
        settings_from_dict({"http": {"port": 80800}})
    assert settings_from_dict({}).http.enabled is False and settings_from_dict({}).http.host == "127.0.0.1"
    config = tmp_path / "config.toml"
    config.write_text('[http]\nenabled = true\nport = 8181\ntoken = "t0ken"\n')
    assert main(["--config", str(config), "check-config"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed)["http"] == "http://127.0.0.1:8181 (bearer token; /health open)"
    assert "t0ken" not in printed


def test_a_busy_port_fails_serve_naming_the_http_section(tmp_path, capsys):
    from qc_daemon.cli import EXIT_CANNOT_LISTEN, main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        config = tmp_path / "config.toml"
        config.write_text(f'[dicom]\nport = 0\nhost = "127.0.0.1"\n[storage]\nstate_dir = "{tmp_path}/state"\n'
                          f'[http]\nenabled = true\nport = {busy.getsockname()[1]}\n')
        assert main(["--config", str(config), "serve"]) == EXIT_CANNOT_LISTEN
    assert "(set [http] host/port)" in capsys.readouterr().err


def test_the_web_view_reads_only_the_store_and_the_status_snapshot():
    import ast
    from pathlib import Path

    import qc_daemon.web

    forbidden = {"qc_daemon.listener", "qc_daemon.assembler", "qc_daemon.scorer", "qc_daemon.pipeline",
                 "qc_daemon.intake", "qc_daemon.service"}
    for path in Path(qc_daemon.web.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {node.module or ""}
            elif isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            else:
                continue
            assert not names & forbidden, f"{path.name} imports {names & forbidden}"
