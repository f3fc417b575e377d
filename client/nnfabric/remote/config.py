"""Where a connection to the fabric comes from: arguments, else NNFABRIC_URL / NNFABRIC_API_KEY,
else the config file `nnfabric login` writes; and the default connection `remote=True` uses.

Usage::

    url, api_key = connection_settings()       # or connection_settings(url, api_key)
    write_config(url, api_key)                  # ~/.config/nnfabric/config.toml, mode 0600
    client = default_fabric()
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .http import FabricClient

_default: FabricClient | None = None


def config_path() -> Path:
    """~/.config/nnfabric/config.toml (or under $XDG_CONFIG_HOME), written by `nnfabric login`."""
    root = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(root) / "nnfabric" / "config.toml"


def read_config() -> dict[str, str]:
    import tomllib

    path = config_path()
    if not path.is_file():
        return {}
    with path.open("rb") as f:
        data = tomllib.load(f)
    return {k: str(v) for k, v in data.items() if k in ("url", "api_key")}


def write_config(url: str, api_key: str) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # JSON string escapes are valid TOML basic strings.
    text = f"url = {json.dumps(url)}\napi_key = {json.dumps(api_key)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the key is a secret
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def connection_settings(url: str | None = None, api_key: str | None = None) -> tuple[str, str]:
    """Each of url and api_key: the argument, else NNFABRIC_URL / NNFABRIC_API_KEY, else
    ~/.config/nnfabric/config.toml."""
    config = read_config()
    url = url or os.environ.get("NNFABRIC_URL") or config.get("url")
    api_key = api_key or os.environ.get("NNFABRIC_API_KEY") or config.get("api_key")
    if not url or not api_key:
        raise ValueError(
            "connect() needs a URL and an API key: pass them, set NNFABRIC_URL and NNFABRIC_API_KEY, "
            "or run `nnfabric login`"
        )
    return url, api_key


def set_default(client: FabricClient) -> None:
    global _default
    _default = client


def default_fabric() -> FabricClient:
    """The connection `remote=True` uses when a model names none: the last `connect()`, else one
    made from the environment or the config file."""
    if _default is None:
        set_default(FabricClient(*connection_settings()))
    assert _default is not None
    return _default
