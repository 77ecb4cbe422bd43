"""compose.yaml against the code: the variables each `dmr server`/`dmr agent` service sets are ones
the binary reads (and the required ones are set), the files they name are ones `dmr pki` writes, the
ports and addresses line up, and RabbitMQ has the Prometheus plugin the rules need."""

from __future__ import annotations

from urllib.parse import urlparse

import yaml

from .code import EnvSpec
from .common import ROOT, Results, file_vars, load_yaml

COMPOSE_SERVICES = ["rabbitmq", "pki", "server-1", "server-2", "agent-a", "agent-b", "sink", "prometheus"]


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            k, _, v = str(item).partition("=")
            out[k] = v
        return out
    return {str(k): ("" if v is None else str(v)) for k, v in env.items()}


def compose_command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def pki_layout(cmd: list[str]) -> tuple[str, list[str], list[str]]:
    """(out dir, agent ids, server names) of a `dmr pki` command line."""
    out, agents, names = "pki", [], []
    i = 1
    while i < len(cmd):
        a, step = cmd[i], 2
        val = cmd[i + 1] if i + 1 < len(cmd) else ""
        if a.startswith("--") and "=" in a:
            a, val = a.split("=", 1)
            step = 1
        if a == "--out":
            out = val
        elif a == "--agent":
            agents.append(val.split("=", 1)[0].lower())
        elif a == "--server-name":
            names.append(val)
        i += step
    return out.rstrip("/"), agents, names or ["localhost", "127.0.0.1"]


