"""The HTTP service, started for real on loopback ports and spoken to over HTTP with httpx.

Two real index versions of LIMIT-small are used: ``limit_small_index`` (all 46 documents, from
conftest) and ``tagged_index`` (the first 40 documents with metadata fields added), so that filters
have fields to match and a reload has a genuinely different version to swap in.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from lateflow.cli import main as cli_main, print_hits
from lateflow.engine import LateIndex
from service.app import create_app
from service.errors import ServiceError
from service.holder import IndexHolder, manifest_index_id
from service.limits import Limits, SearchGate
from service.server import ServerThread
from storage import index_files as files
from tests.conftest import REPO, small_index_config, write_jsonl

QUERIES = ["Who likes Quokkas?", "Who likes Joshua Trees?", "Who likes Slide Rules and Bassoons?"]
TOKEN = "test-token-7f3a9c"
SMALL_LIMITS = Limits(max_query_chars=60, max_k=20, max_candidates=500, max_batch=3, max_body_bytes=4096, max_filter_fields=2, max_filter_values=3)


def tags(i: int) -> dict:
    """Metadata of the i-th document: a string, an int, a bool and a list field."""
    parity = "even" if i % 2 == 0 else "odd"
    return {"source": parity, "group": i % 4, "flag": i % 5 == 0, "tags": ["all", parity]}


@pytest.fixture(scope="module")
def tagged_index(tmp_path_factory, limit_small, prefect_harness) -> Path:
    from flows.index import index_flow

    work = tmp_path_factory.mktemp("tagged")
    docs = [json.loads(line) for line in (limit_small / "corpus.jsonl").read_text(encoding="utf-8").splitlines()][:40]
    corpus = write_jsonl(work / "corpus.jsonl", [{**d, **tags(i)} for i, d in enumerate(docs)])
    index_flow(str(corpus), str(work / "index"), small_index_config())
    return work / "index"


@pytest.fixture(scope="module")
def tagged(tagged_index) -> LateIndex:
    return LateIndex.open(tagged_index)


@pytest.fixture(scope="module")
def server(tagged_index):
    """The service over the tagged index, small limits, no auth."""
    with ServerThread(create_app(tagged_index, limits=SMALL_LIMITS, watch_seconds=None, preload=True)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def secured(tagged_index):
    with ServerThread(create_app(tagged_index, token=TOKEN, watch_seconds=None, preload=True)) as running:
        yield running


def point(link: Path, target: Path) -> None:
    """Re-point a symlink atomically (what a deploy script does with ``ln -sfn``)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.resolve(), target_is_directory=True)
    os.replace(tmp, link)


def wait_ready(client: httpx.Client, index_id: str | None = None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/ready")
        if r.status_code == 200 and (index_id is None or r.json()["index_id"] == index_id):
            return r.json()
        time.sleep(0.1)
    raise AssertionError(f"not ready with {index_id} after {timeout} s: {r.status_code} {r.text}")


def artifact(index_dir: Path, name: str) -> Path:
    """Where an index keeps one of its files (the manifest lists them, also for a versioned index)."""
    listed = json.loads((index_dir / "manifest.json").read_text())["files"]
    return index_dir / next(path for path in listed if Path(path).name == name)


def same_hits(served: list[dict], local: list) -> None:
    assert [h["doc_id"] for h in served] == [h.doc_id for h in local]
    for got, want in zip(served, (h.to_dict() for h in local)):
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)
        assert {k: v for k, v in got.items() if k != "score"} == {k: v for k, v in want.items() if k != "score"}


# -- metadata filters, in-process ---------------------------------------------------------------
def test_filter_equals_exhaustive_ranking_restricted_to_matches(tagged):
    q = tagged.encode(QUERIES[0])
    exact = [tagged.doc_ids[d] for d, _, _ in tagged.rank_exhaustive([q], k=len(tagged))[0]]
    for flt in ({"source": "odd"}, {"group": [1, 2]}, {"source": "even", "group": 2}, {"tags": "odd"}, {"flag": True}):
        mask = tagged.filter_mask(flt)
        matching = [d for d in exact if mask[tagged.doc_ids.index(d)]]
        hits = tagged.search(QUERIES[0], k=5, candidates=10_000, filter=flt)
        assert [h.doc_id for h in hits] == matching[:5], flt


