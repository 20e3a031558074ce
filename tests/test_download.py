"""Downloading shards, against a local HTTP server on loopback (no test touches the internet):
retries after a failure, atomic renames, and two downloaders on one directory not colliding."""
import http.server
import os
import threading

import pytest

from nanochat_jax import dataset


@pytest.fixture
def server(tmp_path):
    """Serves 3 real shards; shard 1 fails with a 500 the first time it is asked for."""
    served = tmp_path / "served"
    dataset.write_shards([f"document {i} " * 20 for i in range(3000)], str(served), docs_per_shard=1024, num_val_docs=900)
    hits = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/shard_00001.parquet" and hits[self.path] == 1:
                self.send_error(500, "flaky")
                return
            if self.path == "/shard_00002.parquet" and os.environ.get("GARBLE"):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"<html>not parquet</html>")
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, hits
    httpd.shutdown()


def test_download_retries_and_renames_atomically(server, tmp_path):
    url, served, hits = server
    out = tmp_path / "data"
    paths = dataset.download(3, str(out), base_url=url, workers=3, backoff=0.01)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    for p in paths:
        assert open(p, "rb").read() == (served / os.path.basename(p)).read_bytes()
    assert hits["/shard_00001.parquet"] == 2  # failed once, then succeeded
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert sum(len(b) for b in dataset.parquets_iter_batched("val", str(out))) == 3000 - 900 - 2048  # last downloaded = val, as v1


def test_concurrent_downloaders_do_not_collide(server, tmp_path):
    """Two downloads of the same shards into one directory at once: each shard is fetched once, intact."""
    url, served, hits = server
    out = str(tmp_path / "data")
    results = []
    threads = [threading.Thread(target=lambda: results.append(dataset.download(3, out, base_url=url, workers=2, backoff=0.01)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert hits["/shard_00000.parquet"] == 1 and hits["/shard_00002.parquet"] == 1
    for p in results[0]:
        assert open(p, "rb").read() == (served / os.path.basename(p)).read_bytes()


def test_a_garbled_download_is_never_kept(server, tmp_path, monkeypatch):
    url, _, _ = server
    monkeypatch.setenv("GARBLE", "1")
    with pytest.raises(RuntimeError, match="could not download .*shard_00002.parquet after 2 attempts: .*not a readable parquet"):
        dataset.download_shard(2, str(tmp_path), base_url=url, attempts=2, backoff=0.01)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".parquet", ".tmp"))]


def test_downloaded_shards_become_the_default(server, monkeypatch, tmp_path):
    url, _, _ = server
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path / "home"))
    assert dataset.default_data_dir().endswith(dataset.EMBEDDED_DIR_NAME)
    dataset.download(2, base_url=url, backoff=0.01)
    assert dataset.default_data_dir() == str(tmp_path / "home" / dataset.DOWNLOAD_DIR_NAME)
