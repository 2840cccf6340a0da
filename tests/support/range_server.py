"""A read-only S3 endpoint over a local folder that answers requests concurrently on keep-alive connections, as S3
does; for benchmarks that measure a client's own CPU, on 127.0.0.1 only.

Why not moto for that: moto answers one request after another (about 400 ranged GETs per second here) over
HTTP/1.0, a new connection per request, so every response wakes the client on its own and the client's CPU per
request is mostly those wakes and connection set-ups, which an S3 endpoint does not cause. moto stays the server
for behaviour (writes, errors, stalls); this one only reads.

`python -m tests.support.range_server ROOT PORT`: the first folder level under ROOT is the bucket, the rest the key
(path-style addressing, as both s3fs and obstore use for an IP endpoint). What it answers, with S3's status codes,
headers and XML bodies: GetObject (whole, `bytes=a-b`, `bytes=a-`, `bytes=-n`), HeadObject, ListObjectsV2
(prefix, delimiter, no paging: benchmark stores are small), and NoSuchKey/NoSuchBucket. Signatures are not checked.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RangeServer:
    def __init__(self, root: Path):
        self.root = root.resolve()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request, *lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
                length = int(headers.get("content-length") or 0)
                if length:
                    await reader.readexactly(length)
                method, target, _ = request.split(" ", 2)
                writer.write(self.answer(method, target, headers))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def answer(self, method: str, target: str, headers: dict[str, str]) -> bytes:
        url = urlsplit(target)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        if bucket in ("", ".", "..") or not (self.root / bucket).is_dir() or ".." in Path(key).parts:
            return _error(404, "NoSuchBucket", bucket, method)
        if method == "GET" and not key:
            query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            return _response(200, {"Content-Type": "application/xml"}, self.listing(bucket, query.get("prefix", ""), query.get("delimiter", "")))
        file = self.root / bucket / key
        if method not in ("GET", "HEAD"):
            return _error(405, "MethodNotAllowed", key, method)
        if not file.is_file():
            return _error(404, "NoSuchKey", key, method)
        stat = file.stat()
        meta = {"ETag": _etag(stat), "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True), "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream"}
        if method == "HEAD":
            return _response(200, {**meta, "Content-Length": str(stat.st_size)}, b"", head=True)
        wanted = _RANGE.match(headers.get("range", ""))
        if wanted is None:
            return _response(200, meta, _pread(file, 0, stat.st_size))
        start, end = _span(wanted.group(1), wanted.group(2), stat.st_size)
        if start >= end:
            return _error(416, "InvalidRange", key, method)
        return _response(206, {**meta, "Content-Range": f"bytes {start}-{end - 1}/{stat.st_size}"}, _pread(file, start, end - start))

    def listing(self, bucket: str, prefix: str, delimiter: str) -> bytes:
        base = self.root / bucket
        keys, prefixes = [], set()
        for file in sorted(p for p in base.rglob("*") if p.is_file()):
            key = file.relative_to(base).as_posix()
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                continue
            stat = file.stat()
            keys.append(f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(stat.st_mtime)}</LastModified>"
                        f"<ETag>{escape(_etag(stat))}</ETag><Size>{stat.st_size}</Size><StorageClass>STANDARD</StorageClass></Contents>")
        common = "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in sorted(prefixes))
        return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(keys) + len(prefixes)}</KeyCount>"
                f"<MaxKeys>1000</MaxKeys><Delimiter>{escape(delimiter)}</Delimiter><IsTruncated>false</IsTruncated>"
                f"{''.join(keys)}{common}</ListBucketResult>").encode()


def _span(first: str, last: str, size: int) -> tuple[int, int]:
    """[start, end) of an HTTP byte range (RFC 9110 §14.1.2), clipped to the object."""
    if not first:  # the last n bytes
        return max(size - int(last or 0), 0), size
    return int(first), min(int(last) + 1 if last else size, size)


def _pread(file: Path, offset: int, length: int) -> bytes:
    fd = os.open(file, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _etag(stat: os.stat_result) -> str:
    return '"' + hashlib.md5(f"{stat.st_size}-{stat.st_mtime_ns}".encode()).hexdigest() + '"'


def _iso(timestamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _response(status: int, headers: dict[str, str], body: bytes, head: bool = False) -> bytes:
    reason = {200: "OK", 206: "Partial Content", 404: "Not Found", 405: "Method Not Allowed", 416: "Range Not Satisfiable"}[status]
    if not head:
        headers = {**headers, "Content-Length": str(len(body))}
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 {status} {reason}\r\n{lines}\r\n".encode("latin-1") + (b"" if head else body)


def _error(status: int, code: str, resource: str, method: str) -> bytes:
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{code}</Message><Resource>{escape(resource)}</Resource></Error>'.encode()
    return _response(status, {"Content-Type": "application/xml", **({"Content-Length": str(len(body))} if method == "HEAD" else {})}, body, head=method == "HEAD")


async def _main(root: Path, port: int) -> None:
    server = await asyncio.start_server(RangeServer(root).serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


@contextmanager
def range_server(root: Path) -> Iterator[str]:
    """Serve `root` in a process of its own (so its CPU is not the client's); yields the endpoint URL."""
    from tests.support.s3_server import _wait_for_port, free_loopback_port

    port = free_loopback_port()
    server = subprocess.Popen([sys.executable, "-m", "tests.support.range_server", str(root), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, server)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(_main(Path(sys.argv[1]), int(sys.argv[2])))
