"""The operator files: Prometheus rules, the Grafana dashboard, the runbook and compose.yaml."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from oncely.runtime.metric_names import METRICS, NAMES, series_base

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "examples" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "examples" / "grafana" / "oncely-dashboard.json"
README = ROOT / "README.md"

METRIC = re.compile(r"\boncely_[a-z0-9_]+")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `scripts/services.sh up` installs it (prometheus)")
    return path


def referenced(text: str) -> set[str]:
    return {series_base(name) for name in METRIC.findall(text)}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def test_metric_names_are_unique_and_follow_prometheus_conventions() -> None:
    assert len(NAMES) == len(METRICS)
    for metric in METRICS:
        assert re.fullmatch(r"oncely_[a-z_]+", metric.name)
        assert metric.name.endswith("_total") == (metric.kind == "counter"), metric.name
        if metric.kind == "histogram":
            assert metric.name.endswith("_seconds")
    assert series_base("oncely_handler_duration_seconds_bucket") == (
        "oncely_handler_duration_seconds"
    )
    assert series_base("oncely_messages_acked_total") == "oncely_messages_acked_total"


def test_alert_rules_parse_and_use_only_exported_metrics() -> None:
    rules = yaml.safe_load(RULES.read_text())
    (group,) = rules["groups"]
    names = [rule["alert"] for rule in group["rules"]]
    assert len(names) == len(set(names))
    for rule in group["rules"]:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        used = referenced(rule["expr"])
        assert used and used <= NAMES, (rule["alert"], used - NAMES)
    # The alerts the runbook promises.
    exprs = " ".join(rule["expr"] for rule in group["rules"])
    for metric in (
        "oncely_dead_letters_total",
        "oncely_duplicates_total",
        "oncely_store_errors_total",
        "oncely_consumer_lag",
    ):
        assert metric in exprs


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    tool = promtool()
    check = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [tool, "test", "rules", "alerts_test.yaml"],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_the_dashboard_parses_and_covers_every_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for expr in dashboard_exprs():
        used |= referenced(expr)
    assert used <= NAMES, used - NAMES
    assert NAMES <= used | referenced(RULES.read_text()), NAMES - used


def test_promtool_accepts_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, checked as a recording rule."""
    rules: list[dict[str, Any]] = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        query = expr.replace("$__rate_interval", "5m").replace("$handler", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": query.replace("$topic", ".*")})
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_runbook_explains_every_metric() -> None:
    text = README.read_text()
    section = text[text.index("## Operating oncely") :]
    section = section[: section.index("\n## ", 1)]
    missing = sorted(name for name in NAMES if f"`{name}`" not in section)
    assert not missing, missing
    assert "histogram_quantile(0.99" in section and "oncely_handler_duration_seconds" in section


# ------------------------------------------------------------------------- compose.yaml

SERVICES_SH = ROOT / "scripts" / "services.sh"
COMPOSE = ROOT / "compose.yaml"

# What each of services.sh's `*_up` steps runs, as a compose service (tools_up installs tools
# only: a browser and promtool for the tests, no service).
SERVICE_OF_STEP = {
    "rabbit_up": "rabbitmq",
    "pg_up": "postgres",
    "redis_up": "redis",
    "redis_cluster_up": "redis-cluster",
    "elasticmq_up": "elasticmq",
    "kafka_up": "kafka",
    "tools_up": None,
}
# Which compose service publishes each port services.sh binds.
SERVICE_OF_PORT = {
    "AMQP_PORT": "rabbitmq",
    "PG_PORT": "postgres",
    "REDIS_PORT": "redis",
    "REDIS_CLUSTER_PORTS": "redis-cluster",
    "ELASTICMQ_PORT": "elasticmq",
    "KAFKA_PORT": "kafka",
    "KAFKA_CONTROLLER_PORT": None,  # internal to the broker in both: checked below
}


def services_sh_ports() -> dict[str, list[int]]:
    script = SERVICES_SH.read_text()
    ports: dict[str, list[int]] = {}
    # A literal or a defaulted number (``${X:-9324}``); NODE_PORT=$AMQP_PORT is a reference.
    for name, value in re.findall(r"^([A-Z_]+_PORTS?)=(.+)$", script, re.M):
        if numbers := [int(p) for p in re.findall(r"\d+", value)]:
            ports[name] = numbers
    return ports


def published(service: dict[str, Any]) -> dict[int, str]:
    """Host port -> host address, from a compose service's ``ports``."""
    out: dict[int, str] = {}
    for spec in service.get("ports", []):
        host, host_ports, _container = str(spec).rsplit(":", 2)
        low, _, high = host_ports.partition("-")
        for port in range(int(low), int(high or low) + 1):
            out[port] = host
    return out


def test_compose_runs_every_service_of_services_sh_on_the_same_ports() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    script = SERVICES_SH.read_text()
    up = script[script.index("\nup)") : script.index(";;", script.index("\nup)"))]
    steps = re.findall(r"^\s+([a-z_]+_up)$", up, re.M)
    assert set(steps) == set(SERVICE_OF_STEP), "a new services.sh step needs a compose service"
    for step in steps:
        service = SERVICE_OF_STEP[step]
        if service is not None:
            assert service in compose, f"{step}: no {service} in compose.yaml"
            assert "healthcheck" in compose[service], service
    ports = services_sh_ports()
    assert set(ports) == set(SERVICE_OF_PORT), "a new port in services.sh needs a compose port"
    for var, numbers in ports.items():
        service = SERVICE_OF_PORT[var]
        if service is None:
            continue
        binds = published(compose[service])
        for port in numbers:
            assert binds.get(port) == "127.0.0.1", f"{service} does not publish {port} on loopback"
    kafka_env = compose["kafka"]["environment"]
    (controller,) = ports["KAFKA_CONTROLLER_PORT"]
    assert kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"].endswith(f":{controller}")
    assert kafka_env["KAFKA_ADVERTISED_LISTENERS"].endswith(f"127.0.0.1:{ports['KAFKA_PORT'][0]}")


def test_compose_uses_the_same_credentials_and_versions_as_services_sh() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    script = SERVICES_SH.read_text()
    pg = dict(re.findall(r"\b(PG_USER|PG_PASSWORD|PG_DB)=(\w+)", script))
    env = compose["postgres"]["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]) == (
        pg["PG_USER"],
        pg["PG_PASSWORD"],
        pg["PG_DB"],
    )
    # RabbitMQ: the image's default user is guest:guest, the one services.sh relies on.
    assert "amqp://guest:guest@127.0.0.1:5672/" in script
    assert "RABBITMQ_DEFAULT_USER" not in compose["rabbitmq"].get("environment", {})
    (elasticmq,) = re.findall(r"^ELASTICMQ_VERSION=(\S+)$", script, re.M)
    assert compose["elasticmq"]["image"].endswith(f":{elasticmq}")
    kafka = re.search(r"Apache Kafka (\d+\.\d+\.\d+)", script)
    assert kafka is not None and compose["kafka"]["image"].endswith(f":{kafka.group(1)}")
    consumer_timeout = re.search(r"RABBIT_CONSUMER_TIMEOUT_MS=(\d+)", script)
    assert consumer_timeout is not None
    rabbit_args = compose["rabbitmq"]["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]
    assert f"consumer_timeout {consumer_timeout.group(1)}" in rabbit_args


def test_readme_shows_both_ways_to_start_the_services() -> None:
    text = README.read_text()
    assert "scripts/services.sh up" in text and "docker compose up" in text
