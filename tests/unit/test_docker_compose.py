"""docker-compose.yml and docker/Dockerfile: the stack is wired together consistently.

There is no Docker engine in the test environment, so these tests read the files and check what
a user of `docker compose up` relies on: the services exist, every address a service is given
names a service and a port that service listens on, volumes and dependencies resolve, and the
runbus image contains the installed package."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"

RUNBUS_SERVICES = ("scheduler", "worker-1", "worker-2", "projector")
WORKERS = ("worker-1", "worker-2")
LOCAL_HOSTS = ("localhost", "127.0.0.1")


# ------------------------------------------------------------------------------------ helpers ---

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), "docker-compose.yml is not a YAML mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as strings (compose accepts a mapping or a list of K=V)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def command(service: dict[str, Any]) -> list[str]:
    raw = service.get("command") or []
    return shlex.split(raw) if isinstance(raw, str) else [str(part) for part in raw]


def listeners(value: str) -> list[tuple[str, str, int]]:
    """'NAME://host:port,...' as (NAME, host, port); an empty host means all interfaces."""
    parsed = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        match = re.fullmatch(r"([A-Za-z0-9_]+)://(\[[^\]]*\]|[^:]*):(\d+)", item)
        assert match, f"listener {item!r} is not NAME://host:port"
        parsed.append((match[1], match[2], int(match[3])))
    return parsed


def kafka_urls(value: str) -> list[tuple[str, int]]:
    """'kafka://host:port[,host:port]' as (host, port) pairs."""
    assert value.startswith("kafka://"), value
    pairs = []
    for item in value.removeprefix("kafka://").split(","):
        host, _, port = item.strip().rpartition(":")
        assert host and port.isdigit(), f"{item!r} in {value!r} is not host:port"
        pairs.append((host, int(port)))
    return pairs


def port_mappings(service: dict[str, Any]) -> list[tuple[str | None, int | None, int]]:
    """(host ip, published port, container port) for `ports`; `expose` entries are unpublished."""
    mappings: list[tuple[str | None, int | None, int]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published = entry.get("published")
            mappings.append((entry.get("host_ip"), int(published) if published else None, int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) == 3:
            mappings.append((parts[0] or None, int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            mappings.append((None, int(parts[0]), int(parts[1])))
        else:
            mappings.append((None, None, int(parts[0])))
    for entry in service.get("expose") or []:
        mappings.append((None, None, int(str(entry).split("/")[0])))
    return mappings


def container_ports(service: dict[str, Any]) -> set[int]:
    return {target for _, _, target in port_mappings(service)}


def mounts(service: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """(type, source, target) of the service's volumes; type is 'volume' (named), 'bind' or 'tmpfs'."""
    parsed = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            parsed.append((entry.get("type", "volume"), entry.get("source"), entry["target"]))
            continue
        parts = str(entry).split(":")
        if len(parts) == 1:
            parsed.append(("volume", None, parts[0]))  # anonymous volume
            continue
        source, target = parts[0], parts[1]
        kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
        parsed.append((kind, source, target))
    return parsed


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return {name: {"condition": "service_started"} for name in raw}
    return {name: spec or {"condition": "service_started"} for name, spec in raw.items()}


def network_names(services: dict[str, dict[str, Any]], name: str) -> set[str]:
    """The names other containers reach service `name` by: the service name and its hostname."""
    service = services[name]
    return {name, *([service["hostname"]] if service.get("hostname") else [])}


def kafka_service_for(services: dict[str, dict[str, Any]], host: str) -> str:
    matches = [name for name in services if host in network_names(services, name)]
    assert matches, f"no service is reachable as {host!r} (services: {sorted(services)})"
    return matches[0]


def runbus_bus_users(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: env(svc)["RUNBUS_BUS"] for name, svc in services.items()
            if env(svc).get("RUNBUS_BUS", "").startswith("kafka://")}


def named_volume_at(service: dict[str, Any], path: str) -> str:
    """The named volume holding `path` in the container (the mount with the longest matching target)."""
    best: tuple[str, str | None, str] | None = None
    for mount in mounts(service):
        target = mount[2].rstrip("/") or "/"
        if (path == target or path.startswith(target.rstrip("/") + "/")) and (
                best is None or len(target) > len(best[2])):
            best = mount
    assert best is not None, f"{path} is not on any mounted volume, so it is lost with the container"
    kind, source, _ = best
    assert kind == "volume" and source, f"{path} is on a {kind} mount, not a named volume"
    return source


