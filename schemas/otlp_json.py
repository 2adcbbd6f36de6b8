"""ExportTraceServiceRequest -> OTLP/JSON exactly as the OpenTelemetry Collector writes it.

Plain proto3 JSON (``MessageToDict``) differs from the OTLP/JSON the Collector's
Kafka (``otlp_json``) and file exporters produce in two ways the spec fixes:
trace and span ids are hex, not base64, and enums are integers, not names.
64-bit integers stay strings and default/empty fields are omitted, as in both.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

_ID_KEYS = ("traceId", "spanId", "parentSpanId")


def _hex_ids(obj: dict[str, Any]) -> None:
    for key in _ID_KEYS:
        v = obj.get(key)
        if v:
            obj[key] = base64.b64decode(v).hex()


def request_to_otlp_dict(req: ExportTraceServiceRequest) -> dict[str, Any]:
    """The OTLP/JSON document of ``req`` as Python objects."""
    doc: dict[str, Any] = MessageToDict(req, use_integers_for_enums=True)
    for rs in doc.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                _hex_ids(span)
                for link in span.get("links", ()):
                    _hex_ids(link)
    return doc


def request_to_otlp_json(req: ExportTraceServiceRequest) -> bytes:
    """One ExportTraceServiceRequest as one line of Collector OTLP/JSON (no trailing newline)."""
    return orjson.dumps(request_to_otlp_dict(req))
