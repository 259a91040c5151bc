"""Where the CLI keeps the URL, token, tenant and CA file it calls the API with (a file of mode 0600)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fleetward.errors import ConfigurationError


def default_path() -> Path:
    configured = os.environ.get("FLEETWARD_CLI_CONFIG")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "fleetward" / "cli.json"


@dataclass(frozen=True)
class Profile:
    url: str = "https://127.0.0.1:8443"
    token: str | None = None
    tenant: str | None = None
    ca_file: str | None = None

    def __repr__(self) -> str:  # never print the token
        return f"Profile(url={self.url!r}, tenant={self.tenant!r}, ca_file={self.ca_file!r})"

    @classmethod
    def load(cls, path: Path) -> Profile:
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(**{key: data.get(key) for key in ("url", "token", "tenant", "ca_file") if key in data})
        except (ValueError, TypeError):
            raise ConfigurationError(f"{path} is not a fleetward CLI profile") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(asdict(self), handle, indent=2)
        path.chmod(0o600)

    def overridden(self, **values: str | None) -> Profile:
        return replace(self, **{key: value for key, value in values.items() if value is not None})
