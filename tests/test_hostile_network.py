"""Remote data that is slow, redirects elsewhere, or carries secrets in its URL (issue 28 items 2, 11,
12, 13). Loopback servers only (ThreadingHTTPServer on 127.0.0.1)."""

from __future__ import annotations

import base64
import functools
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data_pipelines.sources import FetchPolicy, expand_urls
from data_pipelines.sources.expand import SourceError
from data_pipelines.sources.redact import redact
from data_pipelines.sources.transports import FetchError, open_shard
from tests.img2dataset_layout import write_img2dataset

SECRET, SIGNATURE = "hunter2-SECRET", "SIG-0123456789abcdef"


class _Trickle(BaseHTTPRequestHandler):
    """Announces a megabyte and sends one byte every 0.2 s: never silent for a second."""

    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        try:
            for _ in range(50):  # ends on the client's close (a write fails) or after 10 s
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    def log_message(self, *args):
        pass


class _Guarded(SimpleHTTPRequestHandler):
    """Serves a folder to basic auth user:SECRET only; /elsewhere/* redirects to the same file on
    another host name of this machine (localhost), /here/* to this one."""

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path.startswith("/elsewhere/"):
            return self._redirect(f"http://localhost:{self.server.server_port}/{path[len('/elsewhere/') :]}")
        if path.startswith("/here/"):
            return self._redirect(f"http://127.0.0.1:{self.server.server_port}/{path[len('/here/') :]}")
        want = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()
        if self.headers.get("Authorization") != want and "localhost" not in (self.headers.get("Host") or ""):
            self.send_error(401)
            return
        self.path = path
        super().do_GET()

    def _redirect(self, where: str):
        self.send_response(302)
        self.send_header("Location", where)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(handler):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # handler threads end before the test does (server_close joins them): a thread still writing
        # when a later test of this worker forks could hold a lock the child then waits on forever
        httpd.daemon_threads, httpd.block_on_close = False, True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_port}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_a_trickling_server_fails_at_the_minimum_rate_not_never(serve):
    base = serve(_Trickle)
    started = time.monotonic()
    with pytest.raises(FetchError, match="below data.fetch_min_rate"):
        with open_shard(f"{base}/slow.tar", FetchPolicy(timeout=1.0, min_rate=1024)) as shard:
            while shard.read(10240):  # the bytes that came are handed out, then the failure
                pass
    assert time.monotonic() - started < 5, "bounded by the timeout and the rate, not by the server"


def test_redirects_stay_on_the_same_host_unless_allowed(serve, tmp_path):
    (tmp_path / "a.tar").write_bytes(b"the shard")
    base = serve(functools.partial(_Guarded, directory=str(tmp_path)))
    with pytest.raises(FetchError, match=r"another scheme or host; set data.fetch_redirects"):
        open_shard(f"{base}/elsewhere/a.tar", FetchPolicy(timeout=5))
    with open_shard(f"{base}/elsewhere/a.tar", FetchPolicy(timeout=5, redirects="any")) as shard:
        assert shard.read() == b"the shard"
    auth = base.replace("http://", f"http://user:{SECRET}@")
    with open_shard(f"{auth}/here/a.tar", FetchPolicy(timeout=5)) as shard:  # same host: followed, with them
        assert shard.read() == b"the shard"


def test_credentials_and_signatures_work_and_never_appear_in_a_message(serve, tmp_path):
    write_img2dataset(tmp_path / "shards", shards=2, per_shard=4, size=16)
    base = serve(functools.partial(_Guarded, directory=str(tmp_path / "shards")))
    url = base.replace("http://", f"http://user:{SECRET}@") + f"/00000.tar?X-Amz-Signature={SIGNATURE}&x=1"
    with open_shard(url, FetchPolicy(timeout=5)) as shard:
        assert len(shard.read()) > 1000, "basic auth from the URL's user:password"
    # "?" starts a query, not a glob: a presigned URL expands to itself
    assert expand_urls(url) == [url]
    with pytest.raises(FetchError) as e:
        open_shard(url.replace("00000", "99999"), FetchPolicy(timeout=5))
    assert SECRET not in str(e.value) and SIGNATURE not in str(e.value) and "404" in str(e.value)
    with pytest.raises(SourceError) as e:
        expand_urls(base.replace("http://", f"http://user:{SECRET}@") + f"/*.tar?sig={SIGNATURE}")
    assert SECRET not in str(e.value) and SIGNATURE not in str(e.value)
    assert redact(f"see https://u:{SECRET}@h/p?a={SIGNATURE}&b") == "see https://u:***@h/p?a=***&b"
    assert (
        redact(f"InvalidURL: '/00000.tar?X-Amz-Signature={SIGNATURE}'")
        == "InvalidURL: '/00000.tar?X-Amz-Signature=***'"
    )


