"""A small Hugging Face Hub-compatible server for tests and air-gapped sites.

Point the *unmodified* ``huggingface_hub`` client at it with ``HF_ENDPOINT``::

    python -m ltzoo.hub_server --root /srv/ltzoo-hub --port 8080
    export HF_ENDPOINT=http://127.0.0.1:8080
    ltzoo push runs/ncl my-org/ncl-resnet32-fmnistlt
    ltzoo download my-org/ncl-resnet32-fmnistlt

It implements the model-repo subset of the Hub API that ``zoo.push_to_hub`` /
``zoo.download`` / ``zoo.load`` (i.e. ``create_repo``, ``create_branch``,
``upload_folder``/``create_commit``, ``repo_info``, ``list_repo_tree``,
``list_repo_refs``, ``hf_hub_download``, ``snapshot_download``) use:

* ``POST /api/repos/create``, ``DELETE /api/repos/delete``
* ``GET /api/models/{org}/{name}[/revision/{rev}]``: repo info (``sha``, ``siblings``)
* ``POST /api/models/{org}/{name}/preupload/{rev}``: always answers ``uploadMode: "regular"``,
  so file contents arrive base64-encoded in the commit (no LFS, no Xet)
* ``POST /api/models/{org}/{name}/commit/{rev}``: NDJSON ``header`` / ``file`` /
  ``deletedFile`` / ``deletedFolder`` (``lfsFile`` only for blobs already stored)
* ``POST /api/models/{org}/{name}/branch/{branch}``, ``DELETE`` the same to delete one
* ``GET /api/models/{org}/{name}/refs``, ``.../tree/{rev}[/{path}]``, ``.../commits/{rev}``,
  ``POST .../paths-info/{rev}``
* ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{path}`` with ``X-Repo-Commit`` and ``ETag``
* ``GET /api/whoami-v2``, ``POST /api/validate-yaml``

Errors are JSON ``{"error": "..."}`` with the ``X-Error-Code`` header the client maps to
its exceptions (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).

Storage under ``storage_dir``: content-addressed blobs (``blobs/ab/<sha256>``), one JSON
file per commit (``repos/<org>/<name>/commits/<sha1>.json``: tree path -> blob, parent,
message) and a refs file per repo. Commit ids are 40-hex sha1. Every write goes to a
temporary file in ``storage_dir`` and is moved in place with ``os.replace`` under a lock.

There is no authentication: bind it to 127.0.0.1 (the default) or put it behind a proxy
that authenticates. Every repo id, revision and file path from the network is validated
before use, and only names built from validated parts or hex digests touch the disk.
"""

from .app import create_app
from .server import HubServer, main
from .storage import Storage
from .validation import HubError, validate_card_metadata, validate_path, validate_repo_id

__all__ = [
    "HubError",
    "HubServer",
    "Storage",
    "create_app",
    "main",
    "validate_card_metadata",
    "validate_path",
    "validate_repo_id",
]
