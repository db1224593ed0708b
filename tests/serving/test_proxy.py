"""Where Serve's proxy listens vs. what the config asks (no Ray: the running proxy is given).

Issue 24: a redeploy with a new serve.host/port kept serving on the old one silently, and
``auth: none`` — refused for ``serve.host`` — was served on 0.0.0.0 by the shipped
``serve/config.yaml``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from raydb.config import ConfigError, ServeConfig, load_config
from raydb.serving.proxy import check_open_proxy, check_same_proxy

REPO = Path(__file__).resolve().parents[2]


def test_a_running_proxy_elsewhere_is_an_error_naming_both_places():
    cfg = ServeConfig(host="127.0.0.1", port=8001)
    check_same_proxy(cfg, None)  # Serve not running yet: it starts where the config says
    check_same_proxy(cfg, ("127.0.0.1", 8001))
    for proxy in [("127.0.0.1", 8000), ("0.0.0.0", 8001)]:
        with pytest.raises(ConfigError, match="serve.host/serve.port") as err:
            check_same_proxy(cfg, proxy)
        assert f"{proxy[0]}:{proxy[1]}" in str(err.value) and "127.0.0.1:8001" in str(err.value)
        assert "serve shutdown" in str(err.value)


def test_auth_none_is_refused_behind_a_proxy_that_is_not_on_loopback():
    open_cfg = ServeConfig(auth="none", host="127.0.0.1")
    for host in ("127.0.0.1", "::1", "localhost"):
        check_open_proxy(open_cfg, (host, 8000))
    check_open_proxy(open_cfg, None)
    check_open_proxy(ServeConfig(host="127.0.0.1"), ("0.0.0.0", 8000))  # api keys: any address
    with pytest.raises(ConfigError, match=r"serve.auth 'none'.*0\.0\.0\.0:8000"):
        check_open_proxy(open_cfg, ("0.0.0.0", 8000))


def test_the_shipped_serve_config_with_auth_none_is_refused():
    """``serve deploy serve/config.yaml`` binds the proxy on its http_options.host (0.0.0.0), which
    raydb's serve.host does not see: the ingress replica checks the proxy itself."""
    deploy = yaml.safe_load((REPO / "serve/config.yaml").read_text())
    http = deploy["http_options"]
    app_config = REPO / deploy["applications"][0]["args"]["config"]
    cfg = load_config(app_config, ["serve.auth=none"])  # passes: serve.host is loopback
    with pytest.raises(ConfigError, match="serve.auth 'none'"):
        check_open_proxy(cfg.serve, (http["host"], http["port"]))
    check_open_proxy(load_config(app_config).serve, (http["host"], http["port"]))  # as shipped: keys


def test_deploy_refuses_before_running_the_app(monkeypatch):
    """``raydb serve`` onto a cluster whose Serve proxy listens elsewhere: ConfigError, nothing run."""
    import ray.serve

    import raydb.cluster
    import raydb.serving.proxy
    from raydb.serving import deploy

    ran = []
    monkeypatch.setattr(raydb.cluster, "init_ray", lambda cfg: None)
    monkeypatch.setattr(ray.serve, "start", lambda **kw: None)
    monkeypatch.setattr(ray.serve, "run", lambda *a, **kw: ran.append(a))
    monkeypatch.setattr(raydb.serving.proxy, "running_proxy", lambda: ("127.0.0.1", 8000))
    with pytest.raises(ConfigError, match="serve.host/serve.port"):
        deploy(load_config(data={"serve": {"port": 8123}}))
    monkeypatch.setattr(raydb.serving.proxy, "running_proxy", lambda: ("0.0.0.0", 8123))
    with pytest.raises(ConfigError, match="serve.host/serve.port"):
        deploy(load_config(data={"serve": {"port": 8123, "auth": "none"}}))
    assert ran == []
    monkeypatch.setattr(raydb.serving.proxy, "running_proxy", lambda: ("127.0.0.1", 8123))
    monkeypatch.setattr("raydb.serving.build_application", lambda cfg: "app")
    deploy(load_config(data={"serve": {"port": 8123}}))
    assert ran == [("app",)]


def test_the_ingress_replica_refuses_to_start_open_behind_a_public_proxy(monkeypatch):
    """However the app was deployed (``serve deploy serve/config.yaml``, ``serve run``), the ingress
    replica asks Serve where its proxy listens before it takes a request."""
    from types import SimpleNamespace

    import ray.serve.context

    import raydb.serving.deployments as deployments

    # Serve holds a copy of the class (its own module globals): fake the controller it asks instead
    client = SimpleNamespace(http_config=SimpleNamespace(host="0.0.0.0", port=8000))
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda **kw: client)
    ingress_class = deployments.IngressDeployment.func_or_class
    config = load_config(data={"serve": {"auth": "none"}}).to_dict()
    replica = ingress_class.__new__(ingress_class)  # Serve awaits the wrapped __init__
    try:
        with pytest.raises(ConfigError, match=r"serve.auth 'none'.*0\.0\.0\.0:8000"):
            asyncio.run(asyncio.wait_for(ingress_class.__init__(replica, config, None), 30))
    finally:
        replica.__class__ = type("NeverStarted", (), {})  # no (async) __del__ of a half-made replica
