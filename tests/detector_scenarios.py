"""Behaviour scenarios for detector semantics under real traffic (issue 9), written to
tests/scenarios/ in the corpus's wire formats: OTLP JSON lines from the real
OpenTelemetry SDK and CloudTrail files as CloudTrail writes them. Regenerate
(after ``python -m tests.scenario_corpus``, which rebuilds the corpus) with::

    python -m tests.detector_scenarios
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.join_traces import ACCOUNT, DATA_ROLE, _iso, tool_run
from tests.otel_traces import (
    BASE_NS, GENAI, MS, AgentRun, Chat, Clock, ToolCall, make_sdk, run_agent, to_records, to_request, write_jsonl,
)

SCENARIOS = Path(__file__).parent / "scenarios"
SEC = 10**9
TRAIL = f"arn:aws:cloudtrail:eu-west-1:{ACCOUNT}:trail/management-events"


def cloudtrail_trail_call(name: str, request_id: str, at_ns: int, *, event_id: str, read_only: bool) -> dict[str, Any]:
    """A CloudTrail management event about a trail (StopLogging, DescribeTrails ...)."""
    return {
        "eventVersion": "1.09",
        "userIdentity": {"type": "AssumedRole", "principalId": "AROAEXAMPLEID:agent-data-session", "arn": DATA_ROLE,
                         "accountId": ACCOUNT, "accessKeyId": "ASIAEXAMPLEKEY"},
        "eventTime": _iso(at_ns).split(".")[0] + "Z",
        "eventSource": "cloudtrail.amazonaws.com", "eventName": name, "awsRegion": "eu-west-1",
        "sourceIPAddress": "10.0.7.21", "userAgent": "[Boto3/1.34.0 md/Botocore#1.34.0]",
        "requestParameters": {"name": TRAIL} if not read_only else {"trailNameList": [TRAIL]},
        "responseElements": None,
        "requestID": request_id, "eventID": event_id, "readOnly": read_only,
        "resources": [{"type": "AWS::CloudTrail::Trail", "ARN": TRAIL}],
        "eventType": "AwsApiCall", "managementEvent": True, "recipientAccountId": ACCOUNT,
        "eventCategory": "Management",
    }


def _botocore(method: str, request_id: str) -> dict[str, Any]:
    return {"rpc.system": "aws-api", "rpc.service": "CloudTrail", "rpc.method": method,
            "aws.region": "eu-west-1", "aws.request_id": request_id, "http.status_code": 200}


def _write(name: str, description: str, alerts: list[dict[str, str]], files: dict[str, Any],
           policy: dict[str, Any] | None = None) -> None:
    d = SCENARIOS / name
    d.mkdir(parents=True, exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    for fname, content in files.items():
        if isinstance(content, bytes):
            (d / fname).write_bytes(content)
        else:
            write_jsonl(d / fname, content)
    if policy is not None:
        corpus = yaml.safe_load((SCENARIOS / "policy.yaml").read_text())
        for k, v in policy.items():
            corpus[k] = v
        (d / "policy.yaml").write_text("# the corpus policy, with:\n" + yaml.safe_dump(corpus, sort_keys=False))
    (d / "expected.yaml").write_text(yaml.safe_dump({"description": description, "alerts": alerts}, sort_keys=False))


def _trail_scenario(name: str, description: str, alerts: list[dict[str, str]], method: str, tool: str,
                    request_id: str, *, at_s: float, seed: int, read_only: bool, enforce: bool) -> None:
    run = tool_run(make_sdk("agent-data-svc", instance_id="agent-data-svc-0", seed=seed), "agent-data", tool,
                   at_s=at_s, call_id=f"call_{tool}", client=f"CloudTrail.{method}",
                   client_attrs=_botocore(method, request_id))
    trail = {"Records": [cloudtrail_trail_call(method, request_id, run.start_ns + 560 * MS,
                                               event_id=f"{seed:08d}-5b7f-4e2a-9d61-0f3b2c4a5e71",
                                               read_only=read_only)]}
    _write(name, description, alerts,
           {"spans.jsonl": to_records(run.spans, 4),
            "cloudtrail.json": orjson.dumps(trail, option=orjson.OPT_INDENT_2)},
           # the detector's usual mode, where an oversight change halts the agent (a scenario has
           # no agent to acknowledge a halt: the live worker would report it unacknowledged)
           policy={"detectors": {"peer_preservation": {"mode": "enforce"}}} if enforce else None)


def write_scenarios() -> None:
    # peer_preservation: one StopLogging seen three times (tool span, botocore span, CloudTrail)
    _trail_scenario("oversight_stop_logging_one_action",
                    "a data agent stops the CloudTrail trail: its tool span, the botocore client span and the "
                    "CloudTrail record are one action and one alert",
                    [{"detector": "peer_preservation", "agent_id": "agent-data", "severity": "critical",
                      "pattern": "oversight"}],
                    "StopLogging", "cloudtrail_stop_logging", "3KX8Q2ZB7PLM4N1C", at_s=500, seed=901,
                    read_only=False, enforce=False)
    # peer_preservation: reading the trail configuration is worth a look, not a kill switch, even
    # in enforce mode (live, a halt nobody acknowledges would show as killswitch_unacknowledged)
    _trail_scenario("oversight_read_describe_trails",
                    "a data agent lists the CloudTrail trails (DescribeTrails): a low-severity read, never a halt",
                    [{"detector": "peer_preservation", "agent_id": "agent-data", "severity": "low",
                      "pattern": "oversight_read"}],
                    "DescribeTrails", "cloudtrail_describe_trails", "9TB2W5YQ1HCX8R3D", at_s=600, seed=902,
                    read_only=True, enforce=True)

    # retry_loop: a flaky deploy tool fails once every four minutes over half an hour of separate
    # conversations, the agent's other tool working in between: an outage, not a loop
    sdk = make_sdk("agent-deployer-svc", instance_id="agent-deployer-svc-0", seed=903)
    records = []
    for i in range(9):
        steps = [ToolCall("search_docs", f'{{"q": "release {i}"}}', call_id=f"call_docs_{i}"),
                 ToolCall("deploy_service", f'{{"service": "web", "build": {100 + i}}}', call_id=f"call_deploy_{i}",
                          error="ServiceUnavailable")]
        run = AgentRun("agent-deployer", "agent-deployer", steps, conversation_id=f"conv-{i}", gap_ms=1500)
        records.append(to_request(run_agent(sdk, GENAI, run, Clock(BASE_NS + (240 * i + 7) * SEC))))
    _write("benign_intermittent_tool_outage",
           "a deploy tool fails once every four minutes for half an hour while the agent's other tool works: "
           "nine failures in a row, but never within the failure window", [], {"spans.jsonl": records})

    # token_spike: the burst scenario with each minute's last chat delivered after the next
    # minute's first (within the allowed lateness): same verdict and threshold as in order
    sdk = make_sdk("agent-writer2-svc", instance_id="agent-writer2-svc-0", seed=904)
    steady = [1500, 1700, 1400, 1600, 1800, 1500, 1600, 1400, 1700, 1600, 32000, 1500]
    in_order = []
    for m, tokens in enumerate(steady):
        for q, sec in enumerate((5, 20, 35, 50)):
            each = tokens // 4
            run = AgentRun("agent-writer2", "agent-writer2", [Chat("gpt-4o", each * 3 // 4, each - each * 3 // 4)],
                           gap_ms=500)
            in_order.append(to_request(run_agent(sdk, GENAI, run, Clock(BASE_NS + (60 * m + sec) * SEC))))
    shuffled = list(in_order)
    for i in range(3, len(shuffled) - 1, 4):  # minute m at :50 arrives after minute m+1 at :05
        shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]
    _write("token_spike_out_of_order",
           "ten steady minutes and a 20x burst, each minute's last call arriving after the next minute began",
           [{"detector": "token_spike", "agent_id": "agent-writer2", "pattern": "rate"}],
           {"spans.jsonl": shuffled})


if __name__ == "__main__":
    write_scenarios()