# ---------------------------------------------------------------------------------- the file ---

def test_compose_file_follows_the_compose_spec_without_the_obsolete_version_key(compose):
    assert "version" not in compose
    assert isinstance(compose.get("services"), dict)


def test_stack_has_kafka_scheduler_two_workers_and_the_projector(services):
    assert {"kafka", "scheduler", "worker-1", "worker-2", "projector"} <= set(services)


def test_every_depends_on_names_an_existing_service(services):
    for name, service in services.items():
        for dependency, spec in depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown service {dependency!r}"
            assert dependency != name, f"{name} depends on itself"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], (
                    f"{name} waits for {dependency} to be healthy, but {dependency} has no healthcheck")


def test_every_named_volume_used_is_declared_at_top_level(compose, services):
    declared = set(compose.get("volumes") or {})
    used = {source for service in services.values() for kind, source, _ in mounts(service)
            if kind == "volume" and source}
    assert used, "no service uses a named volume"
    assert used <= declared, f"volumes used but not declared: {sorted(used - declared)}"
    assert {"kafka-data", "runbus-home"} <= declared


# ------------------------------------------------------------------------------------- kafka ---

def test_kafka_runs_an_apache_kafka_4_image(services):
    image = services["kafka"]["image"]
    repository, _, tag = image.partition(":")
    assert repository == "apache/kafka", image
    assert tag.split(".")[0] == "4", f"{image} is not Kafka 4.x"


def test_kafka_is_a_single_kraft_node_that_is_broker_and_controller(services):
    kafka_env = env(services["kafka"])
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka_env
    node_id = int(kafka_env["KAFKA_NODE_ID"])

    controller_names = kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")
    controller_ports = {port for listener, _, port in listeners(kafka_env["KAFKA_LISTENERS"])
                        if listener in controller_names}
    assert controller_ports, "KAFKA_LISTENERS has no controller listener"

    voters = kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == 1, f"a single-node cluster has one voter, not {voters}"
    match = re.fullmatch(r"(\d+)@([^:]+):(\d+)", voters[0])
    assert match, f"quorum voter {voters[0]!r} is not id@host:port"
    assert int(match[1]) == node_id, "the only quorum voter must be this node"
    assert match[2] in {*LOCAL_HOSTS, *network_names(services, "kafka")}
    assert int(match[3]) in controller_ports, "the quorum voter must use the controller listener's port"


def test_kafka_cluster_id_is_a_valid_kraft_uuid(services):
    cluster_id = env(services["kafka"]).get("CLUSTER_ID")
    assert cluster_id, "set CLUSTER_ID so the storage format is reproducible"
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id), f"{cluster_id!r} is not a base64 UUID"


def test_kafka_listeners_all_have_a_security_protocol(services):
    kafka_env = env(services["kafka"])
    protocol_map = dict(item.split(":") for item in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    listening = {name for name, _, _ in listeners(kafka_env["KAFKA_LISTENERS"])}
    advertised = {name for name, _, _ in listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])}
    assert listening <= set(protocol_map), f"no protocol for {sorted(listening - set(protocol_map))}"
    assert advertised <= listening, f"advertised but not listening: {sorted(advertised - listening)}"
    controller_names = set(kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(","))
    assert controller_names <= listening
    assert not controller_names & advertised, "clients must not be sent to the controller listener"
    inter_broker = kafka_env.get("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT")
    assert inter_broker in advertised and inter_broker not in controller_names


def test_kafka_internal_topics_fit_a_single_broker(services):
    kafka_env = env(services["kafka"])
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert kafka_env.get(key) == "1", f"{key} must be 1 on a single broker"


def test_kafka_data_dir_is_on_the_kafka_data_volume(services):
    kafka = services["kafka"]
    log_dirs = env(kafka)["KAFKA_LOG_DIRS"].split(",")
    for log_dir in log_dirs:
        assert named_volume_at(kafka, log_dir) == "kafka-data"


