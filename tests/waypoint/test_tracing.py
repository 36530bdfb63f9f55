"""Tracing without sockets: W3C traceparent parsing, sampling, the per-request trace decision,
the span's attributes, its OTLP encoding, and the `tracing` settings section."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore._gen import otlp_trace_pb2 as otlp
from meshcore._gen.otlp_trace_pb2 import ExportTraceServiceRequest, Status
from meshcore._gen.otlp_trace_pb2 import Span as SpanProto
from meshcore.config import ConfigError
from waypoint.metrics import PeerLabels, RequestRecord
from waypoint.otlp import export_request
from waypoint.settings import OtlpEndpoint, parse_settings
from waypoint.tracing import Span, TraceContext, Tracer, incoming_context, parse_traceparent, request_span, should_sample

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


# --- traceparent ---


@pytest.mark.parametrize(
    ("flags", "sampled"),
    [("01", True), ("00", False), ("03", True), ("02", False), ("ff", True)],
)
def test_valid_traceparent_gives_ids_and_the_sampled_bit(flags: str, sampled: bool):
    context = parse_traceparent(f"00-{TRACE}-{PARENT}-{flags}")
    assert context == TraceContext(bytes.fromhex(TRACE), bytes.fromhex(PARENT), sampled)


def test_formatting_round_trips_and_only_the_sampled_flag_is_sent():
    assert parse_traceparent(VALID).traceparent == VALID
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-03").traceparent == VALID
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-02").traceparent == f"00-{TRACE}-{PARENT}-00"


def test_surrounding_whitespace_is_ignored():
    assert parse_traceparent(f"  {VALID}\t") is not None


def test_a_later_version_is_read_by_its_first_four_fields():
    context = parse_traceparent(f"cc-{TRACE}-{PARENT}-01-what-the-future-will-be-like")
    assert context == TraceContext(bytes.fromhex(TRACE), bytes.fromhex(PARENT), True)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"ff-{TRACE}-{PARENT}-01",  # version ff is forbidden
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{PARENT}-01",  # hex must be lower case
        f"00-{TRACE}-{PARENT}-0g",
        f"00-{TRACE[:-1]}-{PARENT}-01",  # too short
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"cc-{TRACE}-{PARENT}-01extra",  # a later version's extra field must follow a dash
        f"00_{TRACE}_{PARENT}_01",
        f"0-{TRACE}-{PARENT}-01",
    ],
)
def test_malformed_traceparent_is_treated_as_absent(value: str):
    assert parse_traceparent(value) is None


@given(st.text(max_size=80))
def test_no_text_makes_parsing_raise(value: str):
    context = parse_traceparent(value)
    assert context is None or parse_traceparent(context.traceparent) == context


def test_two_traceparent_headers_are_invalid_and_tracestate_goes_with_its_traceparent():
    assert incoming_context((("traceparent", VALID), ("traceparent", VALID))) == (None, None)
    assert incoming_context((("traceparent", "garbage"), ("tracestate", "a=1"))) == (None, None)
    context, state = incoming_context((("tracestate", "a=1"), ("traceparent", VALID), ("tracestate", "b=2")))
    assert (context, state) == (parse_traceparent(VALID), "a=1,b=2")


# --- sampling ---


def test_sampling_follows_the_parent_else_the_percentage():
    sampled, unsampled = parse_traceparent(VALID), parse_traceparent(f"00-{TRACE}-{PARENT}-00")
    assert should_sample(sampled, 0.0, 0.99) is True
    assert should_sample(unsampled, 100.0, 0.0) is False
    assert should_sample(None, 100.0, 0.999) is True
    assert should_sample(None, 0.0, 0.0) is False
    assert should_sample(None, 1.0, 0.0099) is True
    assert should_sample(None, 1.0, 0.01) is False


def test_one_percent_samples_about_one_new_trace_in_a_hundred():
    tracer = Tracer(sampling_percent=1.0, export=lambda span: None, rng=random.Random(3))
    recorded = sum(tracer.start((), now_unix_nano=0).recording for _ in range(20_000))
    assert 140 <= recorded <= 260, recorded


# --- the per-request decision ---


def record(**changes) -> RequestRecord:
    values = dict(
        source=PeerLabels(),
        source_address="198.18.1.7:40000",
        destination=PeerLabels(),
        destination_address="10.0.0.1:9080",
        service_host="ratings.shop.svc.cluster.local",
        service_name="ratings",
        service_namespace="shop",
        method="POST",
        authority="ratings:9080",
        path="/ratings/1?x=1",
        protocol="http",
        http_version="HTTP/1.1",
        response_code=200,
        response_flags="-",
        response_code_details="via_upstream",
        grpc_status="",
        duration_ms=3.0,
        request_bytes=12,
        response_bytes=34,
        upstream_cluster="outbound|9080||ratings.shop.svc.cluster.local",
        attempts=1,
        trace_id=TRACE,
    )
    values.update(changes)
    return RequestRecord(**values)


def test_a_recorded_hop_is_the_clients_child_and_names_itself_upstream():
    spans: list[Span] = []
    tracer = Tracer(node_id="waypoint~10.0.0.9~wp.shop~shop.svc.cluster.local", export=spans.append)
    hop = tracer.start((("traceparent", VALID), ("tracestate", "vendor=x")), now_unix_nano=1_000)
    assert hop.recording
    assert hop.context.trace_id.hex() == TRACE and hop.context.span_id.hex() != PARENT
    assert hop.parent_span_id == bytes.fromhex(PARENT)
    assert hop.upstream_headers() == (
        ("traceparent", f"00-{TRACE}-{hop.context.span_id.hex()}-01"),
        ("tracestate", "vendor=x"),
    )
    tracer.finish(hop, record(), operation="ratings.shop.svc.cluster.local:9080/*", now_unix_nano=5_000)
    [span] = spans
    assert (span.trace_id, span.span_id, span.parent_span_id) == (hop.context.trace_id, hop.context.span_id, bytes.fromhex(PARENT))
    assert (span.name, span.kind.name, span.start_unix_nano, span.end_unix_nano) == ("ratings.shop.svc.cluster.local:9080/*", "SERVER", 1_000, 5_000)
    assert span.trace_state == "vendor=x" and not span.error
    attributes = dict(span.attributes)
    assert attributes["http.method"] == "POST"
    assert attributes["http.url"] == "http://ratings:9080/ratings/1?x=1"
    assert attributes["http.status_code"] == "200"
    assert attributes["upstream_cluster"] == "outbound|9080||ratings.shop.svc.cluster.local"
    assert attributes["node_id"] == "waypoint~10.0.0.9~wp.shop~shop.svc.cluster.local"
    assert attributes["component"] == "proxy"
    assert attributes["response_flags"] == "-"
    assert "error" not in attributes


def test_a_new_trace_has_no_parent_and_is_sent_sampled():
    spans: list[Span] = []
    tracer = Tracer(export=spans.append)
    hop = tracer.start((("traceparent", "garbage"), ("tracestate", "stale=1")), now_unix_nano=0)
    assert hop.recording and hop.parent_span_id is None and hop.trace_state is None
    assert hop.upstream_headers() == (("traceparent", hop.context.traceparent),)
    assert hop.context.traceparent.endswith("-01")
    tracer.finish(hop, record(), operation="op", now_unix_nano=1)
    assert spans[0].parent_span_id is None


def test_without_export_the_clients_context_passes_unchanged_and_nothing_is_recorded():
    tracer = Tracer()
    hop = tracer.start((("traceparent", VALID), ("tracestate", "vendor=x")), now_unix_nano=0)
    assert not hop.recording
    assert hop.upstream_headers() == (("traceparent", VALID), ("tracestate", "vendor=x"))
    fresh = tracer.start((), now_unix_nano=0)
    assert not fresh.recording and fresh.context.traceparent.endswith("-00")
    assert fresh.trace_id != TRACE and len(fresh.context.traceparent) == 55


def test_an_unsampled_client_trace_is_not_recorded_and_passes_unchanged():
    spans: list[Span] = []
    tracer = Tracer(export=spans.append)
    unsampled = f"00-{TRACE}-{PARENT}-00"
    hop = tracer.start((("traceparent", unsampled),), now_unix_nano=0)
    tracer.finish(hop, record(), operation="op", now_unix_nano=1)
    assert hop.upstream_headers() == (("traceparent", unsampled),)
    assert spans == []


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"response_code": 503, "response_flags": "UF"}, True),
        ({"response_code": 0, "response_flags": "DC"}, True),  # the client went away
        ({"response_code": 404, "response_flags": "NR"}, False),
        ({"protocol": "grpc", "grpc_status": "14"}, True),
        ({"protocol": "grpc", "grpc_status": "0"}, False),
    ],
)
def test_server_errors_and_failed_grpc_calls_mark_the_span_as_an_error(changes, error):
    hop = Tracer(export=lambda span: None).start((), now_unix_nano=0)
    span = request_span(hop, record(**changes), operation="op", node_id="n", end_unix_nano=1)
    assert span.error is error
    assert (dict(span.attributes).get("error") == "true") is error


# --- OTLP encoding ---


def test_export_request_carries_ids_parent_kind_status_attributes_and_service_name():
    hop = Tracer(export=lambda span: None).start((("traceparent", VALID), ("tracestate", "v=1")), now_unix_nano=10)
    span = request_span(hop, record(response_code=502, response_flags="UF"), operation="op", node_id="n", end_unix_nano=20)
    wire = ExportTraceServiceRequest.FromString(export_request([span], "waypoint.shop").SerializeToString())
    [resource_spans] = wire.resource_spans
    assert [(a.key, a.value.string_value) for a in resource_spans.resource.attributes] == [("service.name", "waypoint.shop")]
    [decoded] = resource_spans.scope_spans[0].spans
    assert decoded.trace_id.hex() == TRACE and decoded.parent_span_id.hex() == PARENT
    assert decoded.span_id == hop.context.span_id and decoded.trace_state == "v=1"
    assert decoded.kind == SpanProto.SPAN_KIND_SERVER
    assert (decoded.start_time_unix_nano, decoded.end_time_unix_nano) == (10, 20)
    assert decoded.status.code == Status.STATUS_CODE_ERROR
    assert {a.key: a.value.string_value for a in decoded.attributes}["http.status_code"] == "502"
    assert decoded.flags & 0x1 and decoded.flags & 0x300 == 0x300  # sampled; parent is remote


# --- settings ---


BASE = {"name": "waypoint", "namespace": "shop", "address": "10.0.0.9", "controlPlane": {"address": "istiod:15012", "tokenFile": "t"}}


def settings(tracing=None, environ=None):
    raw = dict(BASE, tracing=tracing) if tracing is not None else dict(BASE)
    return parse_settings(raw, source="wp.yaml", base=Path("/etc"), environ=environ)


def test_tracing_section_sets_endpoint_sampling_and_service_name():
    parsed = settings({"otlpEndpoint": "http://collector.obs:4318/otlp/", "samplingPercent": 1, "serviceName": "wp"}).tracing
    assert parsed.otlp_endpoint == OtlpEndpoint("collector.obs", 4318, "/otlp/v1/traces")
    assert (parsed.sampling_percent, parsed.service_name) == (1.0, "wp")


def test_default_is_no_export_full_sampling_and_name_dot_namespace():
    parsed = settings()
    assert parsed.tracing.otlp_endpoint is None and parsed.tracing.sampling_percent == 100.0
    assert parsed.service_name == "waypoint.shop"


def test_the_standard_env_var_is_the_fallback_and_the_file_wins():
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert settings(environ=environ).tracing.otlp_endpoint == OtlpEndpoint("127.0.0.1", 4318, "/v1/traces")
    assert settings({"otlpEndpoint": "http://other:80"}, environ=environ).tracing.otlp_endpoint.host == "other"
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        settings(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://x:4317"})


@pytest.mark.parametrize(
    ("tracing", "field"),
    [
        ({"otlpEndpoint": "https://collector:4318"}, "tracing.otlpEndpoint"),
        ({"otlpEndpoint": "collector:4318"}, "tracing.otlpEndpoint"),
        ({"otlpEndpoint": "http://:4318"}, "tracing.otlpEndpoint"),
        ({"otlpEndpoint": "http://collector:99999"}, "tracing.otlpEndpoint"),
        ({"otlpEndpoint": 4318}, "tracing.otlpEndpoint"),
        ({"samplingPercent": 101}, "tracing.samplingPercent"),
        ({"samplingPercent": "all"}, "tracing.samplingPercent"),
        ({"serviceName": ""}, "tracing.serviceName"),
        ({"endpoint": "http://x"}, "tracing.endpoint"),
    ],
)
def test_bad_tracing_settings_name_the_field(tracing, field):
    with pytest.raises(ConfigError, match=f"wp.yaml: {field}: "):
        settings(tracing)


# The same request encoded by upstream's opentelemetry-proto (v1.45): our own copy of the
# messages must put exactly these bytes on the wire for a collector to read them.
UPSTREAM_ENCODING = bytes.fromhex(
    "0ab1010a210a1f0a0c736572766963652e6e616d65120f0a0d776179706f696e742e64656d6f128b010a0a0a08776179"
    "706f696e74127d0a10000102030405060708090a0b0c0d0e0f120800010203040506071a036b3d76220808090a0b0c0d"
    "0e0f2a0d7765622e64656d6f3a38302f2a30023900002a36fe9c97174140423936fe9c97174a190a10687474702e7374"
    "617475735f636f646512050a033530337a0c1208757073747265616d1802850101030000"
)


def test_export_requests_are_byte_for_byte_what_upstream_otlp_encodes():
    request = otlp.ExportTraceServiceRequest(resource_spans=[otlp.ResourceSpans(
        resource=otlp.Resource(attributes=[otlp.KeyValue(key="service.name", value=otlp.AnyValue(string_value="waypoint.demo"))]),
        scope_spans=[otlp.ScopeSpans(scope=otlp.InstrumentationScope(name="waypoint"), spans=[otlp.Span(
            trace_id=bytes(range(16)), span_id=bytes(range(8)), trace_state="k=v", parent_span_id=bytes(range(8, 16)),
            flags=0x301, name="web.demo:80/*", kind=otlp.Span.SPAN_KIND_SERVER,
            start_time_unix_nano=1700000000000000000, end_time_unix_nano=1700000000001000000,
            attributes=[otlp.KeyValue(key="http.status_code", value=otlp.AnyValue(string_value="503"))],
            status=otlp.Status(code=otlp.Status.STATUS_CODE_ERROR, message="upstream"),
        )])],
    )])
    assert request.SerializeToString() == UPSTREAM_ENCODING
