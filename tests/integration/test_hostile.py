"""Requests written by an adversary, against the real api (its own process, so its memory can be
read) on a real Redis, and the real executor: no input earns a 5xx, limits hold before the cost
is paid, and whatever the gateway accepts, the worker loads.

The fuzz run prints its figures (statuses, the api's RSS before and after, the slowest request).
"""

from __future__ import annotations

import json
import random
import struct
import time

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nnfabric.graph import SCHEMA, Graph, Invoke, Node, Ref, SourceLine, TensorRef
from nnfabric.graph.codec import MAGIC, encode_envelope, graph_to_json
from nnfabric.graph.ops import OPS, TENSOR_METHODS, TORCH_FUNCTIONS
from nnfabric.runtime.wire import pack_job, pack_request
from safetensors.torch import save as save_tensors

from tests.support.gateway import start_gateway

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, gpt2):
    running = start_gateway(tmp_path_factory.mktemp("hostile"), gpt2)
    yield running
    running.stop()


# -- envelopes to start from -----------------------------------------------------------------------
def _trace() -> Graph:
    g = Graph()
    g.invokes.append(Invoke(args=[PROMPT]))
    h = g.add(Node("output", ["transformer.h.0", 0, 0], line=SourceLine("study.py", 3, "h = ...")))
    g.add(Node("setitem", [Ref(h.id), (slice(None), -1), 0.0]))
    logits = g.add(Node("output", ["lm_head", 0, 0]))
    g.saves += [h.id, logits.id]
    return g


def seeds() -> list[bytes]:
    trace = pack_request(_trace(), {}, extra={"model": "tiny", "names": {"h": "0"}})
    g = Graph()
    g.invokes.append(Invoke(args=[PROMPT]))
    h = g.add(Node("output", ["transformer.h.1", 0, 0]))
    first = g.add(Node("getitem", [Ref(h.id), 0]))
    steer = g.add(Node("binary", ["add", Ref(first.id), TensorRef("t0")]))
    g.add(Node("set_output", ["transformer.h.1", 0, 0, (Ref(steer.id),)]))
    g.saves.append(steer.id)
    tensors = pack_request(g, {"t0": torch.ones(64), "t1": torch.arange(3)}, extra={"model": "tiny"})
    gen = Graph(kind="generate", options={"max_new_tokens": 3})
    gen.invokes.append(Invoke(args=[PROMPT]))
    gen.add(Node("output", ["transformer.h.0", 1, 0]))
    out = gen.add(Node("model_output", []))
    gen.saves.append(out.id)
    generate = pack_request(gen, {}, extra={"model": "tiny"})
    later = Graph()
    later.invokes.append(Invoke(args=[PROMPT]))
    value = later.add(Node("from_trace", [0, 1]))
    later.saves.append(value.id)
    session = pack_job([_trace(), later], {}, True, extra={"model": "tiny"})
    return [trace, tensors, generate, session]


def split(body: bytes) -> tuple[bytes, bytes]:
    (size,) = struct.unpack("<Q", body[4:12])
    return body[12 : 12 + size], body[12 + size :]


def join(head: bytes, blob: bytes) -> bytes:
    return MAGIC + struct.pack("<Q", len(head)) + head + blob


NASTY = [
    None, True, -1, 0, 2**63, -(2**63) - 1, 1e308, "", "x" * 300, "\ud800", "transformer.h.99", "__class__",
    [], [[[[[[[[[[[]]]]]]]]]]], {}, {"$ref": 10**6}, {"$ref": -1}, {"$tensor": "nope"}, {"$dtype": "complex128"},
    {"$slice": [None, None, 0]}, {"$tuple": 5}, {"$dict": []}, {"$float": "nan"}, {"$ellipsis": True},
    {"$unknown": 1}, list(range(200)), "eval", "torch.load", {"op": "output"}, [None] * 20,
]  # fmt: skip


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


def _replace(value, path, new):
    if not path:
        return new
    head, *rest = path
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    return [*value[:head], _replace(value[head], rest, new), *value[head + 1 :]]