def test_kafka_healthcheck_asks_its_in_network_listener(services):
    kafka = services["kafka"]
    test = kafka["healthcheck"]["test"]
    probe = " ".join(test[1:]) if isinstance(test, list) else test
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in probe or "/opt/kafka/bin/kafka-topics.sh" in probe
    match = re.search(r"--bootstrap-server\s+(\S+):(\d+)", probe)
    assert match, f"healthcheck {probe!r} names no --bootstrap-server"
    assert match[1] in LOCAL_HOSTS
    kafka_env = env(kafka)
    controller_names = kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")
    client_ports = {port for name, _, port in listeners(kafka_env["KAFKA_LISTENERS"]) if name not in controller_names}
    assert int(match[2]) in client_ports


def test_every_runbus_bus_names_a_kafka_listener_advertised_in_the_network(services):
    users = runbus_bus_users(services)
    assert {*WORKERS, "projector"} <= set(users), f"only {sorted(users)} use Kafka"
    for name, url in users.items():
        for host, port in kafka_urls(url):
            assert host not in LOCAL_HOSTS, f"{name}: {host} is the container itself, not the broker"
            broker = kafka_service_for(services, host)
            broker_env = env(services[broker])
            listening_ports = {p for _, _, p in listeners(broker_env["KAFKA_LISTENERS"])}
            assert port in listening_ports, f"{name}: {broker} does not listen on {port}"
            # The broker answers with its advertised address; it must be this same name and port,
            # or clients in the network bootstrap and then try to reach an address they cannot.
            advertised = {(h, p) for _, h, p in listeners(broker_env["KAFKA_ADVERTISED_LISTENERS"])}
            assert (host, port) in advertised, f"{name}: {host}:{port} is not advertised by {broker}"


def test_runbus_services_start_after_kafka_is_healthy(services):
    for name, url in runbus_bus_users(services).items():
        for host, _ in kafka_urls(url):
            broker = kafka_service_for(services, host)
            spec = depends_on(services[name]).get(broker)
            assert spec, f"{name} does not depend on {broker}"
            assert spec.get("condition") == "service_healthy", f"{name} starts before {broker} is healthy"


def test_host_kafka_port_is_published_and_advertised_on_localhost(services):
    kafka_env = env(services["kafka"])
    listener_ports = {name: port for name, _, port in listeners(kafka_env["KAFKA_LISTENERS"])}
    host_listeners = [(name, port) for name, host, port in listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
                      if host in LOCAL_HOSTS]
    assert host_listeners, "no listener is advertised on localhost for clients on the host"
    published = {(published, target) for _, published, target in port_mappings(services["kafka"]) if published}
    for name, port in host_listeners:
        # A host client connects to localhost:<port>, which Docker forwards to the container port
        # of the same listener.
        assert (port, listener_ports[name]) in published, (
            f"{name} is advertised as localhost:{port} but host port {port} is not published "
            f"to container port {listener_ports[name]}")


def test_kafka_internal_listener_is_not_published_on_the_host(services):
    kafka_env = env(services["kafka"])
    internal_ports = {port for _, host, port in listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
                      if host not in LOCAL_HOSTS}
    targets = {target for _, published, target in port_mappings(services["kafka"]) if published}
    # Published, it would hand host clients an address (kafka:9092) the host cannot resolve.
    assert not internal_ports & targets


# --------------------------------------------------------------------------------------- dask ---

def test_scheduler_publishes_the_scheduler_and_dashboard_ports(services):
    scheduler = services["scheduler"]
    cmd = command(scheduler)
    assert cmd[:2] == ["dask", "scheduler"]
    published = {target for _, published_port, target in port_mappings(scheduler) if published_port}
    assert {8786, 8787} <= published
    if "--port" in cmd:
        assert int(cmd[cmd.index("--port") + 1]) == 8786


def test_every_worker_connects_to_the_scheduler_service_port(services):
    scheduler_ports = container_ports(services["scheduler"])
    for name in WORKERS:
        cmd = command(services[name])
        assert cmd[:2] == ["dask", "worker"], f"{name} does not run a dask worker: {cmd}"
        addresses = [part for part in cmd if part.startswith("tcp://")]
        assert len(addresses) == 1, f"{name} names {addresses} as its scheduler"
        host, _, port = addresses[0].removeprefix("tcp://").rpartition(":")
        assert host in network_names(services, "scheduler"), f"{name}: {host} is not the scheduler service"
        assert int(port) == 8786 and int(port) in scheduler_ports
        assert "scheduler" in depends_on(services[name])


