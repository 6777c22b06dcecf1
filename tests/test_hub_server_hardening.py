"""Local Hub server: streamed uploads, no blobs left by rejected commits, bounded JSON depth,
refused path names, tags, validate-yaml, names ending in a newline, invalid revisions
(issues 19.7, 18.11 and 28)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from urllib.parse import quote

import httpx
import pytest
import torch
from checks import same_weights
from huggingface_hub import HfApi, RepoCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

from ltzoo import zoo
from ltzoo.cli import main as cli_main
from ltzoo.hub_server import HubError, HubServer, Storage
from ltzoo.hub_server import app as hub_app
from ltzoo.hub_server.validation import MAX_PATHS_INFO, MAX_SMALL_BODY_BYTES
from ltzoo.zoo import hub_io
from ltzoo.zoo.cards import render_card
from ltzoo.zoo.ensemble import WEIGHTS_NAME
from ltzoo.zoo.registry import get_entry


@pytest.fixture
def hub(tmp_path):
    """(httpx client, storage dir) of a fresh local Hub holding the repo org/repo."""
    store = tmp_path / "store"
    with HubServer(store) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post(
            "/api/repos/create", json={"organization": "org", "name": "repo"}
        ).is_success
        yield client, store


def _line(item: dict) -> bytes:
    return json.dumps(item).encode() + b"\n"


def _header(**extra) -> bytes:
    return _line({"key": "header", "value": {"summary": "test", **extra}})


def _file(path: str, content: bytes = b"x") -> bytes:
    value = {"path": path, "encoding": "base64", "content": base64.b64encode(content).decode()}
    return _line({"key": "file", "value": value})


def _blobs(store) -> list[str]:
    return sorted(p.name for p in (store / "blobs").rglob("*") if p.is_file())


BAD_NAMES = [" ", "a/ /b.txt", " lead.txt", "trail.txt ", "dot.", "\u202etxt.exe", "a\u2066b",
             "zero\u200bwidth", "con", "CON.txt", "nul", "aux.json", "prn", "com1", "LPT9.bin",
             "dir/com3/x", "Lpt1 .txt"]  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES)
def test_odd_path_names_are_refused(hub, name):
    client, store = hub
    blobs = _blobs(store)
    r = client.post("/api/models/org/repo/commit/main", content=_header() + _file(name))
    assert r.status_code == 400, r.text
    assert "invalid file path" in r.json()["error"]
    assert _blobs(store) == blobs and list((store / "tmp").iterdir()) == []


def test_rejected_commits_leave_no_blobs(hub):
    client, store = hub
    before = _blobs(store)
    for i in range(3):  # 412: stale parent; 409: file/folder clash; 404: delete a missing file
        bodies = [
            _header(parentCommit="f" * 40) + _file("w.bin", os.urandom(200_000)),
            _header() + _file("a.txt") + _file("a.txt/b", b"%d" % i),
            _header()
            + _file("new.bin", os.urandom(1000))
            + _line({"key": "deletedFile", "value": {"path": "missing"}}),
        ]
        for body in bodies:
            assert client.post("/api/models/org/repo/commit/main", content=body).is_client_error
    assert _blobs(store) == before
    assert list((store / "tmp").iterdir()) == []


def test_deeply_nested_json_is_a_400(hub):
    client, _ = hub
    deep = b"[" * 100_000 + b"]" * 100_000
    r = client.post("/api/models/org/repo/commit/main", content=_header() + deep + b"\n")
    assert r.status_code == 400 and "nested deeper" in r.json()["error"]
    r = client.post(
        "/api/repos/create",
        content=b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "nested deeper" in r.json()["error"]


def test_large_upload_is_streamed_to_disk(hub, tmp_path):
    """A 24 MiB file: the server's Python allocations stay far below the file size
    (before: about 5.5 x the file), and the file comes back bit-identical."""
    client, _ = hub
    payload = os.urandom(24 * 1024 * 1024)
    body = tmp_path / "body.ndjson"
    with open(body, "wb") as f:
        f.write(_header())
        f.write(b'{"key": "file", "value": {"path": "big.bin", "encoding": "base64", "content": "')
        f.write(base64.b64encode(payload))
        f.write(b'"}}\n')
    del payload

    def stream():
        with open(body, "rb") as f:
            yield from iter(lambda: f.read(1 << 20), b"")

    tracemalloc.start()
    try:
        r = client.post(
            "/api/models/org/repo/commit/main",
            content=stream(),
            headers={"content-length": str(body.stat().st_size)},
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    assert peak < 24 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    got = client.get("/org/repo/resolve/main/big.bin").content
    with open(body, "rb") as f:
        f.readline()
        line = f.readline()
    start = line.index(b'"content": "') + len(b'"content": "')
    assert (
        hashlib.sha256(got).digest()
        == hashlib.sha256(base64.b64decode(line[start : line.rindex(b'"}}')])).digest()
    )


def test_tags_are_immutable_refs(hub):
    client, _ = hub
    api = HfApi(endpoint=str(client.base_url))
    first = api.upload_file(path_or_fileobj=b"one", path_in_repo="f.txt", repo_id="org/repo").oid
    api.create_tag("org/repo", tag="v1.0", revision=first)
    api.upload_file(path_or_fileobj=b"two", path_in_repo="f.txt", repo_id="org/repo")
    assert client.get("/org/repo/resolve/v1.0/f.txt").content == b"one"
    assert client.get("/org/repo/resolve/main/f.txt").content == b"two"
    refs = api.list_repo_refs("org/repo")
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", first)]
    with pytest.raises(HfHubHTTPError):
        api.create_tag("org/repo", tag="v1.0")  # 409: a tag never moves
    r = client.post("/api/models/org/repo/commit/v1.0", content=_header() + _file("g.txt"))
    assert r.status_code == 400 and "tag" in r.json()["error"]
    api.delete_tag("org/repo", tag="v1.0")
    assert api.list_repo_refs("org/repo").tags == []


def test_push_tag_from_the_cli_and_library(hub_server, tmp_path, capsys):
    repo = "test-org/tagged"
    torch.manual_seed(0)
    first = zoo.Ensemble(zoo.EnsembleConfig(num_experts=1, layout="single")).eval()
    first.save_pretrained(tmp_path / "m")
    assert cli_main(["push", str(tmp_path / "m"), repo, "--tag", "v1.0"]) == 0
    assert "tagged v1.0" in capsys.readouterr().out
    second = zoo.Ensemble(zoo.EnsembleConfig(num_experts=1, layout="single")).eval()
    zoo.push_to_hub(second, repo, tag="v2.0")
    assert same_weights(first, zoo.load(f"{repo}@v1.0")) and same_weights(second, zoo.load(repo))
    assert {t.name for t in HfApi().list_repo_refs(repo).tags} == {"v1.0", "v2.0"}


def test_validate_yaml_rejects_invalid_front_matter(hub):
    client, _ = hub
    card = render_card(get_entry("ncl-resnet32-fmnistlt").build_config())
    ok = client.post("/api/validate-yaml", json={"repoType": "model", "content": card})
    assert ok.status_code == 200, ok.text
    for bad, why in [
        ("---\ntags: [unclosed\n---\n# x", "invalid YAML"),
        ("---\n- a list\n---\n", "mapping"),
        ("---\nlicense: [1]\n---\n", "'license' must be a string"),
        ("---\ndatasets:\n- not a dataset id\n---\n", "not a Hub dataset id"),
        ("---\nmodel-index: 3\n---\n", "model-index"),
        ("---\ntags: [a]\n", "not closed"),
    ]:
        r = client.post("/api/validate-yaml", json={"repoType": "model", "content": bad})
        assert r.status_code == 400 and why in r.json()["error"], (bad, r.text)


def test_real_client_card_validation_against_local_hub(hub_server):
    card = render_card(get_entry("ce-resnet32-fmnistlt").build_config())
    RepoCard(card).validate()
    assert "datasets:\n- zalando-datasets/fashion_mnist\n" in card
    assert "long-tailed subset of the Fashion-MNIST training set" in card
    with pytest.raises(ValueError, match="not a Hub dataset id"):
        RepoCard("---\ndatasets:\n- fashion mnist lt\n---\n# card").validate()


def test_weights_file_gets_the_normal_umask_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        zoo.Ensemble(zoo.EnsembleConfig(num_experts=1, layout="single")).save_pretrained(tmp_path)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / WEIGHTS_NAME).stat().st_mode) == 0o644


# -- issue 28: validate-yaml types and depth, names ending in a newline, invalid revisions -------
@pytest.mark.parametrize(
    ("meta", "why"),
    [
        ("datasets: 5", "'datasets' must be a list of strings"),
        ("datasets: true", "'datasets' must be a list of strings"),
        ("datasets: {a: b}", "'datasets' must be a list of strings"),
        ("datasets: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
        ("tags: " + "{a: " * 5000 + "1" + "}" * 5000, "nested too deeply"),
        ("date: 2024-13-45", "invalid YAML"),  # a timestamp datetime() refuses
        ("n: " + "1" * 5000, "invalid YAML"),  # over Python's int digit limit
    ],
)
def test_validate_yaml_odd_values_are_a_400_not_a_500(hub, meta, why):
    client, _ = hub
    r = client.post("/api/validate-yaml", json={"content": f"---\n{meta}\n---\n# card"})
    assert r.status_code == 400 and why in r.json()["error"], r.text[:300]


def _files_and_dirs(store) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*"))


@pytest.mark.parametrize(("org", "name"), [("org", "name\n"), ("org\n", "name"), ("org", "repo\n")])
def test_repo_names_ending_in_a_newline_are_refused(hub, org, name):
    client, store = hub
    before = _files_and_dirs(store)
    r = client.post("/api/repos/create", json={"organization": org, "name": name})
    assert r.status_code == 400 and "invalid repo id" in r.json()["error"], r.text
    assert client.get("/api/models/org/repo%0A").status_code == 400
    assert _files_and_dirs(store) == before
    assert [p.name for p in (store / "repos").iterdir()] == ["org"]
    with pytest.raises(ValueError, match="invalid Hub repo id"):
        hub_io.download(f"{org}/{name}")


def test_tags_and_branches_ending_in_a_newline_are_refused(hub):
    client, store = hub
    refs = client.get("/api/models/org/repo/refs").json()
    before = _files_and_dirs(store)
    r = client.post("/api/models/org/repo/tag/main", json={"tag": "v1\n"})
    assert r.status_code == 400 and "invalid branch name" in r.json()["error"], r.text
    r = client.post("/api/models/org/repo/branch/dev%0A", json={})
    assert r.status_code == 400 and "invalid branch name" in r.json()["error"], r.text
    assert client.get("/api/models/org/repo/refs").json() == refs
    assert _files_and_dirs(store) == before
    r = client.get("/org/repo/resolve/main%0A/.gitattributes")
    assert r.status_code == 404 and r.headers["X-Error-Code"] == "RevisionNotFound"
    # routes match the whole path: a final newline is not dropped before the name checks
    assert client.get("/org/repo/resolve/main/.gitattributes").status_code == 200
    r = client.get("/org/repo/resolve/main/.gitattributes%0A")
    assert r.status_code == 400 and "invalid file path" in r.json()["error"]
    assert client.get("/api/models/org/repo/refs%0A").status_code == 404


INVALID_REVISIONS = ["../main", "refs%2fpr%2f1", "refs/pr/1", "\uff4d\uff41\uff49\uff4e", "main\n"]


@pytest.mark.parametrize("revision", INVALID_REVISIONS)
def test_invalid_revision_is_revision_not_found_for_the_real_client(hub, tmp_path, revision):
    """404 + X-Error-Code: RevisionNotFound, as the Hub answers: huggingface_hub raises
    RevisionNotFoundError, not "check your connection" (a bare 400 before)."""
    client, _ = hub
    endpoint = str(client.base_url)
    api = HfApi(endpoint=endpoint)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            "org/repo",
            ".gitattributes",
            revision=revision,
            endpoint=endpoint,
            cache_dir=tmp_path / "cache",
        )
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/repo", revision=revision)
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files("org/repo", revision=revision)
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/repo", revision=revision
        )
    r = client.get(f"/org/repo/resolve/{quote(revision, safe='')}/.gitattributes")
    assert r.status_code == 404 and r.headers["X-Error-Code"] == "RevisionNotFound"
    assert "Invalid rev id" in r.json()["error"]


# -- issue 28.8: no request freezes the others; linear algorithms; per-endpoint limits ---------
def _profiled_calls(fn: Callable[[], object]) -> int:
    """Python and C function calls made by ``fn()`` in this thread: a measure of work that,
    unlike a timing, does not depend on the machine or its load."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def _commit_calls(tmp_path, n: int) -> int:
    """Calls made by one commit that deletes n folders and adds n files to a tree of n files."""
    store = Storage(tmp_path / f"store-{n}")
    store.create_repo("org/repo", private=False)
    blob = store.put_blob(b"x")
    old = [("file", f"old/d{i}/f.txt", blob) for i in range(n)]
    store.commit_operations("org/repo", "main", {"summary": "setup"}, old)
    ops = [("deletedFolder", f"old/d{i}", None) for i in range(n)]
    ops += [("file", f"new/d{i % 50}/f{i}.txt", blob) for i in range(n)]
    calls = _profiled_calls(
        lambda: store.commit_operations("org/repo", "main", {"summary": "big"}, ops)
    )
    tree = store.resolve("org/repo", "main")[1]["tree"]
    assert len(tree) == n + 1 and not any(p.startswith("old/") for p in tree)
    return calls