def mutate(body: bytes, rng: random.Random) -> bytes:
    head, blob = split(body)
    kind = rng.randrange(9)
    if kind == 0:  # flip bytes anywhere
        data = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 1:  # cut short
        return body[: rng.randrange(len(body))]
    if kind == 2:  # lie about the header's length
        return MAGIC + struct.pack("<Q", rng.choice([0, 1, len(head) - 1, len(head) + 7, 2**63, 2**64 - 1])) + head + blob
    if kind in (3, 4, 5):  # a nasty value somewhere in the header
        header = json.loads(head)
        path = rng.choice(list(_paths(header)))
        text = json.dumps(_replace(header, path, "@@NASTY@@"))
        raw = rng.choice([json.dumps(v) for v in NASTY] + ["9" * rng.choice([25, 5000, 50000]), '"\\udc00x"',
                                                          "NaN", "-Infinity", '{"a":1,"a":2}'])  # fmt: skip
        return join(text.replace('"@@NASTY@@"', raw).encode(), blob)
    if kind == 6 and blob:  # a nasty tensor blob header
        (size,) = struct.unpack("<Q", blob[:8])
        meta = json.loads(blob[8 : 8 + size])
        name = next(k for k in meta if k != "__metadata__")
        choice = rng.randrange(6)
        if choice == 0:
            meta[name]["dtype"] = ["F32"]
        elif choice == 1:
            meta[name]["shape"] = [True] * len(meta[name]["shape"])
        elif choice == 2:
            meta[name]["shape"] = [2**64]
        elif choice == 3:
            meta["__metadata__"] = {"format": 1}
        elif choice == 4:
            meta[name]["data_offsets"] = [0, meta[name]["data_offsets"][1]]  # overlap another
        else:
            meta[name]["data_offsets"] = [o + 4 for o in meta[name]["data_offsets"]]  # a gap
        new = json.dumps(meta).encode()
        return join(head, struct.pack("<Q", len(new)) + new + blob[8 + size :])
    if kind == 7:  # a repeated key
        return join(head.replace(b'{"schema"', b'{"schema":"nnfabric.graph/1","schema"', 1), blob)
    return body + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))  # trailing bytes


def test_ten_thousand_mutated_envelopes_get_no_5xx_and_what_is_accepted_loads(gateway, capsys):
    rng = random.Random(20261129)
    bodies = seeds()
    for body in bodies:
        assert gateway.submit(body).status_code == 202
    before = gateway.rss()
    statuses: dict[int, int] = {}
    accepted: list[bytes] = []
    worst = (0.0, b"")
    for _ in range(10_000):
        body = mutate(rng.choice(bodies), rng)
        start = time.perf_counter()
        status = gateway.submit(body).status_code
        took = time.perf_counter() - start
        worst = max(worst, (took, body[:80]))
        statuses[status] = statuses.get(status, 0) + 1
        if status == 202:
            accepted.append(body)
    after = gateway.rss()
    assert not any(s >= 500 for s in statuses), statuses
    assert set(statuses) <= {202, 404, 413, 422}, statuses
    for body in accepted:  # one validator: what the gateway took, the worker loads
        gateway.executor.decode(body)
    with capsys.disabled():
        print(f"\nfuzz: 10000 mutated envelopes -> {dict(sorted(statuses.items()))}; api RSS {before:.0f} MB -> "
              f"{after:.0f} MB; slowest request {worst[0] * 1000:.0f} ms; {len(accepted)} accepted, all loadable")  # fmt: skip
    assert after - before < 100


# -- structured graphs from Hypothesis -----------------------------------------------------------
leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["transformer.h.0", "lm_head", "", "logits", "shape", "add", "softmax"]),
    st.builds(Ref, st.integers(-2, 12)), st.builds(TensorRef, st.sampled_from(["t0", "t1", "zz"])),
)  # fmt: skip
value = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                                                    st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                     max_leaves=8)  # fmt: skip
names = [*sorted(OPS), "exec", "__import__"]
op_names = st.sampled_from(names)
node = st.builds(
    lambda op, args, kwargs, invoke: Node(op, args, kwargs, invoke),
    op_names,
    st.one_of(
        st.lists(value, max_size=4),
        st.tuples(st.sampled_from(["transformer.h.0", "lm_head", "transformer.wpe", ""]),
                  st.integers(0, 2), st.integers(0, 1)).map(list),
        st.tuples(st.sampled_from(sorted(TENSOR_METHODS)), st.builds(Ref, st.integers(0, 5))).map(list),
        st.tuples(st.sampled_from(sorted(TORCH_FUNCTIONS)), st.builds(Ref, st.integers(0, 5))).map(list),
    ),
    st.dictionaries(st.sampled_from(["dim", "out", "keepdim", "dtype"]), value, max_size=2),
    st.integers(0, 2),
)  # fmt: skip