def test_filter_semantics(tagged):
    meta = {d: m for d, m in zip(tagged.doc_ids, (json.loads(m) for m in tagged.doc_metadata))}
    hits = tagged.search(QUERIES[1], k=10, filter={"source": "odd"})
    assert len(hits) == 10 and all(h.metadata["source"] == "odd" for h in hits)
    both = tagged.search(QUERIES[1], k=20, filter={"source": "even", "group": [0, 2]})
    assert {h.doc_id for h in both} == {d for d, m in meta.items() if m["source"] == "even"}  # even i has group 0 or 2
    # bool and int are different values (JSON true is not 1); fewer matches than k: all of them
    flagged = {d for d, m in meta.items() if m["flag"] is True}
    assert {h.doc_id for h in tagged.search(QUERIES[1], k=20, filter={"flag": True})} == flagged
    assert tagged.search(QUERIES[1], k=5, filter={"flag": 1}) == []
    assert tagged.search(QUERIES[1], k=5, filter={"source": "nowhere"}) == []
    assert tagged.search(QUERIES[1], k=5, filter={"no_such_field": "x"}) == []
    with pytest.raises(ValueError, match="filter field 'group': an empty list matches no document"):
        tagged.search(QUERIES[1], k=5, filter={"group": []})
    with pytest.raises(ValueError, match="filter field 'source'"):
        tagged.search(QUERIES[1], filter={"source": {"nested": 1}})


def test_filter_widens_the_candidate_search_to_return_k(tagged):
    # one ANN candidate chunk would name one document: the search widens until 8 matching ones are found
    hits = tagged.search(QUERIES[2], k=8, candidates=1, filter={"group": 3})
    assert len(hits) == min(8, sum(1 for m in tagged.doc_metadata if json.loads(m)["group"] == 3))
    assert all(h.metadata["group"] == 3 for h in hits)


def test_a_filter_returns_k_when_the_ann_cannot_reach_every_chunk(tagged_index):
    """IVF reads nprobe lists (HNSW ~efSearch nodes) however many results are asked for: the
    matching chunks it never reaches are still candidates, so k matching documents come back."""
    from tasks.ann import ANNConfig, build_ann, search_ann

    index = LateIndex.open(tagged_index)
    fde = files.read_fde(index.path / files.FDE_FILE)
    index.ann, _ = build_ann(fde, ANNConfig(kind="ivfpq", ivf_lists=3, ivf_nprobe=1, pq_subquantizers=8))
    reached = (search_ann(index.ann, index.query_fde(index.encode(QUERIES[2]))[None, :], index.ann.ntotal)[1] >= 0).sum()
    assert reached < index.ann.ntotal  # the ANN alone cannot return every chunk
    group = {d for d, m in zip(index.doc_ids, index.doc_metadata) if json.loads(m)["group"] == 3}
    for query in QUERIES:
        hits = index.search(query, k=20, candidates=5, filter={"group": 3})
        # every matching document, the ones the ANN missed ranked by the exact rerank like the others
        exact = [index.doc_ids[d] for d, _, _ in index.rank_exhaustive([index.encode(query)], k=len(index))[0] if index.doc_ids[d] in group]
        assert [h.doc_id for h in hits] == exact and len(exact) == len(group) == 10


def test_no_filter_is_unchanged(tagged):
    plain = [h.to_dict() for h in tagged.search(QUERIES[0], k=5)]
    assert [h.to_dict() for h in tagged.search(QUERIES[0], k=5, filter=None)] == plain
    assert [h.to_dict() for h in tagged.search(QUERIES[0], k=5, filter={})] == plain


