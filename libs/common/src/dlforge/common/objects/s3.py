"""S3 ObjectStore on the minio SDK: MinIO, SeaweedFS or any S3-compatible server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import BinaryIO

from minio import Minio
from minio.error import S3Error

from dlforge.common.errors import NotFound
from dlforge.common.objects import ObjectInfo, ObjectStore, check_key

_PART_SIZE = 16 * 1024 * 1024


class S3ObjectStore(ObjectStore):
    def __init__(
        self, *, endpoint: str, access_key: str, secret_key: str, bucket: str, secure: bool = False,
        region: str | None = None, prefix: str = "",
    ) -> None:
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region)
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._bucket_checked = False

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._bucket_checked = True

    def put_stream(
        self, key: str, stream: BinaryIO, *, length: int = -1, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        self._ensure_bucket()
        self.client.put_object(
            self.bucket, self._key(key), stream, length=length, part_size=_PART_SIZE, content_type=content_type
        )
        return self.stat(key)

    @contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        self._ensure_bucket()
        try:
            response = self.client.get_object(self.bucket, self._key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise NotFound(f"no object {key!r}") from exc
            raise
        try:
            yield response  # type: ignore[misc]  # urllib3 response is a readable binary stream
        finally:
            response.close()
            response.release_conn()

    def open(self, key: str):  # type: ignore[override]
        return self._open(key)

    def stat(self, key: str) -> ObjectInfo:
        self._ensure_bucket()
        try:
            st = self.client.stat_object(self.bucket, self._key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "ResourceNotFound", "NoSuchObject"):
                raise NotFound(f"no object {key!r}") from exc
            raise
        return ObjectInfo(
            key=key,
            size=st.size or 0,
            etag=(st.etag or "").strip('"'),
            last_modified=st.last_modified,  # type: ignore[arg-type]
            content_type=st.content_type or "application/octet-stream",
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._ensure_bucket()
        infos = []
        for obj in self.client.list_objects(self.bucket, prefix=self.prefix + prefix, recursive=True):
            if obj.is_dir or obj.object_name is None:
                continue
            infos.append(
                ObjectInfo(
                    key=obj.object_name[len(self.prefix):],
                    size=obj.size or 0,
                    etag=(obj.etag or "").strip('"'),
                    last_modified=obj.last_modified,  # type: ignore[arg-type]
                    content_type=obj.content_type or "application/octet-stream",
                )
            )
        yield from sorted(infos, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        self._ensure_bucket()
        self.client.remove_object(self.bucket, self._key(key))

    def presigned_get_url(self, key: str, *, expires: timedelta = timedelta(hours=1)) -> str:
        self.stat(key)
        return self.client.presigned_get_object(self.bucket, self._key(key), expires=expires)

    def ping(self) -> None:
        self.client.bucket_exists(self.bucket)
