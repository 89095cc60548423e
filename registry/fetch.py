"""How a target fetches registry files: a python-tuf ``FetcherInterface`` for a
registry directory (``file://``) or a static web server (``http://``, ``https://``).

It only moves bytes; python-tuf checks every byte it returns against signed lengths
and hashes. It refuses a ``file://`` path that leads outside the registry's directory,
reports progress (bytes) to an optional callback, and never retries on its own.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from tuf.api import exceptions
from tuf.ngclient import FetcherInterface


CHUNK = 64 * 1024
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0


class Fetcher(FetcherInterface):
    def __init__(self, base_url: str, read_timeout: float = READ_TIMEOUT):
        self.base_url = base_url
        parsed = urlparse(base_url)
        self.root = Path(url2pathname(parsed.path)).resolve() if parsed.scheme == "file" else None
        self.read_timeout = read_timeout
        self.on_bytes = None  # callable(n): bytes received, for progress bars
        self._pool = None

    def _fetch(self, url: str):
        parsed = urlparse(url)
        if parsed.scheme == "file":
            return self._file(parsed)
        if parsed.scheme in ("http", "https"):
            return self._http(url)
        raise exceptions.DownloadError(f"unsupported URL scheme in {url}")

    def _file(self, parsed):
        path = Path(url2pathname(parsed.path)).resolve()
        if self.root is None or not path.is_relative_to(self.root):
            raise exceptions.DownloadError(f"{path} is outside the registry directory {self.root}")
        try:
            f = open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise exceptions.DownloadHTTPError(f"{path}: not found", 404) from None

        def chunks():
            with f:
                while data := f.read(CHUNK):
                    self._count(len(data))
                    yield data

        return chunks()

    def _http(self, url: str):
        import urllib3

        if self._pool is None:
            self._pool = urllib3.PoolManager(timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=self.read_timeout),
                                             retries=False)
        try:
            resp = self._pool.request("GET", url, preload_content=False, redirect=False)
        except urllib3.exceptions.HTTPError as exc:
            raise exceptions.DownloadError(f"could not fetch {url}: {exc}") from None
        if resp.status != 200:
            resp.release_conn()
            raise exceptions.DownloadHTTPError(f"HTTP {resp.status} for {url}", resp.status)

        def chunks():
            try:
                for data in resp.stream(CHUNK):
                    self._count(len(data))
                    yield data
            except urllib3.exceptions.HTTPError as exc:
                raise exceptions.DownloadError(f"download of {url} failed: {exc}") from None
            finally:
                resp.release_conn()

        return chunks()

    def _count(self, n: int) -> None:
        if self.on_bytes is not None:
            self.on_bytes(n)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.clear()
            self._pool = None