# -- search over HTTP equals the in-process API ---------------------------------------------------
def test_health_and_ready(client, tagged_index):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["index_id"] == manifest_index_id(tagged_index)
    assert ready["documents"] == 40 and ready["chunks"] > 40


def test_search_matches_in_process(client, tagged):
    for query in QUERIES:
        r = client.post("/search", json={"query": query, "k": 5})
        assert r.status_code == 200, r.text
        assert r.json()["index_id"] == tagged.index_id
        same_hits(r.json()["results"], tagged.search(query, k=5))
    prf = {"fb_docs": 2, "k": 12, "fb_embs": 4, "beta": 0.5, "mode": "retrieve"}
    r = client.post("/search", json={"query": QUERIES[0], "k": 4, "candidates": 50, "prf": prf})
    from tasks.prf import PRFConfig

    same_hits(r.json()["results"], tagged.search(QUERIES[0], k=4, candidates=50, prf=PRFConfig(**prf)))
    r = client.post("/search", json={"query": QUERIES[1], "k": 6, "prf": True, "filter": {"source": "odd", "group": [1, 3]}})
    same_hits(r.json()["results"], tagged.search(QUERIES[1], k=6, prf=PRFConfig(), filter={"source": "odd", "group": [1, 3]}))
    assert all(h["metadata"]["source"] == "odd" for h in r.json()["results"])
    r = client.post("/search", json={"query": QUERIES[2], "k": 5, "candidates": 5, "scope": "documents"})
    same_hits(r.json()["results"], tagged.search(QUERIES[2], k=5, candidates=5, scope="documents"))


def test_batch_matches_in_process(client, tagged):
    body = {"queries": [{"query": QUERIES[0], "k": 3}, {"query": QUERIES[1], "k": 5, "filter": {"tags": "even"}}, {"query": QUERIES[2], "k": 2, "prf": True}]}
    r = client.post("/search/batch", json=body)
    assert r.status_code == 200, r.text
    from tasks.prf import PRFConfig

    expected = [tagged.search(QUERIES[0], k=3), tagged.search(QUERIES[1], k=5, filter={"tags": "even"}), tagged.search(QUERIES[2], k=2, prf=PRFConfig())]
    for got, want in zip(r.json()["results"], expected):
        same_hits(got, want)


