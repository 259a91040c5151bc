"""The main job (README's first command) runs the whole story on the embedded default."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from fleetward.sim.demo import run_demo
from fleetward.store.database import Database
from fleetward.store.schema import certificates, devices, events, telemetry


def test_the_demo_enrolls_its_devices_refuses_the_bad_ones_and_revokes_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_demo(devices=3, data_dir=tmp_path)

    shown = " ".join(capsys.readouterr().out.split())  # Rich wraps lines at 80 columns
    assert "3 devices attested" in shown
    assert "device_unclaimed" in shown
    assert "measurement_below_floor" in shown
    assert "measurement_unknown" in shown
    assert "refused: certificate revoked" in shown
    assert "direct method read_power" in shown
    assert "3 received it" in shown
    assert "ended its live session" in shown
    database = Database(f"sqlite:///{tmp_path / 'fleetward.db'}")
    try:
        with database.read() as connection:
            claimed = connection.execute(sa.select(sa.func.count()).select_from(devices)).scalar_one()
            issued = connection.execute(sa.select(certificates.c.revoked_at)).all()
            refusals = connection.execute(
                sa.select(events.c.code).where(events.c.kind == "attestation", events.c.severity == "warning")
            ).scalars()
            assert claimed == 5  # three panels, the outdated one and the tampered one
            assert len(issued) == 4  # three enrollments and one renewal
            assert sum(row.revoked_at is not None for row in issued) == 1
            assert sorted(refusals) == ["device_unclaimed", "measurement_below_floor", "measurement_unknown"]
            readings = connection.execute(sa.select(sa.func.count()).select_from(telemetry)).scalar_one()
            assert readings == 3 * 20
    finally:
        database.dispose()
