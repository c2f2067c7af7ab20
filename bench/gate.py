"""
The policy gate's CPU per request, in process: ``python -m bench.gate``.

One small non-stream chat request of a key with the bench's policy, through
everything the policies add to an exchange: ``admit`` (the body's facts,
the plan, the reservation in the memory store), the ``x-ratelimit-*``
headers set on the answer, the answer read for its usage, and the
settlement.  No network and no reactor turns: what is left is the gate's
own work, timed (best of ``--rounds``) and counted (cProfile calls).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from typing import Optional

from twisted.internet.testing import MemoryReactorClock
from twisted.web.http_headers import Headers

from twisted_forward._compat import set_header_values
from twisted_forward.policies.gate import Admission, PolicyGate, RequestFacts
from twisted_forward.policies.memory import MemoryStore
from twisted_forward.policies.prices import Price, PriceTable
from twisted_forward.policies.rules import Policies, parse_key_policy_json

from .client import chat_request
from .fake_upstream import chat_answer
from .run import BENCH_POLICY


def one_request(gate: PolicyGate, n: int, body: bytes, answer: bytes) -> None:
    """Everything the policies do for one exchange."""
    facts = RequestFacts(
        label="bench", level=0, substituted=True, method=b"POST", path="/v1/chat/completions",
        content=io.BytesIO(body), content_type=b"application/json", reservation=f"r{n}",
    )
    admission = gate.decide(facts)
    assert isinstance(admission, Admission)  # a memory store answers at once
    headers = Headers()
    set_header_values(headers, admission.headers)  # as the exchange sets them
    admission.answer_started(200, False)
    admission.relay(answer)
    admission.finish(True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    clock = MemoryReactorClock()
    clock.advance(1_800_000_000.0)
    gate = PolicyGate(
        Policies(keys=parse_key_policy_json(BENCH_POLICY)), MemoryStore(),
        PriceTable({}, Price(1.0, 1.0, 1.0)), clock,
    )
    request = chat_request("127.0.0.1", 1)
    body = request.split(b"\r\n\r\n", 1)[1]
    answer = chat_answer()
    n = 0
    best = float("inf")
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _ in range(args.requests):
            n += 1
            one_request(gate, n, body, answer)
        best = min(best, (time.perf_counter() - started) / args.requests)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(1000):
        n += 1
        one_request(gate, n, body, answer)
    profile.disable()
    calls = sum(row[1] for row in pstats.Stats(profile).stats.values()) / 1000  # type: ignore[attr-defined]  # set by Stats, not declared in typeshed
    sys.stdout.write(f"gate per request: {best * 1e6:.1f} µs (best of {args.rounds} rounds of "
                     f"{args.requests}), {calls:.1f} Python calls\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