def test_cli_search_through_the_server(server, tagged, capsys):
    assert cli_main(["search", "--server", server.url, QUERIES[0], "-k", "3", "--json"]) == 0
    same_hits(json.loads(capsys.readouterr().out), tagged.search(QUERIES[0], k=3))
    # the same text output as an in-process search
    assert cli_main(["search", "--server", server.url, QUERIES[1], "-k", "2", "--filter", "source=odd", "--filter", "group=1"]) == 0
    served = capsys.readouterr().out
    print_hits(tagged.search(QUERIES[1], k=2, filter={"source": "odd", "group": 1}), as_json=False)
    assert served == capsys.readouterr().out and served.count("score") == 2
    # errors are one clear line and exit code 2, never a traceback
    assert cli_main(["search", "--server", server.url, "x" * 100]) == 2
    assert "422" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert cli_main(["search", "--server", f"http://127.0.0.1:{free}", "q"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert cli_main(["search", "q"]) == 2 and "exactly one of --index" in capsys.readouterr().err


# -- limits and malformed requests ----------------------------------------------------------------
LIMIT_CASES = [
    # (path, json body, status, code)
    ("/search", {"query": "x" * 61}, 422, "limit_exceeded"),
    ("/search", {"query": "x", "k": 0}, 422, "limit_exceeded"),
    ("/search", {"query": "x", "k": 21}, 422, "limit_exceeded"),
    ("/search", {"query": "x", "candidates": 501}, 422, "limit_exceeded"),
    ("/search", {"query": "x", "filter": {"a": 1, "b": 2, "c": 3}}, 422, "limit_exceeded"),
    ("/search", {"query": "x", "filter": {"a": [1, 2, 3, 4]}}, 422, "limit_exceeded"),
    ("/search/batch", {"queries": [{"query": "x"}] * 4}, 422, "limit_exceeded"),
    ("/search/batch", {"queries": []}, 422, "limit_exceeded"),
    ("/search", {"k": 3}, 422, "invalid_request"),
    ("/search", {"query": 5}, 422, "invalid_request"),
    ("/search", {"query": "x", "k": "ten"}, 422, "invalid_request"),
    ("/search", {"query": "x", "k": "5"}, 422, "invalid_request"),  # no lax coercion of numbers
    ("/search", {"query": "x", "filter": {"source": []}}, 422, "invalid_request"),  # any of nothing
    ("/search", {"query": "x", "k": True}, 422, "invalid_request"),
    ("/search", {"query": "x", "candidates": 50.0}, 422, "invalid_request"),
    ("/search", {"query": "x", "topk": 3}, 422, "invalid_request"),
    ("/search", {"query": "x", "filter": {"a": {"nested": 1}}}, 422, "invalid_request"),
    ("/search", {"query": "x", "prf": {"k": 5, "fb_embs": 10}}, 422, "invalid_request"),
    ("/search", {"query": "x", "prf": {"mode": "sideways"}}, 422, "invalid_request"),
    ("/search", {"query": "x", "scope": "passages"}, 422, "invalid_request"),
    ("/search", ["x"], 422, "invalid_request"),
    ("/search", {"query": "   "}, 422, "invalid_request"),
    ("/search", {"query": "\u200b"}, 422, "invalid_query"),  # no token the model can read
    ("/search", {"query": "\U0001f600"}, 422, "invalid_query"),  # only the tokenizer's unknown token
    ("/search", {"query": "[SEP] [CLS]"}, 422, "invalid_query"),  # only special tokens, which the encoder drops
    ("/search/batch", {"queries": [{"query": "fine"}, {"query": "\u200b"}]}, 422, "invalid_query"),
    ("/search/batch", {"queries": [{"query": "fine"}, {"query": "\U0001f600 \U0001f600"}]}, 422, "invalid_query"),
    ("/search/batch", {"query": "x"}, 422, "invalid_request"),
]


@pytest.mark.parametrize("path,body,status,code", LIMIT_CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(LIMIT_CASES)])
def test_limits_and_invalid_bodies_are_4xx_json(client, path, body, status, code):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    if r.status_code == 422 and "details" in error:
        assert all("input" not in d for d in error["details"])  # the rejected input is never echoed
    if code == "invalid_query":
        assert error["message"].endswith("the query has no token the model can read"), error
        if path == "/search/batch":
            assert error["message"].startswith("queries[1]: ")


def test_malformed_json_body_size_and_routes(client):
    r = client.post("/search", content=b'{"query": "x", ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
    r = client.post("/search", content=b'{"query": "x"}', headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]["message"]
    r = client.post("/search", content=json.dumps({"query": "x" * 5000}).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"
    assert client.get("/search").status_code == 405 and client.get("/search").json()["error"]["code"] == "method_not_allowed"
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/search", "/search/batch", "/health", "/ready", "/reload"}
    assert client.get("/docs").status_code == 200


def test_search_gate_answers_busy_after_its_timeout():
    gate = SearchGate(slots=1, timeout=0.05)
    with gate.slot():
        with pytest.raises(ServiceError) as busy:
            with gate.slot():
                pass
    assert busy.value.status == 503 and busy.value.code == "busy"
    with gate.slot():  # the slot was given back
        pass


# -- auth ----------------------------------------------------------------------------------------
def test_auth_on(secured, caplog):
    caplog.set_level(logging.DEBUG)
    anonymous = httpx.Client(base_url=secured.url, timeout=60)
    wrong = httpx.Client(base_url=secured.url, timeout=60, headers={"Authorization": "Bearer not-the-token"})
    right = httpx.Client(base_url=secured.url, timeout=60, headers={"Authorization": f"bearer {TOKEN}"})
    assert anonymous.get("/health").status_code == 200
    seen = []
    for c in (anonymous, wrong):
        for method, path, body in [("GET", "/ready", None), ("POST", "/search", {"query": "x"}), ("POST", "/search/batch", {"queries": [{"query": "x"}]}),
                                   ("POST", "/reload", None), ("GET", "/docs", None), ("GET", "/openapi.json", None), ("GET", "/nowhere", None)]:
            r = c.request(method, path, json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (path, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            seen.append(r.text)
    assert right.get("/ready").status_code == 200
    assert right.post("/search", json={"query": QUERIES[0], "k": 2}).status_code == 200
    assert httpx.get(secured.url + "/search", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert all(TOKEN not in text for text in seen)
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


def test_cli_sends_the_token_from_the_environment(secured, monkeypatch, capsys):
    monkeypatch.delenv("LATEFLOW_API_TOKEN", raising=False)
    assert cli_main(["search", "--server", secured.url, QUERIES[0], "-k", "1"]) == 2
    assert "401" in capsys.readouterr().err
    monkeypatch.setenv("LATEFLOW_API_TOKEN", TOKEN)
    assert cli_main(["search", "--server", secured.url, QUERIES[0], "-k", "1"]) == 0
    assert "score" in capsys.readouterr().out


def test_auth_off_needs_no_header(client):
    assert client.get("/ready").status_code == 200
    assert client.post("/reload").status_code == 200


# -- reload: explicit, watched, failed, in flight --------------------------------------------------
@pytest.fixture()
def current(tmp_path, limit_small_index) -> Path:
    """A symlink ``current -> v1`` (LIMIT-small, no metadata): re-point it to deploy a version."""
    link = tmp_path / "current"
    point(link, limit_small_index)
    return link


def test_reload_endpoint_swaps_to_the_new_version(current, limit_small_index, tagged_index, tagged):
    v1, v2 = manifest_index_id(limit_small_index), manifest_index_id(tagged_index)
    assert v1 != v2
    with ServerThread(create_app(current, watch_seconds=None)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert wait_ready(c)["index_id"] == v1  # loaded in the background at startup
        assert c.post("/search", json={"query": QUERIES[0], "filter": {"source": "odd"}}).json()["results"] == []  # v1 has no metadata
        assert c.post("/reload").json()["status"] == "unchanged"
        point(current, tagged_index)
        r = c.post("/reload")
        assert r.status_code == 200 and r.json()["status"] == "swapped", r.text
        assert r.json()["index_id"] == v2 and r.json()["previous_index_id"] == v1
        assert c.get("/ready").json()["index_id"] == v2
        r = c.post("/search", json={"query": QUERIES[0], "k": 3, "filter": {"source": "odd"}})
        assert r.json()["index_id"] == v2
        same_hits(r.json()["results"], tagged.search(QUERIES[0], k=3, filter={"source": "odd"}))


def test_failed_reload_keeps_serving_the_old_version(current, limit_small_index, tagged_index, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tagged_index, broken)
    tokens = artifact(broken, files.TOKENS_FILE)
    tokens.write_bytes(tokens.read_bytes()[:1000])  # truncated: the manifest's size check fails
    v1 = manifest_index_id(limit_small_index)
    with ServerThread(create_app(current, watch_seconds=None, preload=True)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        point(current, broken)
        r = c.post("/reload")
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["code"] == "reload_failed" and "tokens.parquet" in error["message"] and error["serving_index_id"] == v1
        ready = c.get("/ready").json()
        assert ready["index_id"] == v1 and "tokens.parquet" in ready["last_error"]
        assert c.post("/search", json={"query": QUERIES[0], "k": 2}).json()["index_id"] == v1
        point(current, tagged_index)  # the fixed version goes in
        assert c.post("/reload").json()["status"] == "swapped"
        assert c.get("/ready").json()["last_error"] is None


def test_the_error_clears_when_the_folder_goes_back_to_the_served_version(current, limit_small_index, tmp_path):
    """A broken version replaced by the one being served: /ready must stop reporting its error."""
    broken = tmp_path / "broken"
    shutil.copytree(limit_small_index, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["current"], manifest["index_id"] = "versions/nope", "0123456789abcdef"  # a new version whose folder is missing
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with ServerThread(create_app(current, watch_seconds=0.2, preload=True)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        point(current, broken)
        assert c.post("/reload").status_code == 500
        assert "missing" in c.get("/ready").json()["last_error"]
        point(current, limit_small_index)  # back to the version being served: nothing to load
        deadline = time.time() + 30
        while c.get("/ready").json()["last_error"] is not None and time.time() < deadline:
            time.sleep(0.1)
        assert c.get("/ready").json()["last_error"] is None


def test_not_ready_until_a_loadable_version_arrives(current, tagged_index, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tagged_index, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "format_version": 999}))
    point(current, broken)
    with ServerThread(create_app(current, watch_seconds=None)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        deadline = time.monotonic() + 60
        while "failed to load" not in c.get("/ready").text and time.monotonic() < deadline:
            time.sleep(0.05)  # the first load runs in the background
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "version 999" in r.json()["error"]["message"]
        r = c.post("/search", json={"query": QUERIES[0]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert c.get("/health").status_code == 200
        point(current, tagged_index)
        assert c.post("/reload").json()["status"] == "swapped"
        assert c.post("/search", json={"query": QUERIES[0], "k": 1}).status_code == 200


def test_watcher_picks_up_an_in_place_rebuild_while_requests_keep_succeeding(limit_small_index, tagged_index, tmp_path):
    """The scheduled-job case: the index flow writes a new version into the served folder."""
    from flows.index import index_flow

    live = tmp_path / "live"
    shutil.copytree(limit_small_index, live)
    v1 = manifest_index_id(live)
    app = create_app(live, watch_seconds=0.2, preload=True)
    stop, outcomes = threading.Event(), []

    def hammer() -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/search", json={"query": QUERIES[1], "k": 3})
                outcomes.append((r.status_code, r.json().get("index_id")))

    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        workers = [threading.Thread(target=hammer) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        index_flow(str(tagged_index.parent / "corpus.jsonl"), str(live), small_index_config())
        v2 = manifest_index_id(live)
        ready = wait_ready(c, v2, timeout=60)
        time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join(60)
    assert v2 != v1 and ready["last_reload"]["trigger"] == "watch" and ready["documents"] == 40
    assert outcomes and all(status == 200 for status, _ in outcomes)
    ids = [i for _, i in outcomes]
    assert set(ids) == {v1, v2} and ids.index(v2) > 0


def test_in_flight_snapshot_survives_a_swap(current, limit_small_index, tagged_index):
    holder = IndexHolder(current, watch_seconds=None)
    holder.load()
    in_flight = holder.current  # what a request took at its start
    point(current, tagged_index)
    assert holder.reload().status == "swapped"
    assert holder.current.index_id == manifest_index_id(tagged_index) != in_flight.index_id
    hits = in_flight.index.search(QUERIES[0], k=3)  # the old version still answers, unchanged
    assert [h.doc_id for h in hits] == [h.doc_id for h in LateIndex.open(limit_small_index).search(QUERIES[0], k=3)]


# -- the real command line --------------------------------------------------------------------------
def test_lateflow_serve_command(tagged_index, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LATEFLOW_API_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lateflow.cli", "serve", "--index", str(tagged_index), "--port", str(port), "--token-file", str(token_file), "--watch-seconds", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/ready", headers=headers, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "lateflow serve did not become ready"
            time.sleep(0.2)
        assert httpx.get(url + "/ready", timeout=5).status_code == 401
        r = httpx.post(url + "/search", json={"query": QUERIES[0], "k": 2}, headers=headers, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"]) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "bearer token required (from --token-file)" in output and "POST /search" in output  # the access log
    assert TOKEN not in output