def test_commit_work_grows_linearly_with_the_number_of_files(tmp_path):
    """Each added file was checked against every file of the tree, each deleted folder
    scanned the whole tree: a 10,000-file commit took 15 s under the storage lock."""
    small, large = _commit_calls(tmp_path, 500), _commit_calls(tmp_path, 1000)
    assert large / small < 2.5, (small, large)  # quadratic: about 4


def test_file_and_folder_operations_keep_the_tree_consistent(tmp_path):
    store = Storage(tmp_path / "store")
    store.create_repo("org/repo", private=False)
    blob = store.put_blob(b"x")

    def commit(*ops: tuple[str, str, dict | None]) -> dict:
        store.commit_operations("org/repo", "main", {"summary": "s"}, list(ops))
        return store.resolve("org/repo", "main")[1]["tree"]

    commit(("file", "a/b/c.txt", blob), ("file", "a/d.txt", blob))
    for clash in ("a", "a/b", "a/d.txt/e", "a/b/c.txt/f"):
        with pytest.raises(HubError, match="conflicts with existing") as err:
            commit(("file", clash, blob))
        assert err.value.status == 409
    tree = commit(("deletedFolder", "a/b", None), ("file", "a/b", blob))  # the folder is gone
    assert sorted(tree) == [".gitattributes", "a/b", "a/d.txt"]
    tree = commit(
        ("deletedFile", "a/b", None), ("deletedFile", "a/d.txt", None), ("file", "a", blob)
    )
    assert sorted(tree) == [".gitattributes", "a"]
    for op in (("deletedFolder", "a", None), ("deletedFile", "a/d.txt", None)):
        with pytest.raises(HubError) as err:
            commit(op)
        assert err.value.status == 404 and err.value.code == "EntryNotFound"


