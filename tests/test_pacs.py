"""The PACS batch job and DICOM node against a real Orthanc on loopback.

Every test starts its own Orthanc (Debian's orthanc + orthanc-dicomweb) on free ports with
its own storage, runs ``dicom-heatmap pacs ...`` in a child process as hospital IT would,
and checks what Orthanc holds afterwards through its REST API.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import ROOT, write_series
from orthanc import ORTHANC, Orthanc, free_port

OUR_AE = "DHEATMAP"
OUTPUTS_PER_CT = 6  # 4 SC slices + PM + SR
OUTPUTS_PER_SLIDE = 3


@pytest.fixture
def our_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path, our_port):
    if not Path(ORTHANC).exists():
        pytest.fail("Orthanc is not installed; `make test` installs Debian's orthanc and orthanc-dicomweb")
    server = Orthanc(tmp_path / "orthanc", OUR_AE, our_port).start()
    yield server
    server.stop(kill=True)


def write_config(path: Path, orthanc: Orthanc, our_port: int, protocol: str = "dimse", retrieve: str = "c-get",
                 work_dir: str = "work", extra: str = "") -> Path:
    if protocol == "dimse":
        pacs = (f"  protocol: dimse\n  ae_title: ORTHANC\n  host: 127.0.0.1\n  port: {orthanc.dicom_port}\n"
                f"  retrieve: {retrieve}\n  timeout: 10s\n")
    else:
        pacs = f"  protocol: dicomweb\n  url: {orthanc.url}/dicom-web\n  username: heatmap\n  password_env: DHM_TEST_PASSWORD\n"
    path.write_text(f"ae_title: {OUR_AE}\nport: {our_port}\nallowed_peers: [ORTHANC]\npacs:\n{pacs}"
                    f"work_dir: {work_dir}\nquiet: 1s\nretry:\n  backoff: 0\n  max_attempts: 3\n{extra}")
    return path


def run_pacs(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "pacs", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def start_pacs(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "pacs", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


def ct_study(folder: Path) -> tuple[str, list[Path]]:
    """A 4-slice CT series in a study of its own."""
    study = generate_uid()
    return study, write_series(folder, study_uid=study)


def upload_ct_studies(orthanc: Orthanc, folder: Path, count: int) -> list[str]:
    """``count`` CT series, each in a study of its own, uploaded; their study UIDs."""
    studies = []
    for index in range(count):
        study, files = ct_study(folder / f"ct{index}")
        orthanc.upload(*files)
        studies.append(study)
    return studies


def ledger_states(work_dir: Path) -> dict[str, str]:
    path = work_dir / "ledger.sqlite"
    if not path.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return dict(db.execute("SELECT series_uid, state FROM series").fetchall())
    except sqlite3.OperationalError:  # the schema is not written yet
        return {}


def wait_for(condition, timeout: float = 120, what: str = "condition", process: subprocess.Popen | None = None) -> None:
    """Wait until ``condition()``; fail at once, with its output, if ``process`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            stdout, stderr = process.communicate()
            raise AssertionError(f"{what}: the job ended (status {process.returncode}) first:\n{stdout}\n{stderr}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def accepts(assoc) -> bool:
    """Whether an association was accepted (released again at once)."""
    if assoc.is_established:
        assoc.release()
        return True
    return False


def verification_accepted(port: int) -> bool:
    """Whether our listener on ``port`` accepts an association (C-ECHO's context) from ORTHANC."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    return accepts(ae.associate("127.0.0.1", port, ae_title=OUR_AE))


def result_counts(orthanc: Orthanc) -> dict[str, int]:
    return {study: len(items) for study, items in orthanc.results_by_source().items()}


def test_poll_over_dimse_stores_results_once_in_each_source_study(tmp_path, orthanc, our_port, dciodvfy):
    ct_uid, ct_files = ct_study(tmp_path / "ct")
    slide = ROOT / "tests" / "data" / "wsi_lymph_node.dcm"
    slide_study = str(pydicom.dcmread(slide, stop_before_pixels=True).StudyInstanceUID)
    orthanc.upload(*ct_files, slide)
    config = write_config(tmp_path / "pacs.yaml", orthanc, our_port)

    first = run_pacs("poll", "--config", config)
    assert first.returncode == 0, first.stderr
    assert "2 analysed and stored" in first.stdout
    assert result_counts(orthanc) == {ct_uid: OUTPUTS_PER_CT, slide_study: OUTPUTS_PER_SLIDE}
    results = orthanc.results_by_source()[ct_uid]
    assert {r["Modality"] for r in results} == {"OT", "SR"}
    sr_id = next(i for i in orthanc.get("/instances")
                 if orthanc.get(f"/instances/{i}/simplified-tags")["Modality"] == "SR")
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(orthanc.raw(f"/instances/{sr_id}/file"))
    assert dciodvfy(sr_path) == []
    total = len(orthanc.get("/instances"))

    again = run_pacs("poll", "--config", config)
    assert again.returncode == 0, again.stderr
    assert "0 analysed and stored, 2 already done" in again.stdout
    assert len(orthanc.get("/instances")) == total

    # forced, and retrieved by C-MOVE to our own SCP this time: same UIDs, so nothing new
    write_config(config, orthanc, our_port, retrieve="c-move")
    forced = run_pacs("poll", "--config", config, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "2 analysed and stored" in forced.stdout
    assert len(orthanc.get("/instances")) == total

    status = run_pacs("status", "--config", config)
    assert status.returncode == 0
    assert status.stdout.count(" stored ") == 2 and "total: 2 stored" in status.stdout
    assert not any((tmp_path / "work" / "tmp").glob("*")), "temporary files left behind"


def test_poll_over_dicomweb_stores_results_and_keeps_the_password_out_of_everything(tmp_path, orthanc, our_port):
    ct_uid, ct_files = ct_study(tmp_path / "ct")
    slide = ROOT / "tests" / "data" / "wsi_lymph_node.dcm"
    slide_study = str(pydicom.dcmread(slide, stop_before_pixels=True).StudyInstanceUID)
    orthanc.upload(*ct_files, slide)
    config = write_config(tmp_path / "pacs.yaml", orthanc, our_port, protocol="dicomweb")

    missing = run_pacs("poll", "--config", config)
    assert missing.returncode == 2 and "DHM_TEST_PASSWORD is not set" in missing.stderr
    wrong = run_pacs("poll", "--config", config, env={"DHM_TEST_PASSWORD": "wrong"})
    assert wrong.returncode == 2 and "refused our credentials (HTTP 401)" in wrong.stderr

    done = run_pacs("poll", "--config", config, env={"DHM_TEST_PASSWORD": orthanc.password})
    assert done.returncode == 0, done.stderr
    assert result_counts(orthanc) == {ct_uid: OUTPUTS_PER_CT, slide_study: OUTPUTS_PER_SLIDE}
    for text in (missing.stdout + missing.stderr, wrong.stdout + wrong.stderr, done.stdout + done.stderr,
                 (tmp_path / "work" / "ledger.sqlite").read_bytes().decode("latin-1")):
        assert orthanc.password not in text
    # QIDO-RS asks for the one media type Orthanc's plugin takes
    assert "Unsupported return MIME type" not in (orthanc.folder / "orthanc.log").read_text(errors="replace")


def test_a_poll_that_finds_nothing_says_what_it_asked(tmp_path, orthanc, our_port):
    config = write_config(tmp_path / "pacs.yaml", orthanc, our_port,
                          extra="query:\n  modalities: [MR]\n  study_date: 19990101-19990102\n")
    done = run_pacs("poll", "--config", config)
    assert done.returncode == 0, done.stderr
    assert "found 0 series" in done.stdout
    assert f"asked PACS ORTHANC@127.0.0.1:{orthanc.dicom_port} by C-FIND at series level for modalities MR, " \
           "study date 19990101-19990102" in done.stdout, done.stdout


def test_poll_every_picks_up_new_series_and_stops_cleanly_on_sigterm(tmp_path, orthanc, our_port):
    first_study, first_files = ct_study(tmp_path / "ct0")
    orthanc.upload(*first_files)
    config = write_config(tmp_path / "pacs.yaml", orthanc, our_port)
    job = start_pacs("poll", "--config", config, "--every", "1s")
    try:
        wait_for(lambda: result_counts(orthanc).get(first_study) == OUTPUTS_PER_CT, what="the first series' results", process=job)
        second_study, second_files = ct_study(tmp_path / "ct1")
        orthanc.upload(*second_files)
        wait_for(lambda: result_counts(orthanc).get(second_study) == OUTPUTS_PER_CT, what="the second series' results", process=job)
    finally:
        job.send_signal(signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 0, stderr
    assert "found 2 series: 1 analysed and stored, 1 already done" in stderr
    assert set(ledger_states(tmp_path / "work").values()) == {"stored"}


def test_a_job_killed_mid_batch_finishes_every_series_exactly_once(tmp_path, orthanc, our_port):
    studies = upload_ct_studies(orthanc, tmp_path, 4)
    config = write_config(tmp_path / "pacs.yaml", orthanc, our_port)
    work = tmp_path / "work"

    job = start_pacs("poll", "--config", config, "--quiet")
    wait_for(lambda: "stored" in ledger_states(work).values() or job.poll() is not None, what="a first stored series")
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    states = ledger_states(work)
    assert list(states.values()).count("stored") < 4, "the batch finished before the kill; nothing was tested"
    assert {"retrieving", "analysing", "storing"} & set(states.values()), "no series was in progress at the kill"

    resumed = run_pacs("poll", "--config", config)
    assert resumed.returncode == 0, resumed.stderr
    assert set(ledger_states(work).values()) == {"stored"}
    assert result_counts(orthanc) == {study: OUTPUTS_PER_CT for study in studies}
    assert not any((work / "tmp").glob("*")), "temporary files left behind"
    with sqlite3.connect(work / "ledger.sqlite") as db:
        resumed_events = db.execute("SELECT COUNT(*) FROM events WHERE detail = 'interrupted; resumed'").fetchone()[0]
    assert resumed_events >= 1


def test_archive_down_mid_run_is_retried_and_completes_when_back(tmp_path, orthanc, our_port):
    studies = upload_ct_studies(orthanc, tmp_path, 2)
    config = write_config(tmp_path / "pacs.yaml", orthanc, our_port)
    work = tmp_path / "work"

    job = start_pacs("poll", "--config", config, "--quiet")
    wait_for(lambda: "analysing" in ledger_states(work).values() or job.poll() is not None, what="an analysis")
    orthanc.stop(kill=True)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "error: PACS ORTHANC@127.0.0.1" in stderr and "tried again by the next run" in stderr
    assert "stored" not in ledger_states(work).values()

    orthanc.start()
    again = run_pacs("poll", "--config", config)
    assert again.returncode == 0, again.stderr
    assert set(ledger_states(work).values()) == {"stored"}
    assert result_counts(orthanc) == {study: OUTPUTS_PER_CT for study in studies}
    with sqlite3.connect(work / "ledger.sqlite") as db:
        attempts = dict(db.execute("SELECT series_uid, attempts FROM series").fetchall())
    assert max(attempts.values()) == 1  # the outage counted once, for the series it hit


def test_a_corrupt_series_is_recorded_as_failed_and_the_batch_completes(tmp_path, orthanc, our_port):
    good_study, good_files = ct_study(tmp_path / "good")
    bad_study, bad_files = ct_study(tmp_path / "bad")
    for path in bad_files:  # pixel data cut in half: Orthanc stores it, a reader cannot use it
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.save_as(path)
    orthanc.upload(*good_files, *bad_files)
    config = write_config(tmp_path / "pacs.yaml", orthanc, our_port)

    first = run_pacs("poll", "--config", config, "--workers", "2")
    assert first.returncode == 2
    assert "1 analysed and stored" in first.stdout and "1 failed" in first.stdout
    assert "Traceback" not in first.stderr
    assert result_counts(orthanc) == {good_study: OUTPUTS_PER_CT}
    status = run_pacs("status", "--config", config, "--state", "failed")
    assert "pixel data" in status.stdout.lower() and "total: 1 failed, 1 stored" in status.stdout

    second = run_pacs("poll", "--config", config)
    assert "1 already done" in second.stdout and "1 failed earlier (not retried)" in second.stdout


def test_listen_analyses_a_received_series_and_refuses_strangers(tmp_path, orthanc, our_port):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    study, files = ct_study(tmp_path / "ct")
    config = write_config(tmp_path / "pacs.yaml", orthanc, our_port)
    node = start_pacs("listen", "--config", config)
    try:
        def associate(calling: str, called: str = OUR_AE):
            ae = AE(ae_title=calling)
            ae.add_requested_context(CTImageStorage)
            ae.add_requested_context(Verification)
            return ae.associate("127.0.0.1", our_port, ae_title=called)

        wait_for(lambda: accepts(associate("ORTHANC")), what="the listener to accept associations", process=node)
        stranger = associate("STRANGER")
        assert stranger.is_rejected
        wrong_called = associate("ORTHANC", "SOMEONE")
        assert wrong_called.is_rejected

        assoc = associate("ORTHANC")
        statuses = [assoc.send_c_store(pydicom.dcmread(path)).Status for path in files]
        assoc.release()
        assert statuses == [0] * len(files)
        wait_for(lambda: result_counts(orthanc).get(study) == OUTPUTS_PER_CT, what="the results in Orthanc", process=node)
    finally:
        node.send_signal(signal.SIGTERM)
        stdout, stderr = node.communicate(timeout=60)
    assert node.returncode == 0, stderr
    assert "refused an association" in stderr and "STRANGER" in stderr
    assert "called AE 'SOMEONE'" in stderr  # what the peer asked for, not our own title
    assert not any((tmp_path / "work" / "received").glob("*")), "received instances left after their results were stored"


def test_listen_over_tls_accepts_only_tls_peers(tmp_path, orthanc, our_port):
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    key, cert = tmp_path / "node.key", tmp_path / "node.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=dicom-heatmap-test"], check=True, capture_output=True)
    study, files = ct_study(tmp_path / "ct")
    config = write_config(tmp_path / "pacs.yaml", orthanc, our_port,
                          extra=f"tls:\n  ca_file: {cert}\n  cert_file: {cert}\n  key_file: {key}\n")
    node = start_pacs("listen", "--config", config)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client.check_hostname = False
    client.load_cert_chain(str(cert), str(key))
    try:
        def associate(tls: bool):
            ae = AE(ae_title="ORTHANC")
            ae.add_requested_context(CTImageStorage)
            return ae.associate("127.0.0.1", our_port, ae_title=OUR_AE, tls_args=(client, None) if tls else None)

        wait_for(lambda: accepts(associate(tls=True)), what="the listener to accept TLS associations", process=node)
        assert not associate(tls=False).is_established
        assoc = associate(tls=True)
        assert [assoc.send_c_store(pydicom.dcmread(path)).Status for path in files] == [0] * len(files)
        assoc.release()
        wait_for(lambda: result_counts(orthanc).get(study) == OUTPUTS_PER_CT, what="the results in Orthanc", process=node)
    finally:
        node.send_signal(signal.SIGTERM)
        stdout, stderr = node.communicate(timeout=60)
    assert node.returncode == 0, stderr


def test_a_dask_cluster_gives_the_same_results_as_one_process(tmp_path, orthanc, our_port):
    from distributed import LocalCluster

    studies = upload_ct_studies(orthanc, tmp_path, 2)
    single = run_pacs("poll", "--config", write_config(tmp_path / "single.yaml", orthanc, our_port, work_dir="single"))
    assert single.returncode == 0, single.stderr
    expected = parametric_maps(orthanc)
    for tags in orthanc.instances():  # take the results out again; the sources stay
        if tags.get("Manufacturer") == "dicom-heatmap":
            orthanc.delete_instance(tags["SOPInstanceUID"])
    assert result_counts(orthanc) == {}

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        config = write_config(tmp_path / "dask.yaml", orthanc, our_port, work_dir="dask")
        spread = run_pacs("poll", "--config", config, "--dask-scheduler", cluster.scheduler_address)
    assert spread.returncode == 0, spread.stderr
    assert result_counts(orthanc) == {study: OUTPUTS_PER_CT for study in studies}
    found = parametric_maps(orthanc)
    assert found.keys() == expected.keys()
    for uid, scores in expected.items():
        np.testing.assert_array_equal(found[uid], scores)


def parametric_maps(orthanc: Orthanc) -> dict[str, np.ndarray]:
    """The score arrays of every Parametric Map in Orthanc, by SOP Instance UID."""
    from io import BytesIO

    maps = {}
    for instance_id in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{instance_id}/simplified-tags")
        if tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.30":
            ds = pydicom.dcmread(BytesIO(orthanc.raw(f"/instances/{instance_id}/file")))
            maps[tags["SOPInstanceUID"]] = ds.pixel_array
    return maps


@pytest.mark.parametrize("text, message", [
    ("ae_title: DHEATMAP\nwork_dir: w\npacs: {protocol: dimse, host: h, port: 104}\n", "pacs.ae_title: required"),
    ("ae_title: DHEATMAP\nwork_dir: w\npacs: {ae_title: PACS, host: h, port: 70000}\n", "pacs.port: 70000 is not allowed"),
    ("ae_title: WAY_TOO_LONG_AE_TITLE\nwork_dir: w\npacs: {ae_title: PACS, host: h, port: 104}\n", "ae_title: an AE title"),
    ("ae_title: DHEATMAP\nwork_dir: w\npacs: {ae_title: PACS, host: h, port: 104}\nquery: {modality: CT}\n",
     "unknown key 'modality'"),
    ("ae_title: DHEATMAP\nwork_dir: w\npacs: {protocol: dicomweb, url: 'http://u:p@h/dicom-web'}\n",
     "put no credentials in the URL"),
    ("ae_title: [unclosed\n", "not valid YAML at line"),
    # what the schema and the strict YAML reading refuse (each was once read as something else)
    ("ae_title: DHEATMAP\nwork_dir: w\nport: true\npacs: {ae_title: PACS, host: h, port: 104}\n", "port: True is not allowed"),
    ("ae_title: DHEATMAP\nwork_dir: w\npacs: {ae_title: PACS, host: h, port: 104, timeout: 0}\n",
     "pacs.timeout: 0 is not allowed here (a duration above 0"),
    ("ae_title: DHEATMAP\nwork_dir: w\npacs: {ae_title: PACS, host: h, port: 104}\nanalysis: {rotate: .inf}\n",
     "analysis.rotate: inf is not allowed"),
    ("ae_title: DHEATMAP\nwork_dir: w\npacs: {ae_title: PACS, host: h, port: 104}\nretry: {max_attempts: .inf}\n",
     "retry.max_attempts: inf is not allowed"),
    ("ae_title: DHEATMAP\nwork_dir: w\npacs: {ae_title: PACS, host: h, port: 104}\nquery: {study_date: 20260230}\n",
     "20260230 is no date of the calendar"),
    ("ae_title: DHEATMAP\nwork_dir: w\npacs: {ae_title: PACS, host: h, port: 104}\nquery: {study_date: last 99999 days}\n",
     "at most 'last 36500 days'"),
    ("ae_title: DHEATMAP\nwork_dir: w\npacs: {ae_title: PACS, host: h, port: 104}\nquery: {study_date: last 9999999999 days}\n",
     "expected YYYYMMDD"),
    ("ae_title: DHEATMAP\nwork_dir: w\nwork_dir: v\npacs: {ae_title: PACS, host: h, port: 104}\n", "'work_dir' appears twice"),
    ("a: &a [x, x, x]\nb: [*a, *a, *a]\n", "anchors and aliases are not allowed"),
])
def test_a_wrong_configuration_is_named_by_file_and_key(tmp_path, capsys, text, message):
    from pipelines.cli import main

    config = tmp_path / "pacs.yaml"
    config.write_text(text)
    assert main(["pacs", "status", "--config", str(config)]) == 2
    stderr = capsys.readouterr().err
    assert str(config) in stderr and message in stderr
    assert "Traceback" not in stderr


def test_the_ledger_backs_off_transient_faults_and_gives_up_after_max_attempts(tmp_path):
    from pipelines.pacs.config import RetryPolicy
    from pipelines.pacs.ledger import FAILED, SEEN, Ledger, SeriesRef

    ledger = Ledger(tmp_path / "ledger.sqlite")
    policy = RetryPolicy(max_attempts=3, backoff_s=10, backoff_max_s=25)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [10, 20, 25, 25]
    ledger.add(SeriesRef("1.2", "1.2.3", "CT", 4), "poll")
    assert ledger.record_failure("1.2.3", "PACS down", False, 3, policy.delay(1)) == SEEN
    assert ledger.due() == []  # waiting for its retry time
    assert [row.series_uid for row in ledger.due(time.time() + 11)] == ["1.2.3"]
    assert ledger.record_failure("1.2.3", "PACS down", False, 3, policy.delay(2)) == SEEN
    assert ledger.record_failure("1.2.3", "PACS down", False, 3, policy.delay(3)) == FAILED
    ledger.add(SeriesRef("1.2", "1.2.4", "CT", 4), "poll")
    assert ledger.record_failure("1.2.4", "pixel data too short", True, 3, 0) == FAILED  # permanent: at once
    assert ledger.get("1.2.4").attempts == 1 and ledger.get("1.2.4").last_error == "pixel data too short"


def test_the_readme_example_configuration_and_rules_work(tmp_path):
    import datetime as dt
    import re

    from pipelines.pacs.config_file import load_config
    from pipelines.pacs.ledger import SeriesRef

    section = (ROOT / "README.md").read_text().split("## Run next to a PACS")[1].split("\n## ")[0]
    config_text, rules_text = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert config_text == (ROOT / "docs" / "pacs.example.yaml").read_text()
    (tmp_path / "rules.yaml").write_text(rules_text)
    (tmp_path / "pacs.yaml").write_text(re.sub(r"# rules: \S+", "rules: rules.yaml", config_text))
    config = load_config(tmp_path / "pacs.yaml")
    assert config.bind == "127.0.0.1" and config.allowed_peers == ("ORTHANC",)
    assert config.query.date_range(dt.date(2026, 3, 3)) == "20260224-20260303"
    cases = {
        SeriesRef("1", "2", "SM"): True,
        SeriesRef("1", "2", "CT", 40, "Scout 0.5", "BREAST"): False,
        SeriesRef("1", "2", "CT", 40, "Axial", "breast"): True,
        SeriesRef("1", "2", "CT", 5, "Axial", "BREAST"): False,
        SeriesRef("1", "2", "MR", 40, "T1", "HEAD"): False,
    }
    assert {series: config.query.selects(series) for series in cases} == cases


@contextlib.contextmanager
def running_listener(tmp_path: Path, orthanc: Orthanc, our_port: int, connections: list):
    """``pacs listen`` accepting associations; on leaving, ``connections`` are closed and the
    listener stopped."""
    config = write_config(tmp_path / "pacs.yaml", orthanc, our_port)
    node = start_pacs("listen", "--config", config)
    try:
        wait_for(lambda: verification_accepted(our_port), what="the listener to accept associations", process=node)
        yield node
    finally:
        for connection in connections:
            connection.close()
        node.send_signal(signal.SIGTERM)
        node.communicate(timeout=60)


def test_silent_connections_do_not_block_the_listener(tmp_path, orthanc, our_port):
    """Ten TCP connections that send part of a PDU and go quiet (slowloris) must neither
    block real associations nor hold their slots for long."""
    import socket

    silent = []
    with running_listener(tmp_path, orthanc, our_port, silent):
        for _ in range(12):
            connection = socket.create_connection(("127.0.0.1", our_port))
            connection.sendall(b"\x01\x00\x00\x00\x00\x00")  # the start of an A-ASSOCIATE-RQ, then nothing
            silent.append(connection)
        started = time.monotonic()
        assert verification_accepted(our_port), "a real association was refused while silent connections were open"
        assert time.monotonic() - started < 5


def test_half_sent_requests_and_huge_pdus_cannot_exhaust_the_listener(tmp_path, orthanc, our_port):
    """70 connections that each send part of an A-ASSOCIATE-RQ and then a byte now and then
    hold no slot past the handshake limit, and a peer announcing a 4 GB PDU before any
    association is cut off at the PDU's header, nothing of it read."""
    import socket
    import struct

    from pipelines.pacs.dimse import HANDSHAKE_TIMEOUT_S

    partial = []
    with running_listener(tmp_path, orthanc, our_port, partial):
        for _ in range(70):
            connection = socket.create_connection(("127.0.0.1", our_port))
            connection.sendall(b"\x01\x00" + struct.pack(">L", 200) + b"\x00\x01\x00\x00")  # 4 of 200 bytes
            partial.append(connection)
        dripped = time.monotonic() + HANDSHAKE_TIMEOUT_S + 2
        while time.monotonic() < dripped:  # a byte now and then: no read of them ever waits long
            for connection in partial:
                try:
                    connection.sendall(b"A")
                except OSError:
                    pass
            time.sleep(0.5)
        assert verification_accepted(our_port), "half-sent association requests still held the listener's slots"
        huge = socket.create_connection(("127.0.0.1", our_port))
        partial.append(huge)
        huge.settimeout(10)
        huge.sendall(b"\x01\x00" + struct.pack(">L", 4_000_000_000))
        time.sleep(1)
        with pytest.raises(OSError):  # the listener closed the connection instead of reading on
            for _ in range(256):
                huge.sendall(bytes(1 << 20))
        assert verification_accepted(our_port)


def test_configuration_files_that_are_not_what_they_seem_are_refused(tmp_path, capsys):
    from pipelines.cli import main

    base = "ae_title: DHEATMAP\nwork_dir: w\npacs: {ae_title: PACS, host: h, port: 104}\n"
    cases = {
        "latin1.yaml": (base.encode() + "query: {series_description: 'Thorax \xe9'}\n".encode("latin-1"), "is not UTF-8 text"),
        "rules.yaml": ((base + "query: {rules: r.yaml}\n").encode(), "rule 1.exclude: 'false' is not allowed"),
        "tls.yaml": ((base + "tls: {ca_file: ca.pem, cert_file: ca.pem, key_file: ca.pem}\n").encode(),
                     "the certificates cannot be used"),
    }
    (tmp_path / "r.yaml").write_text("- {modalities: [CT], exclude: 'false'}\n")  # a string, not false
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert main(["pacs", "status", "--config", str(tmp_path / name)]) == 2
        stderr = capsys.readouterr().err
        assert message in stderr and stderr.count("\n") == 1, (name, stderr)
