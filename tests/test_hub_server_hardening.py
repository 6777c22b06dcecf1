"""Local Hub server: streamed uploads, no blobs left by rejected commits, bounded JSON depth,
refused path names, tags, validate-yaml, names ending in a newline, invalid revisions
(issues 19.7, 18.11 and 28)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import tracemalloc
from urllib.parse import quote

import httpx
import pytest
import torch
from huggingface_hub import HfApi, RepoCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

from ltzoo import zoo
from ltzoo.cli import main as cli_main
from ltzoo.hub_server import HubServer
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


def _same(a: zoo.Ensemble, b: zoo.Ensemble) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


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
    assert _same(first, zoo.load(f"{repo}@v1.0")) and _same(second, zoo.load(repo))
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