def _paths_info_calls(n: int) -> int:
    """Calls made by paths-info for n missing paths and 50 folders on a tree of n files."""
    tree = {f"d{i % 50}/f{i}.txt": {"oid": f"{i:040x}", "size": 1} for i in range(n)}
    paths = [f"d{i % 50}/missing{i}" for i in range(n)] + [f"d{i}" for i in range(50)]
    entries: list = []
    calls = _profiled_calls(
        lambda: entries.extend(hub_app.paths_info_entries(tree, paths, "0" * 40))
    )
    assert [e["path"] for e in entries] == [f"d{i}" for i in range(50)]
    return calls


def test_paths_info_work_grows_linearly_with_the_tree():
    """Each path missing from the tree was looked for by a scan of the whole tree (9,999
    paths on 10,000 files: 13.8 s, all of it on the event loop)."""
    small, large = _paths_info_calls(500), _paths_info_calls(1000)
    assert large / small < 2.5, (small, large)  # quadratic: about 4


def test_paths_info_answers_files_and_folders_as_the_tree_listing(hub):
    client, _ = hub
    endpoint = str(client.base_url)
    api = HfApi(endpoint=endpoint)
    for path in ("a/b/c.txt", "a/d.txt", "e.txt"):
        api.upload_file(path_or_fileobj=path.encode(), path_in_repo=path, repo_id="org/repo")
    listing = api.list_repo_tree("org/repo", recursive=True)
    want = {e.path: (type(e).__name__, getattr(e, "blob_id", None) or e.tree_id) for e in listing}
    asked = ["a", "a/b/", "e.txt", "missing", "a/b/c.txt", "a/missing"]
    got = api.get_paths_info("org/repo", asked)
    assert [e.path for e in got] == ["a", "a/b", "e.txt", "a/b/c.txt"]
    assert all(
        want[e.path] == (type(e).__name__, getattr(e, "blob_id", None) or e.tree_id) for e in got
    )


