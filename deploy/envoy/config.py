"""Envoy's bootstrap for a pagemesh deployment, built from typed envoy-data-plane messages.

One Envoy sits in front of the replicas and does all the balancing; pagemesh has no balancer
of its own:

    clients ──HTTP :8000──> Envoy ──> gateways (OpenAI REST)      health: HTTP GET /health
    gateways, gRPC clients ──gRPC :50051──> Envoy ──> schedulers  health: grpc.health.v1
                                                      (one cluster per model, chosen by the
                                                       x-pagemesh-model header; the first
                                                       group is the default)

Generations stream for minutes, so no route has an overall timeout: an idle timeout ends a
stream only when nothing has moved on it for a while. Retries happen only where nothing can
have been generated yet (the connection failed, the stream was refused or reset before the
request went out, or, for gRPC, a trailers-only UNAVAILABLE); Envoy never retries once
response headers have gone downstream.

Typed messages rather than YAML by hand: a misspelt field fails here, in Python, and
`envoy --mode validate` checks the rest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import betterproto2
from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    HealthCheckHttpHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    KeepaliveSettings,
    RuntimeFractionalPercent,
    SocketAddress,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
from envoy_data_plane.envoy.config.route.v3 import (
    HeaderMatcher,
    RetryPolicy,
    RetryPolicyRetryHostPredicate,
    Route,
    RouteAction,
    RouteActionMaxStreamDuration,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.health_check.v3 import HealthCheck as HealthCheckFilter
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerTracing,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig,
)
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.envoy.type.v3 import FractionalPercent, Percent, TokenBucket
from envoy_data_plane.google.protobuf import Any as AnyMessage

MODEL_HEADER = "x-pagemesh-model"  # set by the gateway (and by gRPC clients) to the request's model
# Answered by Envoy itself, so Kubernetes can probe it while the admin port stays on loopback.
ENVOY_READY_PATH = "/envoy-ready"
HTTP_UPSTREAM_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Retry only what cannot have reached a model: the request never left Envoy or was refused.
HTTP_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
# gRPC adds `unavailable`: Envoy matches it on a trailers-only reply, i.e. before any message.
GRPC_RETRY_ON = HTTP_RETRY_ON + ",unavailable"


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Upstream:
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {text!r}")
        return cls(host.strip("[]"), int(port))


@dataclass(frozen=True, slots=True)
class SchedulerGroup:
    """The scheduler replicas serving one model; model "" is the unnamed (default-only) group."""

    model: str
    replicas: tuple[Upstream, ...]

    @property
    def cluster_name(self) -> str:
        # Model ids may hold slashes (HuggingFaceTB/SmolLM2-135M-Instruct); stat names may not.
        return "scheduler" if not self.model else "scheduler_" + re.sub(r"[^A-Za-z0-9_.-]", "_", self.model)


def parse_scheduler_groups(specs: list[str]) -> list[SchedulerGroup]:
    """`h1:1,h2:2` is one unnamed group; `m1=h1:1,h2:2,m2=h3:3` (or one flag per model) names
    groups: an item with `=` starts a new group, the items after it join that group. The first
    group is the default route and alone may be unnamed."""
    groups: list[tuple[str, list[Upstream]]] = []
    for spec in specs:
        current: list[Upstream] | None = None
        for item in filter(None, (s.strip() for s in spec.split(","))):
            model, eq, address = item.rpartition("=")
            if eq or current is None:
                current = []
                groups.append((model, current))
            current.append(Upstream.parse(address))
    result = [SchedulerGroup(model, tuple(replicas)) for model, replicas in groups]
    names = [g.cluster_name for g in result]
    if not result:
        raise ValueError("no scheduler replicas given")
    if len(set(names)) != len(names):
        raise ValueError(f"two scheduler groups map to the same cluster name: {names}")
    if any(not g.model for g in result[1:]):
        raise ValueError("only the first (default) scheduler group may be unnamed: name it model=host:port")
    return result


@dataclass(slots=True)
class EnvoySettings:
    schedulers: list[SchedulerGroup]
    gateways: list[Upstream]
    listen_address: str = "127.0.0.1"  # 0.0.0.0 in a container
    http_port: int = 8000  # the ports `pagemesh serve` uses, so clients need not change
    grpc_port: int = 50051
    admin_port: int = 9901  # admin always binds to loopback: it can stop Envoy
    otlp: Upstream | None = None  # OTLP gRPC collector for Envoy's own spans; None: no tracing
    trace_sampling_percent: float = 100.0
    health_check_interval: timedelta = timedelta(seconds=5)
    idle_timeout: timedelta = timedelta(minutes=10)  # silence on a stream this long ends it
    connect_timeout: timedelta = timedelta(seconds=2)
    num_retries: int = 2
    rate_limit_per_second: int = 100  # token bucket per listener per Envoy instance
    rate_limit_burst: int = 200
    access_log: bool = True
    max_connections: int = 50_000  # downstream connections over all listeners; beyond it Envoy refuses


# -- building blocks ---------------------------------------------------------------------------------------


def _any(message: betterproto2.Message) -> AnyMessage:
    return AnyMessage.pack(message)


def _socket(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _percent_100() -> RuntimeFractionalPercent:
    return RuntimeFractionalPercent(default_value=FractionalPercent(numerator=100))


def _cluster(
    name: str, upstreams: list[Upstream] | tuple[Upstream, ...], http2: bool, s: EnvoySettings
) -> Cluster:
    """STRICT_DNS: in Kubernetes a headless Service name resolves to the pods behind it, each a
    host of its own, re-resolved every few seconds as pods come and go; an IP literal is itself."""
    protocol = (
        HttpProtocolOptionsExplicitHttpConfig(
            # Pings keep idle long streams' connections alive through NATs and notice dead peers.
            http2_protocol_options=Http2ProtocolOptions(
                connection_keepalive=KeepaliveSettings(
                    interval=timedelta(seconds=30), timeout=timedelta(seconds=10)
                )
            )
        )
        if http2
        else HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions())
    )
    endpoints = [LbEndpoint(endpoint=Endpoint(address=_socket(u.host, u.port))) for u in upstreams]
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STRICT_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=s.connect_timeout,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=endpoints)]
        ),
        typed_extension_protocol_options={
            HTTP_UPSTREAM_PROTOCOL_OPTIONS: _any(HttpProtocolOptions(explicit_http_config=protocol))
        },
    )


def _balanced(cluster: Cluster, health_check: HealthCheck) -> Cluster:
    """Least-request balancing, active health checks and outlier detection on a replica cluster.

    Least request suits generation: a replica's open streams are its load, and requests differ
    in length by orders of magnitude, which round robin ignores."""
    cluster.lb_policy = ClusterLbPolicy.LEAST_REQUEST
    cluster.health_checks = [health_check]
    cluster.outlier_detection = OutlierDetection(
        # Envoy counts a gRPC status as its HTTP equivalent here (UNAVAILABLE as 503), so a
        # replica failing calls while still answering health checks is ejected too.
        consecutive_5xx=5,
        consecutive_gateway_failure=3,
        interval=timedelta(seconds=10),
        base_ejection_time=timedelta(seconds=30),
        max_ejection_percent=50,  # never eject the whole fleet on a bad spell
    )
    return cluster


def _health_check(s: EnvoySettings, **kind: Any) -> HealthCheck:
    return HealthCheck(
        timeout=timedelta(seconds=1),
        interval=s.health_check_interval,
        # Until a cluster carries traffic Envoy checks at no_traffic_interval (60 s by default);
        # a replica that comes up should get traffic as soon as it is healthy.
        no_traffic_interval=s.health_check_interval,
        unhealthy_threshold=2,
        healthy_threshold=1,
        **kind,
    )


def scheduler_cluster(group: SchedulerGroup, s: EnvoySettings) -> Cluster:
    check = _health_check(
        s,
        # The service name: a scheduler flips it to NOT_SERVING to drain without dying.
        grpc_health_check=HealthCheckGrpcHealthCheck(service_name="pagemesh.v1.Inference"),
    )
    return _balanced(_cluster(group.cluster_name, group.replicas, http2=True, s=s), check)


def gateway_cluster(s: EnvoySettings) -> Cluster:
    # uvicorn speaks HTTP/1.1 only; /health answers while the event loop lives.
    check = _health_check(s, http_health_check=HealthCheckHttpHealthCheck(path="/health"))
    return _balanced(_cluster("gateway", s.gateways, http2=False, s=s), check)


def collector_cluster(otlp: Upstream, s: EnvoySettings) -> Cluster:
    return _cluster("otel_collector", [otlp], http2=True, s=s)


def _retry_policy(retry_on: str, s: EnvoySettings) -> RetryPolicy:
    return RetryPolicy(
        retry_on=retry_on,
        num_retries=s.num_retries,
        # A per-try timeout that never cuts a live stream: it fires only when an attempt goes
        # silent; per_try_timeout would bound the whole (possibly minutes long) response.
        per_try_idle_timeout=s.idle_timeout,
        # Retry on a different replica than the one that just failed.
        retry_host_predicate=[
            RetryPolicyRetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts", typed_config=_any(PreviousHostsPredicate())
            )
        ],
        host_selection_retry_max_attempts=3,
    )


def _route_action(cluster: str, retry_on: str, s: EnvoySettings, grpc: bool) -> RouteAction:
    return RouteAction(
        cluster=cluster,
        timeout=timedelta(0),  # 0 disables the overall timeout (Envoy's default is 15 s)
        idle_timeout=s.idle_timeout,
        retry_policy=_retry_policy(retry_on, s),
        # gRPC clients state their own deadline in grpc-timeout; 0 honours it without a cap.
        max_stream_duration=(
            RouteActionMaxStreamDuration(grpc_timeout_header_max=timedelta(0)) if grpc else None
        ),
    )


def http_routes(s: EnvoySettings) -> RouteConfiguration:
    """Every OpenAI request to some gateway: gateways are model-agnostic."""
    route = Route(
        name="openai",
        match=RouteMatch(prefix="/"),
        route=_route_action("gateway", HTTP_RETRY_ON, s, grpc=False),
    )
    return RouteConfiguration(
        name="openai", virtual_hosts=[VirtualHost(name="openai", domains=["*"], routes=[route])]
    )


def grpc_routes(s: EnvoySettings) -> RouteConfiguration:
    """One route per named model, matched on the model header; then everything else to the first
    group (requests without the header, unknown models, health and reflection calls)."""
    routes = [
        Route(
            name=f"model:{g.model}",
            match=RouteMatch(
                prefix="/",
                headers=[HeaderMatcher(name=MODEL_HEADER, string_match=StringMatcher(exact=g.model))],
            ),
            route=_route_action(g.cluster_name, GRPC_RETRY_ON, s, grpc=True),
        )
        for g in s.schedulers
        if g.model
    ]
    routes.append(
        Route(
            name="default",
            match=RouteMatch(prefix="/"),
            route=_route_action(s.schedulers[0].cluster_name, GRPC_RETRY_ON, s, grpc=True),
        )
    )
    return RouteConfiguration(
        name="inference", virtual_hosts=[VirtualHost(name="inference", domains=["*"], routes=routes)]
    )


def _rate_limit(name: str, s: EnvoySettings) -> HttpFilter:
    limit = LocalRateLimit(
        stat_prefix=f"{name}_rate_limit",
        token_bucket=TokenBucket(
            max_tokens=s.rate_limit_burst,
            tokens_per_fill=s.rate_limit_per_second,
            fill_interval=timedelta(seconds=1),
        ),
        filter_enabled=_percent_100(),
        filter_enforced=_percent_100(),
        # A limited gRPC call gets RESOURCE_EXHAUSTED, not UNAVAILABLE, which clients would retry.
        rate_limited_as_resource_exhausted=True,
    )
    return HttpFilter(name="envoy.filters.http.local_ratelimit", typed_config=_any(limit))


def _connection_manager(
    name: str, routes: RouteConfiguration, s: EnvoySettings, filters: list[HttpFilter]
) -> HttpConnectionManager:
    hcm = HttpConnectionManager(
        stat_prefix=name,
        codec_type=HttpConnectionManagerCodecType.AUTO,
        route_config=routes,
        http_filters=[
            *filters,
            _rate_limit(name, s),
            HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router())),
        ],
        # Ends streams that go quiet; the route's idle_timeout overrides it per route.
        stream_idle_timeout=s.idle_timeout,
        # Ids and W3C trace context pass through, so gateway and scheduler spans join Envoy's.
        generate_request_id=True,
    )
    if s.access_log:
        hcm.access_log = [AccessLog(name="envoy.access_loggers.stdout", typed_config=_any(StdoutAccessLog()))]
    if s.otlp is not None:
        hcm.tracing = HttpConnectionManagerTracing(
            random_sampling=Percent(value=s.trace_sampling_percent),
            provider=TracingHttp(
                name="envoy.tracers.opentelemetry",
                typed_config=_any(
                    OpenTelemetryConfig(
                        grpc_service=GrpcService(
                            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="otel_collector"),
                            timeout=timedelta(seconds=1),
                        ),
                        service_name="pagemesh-envoy",
                    )
                ),
            ),
        )
    return hcm


def _listener(name: str, port: int, hcm: HttpConnectionManager, s: EnvoySettings) -> Listener:
    return Listener(
        name=name,
        address=_socket(s.listen_address, port),
        filter_chains=[
            FilterChain(
                filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm))]
            )
        ],
    )


def http_listener(s: EnvoySettings) -> Listener:
    # Envoy answers its own readiness on this port: 200 while it is not draining and at least one
    # gateway is healthy, so Kubernetes can probe it without reaching the admin interface.
    ready = HttpFilter(
        name="envoy.filters.http.health_check",
        typed_config=_any(
            HealthCheckFilter(
                pass_through_mode=False,
                headers=[HeaderMatcher(name=":path", string_match=StringMatcher(exact=ENVOY_READY_PATH))],
                cluster_min_healthy_percentages={"gateway": Percent(value=1.0)},
            )
        ),
    )
    return _listener(
        "openai_http", s.http_port, _connection_manager("openai_http", http_routes(s), s, [ready]), s
    )


def grpc_listener(s: EnvoySettings) -> Listener:
    return _listener(
        "inference_grpc", s.grpc_port, _connection_manager("inference_grpc", grpc_routes(s), s, []), s
    )


def bootstrap(s: EnvoySettings) -> Bootstrap:
    if not s.schedulers or not s.gateways:
        raise ValueError("Envoy needs at least one scheduler replica and one gateway")
    clusters = [gateway_cluster(s), *(scheduler_cluster(g, s) for g in s.schedulers)]
    if s.otlp is not None:
        clusters.append(collector_cluster(s.otlp, s))
    return Bootstrap(
        admin=Admin(address=_socket("127.0.0.1", s.admin_port)),
        static_resources=BootstrapStaticResources(
            listeners=[http_listener(s), grpc_listener(s)], clusters=clusters
        ),
        # A ceiling on open connections, so a flood of clients exhausts Envoy's limit, not its memory.
        overload_manager=OverloadManager(
            resource_monitors=[
                ResourceMonitor(
                    name="envoy.resource_monitors.global_downstream_max_connections",
                    typed_config=_any(
                        DownstreamConnectionsConfig(max_active_downstream_connections=s.max_connections)
                    ),
                )
            ]
        ),
    )


def _proto_field_name(python_name: str) -> str:
    return python_name  # envoy-data-plane's attribute names are the .proto field names


def to_dict(s: EnvoySettings) -> dict[str, Any]:
    """The bootstrap as a dict keyed by .proto field names (snake_case, as Envoy's docs spell them).

    betterproto2's own casings re-case names and mangle digits (consecutive_5xx comes out as
    consecutive_5_xx or consecutive5Xx, both rejected by Envoy), so the names go through as they
    are; to_dict only calls `casing(name)`."""
    return bootstrap(s).to_dict(casing=_proto_field_name)  # type: ignore[arg-type]


def render(s: EnvoySettings, fmt: str = "yaml") -> str:
    data = to_dict(s)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    import yaml  # PyYAML: only needed for the YAML form

    return str(yaml.safe_dump(data, sort_keys=False))