def test_workers_have_distinct_names(services):
    names = []
    for worker in WORKERS:
        cmd = command(services[worker])
        if "--name" in cmd:
            names.append(cmd[cmd.index("--name") + 1])
    assert len(names) == len(set(names))


# ------------------------------------------------------------------------------------ runbus ---

def test_projector_runs_runbus_project_follow(services):
    assert command(services["projector"]) == ["runbus", "project", "--follow"]


def test_projector_and_workers_keep_runbus_home_on_the_same_named_volume(services):
    volumes = {}
    for name in (*WORKERS, "projector"):
        home = env(services[name]).get("RUNBUS_HOME")
        assert home and home.startswith("/"), f"{name} has no absolute RUNBUS_HOME"
        volumes[name] = named_volume_at(services[name], home)
    assert set(volumes.values()) == {"runbus-home"}, volumes
    homes = {env(services[name])["RUNBUS_HOME"] for name in volumes}
    assert len(homes) == 1, f"artifacts and the projection live at different paths: {homes}"


def test_runbus_processes_agree_on_bus_topic_and_partitions(services):
    keys = ("RUNBUS_BUS", "RUNBUS_HOME", "RUNBUS_KAFKA_TOPIC", "RUNBUS_KAFKA_PARTITIONS")
    settings = {name: tuple(env(services[name]).get(key) for key in keys) for name in (*WORKERS, "projector")}
    assert len(set(settings.values())) == 1, settings
    partitions = env(services["projector"]).get("RUNBUS_KAFKA_PARTITIONS", "6")
    assert partitions.isdigit() and int(partitions) > 0


def test_shared_runbus_settings_are_written_once(compose):
    shared = compose.get("x-runbus-env")
    assert isinstance(shared, dict) and shared.get("RUNBUS_BUS", "").startswith("kafka://")
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert len(re.findall(r"^\s*RUNBUS_BUS\s*:", text, flags=re.MULTILINE)) == 1


def test_runbus_services_build_the_runbus_image_from_docker_dockerfile(services):
    images = set()
    for name in RUNBUS_SERVICES:
        build = services[name].get("build")
        assert isinstance(build, dict), f"{name} does not build the runbus image"
        context = (REPO / build.get("context", ".")).resolve()
        assert context == REPO, f"{name}: the build context must be the repo root (pip install .)"
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        images.add(services[name].get("image"))
    assert len(images) == 1, f"runbus services tag different images: {images}"


# -------------------------------------------------------------------------------- Dockerfile ---

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    parsed = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            parsed.append((keyword.upper(), rest.strip()))
    return parsed


def test_runbus_image_is_python_3_11_slim_by_default():
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)
    base = next(rest for kw, rest in instructions if kw == "FROM")
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]].strip('"'), base)
    assert resolved == "python:3.11-slim"


def test_runbus_image_copies_and_installs_every_package_pyproject_names():
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    include = re.search(r"^include\s*=\s*\[([^\]]*)\]", pyproject, flags=re.MULTILINE)
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, flags=re.MULTILINE)
    assert include and readme
    packages = {name.strip().strip("\"'").rstrip("*") for name in include[1].split(",") if name.strip()}

    instructions = dockerfile_instructions()
    copied = {Path(src).as_posix().rstrip("/") for kw, rest in instructions if kw == "COPY"
              for src in rest.split()[:-1] if not src.startswith("--")}
    assert {"pyproject.toml", readme[1], *packages} <= copied, f"missing: {sorted({*packages} - copied)}"
    installs = [rest for kw, rest in instructions if kw == "RUN" and "pip install" in rest]
    assert any(re.search(r"pip install (--\S+ )*\.(\s|$)", rest) for rest in installs)
    assert any("--no-cache-dir" in rest for rest in installs)


def test_runbus_image_defaults_to_the_runbus_cli():
    cmd = [rest for kw, rest in dockerfile_instructions() if kw == "CMD"]
    assert cmd and yaml.safe_load(cmd[-1]) == ["runbus", "--help"]