def _slow_request_cases() -> list:
    """(function of the app module that the request calls, the request)."""
    return [
        ("validate_card_metadata", lambda c: c.post("/api/validate-yaml", json={"content": "# card"})),
        ("validate_path", lambda c: c.post("/api/models/org/repo/paths-info/main", data={"paths": ["a"]})),
        ("parse_json_object", lambda c: c.post("/api/repos/create", json={"organization": "org", "name": "new"})),
    ]  # fmt: skip


@pytest.mark.parametrize(("slow_function", "request_"), _slow_request_cases())
def test_a_slow_request_does_not_delay_whoami(hub, monkeypatch, slow_function, request_):
    """The request's work is made 3 s slow: run on the event loop (card validation, paths
    validation, JSON parsing were), it held every other request for as long."""
    client, _ = hub
    entered = threading.Event()
    real = getattr(hub_app, slow_function)

    def slow(*args, **kwargs):
        entered.set()
        time.sleep(3)
        return real(*args, **kwargs)

    monkeypatch.setattr(hub_app, slow_function, slow)
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=client.base_url, timeout=60) as other:
        worker = threading.Thread(target=lambda: answers.append(request_(other)))
        worker.start()
        assert entered.wait(10)
        start = time.monotonic()
        assert client.get("/api/whoami-v2").json()["name"] == "local"
        waited = time.monotonic() - start
        still_running = worker.is_alive()
        worker.join()
    assert waited < 1 and still_running, waited
    assert answers[0].status_code == 200, answers[0].text