def check_compose(res: Results, envs: dict[str, EnvSpec]) -> dict | None:
    path = ROOT / "compose.yaml"
    try:
        doc = load_yaml(path)
    except (OSError, yaml.YAMLError) as e:
        res.check("compose.yaml parses", [str(e)])
        return None
    services = doc.get("services") or {}
    problems = [f"service {s} is missing" for s in COMPOSE_SERVICES if s not in services]

    # Start-up order the relay needs: certificates before anyone, RabbitMQ ready before a server.
    for name, svc in services.items():
        if name != "pki" and compose_command(svc)[:1] in (["server"], ["agent"]):
            cond = ((svc.get("depends_on") or {}).get("pki") or {}).get("condition")
            if cond != "service_completed_successfully":
                problems.append(f"{name}: must wait for pki with condition service_completed_successfully")
        if compose_command(svc)[:1] == ["server"]:
            cond = ((svc.get("depends_on") or {}).get("rabbitmq") or {}).get("condition")
            if cond != "service_healthy":
                problems.append(f"{name}: must wait for rabbitmq with condition service_healthy")
    res.check("compose.yaml: services and start-up order", problems)

    # published ports
    problems = []
    for svc_name, host_port in (("agent-a", "8073"), ("agent-b", "8074")):
        svc = services.get(svc_name) or {}
        container_port = compose_env(svc).get("PORT", envs["agent"].defaults.get("PORT", "8077"))
        found = False
        for p in svc.get("ports") or []:
            if isinstance(p, dict):
                hp, cp = str(p.get("published")), str(p.get("target"))
            else:
                parts = str(p).split("/")[0].split(":")
                hp, cp = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[0])
            if hp == host_port:
                found = True
                if cp != container_port:
                    problems.append(f"{svc_name}: host port {host_port} maps to {cp}, but the agent listens on {container_port}")
        if not found:
            problems.append(f"{svc_name}: REST not published on host port {host_port}")
    res.check("compose.yaml: agent A on host port 8073, agent B on 8074", problems)

    # dmr services: environment against the code
    pki_svc = services.get("pki") or {}
    pki_cmd = compose_command(pki_svc)
    problems = []
    if pki_cmd[:1] != ["pki"]:
        problems.append("service pki does not run `dmr pki`")
    out_dir, pki_agents, server_names = pki_layout(pki_cmd)
    pki_files = {f"{out_dir}/{f}" for f in ("ca.pem", "server.pem", "server-key.pem", "centops.json")}
    for a in pki_agents:
        pki_files |= {f"{out_dir}/agents/{a}/cert.pem", f"{out_dir}/agents/{a}/key.pem"}
    pki_volume = next((str(v).split(":")[0] for v in pki_svc.get("volumes") or [] if str(v).split(":")[1:2] == [out_dir]), None)
    if pki_volume is None:
        problems.append(f"service pki does not write {out_dir} into a volume")
    servers = {n: s for n, s in services.items() if compose_command(s)[:1] == ["server"]}
    agents = {n: s for n, s in services.items() if compose_command(s)[:1] == ["agent"]}
    if len(servers) < 2:
        problems.append("fewer than two `dmr server` services")
    if len(agents) < 2:
        problems.append("fewer than two `dmr agent` services")
    rabbit_env = compose_env(services.get("rabbitmq") or {})
    for name, svc in {**servers, **agents}.items():
        kind = compose_command(svc)[0]
        env = compose_env(svc)
        spec = envs[kind]
        for v in spec.unknown(set(env)):
            problems.append(f"{name}: {v} is not read by `dmr {kind}` (crates/dmr-{kind}/src/config.rs, dmr-cli logging)")
        problems += [f"{name}: {m}" for m in spec.missing(set(env))]
        if (svc.get("image") or "").split(":")[0] != (pki_svc.get("image") or "").split(":")[0]:
            problems.append(f"{name}: runs another image than pki")
        mounts = [str(v) for v in svc.get("volumes") or []]
        if not any(m.split(":")[:2] == [pki_volume, out_dir] for m in mounts):
            problems.append(f"{name}: does not mount the PKI volume at {out_dir}")
        for var, value in file_vars(env).items():
            if value not in pki_files:
                problems.append(f"{name}: {var}={value} is not a file `dmr pki` writes ({sorted(pki_files)})")
        if kind == "server":
            host = env.get("RABBITMQ_DEFAULT_HOST", spec.defaults.get("RABBITMQ_DEFAULT_HOST"))
            if host not in services:
                problems.append(f"{name}: RABBITMQ_DEFAULT_HOST={host} is not a compose service")
            for var in ("RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS"):
                if env.get(var, "guest") != rabbit_env.get(var, "guest"):
                    problems.append(f"{name}: {var} differs from the rabbitmq service's")
        else:
            agent_id = env.get("AGENT_ID", "")
            if agent_id.lower() not in pki_agents:
                problems.append(f"{name}: AGENT_ID {agent_id} is not one of the pki --agent ids")
            for var in ("AGENT_PRIVATE_KEY_FILE", "TLS_CERT_FILE"):
                if var in env and f"/agents/{agent_id}/" not in env[var]:
                    problems.append(f"{name}: {var} is not agent {agent_id}'s")
            urls = [u.strip() for u in env.get("DMR_SERVER_GRPC_URL", "").split(",") if u.strip()]
            for u in urls:
                pu = urlparse(u)
                target = servers.get(pu.hostname or "")
                if pu.scheme != "https":
                    problems.append(f"{name}: {u} is not https")
                if target is None:
                    problems.append(f"{name}: {u} does not name a `dmr server` service")
                elif str(pu.port) != compose_env(target).get("GRPC_PORT", envs["server"].defaults.get("GRPC_PORT")):
                    problems.append(f"{name}: {u} does not use {pu.hostname}'s GRPC_PORT")
                tls_name = env.get("DMR_SERVER_TLS_NAME", pu.hostname)
                if tls_name not in server_names:
                    problems.append(f"{name}: {tls_name} is not in the server certificate (pki --server-name {server_names})")
            if set(urls) and {urlparse(u).hostname for u in urls} != set(servers):
                problems.append(f"{name}: DMR_SERVER_GRPC_URL does not list every server ({sorted(servers)})")
            endpoint = urlparse(env.get("OUTGOING_MESSAGE_ENDPOINT", ""))
            if endpoint.hostname not in services:
                problems.append(f"{name}: OUTGOING_MESSAGE_ENDPOINT host {endpoint.hostname} is not a compose service")
    res.check("compose.yaml: dmr server/agent environment matches what the code reads", problems)

    # RabbitMQ: prometheus plugin and healthcheck
    problems = []
    rabbit = services.get("rabbitmq") or {}
    if not str(rabbit.get("image", "")).startswith("rabbitmq:3-management"):
        problems.append("rabbitmq image is not rabbitmq:3-management")
    plugins = ""
    for v in rabbit.get("volumes") or []:
        src, _, rest = str(v).partition(":")
        if rest.startswith("/etc/rabbitmq/enabled_plugins"):
            plugins = (ROOT / src).read_text() if (ROOT / src).exists() else ""
    if "rabbitmq_prometheus" not in plugins + " ".join(compose_command(rabbit)):
        problems.append("rabbitmq_prometheus is not enabled (enabled_plugins mount or command)")
    if not (rabbit.get("healthcheck") or {}).get("test"):
        problems.append("rabbitmq has no healthcheck")
    res.check("compose.yaml: RabbitMQ with the Prometheus plugin and a healthcheck", problems)
    return doc
