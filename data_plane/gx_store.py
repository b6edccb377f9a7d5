"""The GX Data Context shared through S3 (`data.gx_store: s3://bucket/prefix`).

With several workers (Prefect pods on Kubernetes) a `<home>/gx/` folder per pod would give
each pod its own suite, its own validation history and its own Data Docs site. Great
Expectations 1.x no longer ships S3 store backends (`TupleS3StoreBackend` was deprecated in
the v1 release and removed in 2026, great_expectations PR #11675); its maintainers' advice is
the file-system backend synced with S3. That is what this module does:

- `pull` before the suite is read and before each validation: the shared stores (suites,
  checkpoints, validation definitions, validation results, the Data Docs site) are copied
  from S3 into the pod's `<home>/gx/`, only objects whose content differs;
- `push` after: what this process wrote or changed goes back, and what it deleted (GX
  pruning old results and their pages) is deleted in S3 — only keys it had seen, so another
  pod's newer results are never removed.

`great_expectations.yml` stays local: it holds the pod's data source (stored definitions
refer to it by name, so the ids need not agree) and is read once when the context opens.
Credentials and the endpoint come from the standard AWS environment (`make_s3_client`).
Two pods validating at the same moment both publish a correct page; the index is the one of
whichever pushed last (it lists every result that pod had pulled).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_plane.landing import make_s3_client

log = logging.getLogger(__name__)

# GX's store folders under the project: shared. The rest (great_expectations.yml,
# uncommitted/config_variables.yml) is per pod.
SHARED = (
    "expectations/",
    "checkpoints/",
    "validation_definitions/",
    "uncommitted/validations/",
    "uncommitted/data_docs/",
)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix ending in "/" or empty) of `s3://bucket/prefix`."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


@dataclass
class S3GxStore:
    """The shared copy of a GX project's stores at `s3://bucket/prefix` (module docstring)."""

    uri: str
    client: Any = None
    seen: dict[str, str] = field(default_factory=dict)  # relative key → ETag at the last sync

    def __post_init__(self) -> None:
        self.bucket, self.prefix = parse_s3_uri(self.uri)
        if self.client is None:
            self.client = make_s3_client()

    def _remote(self) -> dict[str, str]:
        """Relative key → ETag of every shared object under the prefix."""
        found: dict[str, str] = {}
        pages = self.client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(self.prefix) :]
                if relative.startswith(SHARED):
                    found[relative] = item["ETag"].strip('"')
        return found

    def pull(self, project: Path) -> int:
        """Copy into `project` (`<home>/gx`) every shared object it lacks or holds differently,
        except files edited here since the last sync (a local edit of the suite is pushed, not
        overwritten; when both sides changed, S3 wins); how many were copied."""
        remote = self._remote()
        for relative in set(self.seen) - set(remote):  # another pod pruned it: do not revive it
            (project / relative).unlink(missing_ok=True)
        copied = 0
        for relative, etag in remote.items():
            target = project / relative
            mine = _etag(target) if target.is_file() else None
            if mine == etag or (mine is not None and self.seen.get(relative) == etag):
                continue  # the same, or edited here since the last sync (the push sends it)
            target.parent.mkdir(parents=True, exist_ok=True)
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + relative)["Body"]
            target.write_bytes(body.read())
            copied += 1
        self.seen = remote
        log.debug("pulled %d GX store objects from %s", copied, self.uri)
        return copied

    def push(self, project: Path) -> tuple[int, int]:
        """Upload what changed in `project` since the last sync and delete in S3 what this
        process removed locally (only keys seen at the last pull); (uploaded, deleted)."""
        local = {
            path.relative_to(project).as_posix(): path
            for folder in SHARED
            if (project / folder).is_dir()
            for path in (project / folder).rglob("*")
            if path.is_file()
        }
        uploaded = 0
        for relative, path in sorted(local.items()):
            etag = _etag(path)
            if self.seen.get(relative) == etag:
                continue
            self.client.put_object(
                Bucket=self.bucket,
                Key=self.prefix + relative,
                Body=path.read_bytes(),
                ContentType=_content_type(relative),
            )
            self.seen[relative] = etag
            uploaded += 1
        gone = [relative for relative in self.seen if relative not in local]
        for relative in gone:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + relative)
            del self.seen[relative]
        return uploaded, len(gone)

    def url_for(self, project: Path, local_url: str) -> str:
        """The HTTP URL of the pushed copy of a Data Docs page GX gave as `file://…`
        (path-style `<endpoint>/<bucket>/<key>`, which AWS and S3-compatible servers serve)."""
        from urllib.parse import quote, unquote, urlparse
        from urllib.request import url2pathname

        page = Path(url2pathname(unquote(urlparse(local_url).path)))
        relative = page.resolve().relative_to(Path(project).resolve()).as_posix()
        endpoint = str(self.client.meta.endpoint_url).rstrip("/")
        return f"{endpoint}/{self.bucket}/{quote(self.prefix + relative)}"


def _etag(path: Path) -> str:
    """The ETag S3 gives a single-part upload of `path`: its MD5 (GX files are small)."""
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _content_type(relative: str) -> str:
    suffix = relative.rsplit(".", 1)[-1]
    types = {"html": "text/html", "json": "application/json", "css": "text/css"}
    types |= {"js": "application/javascript", "svg": "image/svg+xml", "png": "image/png"}
    return types.get(suffix, "application/octet-stream")


_STORES: dict[str, S3GxStore] = {}


def shared_store(uri: str | None) -> S3GxStore | None:
    """The process's `S3GxStore` for `data.gx_store` (None: the local `<home>/gx` only)."""
    if not uri:
        return None
    if uri not in _STORES:
        _STORES[uri] = S3GxStore(uri)
    return _STORES[uri]
