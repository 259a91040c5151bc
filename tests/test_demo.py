"""The main job (README's first command) runs the whole story on the embedded default, with real agents."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from fleetward.sim.demo import run_demo
from fleetward.store.database import Database
from fleetward.store.schema import certificates, device_reports, devices, events, telemetry


def test_the_demo_runs_agents_that_enroll_report_and_are_refused_once_revoked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_demo(devices=3, data_dir=tmp_path)

    shown = " ".join(capsys.readouterr().out.split())  # Rich wraps lines at 80 columns
    assert "3 agents attested and earned certificates, and connected to the hub" in shown
    assert "panel-003's agent was refused by the hub and asked the authority: device_revoked" in shown
    assert "the cloud groups alike failures" in shown
    assert "device_unclaimed" in shown
    assert "measurement_below_floor" in shown
    assert "measurement_unknown" in shown
    assert "refused: certificate revoked" in shown
    assert "direct method read_power" in shown
    assert "3 received it" in shown
    assert "ended its live session" in shown
    assert "the rollout aborted itself in wave 1" in shown
    assert "the inverter calibration table is missing" in shown
    assert "Every panel still runs panel-monitor 2.1.0" in shown
    assert "every panel runs panel-monitor 2.2.1, kept after its trial" in shown
    assert "its panel-monitor phones home" in shown
    assert "quarantined" in shown
    assert "by the playbook: alert undeclared_destination (high)" in shown
    assert "was released by policy" in shown
    assert "No other panel was touched" in shown
    assert "hash-chained" in shown
    assert "verified." in shown
    database = Database(f"sqlite:///{tmp_path / 'fleetward.db'}")
    try:
        with database.read() as connection:
            claimed = connection.execute(sa.select(sa.func.count()).select_from(devices)).scalar_one()
            issued = connection.execute(sa.select(certificates.c.device_id, certificates.c.revoked_at)).all()
            refusals = connection.execute(
                sa.select(events.c.code).where(events.c.kind == "attestation", events.c.severity == "warning")
            ).scalars()
            assert claimed == 5  # three panels, the outdated one and the tampered one
            # three enrollments, one renewal, and an attestation after every update kept (the certificate
            # attests what runs), the rogue panel's remediation certificates among them
            assert len({row.device_id for row in issued}) == 3
            assert len(issued) >= 4 + 3
            # the revoked panel's certificates, and only its, are revoked
            assert len({row.device_id for row in issued if row.revoked_at is not None}) == 1
            assert sorted(refusals) == [
                "device_revoked",  # the revoked panel's agent, asking again once the hub refused it
                "device_unclaimed",
                "measurement_below_floor",
                "measurement_unknown",
            ]
            stored = connection.execute(sa.select(telemetry.c.properties)).scalars().all()
            # at least once: a reading in flight when a renewal reconnects the link comes again, same $.mid
            message_ids = {dict(json.loads(properties))["$.mid"] for properties in stored}
            assert len(message_ids) == 3 * 20
            kinds = connection.execute(sa.select(device_reports.c.kind)).scalars().all()
            crashes = connection.execute(
                sa.select(device_reports.c.signature, device_reports.c.device_id).where(
                    device_reports.c.kind == "crash"
                )
            ).all()
            # the segfault story: one problem on two devices; and the broken release's trial on one
            signatures = collections.Counter(row.signature for row in crashes)
            assert sorted(signatures.values()) == [1, 2]
            [segfault] = [signature for signature, count in signatures.items() if count == 2]
            assert len({row.device_id for row in crashes if row.signature == segfault}) == 2
            assert kinds.count("launch_refused") == 1
            assert "security-baseline" in kinds
    finally:
        database.dispose()
