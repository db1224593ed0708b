"""Where Ray Serve's HTTP proxy really listens, checked against what the config asks.

Serve starts its proxy once per cluster: a later ``serve.start`` with another host or port only
logs that the new options are ignored, and ``serve deploy`` takes them from the Serve config file
(``http_options``), never from raydb's ``serve`` section. Two holes followed: a redeploy with a new
``serve.port`` kept serving on the old one with no error, and ``serve.auth: none`` — refused unless
``serve.host`` is a loopback address — was still served on 0.0.0.0 by a Serve config that binds
there (the shipped ``serve/config.yaml`` does). So:

- :func:`check_same_proxy`: ``raydb serve`` refuses to deploy when the running proxy is not where
  ``serve.host`` / ``serve.port`` say;
- :func:`check_open_proxy`: the ingress replica refuses to start with ``auth: none`` behind a proxy
  that is not on a loopback address, however the app was deployed.
"""

from __future__ import annotations

from raydb.config import ConfigError, ServeConfig

__all__ = ["LOOPBACK_HOSTS", "running_proxy", "check_same_proxy", "check_open_proxy"]

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def running_proxy() -> tuple[str, int] | None:
    """``(host, port)`` Serve's HTTP proxies bind on this Ray cluster; None when Serve is not
    running. Needs a connected Ray (a driver, a task or a replica)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    http = client.http_config
    return str(http.host), int(http.port)


def check_same_proxy(serve_cfg: ServeConfig, proxy: tuple[str, int] | None) -> None:
    """ConfigError when Serve's proxy runs somewhere else than ``serve.host:serve.port``."""
    if proxy is None or proxy == (serve_cfg.host, serve_cfg.port):
        return
    host, port = proxy
    raise ConfigError(
        f"serve.host/serve.port: Ray Serve already runs on this cluster with its HTTP proxy on "
        f"{host}:{port}, and a running proxy does not move, so this app would not be served on "
        f"{serve_cfg.host}:{serve_cfg.port}. Stop Serve first (`serve shutdown`), or set serve.host: "
        f"{host} and serve.port: {port}")


def check_open_proxy(serve_cfg: ServeConfig, proxy: tuple[str, int] | None) -> None:
    """ConfigError for ``serve.auth: none`` behind a proxy that is not on a loopback address."""
    if serve_cfg.auth != "none" or proxy is None or proxy[0] in LOOPBACK_HOSTS:
        return
    raise ConfigError(
        f"serve.auth 'none' is only allowed on a loopback address, but Ray Serve's HTTP proxy binds "
        f"{proxy[0]}:{proxy[1]} (http_options.host of the Serve config, e.g. serve/config.yaml): the "
        "open API would be reachable from other machines. Use serve.auth: api_key, or bind the proxy "
        "to 127.0.0.1")