SMALL_BODY_ENDPOINTS = [
    ("POST", "/api/repos/create"),
    ("DELETE", "/api/repos/delete"),
    ("POST", "/api/models/org/repo/tag/main"),
    ("POST", "/api/models/org/repo/branch/dev"),
    ("POST", "/api/validate-yaml"),
    ("POST", "/api/models/org/repo/paths-info/main"),
]


@pytest.mark.parametrize(("method", "url"), SMALL_BODY_ENDPOINTS)
def test_small_request_endpoints_answer_413_over_their_limit(hub, method, url):
    client, store = hub
    refs = client.get("/api/models/org/repo/refs").json()
    body = json.dumps({"organization": "org", "name": "repo", "pad": "x" * MAX_SMALL_BODY_BYTES})
    r = client.request(method, url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:200]
    assert r.json() == {
        "error": f"request body larger than the limit of {MAX_SMALL_BODY_BYTES} bytes"
    }
    assert client.get("/api/models/org/repo/refs").json() == refs  # nothing happened
    assert [p.name for p in (store / "repos" / "org").iterdir()] == ["repo"]


def test_the_limits_leave_room_for_real_requests(hub):
    """A card just under the small limit is validated; a commit far over it is stored."""
    client, _ = hub
    card = "---\ntags: [a]\n---\n" + "text " * ((MAX_SMALL_BODY_BYTES - 1000) // 5)
    assert client.post("/api/validate-yaml", json={"content": card}).status_code == 200
    payload = os.urandom(2 * MAX_SMALL_BODY_BYTES)
    r = client.post(
        "/api/models/org/repo/commit/main", content=_header() + _file("big.bin", payload)
    )
    assert r.status_code == 200, r.text
    assert client.get("/org/repo/resolve/main/big.bin").content == payload


def test_paths_info_takes_as_many_paths_as_the_hub(hub):
    """The Hub answers 413 over 1,000 paths (the client sends 500 at a time)."""
    client, _ = hub
    api = HfApi(endpoint=str(client.base_url))
    paths = [".gitattributes"] + [f"missing/{i}.txt" for i in range(MAX_PATHS_INFO - 1)]
    assert [e.path for e in api.get_paths_info("org/repo", paths)] == [".gitattributes"]
    r = client.post("/api/models/org/repo/paths-info/main", data={"paths": [*paths, "one-more"]})
    assert r.status_code == 413 and "too many paths" in r.json()["error"], r.text


# -- issue 28.11: an NDJSON header with a long summary ------------------------------------------
def _commit_titles(client: httpx.Client) -> list[str]:
    return [c["title"] for c in client.get("/api/models/org/repo/commits/main").json()]


@pytest.mark.parametrize(
    ("header", "why"),
    [  # a header line over 1 MiB: its strings over 64 KiB came back as placeholders ("\x000")
        ({"summary": "S" * 70_000, "description": "d" * (1 << 20)}, "line 1 is too large"),
        ({"summary": "S" * (1 << 20) + "S"}, "line 1 is too large"),
        ({"summary": "S" * 70_000}, "commit summary too long"),  # on a line under 1 MiB
    ],
)
def test_an_overlong_commit_header_is_a_400_not_a_garbled_title(hub, header, why):
    client, _ = hub
    titles = _commit_titles(client)
    body = _line({"key": "header", "value": header}) + _file("a.txt")
    r = client.post("/api/models/org/repo/commit/main", content=body)
    assert r.status_code == 400 and why in r.json()["error"], r.text[:300]
    assert _commit_titles(client) == titles


def test_only_a_file_content_may_be_left_in_the_body(hub):
    """On a line over 1 MiB, another string over 64 KiB (here an unknown field) would reach
    the commit as a placeholder: refused; the same line without it is stored."""
    client, _ = hub
    value = {
        "path": "big.bin",
        "encoding": "base64",
        "content": base64.b64encode(os.urandom(1 << 20)).decode(),
    }
    r = client.post(
        "/api/models/org/repo/commit/main",
        content=_header() + _line({"key": "file", "value": {**value, "note": "n" * 70_000}}),
    )
    assert r.status_code == 400 and "only a file's content" in r.json()["error"], r.text[:300]
    r = client.post(
        "/api/models/org/repo/commit/main",
        content=_header() + _line({"key": "file", "value": value}),
    )
    assert r.status_code == 200, r.text
