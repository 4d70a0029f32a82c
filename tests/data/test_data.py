"""Tests for relora.data: prepare (corpus -> token files), load_prepared and TokenWindows."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from transformers import AutoTokenizer

import relora.data.preparation as prepare_module
from relora.data import (
    PreparedData,
    TokenWindows,
    default_corpus_files,
    load_prepared,
    prepare,
)
from relora.errors import DataError

VOCAB = 320
EOS = "<|endoftext|>"

# Documents the fixture corpus should yield, keyed by file; "body" is the custom text field.
DOCS = {
    "a.txt": ["Hello world.\nSecond line, with unicode: ü 漢字 🙂\n"],
    "notes/b.md": ["# Title\n\nSome *markdown* text about tokens and windows.\n"],
    "notes/deeper/c.rst": ["Section\n=======\n\nA literal <|endoftext|> inside a document is just text.\n"],
    "code.py": ["def f(x):\n    return x + 1\n\n\nprint(f(41))\n"],
    "records.jsonl": ["first record body", "second record\nspans lines", "third ✓"],
    "list.json": ["json list item one", "json list item two"],
    "zipped.txt.gz": ["compressed text document\n" * 3],
    "rows.parquet": ["parquet row alpha", "parquet row beta"],
}
EXPECTED = [text for texts in DOCS.values() for text in texts]


def write_corpus(root: Path) -> Path:
    """The DOCS files plus an ignored .bin, an undecodable .txt and bad json records."""
    for rel, texts in DOCS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".jsonl"):
            lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)]
            lines.insert(1, json.dumps({"text": "wrong field"}))
            lines.append("{not json")
            path.write_text("\n".join(lines) + "\n")
        elif rel.endswith(".json"):
            path.write_text(json.dumps([{"body": t} for t in texts]))
        elif rel.endswith(".gz"):
            path.write_bytes(gzip.compress(texts[0].encode()))
        elif rel.endswith(".parquet"):
            pq.write_table(pa.table({"body": texts}), path)
        else:
            path.write_text(texts[0])
    (root / "blob.bin").write_bytes(bytes(range(256)))
    (root / "notes" / "broken.txt").write_bytes(b"valid start \xff\xfe\xc3\x28 invalid utf-8")
    (root / "notes" / "empty.md").write_text("  \n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "ds"
    return prepare([corpus], out, vocab_size=VOCAB, val_fraction=0.2, text_field="body", progress=False)


def split_docs(tokens: np.ndarray, eos_id: int) -> list[tuple[int, ...]]:
    """The documents of a token file: runs of tokens each terminated by EOS."""
    assert len(tokens) and tokens[-1] == eos_id, "the file must end with EOS"
    ends = np.flatnonzero(tokens == eos_id)
    return [tuple(map(int, doc[:-1])) for doc in np.split(tokens, ends + 1)[:-1]]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line(err: pytest.ExceptionInfo[DataError], *words: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and ": " in msg, msg
    for word in words:
        assert word in msg, msg


# ---------------------------------------------------------------- prepare: output content


def test_prepare_files_match_meta(prepared: Path) -> None:
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["version"] == 1
    assert meta["dtype"] == ("uint16" if meta["vocab_size"] <= 2**16 else "uint32")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val", "test"):
        data = (prepared / f"{split}.bin").read_bytes()
        assert len(data) == meta["splits"][split]["tokens"] * itemsize
        assert hashlib.sha256(data).hexdigest() == meta["splits"][split]["sha256"]
    assert sum(meta["splits"][s]["docs"] for s in ("train", "val", "test")) == len(EXPECTED)
    assert meta["splits"]["val"]["docs"] == meta["splits"]["test"]["docs"] == round(len(EXPECTED) * 0.2)
    assert meta["skipped"] == {"files": 1, "records": 2, "empty_docs": 1}
    assert meta["tokenizer"] == "trained" and meta["text_field"] == "body"
    assert not list(prepared.parent.glob(".*")), "no temp dirs left behind"


def test_prepare_documents_roundtrip(prepared: Path) -> None:
    tok = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    meta = json.loads((prepared / "meta.json").read_text())
    assert len(tok) == meta["vocab_size"] <= VOCAB
    assert tok.eos_token == EOS and tok.eos_token_id == meta["eos_id"]
    data = load_prepared(prepared)
    train, val, test = (split_docs(np.asarray(a), data.eos_id) for a in (data.train, data.val, data.test))
    assert len(train) == meta["splits"]["train"]["docs"] and len(val) == meta["splits"]["val"]["docs"]
    assert len(test) == meta["splits"]["test"]["docs"] > 0
    # Tokenise each original document independently; the literal "<|endoftext|>" must stay text.
    expected = []
    for text in EXPECTED:
        ids = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert data.eos_id not in ids
        assert tok.decode(ids) == text
        expected.append(tuple(ids))
    assert Counter(train + val + test) == Counter(expected)
    assert not set(train) & set(val), "a document is in both splits"
    assert not set(test) & (set(train) | set(val)), "a test document is also in train or val"


def test_test_split_is_whole_documents_disjoint_from_train_and_val(corpus: Path, tmp_path: Path) -> None:
    """The three splits partition the documents; adding a test split takes it from train, not from val."""
    kw = dict(vocab_size=VOCAB, val_fraction=0.2, text_field="body", progress=False)
    three = load_prepared(prepare([corpus], tmp_path / "three", test_fraction=0.3, **kw))
    two = load_prepared(prepare([corpus], tmp_path / "two", tokenizer=tmp_path / "three" / "tokenizer",
                                test_fraction=0, **kw))
    docs = {name: split_docs(np.asarray(getattr(three, name)), three.eos_id) for name in ("train", "val", "test")}
    assert len(docs["test"]) == round(len(EXPECTED) * 0.3) and len(docs["val"]) == round(len(EXPECTED) * 0.2)
    assert Counter(docs["train"] + docs["val"] + docs["test"]) == Counter(
        split_docs(np.asarray(two.train), two.eos_id) + split_docs(np.asarray(two.val), two.eos_id))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(docs[a]) & set(docs[b]), f"a document is in both {a} and {b}"
    assert docs["val"] == split_docs(np.asarray(two.val), two.eos_id)  # same seed: same validation documents
    assert two.test is None and not (tmp_path / "two" / "test.bin").exists()


def test_data_without_test_split_loads_and_refuses_test_in_one_line(prepared: Path, tmp_path: Path) -> None:
    """A directory prepared before the test split existed: train/val load, asking for test names the fix."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    meta = json.loads((prepared / "meta.json").read_text())
    del meta["test_fraction"], meta["splits"]["test"]
    (legacy / "meta.json").write_text(json.dumps(meta))
    for name in ("train.bin", "val.bin"):
        (legacy / name).write_bytes((prepared / name).read_bytes())
    data = load_prepared(legacy, verify=True)
    assert data.test is None and len(data.val) == meta["splits"]["val"]["tokens"]
    with pytest.raises(DataError) as err:
        data.test_split()
    assert_one_line(err, "no test split", "relora prepare")