def test_wds_secure_refuses_every_pipe_command(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("WDS_SECURE", "1")
    with pytest.raises(SourceError, match="WDS_SECURE"):
        expand_urls(f"pipe:touch {marker}")
    with pytest.raises(FetchError, match="WDS_SECURE"):
        open_shard(f"pipe:touch {marker}")
    assert not marker.exists()
    monkeypatch.delenv("WDS_SECURE")
    with open_shard(f"pipe:touch {marker}") as shard:
        shard.read()
    assert marker.exists(), "without it pipe: runs, as webdataset's convention says"


@pytest.mark.slow
def test_a_run_on_a_url_with_credentials_writes_them_nowhere(serve, tmp_path, capfd):
    """A CLIP run reading shards through user:password@ and a signed query: trains, evaluates, checkpoints;
    neither secret appears in any file of the run directory or in what it printed."""
    import json

    from tests.launch import REPO, world_of_one

    raw = tmp_path / "shards"
    write_img2dataset(raw, shards=2, per_shard=24, size=32)
    base = serve(functools.partial(_Guarded, directory=str(raw)))
    url = base.replace("http://", f"http://user:{SECRET}@") + f"/{{00000..00001}}.tar?X-Amz-Signature={SIGNATURE}"
    recipe = json.loads((REPO / "pretrain/recipes/clip-tiny.json").read_text())
    recipe["data"].update(holdout_fraction=0.2, fetch_retries=0, max_bad_fraction=0.9)
    recipe["training"].update(micro_batch_size=4, max_steps=2, warmup_steps=0)
    recipe["model"]["zero3_init"] = False
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    from data_pipelines.text.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer([f"a photo of a {c} square" for c in ("red", "blue")] * 20, 300).save_pretrained(
        tmp_path / "tok"
    )
    recipe["data"]["tokenizer"] = str(tmp_path / "tok")
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    with world_of_one():
        args = build_parser().parse_args(
            [
                "--config",
                str(tmp_path / "r.json"),
                "--data",
                url,
                "--output-dir",
                str(tmp_path / "run"),
                "--no-progress",
            ]
        )
        trainer = Trainer(*prepare(args), "none", progress=False)
        trainer.setup()
        trainer.fit()
    printed = capfd.readouterr()
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "resolved-config.json" for p in files) and any("checkpoints" in p.parts for p in files)
    for p in files:
        data = p.read_bytes()
        assert SECRET.encode() not in data and SIGNATURE.encode() not in data, p
    assert SECRET not in printed.out + printed.err and SIGNATURE not in printed.out + printed.err


def test_a_recipes_pipe_source_runs_only_with_allow_pipe(tmp_path):
    """A shared recipe whose data is a pipe: command runs nothing unless --allow-pipe is on the command
    line; the same command typed with --data is the user's own (it gets as far as the missing tokenizer)."""
    import json

    from pretrain.run.config import RecipeError
    from pretrain.train import build_parser, prepare
    from tests.launch import REPO

    marker = tmp_path / "MARKER"
    recipe = json.loads((REPO / "pretrain/recipes/clip-tiny.json").read_text())
    recipe["data"]["sources"] = [{"urls": f"pipe:touch {marker}; cat /nonexistent/{{0..1}}.tar"}]
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    argv = ["--config", str(tmp_path / "r.json"), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(RecipeError, match=r"data.sources\[0\].urls: pipe:touch .* runs only with\s+--allow-pipe"):
        prepare(build_parser().parse_args(argv))
    assert not marker.exists()
    with pytest.raises(RecipeError) as e:  # allowed: it goes on to the next problem of this recipe
        prepare(build_parser().parse_args([*argv, "--allow-pipe"]))
    assert "--allow-pipe" not in str(e.value)