@st.composite
def graphs(draw):
    g = Graph(kind=draw(st.sampled_from(["trace", "trace", "generate"])))
    if g.kind == "generate":
        g.options["max_new_tokens"] = draw(st.integers(0, 12))
    for _ in range(draw(st.integers(1, 2))):
        g.invokes.append(Invoke(args=draw(st.one_of(st.none(), st.just([PROMPT]), st.lists(value, max_size=2)))))
    for n in draw(st.lists(node, min_size=1, max_size=8)):
        g.add(n)
    g.saves = draw(st.lists(st.integers(-1, 9), max_size=3))
    return g


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(graph=graphs())
def test_hypothesis_graphs_get_4xx_or_run_and_never_take_the_replica_down(gateway, graph):
    try:
        header = {"schema": SCHEMA, "graph": graph_to_json(graph), "model": "tiny"}
    except Exception:
        return  # not even encodable by our own client
    blob = save_tensors({"t0": torch.ones(2, 64), "t1": torch.zeros(3, dtype=torch.long)})
    body = encode_envelope(header, blob)
    response = gateway.submit(body)
    assert response.status_code < 500, response.text
    if response.status_code == 202:
        outcomes = gateway.executor.run([("fuzz", body), ("honest", pack_request(_trace(), {}))])
        assert set(outcomes) == {"fuzz", "honest"} and outcomes["honest"].ok, outcomes["honest"].error
    else:
        assert response.json()["detail"]


# -- the cases found by hand, by name ---------------------------------------------------------------
def header_with(raw_value: str) -> bytes:
    text = json.dumps({"schema": SCHEMA, "model": "tiny", "graph": graph_to_json(_trace()), "names": "@@X@@"})
    return join(text.replace('"@@X@@"', raw_value).encode(), b"")


def blob_with(meta: dict, data: bytes) -> bytes:
    head = json.dumps(meta).encode()
    return struct.pack("<Q", len(head)) + head + data


def test_integers_of_thousands_of_digits_are_422(gateway):
    response = gateway.submit(header_with("9" * 5000))
    assert response.status_code == 422 and "digits" in response.json()["detail"]


def test_a_list_as_a_tensor_dtype_is_422(gateway):
    head, _ = split(seeds()[0])
    blob = blob_with({"t0": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    assert gateway.submit(join(head, blob)).status_code == 422


@pytest.mark.parametrize("where", ["file", "code", "names"])
def test_lone_surrogates_are_422_and_the_users_job_list_keeps_working(gateway, where):
    if where == "names":
        body = header_with('{"x\\ud800": "1"}')
    else:
        header = json.loads(split(seeds()[0])[0])
        header["graph"]["nodes"][0]["line"][where] = "@@S@@"
        body = join(json.dumps(header).replace('"@@S@@"', '"\\udfff"').encode(), b"")
    response = gateway.submit(body)
    assert response.status_code == 422 and "surrogate" in response.json()["detail"]
    assert gateway.http.get("/v1/jobs").status_code == 200


@pytest.mark.parametrize(
    "meta",
    [
        {"t0": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "t1": {"dtype": "F32", "shape": [1],
                                                                         "data_offsets": [4, 8]}},
        {"t0": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
        {"t0": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}},
        {"t0": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"format": 1}},
        {"t0": {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}},
    ],
    ids=["overlapping", "gapped", "boolean-shape", "non-string-metadata", "2**64-dimension"],
)
def test_tensor_blobs_the_worker_could_not_load_are_refused(gateway, meta):
    head, _ = split(seeds()[0])
    assert gateway.submit(join(head, blob_with(meta, b"\0" * 8))).status_code == 422


def test_a_header_of_huge_integers_is_refused_fast_and_health_stays_answered(gateway):
    head, _ = split(seeds()[0])
    blob = struct.pack("<Q", 1_200_000) + b'{"t0": [' + b",".join([b"9" * 4000] * 299) + b"]}"
    blob = blob[:8] + blob[8:].ljust(1_200_000, b" ")
    response = gateway.submit(join(head, blob))
    # Refused at the first long integer, as the parser meets it (not after converting 299 of them).
    assert response.status_code == 422 and "digits is too long" in response.json()["detail"], response.text
    assert gateway.http.get("/healthz").status_code == 200


def test_a_million_node_header_is_413_before_it_is_parsed(gateway):
    nodes = b",".join([b"{}"] * 1_000_000)
    head = b'{"schema":"nnfabric.graph/1","model":"tiny","graph":{"kind":"trace","nodes":[' + nodes + b'],"invokes":[]}}'
    before = gateway.rss()
    start = time.perf_counter()
    response = gateway.submit(join(head, b""))
    assert response.status_code == 413 and time.perf_counter() - start < 2.0
    assert gateway.rss() - before < 60


def test_a_chunked_body_far_over_the_limit_is_cut_as_it_arrives(gateway):
    before = gateway.rss()

    def chunks():
        for _ in range(160):
            yield b"{" * (1 << 20)

    try:
        status = gateway.submit(chunks()).status_code  # type: ignore[arg-type]
    except httpx.TransportError:
        status = 413  # the server answered and closed while the client was still sending
    assert status == 413
    assert gateway.rss() - before < 60
    assert gateway.http.get("/healthz").status_code == 200