def test_prepare_logs_skipped_inputs(corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="relora.data"):
        prepare([corpus], tmp_path / "ds", vocab_size=VOCAB, text_field="body", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("broken.txt" in w for w in warnings)
    assert any("records.jsonl" in w and "2 records" in w for w in warnings)


def test_prepare_reads_extensionless_text_and_says_what_it_skips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Files without an extension are read when they are text; every other skipped file is counted aloud."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {"a.txt": "an ordinary text file\n", "README": "a readme without extension\n",
             "LICENSE": "long text " * 2000 + "ü"}  # the 8 KiB sniff cuts the file inside nothing special
    for name, text in texts.items():
        (corpus / name).write_text(text)
    (corpus / "cut").write_bytes("é".encode() * 4096 + b"tail")  # 8192 bytes of 2-byte chars: the sniff ends mid-way
    texts["cut"] = "é" * 4096 + "tail"
    (corpus / "nul").write_bytes(b"looks like text\0but has a NUL byte")
    (corpus / "latin1").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with caplog.at_level(logging.WARNING, logger="relora.data"):
        out = prepare([corpus], tmp_path / "ds", vocab_size=VOCAB, val_fraction=0.2, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipping 3 of 7 files" in warnings[0], warnings
    assert "1 .png" in warnings[0] and "2 without extension and not text" in warnings[0], warnings
    data = load_prepared(out)
    tok = data.tokenizer()
    docs = [d for split in (data.train, data.val, data.test_split()) for d in split_docs(np.asarray(split), data.eos_id)]
    assert Counter(tok.decode(d) for d in docs) == Counter(texts.values())
    # an extension-less text file named alone is accepted too; a binary one is refused
    alone = prepare([corpus / "README", corpus / "LICENSE"], tmp_path / "alone", vocab_size=VOCAB, test_fraction=0,
                    progress=False)
    assert load_prepared(alone).meta["splits"]["train"]["docs"] == 1
    with pytest.raises(DataError) as err:
        prepare([corpus / "nul"], tmp_path / "bad", vocab_size=VOCAB, progress=False)
    assert_one_line(err, "unsupported type", "without an extension")


def test_prepare_is_deterministic_and_seed_changes_split(corpus: Path, prepared: Path, tmp_path: Path) -> None:
    again = prepare([corpus], tmp_path / "same", vocab_size=VOCAB, val_fraction=0.2, text_field="body", progress=False)
    other = prepare(
        [corpus], tmp_path / "other", vocab_size=VOCAB, val_fraction=0.2, text_field="body", seed=1, progress=False
    )
    assert snapshot(again / "tokenizer") == snapshot(prepared / "tokenizer")
    for split in ("train", "val"):
        assert (again / f"{split}.bin").read_bytes() == (prepared / f"{split}.bin").read_bytes()
    assert (other / "val.bin").read_bytes() != (prepared / "val.bin").read_bytes()


def test_prepare_reuses_existing_tokenizer(corpus: Path, prepared: Path, tmp_path: Path) -> None:
    ref = json.loads((prepared / "meta.json").read_text())["splits"]
    for i, tok in enumerate([prepared / "tokenizer", prepared / "tokenizer" / "tokenizer.json"]):
        out = prepare([corpus], tmp_path / f"re{i}", tokenizer=tok, val_fraction=0.2, text_field="body", progress=False)
        meta = json.loads((out / "meta.json").read_text())
        assert meta["tokenizer"] == str(tok)
        assert meta["splits"] == ref, "same tokenizer, same split: identical ids"
        assert AutoTokenizer.from_pretrained(out / "tokenizer").eos_token == EOS


def test_prepare_large_vocab_uses_uint32(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(70_000)}
    bare = Tokenizer(models.WordLevel(words | {"[UNK]": 70_000}, unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    bare.add_special_tokens([EOS])
    bare.save(str(tmp_path / "tokenizer.json"))
    docs = {"a.txt": "w69999 w1 w65536", "b.txt": "w7 w70000"}
    for name, text in docs.items():
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_text(text)
    tok = tmp_path / "tokenizer.json"
    out = prepare([tmp_path / "in"], tmp_path / "ds", tokenizer=tok, val_fraction=0.5, test_fraction=0, progress=False)
    data = load_prepared(out)
    assert data.meta["dtype"] == "uint32" and data.train.dtype == np.uint32
    eos = bare.token_to_id(EOS)
    assert data.eos_id == eos > 2**16
    got = Counter(split_docs(np.asarray(data.train), eos) + split_docs(np.asarray(data.val), eos))
    assert got == Counter([(69999, 1, 65536), (7, 70_000)])  # w70000 is unknown -> [UNK] = 70000


def test_prepare_hf_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets

    class FakeStream(list):
        features = {"text": None, "id": None}

    records = FakeStream([{"text": f"streamed document number {i}", "id": i} for i in range(5)] + [{"id": 5}])
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: calls.append((name, kw)) or records)
    out = prepare(["someone/corpus"], tmp_path / "ds", vocab_size=VOCAB, progress=False)
    assert calls == [("someone/corpus", {"split": "train", "streaming": True})]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"] == ["hf:someone/corpus"] and meta["skipped"]["records"] == 1
    assert sum(split["docs"] for split in meta["splits"].values()) == 5

    def offline(name: str, **kw: object) -> None:
        raise ConnectionError("no network\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        prepare(["someone/corpus"], tmp_path / "ds2", vocab_size=VOCAB, progress=False)
    assert_one_line(err, "someone/corpus", "no network")
    assert not (tmp_path / "ds2").exists() and not list(tmp_path.glob(".ds2*"))


# ---------------------------------------------------------------- prepare: re-runs, overwrite, atomicity


def test_rerun_is_cached_and_overwrite_replaces(corpus: Path, tmp_path: Path) -> None:
    kw = dict(vocab_size=VOCAB, text_field="body", progress=False)
    out = prepare([corpus], tmp_path / "ds", **kw)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare([str(corpus)], out, **kw) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    with pytest.raises(DataError) as err:
        prepare([corpus], out, seed=1, **kw)
    assert_one_line(err, "--overwrite")
    prepare([corpus], out, seed=1, overwrite=True, **kw)
    assert json.loads((out / "meta.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"], "old and temp dirs are gone"


def test_existing_other_content_is_untouched(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    (out / "sub" / "meta.json").write_text("{}")
    before = snapshot(out)
    for overwrite in (False, True):  # --overwrite never replaces a directory relora did not write
        with pytest.raises(DataError) as err:
            prepare([corpus], out, vocab_size=VOCAB, text_field="body", overwrite=overwrite, progress=False)
        assert_one_line(err, str(out), "never deletes", "--out")
        assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_empty_out_dir_is_used(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    out = prepare([corpus], tmp_path / "ds", vocab_size=VOCAB, text_field="body", progress=False)
    assert load_prepared(out, verify=True).meta["text_field"] == "body"


def test_output_inside_input_dir_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 20)
    out = prepare(["."], "prepared", vocab_size=VOCAB, val_fraction=0.5, test_fraction=0, progress=False)
    assert out == tmp_path / "prepared"
    again = prepare([tmp_path], out, vocab_size=VOCAB, val_fraction=0.5, test_fraction=0, overwrite=True,
                    progress=False)
    meta = json.loads((again / "meta.json").read_text())
    assert sum(split["docs"] for split in meta["splits"].values()) == 3
    assert meta["skipped"] == {"files": 0, "records": 0, "empty_docs": 0}


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_way_leaves_nothing(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    kw = dict(vocab_size=VOCAB, text_field="body", progress=False)
    out = tmp_path / "ds"
    if existing:
        prepare([corpus], out, **kw)
    before = snapshot(tmp_path)

    def failing_encoder(tok: object):
        def encode(texts: list[str]) -> list[list[int]]:
            raise RuntimeError("injected failure")

        return encode

    monkeypatch.setattr(prepare_module, "batch_encoder", failing_encoder)
    with pytest.raises(RuntimeError, match="injected"):
        prepare([corpus], out, seed=7, overwrite=True, **kw)
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ds"] if existing else [])


# ---------------------------------------------------------------- prepare: bad inputs


def test_bad_inputs_raise_data_error(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "outs" / "ds"
    kw = dict(vocab_size=VOCAB, text_field="body", progress=False)
    (tmp_path / "binaries").mkdir()
    (tmp_path / "binaries" / "x.bin").write_bytes(b"\0" * 10)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n")
    (tmp_path / "undecodable").mkdir()
    (tmp_path / "undecodable" / "a.txt").write_bytes(b"\xff\xfe\xfa")
    (tmp_path / "undecodable" / "b.md.gz").write_bytes(b"not gzip at all")
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "a.txt").write_text("only one document")
    for name in ("a", "b"):
        (tmp_path / "two" / f"{name}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "two" / f"{name}.txt").write_text(f"document {name}")
    (tmp_path / "notatokenizer.json").write_text('{"hello": 1}')
    (tmp_path / "emptytok").mkdir()
    cases = [
        (dict(inputs=[tmp_path / "missing"]), ["does not exist"]),
        (dict(inputs=["relative/missing.txt"]), ["does not exist"]),
        (dict(inputs=[tmp_path / "binaries"]), ["no supported files"]),
        (dict(inputs=[tmp_path / "binaries" / "x.bin"]), ["unsupported type"]),
        (dict(inputs=[tmp_path / "blank"]), ["no usable documents", "1 empty"]),
        (dict(inputs=[tmp_path / "undecodable"]), ["no usable documents", "2 unreadable"]),
        (dict(inputs=[tmp_path / "single"]), ["only 1 document"]),
        (dict(inputs=[corpus], val_fraction=0.0), ["val_fraction"]),
        (dict(inputs=[corpus], val_fraction=0.6), ["val_fraction"]),
        (dict(inputs=[corpus], test_fraction=-0.1), ["test_fraction"]),
        (dict(inputs=[tmp_path / "two"]), ["only 2 documents", "--test-fraction 0"]),
        (dict(inputs=[corpus], vocab_size=200), ["vocab_size"]),
        (dict(inputs=[corpus], vocab_size=2**32 + 1), ["vocab_size"]),
        (dict(inputs=[corpus], tokenizer=tmp_path / "nope"), ["tokenizer", "does not exist"]),
        (dict(inputs=[corpus], tokenizer=tmp_path / "notatokenizer.json"), ["could not load tokenizer"]),
        (dict(inputs=[corpus], tokenizer=tmp_path / "emptytok"), ["could not load tokenizer"]),
        (dict(inputs=[corpus], num_workers=0), ["num_workers"]),
    ]
    for args, words in cases:
        with pytest.raises(DataError) as err:
            prepare(args.pop("inputs"), out, **(kw | args))
        assert_one_line(err, *words)
        assert not (out.parent.exists() and any(out.parent.iterdir())), "nothing left behind"


def test_tokenizer_hash_and_identity_name_content_not_place(corpus: Path, prepared: Path, tmp_path: Path) -> None:
    """meta.json's tokenizer hash survives a load/save round trip (as into a run's final/); the dataset identity
    is the same for a copy elsewhere and for data prepared again, and differs for other tokens."""
    from relora.data.tokenizer import tokenizer_fingerprint

    data = load_prepared(prepared)
    assert data.meta["tokenizer_hash"] == tokenizer_fingerprint(prepared / "tokenizer")
    data.tokenizer().save_pretrained(tmp_path / "resaved")
    assert tokenizer_fingerprint(tmp_path / "resaved") == data.tokenizer_hash
    assert tokenizer_fingerprint(tmp_path) is None  # no tokenizer there
    other = prepare([corpus], tmp_path / "other", vocab_size=VOCAB - 40, val_fraction=0.2, text_field="body",
                    progress=False)
    assert load_prepared(other).tokenizer_hash != data.tokenizer_hash

    copy = Path(shutil.copytree(prepared, tmp_path / "elsewhere" / "copy"))
    meta = json.loads((copy / "meta.json").read_text())
    del meta["tokenizer_hash"]  # as prepared before the hash was stored: computed from tokenizer/
    meta["created"] = "2000-01-01T00:00:00+00:00"
    (copy / "meta.json").write_text(json.dumps(meta))
    assert load_prepared(copy).identity == data.identity and load_prepared(copy).tokenizer_hash == data.tokenizer_hash
    assert load_prepared(other).identity != data.identity
    again = prepare([corpus], tmp_path / "again", vocab_size=VOCAB, val_fraction=0.2, text_field="body", progress=False)
    assert load_prepared(again).identity == data.identity
    reseeded = prepare([corpus], tmp_path / "reseeded", vocab_size=VOCAB, val_fraction=0.2, text_field="body",
                       seed=1, progress=False)
    assert load_prepared(reseeded).identity != data.identity


def test_tokenizer_without_eos_is_rejected(tmp_path: Path, corpus: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(DataError) as err:
        prepare([corpus], tmp_path / "ds", tokenizer=tmp_path / "t.json", progress=False)
    assert_one_line(err, "EOS")


# ---------------------------------------------------------------- load_prepared


def test_load_prepared(prepared: Path, tmp_path: Path) -> None:
    data = load_prepared(prepared, verify=True)
    assert isinstance(data, PreparedData) and isinstance(data.train, np.memmap)
    assert data.vocab_size == data.meta["vocab_size"] and data.eos_id == data.meta["eos_id"]
    assert data.tokenizer().eos_token_id == data.eos_id

    with pytest.raises(DataError) as err:
        load_prepared(tmp_path / "missing")
    assert_one_line(err, "does not exist", "relora prepare")
    with pytest.raises(DataError) as err:
        load_prepared(tmp_path)
    assert_one_line(err, "no meta.json")

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in prepared.iterdir():
        if p.is_file():
            (broken / p.name).write_bytes(p.read_bytes())
    train = broken / "train.bin"
    flipped = bytearray(train.read_bytes())
    flipped[0] ^= 1
    train.write_bytes(flipped)
    load_prepared(broken)  # sizes still match; only verify notices
    with pytest.raises(DataError) as err:
        load_prepared(broken, verify=True)
    assert_one_line(err, "sha256")
    train.write_bytes(bytes(flipped[:-2]))
    with pytest.raises(DataError) as err:
        load_prepared(broken)
    assert_one_line(err, "train.bin", "--overwrite")


# ---------------------------------------------------------------- default corpus


def test_default_corpus_files() -> None:
    files = default_corpus_files()
    assert files and all(p.suffix == ".py" and p.is_file() for p in files)
    assert not [p for p in files if {"test", "tests", "idle_test", "site-packages"} & set(p.parts)]
    assert sum(p.stat().st_size for p in files) > 2**20
    assert files == sorted(files)


def test_default_corpus_leaves_out_the_generated_codec_tables() -> None:
    """encodings/cp1252.py and its ~70 siblings are near-copies: a held-out one measures memorisation."""
    import encodings
    import importlib
    import sysconfig

    files = set(default_corpus_files())
    codecs = Path(encodings.__file__).parent
    tables, modules = set(), set(codecs.glob("*.py"))
    for path in modules:  # found independently: the modules that, imported, hold a decoding table
        try:
            module = importlib.import_module(f"encodings.{path.stem}")
        except ImportError:  # mbcs, oem: Windows only
            continue
        if isinstance(getattr(module, "decoding_table", None), str):
            tables.add(path)
    assert len(tables) >= 50 and modules - files == tables  # cp1252, iso8859_1, mac_roman, ...: exactly those
    assert codecs / "utf_8.py" in files and codecs / "idna.py" in files  # real codec code stays
    assert all(p.is_relative_to(Path(sysconfig.get_paths()["stdlib"])) for p in files)


@pytest.mark.slow
def test_prepare_default_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    out = prepare(None, tmp_path / "stdlib", vocab_size=8192, progress=False)
    elapsed = time.perf_counter() - start
    data = load_prepared(out)
    with capsys.disabled():
        print(f"\nprepare(stdlib, vocab 8192): {elapsed:.1f} s, {len(data.train)} train / {len(data.val)} val tokens")
    assert data.vocab_size == 8192 and data.meta["sources"][0].startswith("python-stdlib")
    assert len(data.train) > 10**6 and len(data.val) > 0


# ---------------------------------------------------------------- TokenWindows


@pytest.fixture
def tokens() -> np.ndarray:
    # Random ids make every window unique, so a row identifies its start position.
    return np.random.default_rng(123).integers(0, 60_000, size=3001).astype(np.uint16)


def test_sequential_windows_are_direct_slices(tokens: np.ndarray) -> None:
    L = 64
    w = TokenWindows(tokens, L, mode="sequential")
    n_expected = sum(1 for j in range(len(tokens)) if j * L + L + 1 <= len(tokens))
    assert len(w) == n_expected
    got = w.get(range(len(w)))
    assert got.dtype == torch.int64 and got.shape == (n_expected, L + 1)
    for j in range(len(w)):
        assert got[j].tolist() == tokens[j * L : j * L + L + 1].tolist()
    with pytest.raises(IndexError, match="out of range"):
        w.get([len(w)])
    with pytest.raises(IndexError):
        w.get([-1])


def test_random_windows_are_valid_deterministic_slices(tokens: np.ndarray) -> None:
    L = 32
    w = TokenWindows(tokens, L, mode="random", seed=5)
    assert len(w) == (len(tokens) - 1) // L
    idx = np.arange(0, 4000, 7)
    rows = w.get(idx).numpy()
    all_windows = sliding_window_view(tokens.astype(np.int64), L + 1)
    lookup = {row.tobytes(): s for s, row in enumerate(all_windows)}
    starts = np.array([lookup[row.tobytes()] for row in rows])  # KeyError if a row is not a slice
    assert np.array_equal(starts, w.starts(idx))
    # Uniform over [0, n - L - 1]: draws reach near both ends.
    assert starts.min() < 0.05 * len(all_windows) and starts.max() > 0.95 * len(all_windows)

    same = TokenWindows(tokens.copy(), L, mode="random", seed=5)
    assert torch.equal(same.get(idx), w.get(idx))
    one_by_one = torch.cat([w.get([j]) for j in idx[:20]])
    assert torch.equal(one_by_one, w.get(idx[:20]))
    other = TokenWindows(tokens, L, mode="random", seed=6)
    assert not torch.equal(other.get(idx), w.get(idx))


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_get_of_permutation_permutes_rows(tokens: np.ndarray, mode: str) -> None:
    w = TokenWindows(tokens, 16, mode=mode, seed=1)
    idx = np.arange(50)
    perm = np.random.default_rng(0).permutation(50)
    assert torch.equal(w.get(idx[perm]), w.get(idx)[perm])


def test_windows_too_short_and_fast(tokens: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        TokenWindows(tokens[:65], 64, name="the val split")
    assert_one_line(err, "the val split", "--seq-len")
    tokens.tofile(tmp_path / "t.bin")
    w = TokenWindows(np.memmap(tmp_path / "t.bin", dtype=tokens.dtype, mode="r"), 256)
    idx = np.arange(64)
    w.get(idx)
    timings = []
    for _ in range(20):
        start = time.perf_counter()
        w.get(idx)
        timings.append(time.perf_counter() - start)
    assert sorted(timings)[10] < 0.005


# ---------------------------------------------------------------- the site-packages corpus (issue 18)


def test_site_packages_corpus_is_the_installed_sources_without_tests():
    import importlib.metadata
    import sysconfig

    import transformers

    from relora.data.corpus import site_packages_files, site_packages_pins

    files = site_packages_files()
    root = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(transformers.__file__).resolve().parent / "models" / "llama" / "modeling_llama.py" in files
    assert all(f.suffix == ".py" for f in files)
    assert not [f for f in files if {"tests", "test", "__pycache__"} & set(f.relative_to(root).parts[:-1])]
    assert f"torch=={importlib.metadata.version('torch')}" in site_packages_pins()


def test_prepare_site_packages_records_the_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from relora.data import corpus as corpus_module

    some = [f for f in corpus_module.site_packages_files() if f.parent.name == "llama"][:4]
    monkeypatch.setattr(corpus_module, "site_packages_files", lambda: some)
    out = prepare(None, tmp_path / "sp", corpus="site-packages", vocab_size=VOCAB, val_fraction=0.5, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["corpus_pins"] == corpus_module.site_packages_pins()
    assert meta["sources"][0].startswith("python-site-packages")
    assert sum(split["docs"] for split in meta["splits"].values()) == len(some)
    with pytest.raises(DataError, match="either input paths or --corpus"):
        prepare([tmp_path], tmp_path / "sp2", corpus="site-packages", progress=False)
