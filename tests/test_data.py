"""engine/data: .mo parsing, cleaning, splits, TSV, shards, datasets, prepare_data."""
import json
import random
import struct
from collections import Counter

import numpy as np
import pytest
import torch

from engine.recipe.data import catalogs
from engine.recipe.data.catalogs import Pair, clean_pair, extract_pairs, find_catalogs, parse_mo
from engine.recipe.data.corpus import SplitConfig, load_corpus, read_tsv, split_pairs, write_tsv
from engine.recipe.data.datasets import PretrainDataset, TranslationDataset, span_capacity
from engine.recipe.data.documents import pretrain_documents
from engine.recipe.data.prepare import PrepareConfig, prepare
from engine.recipe.data.shards import Shard, shard_paths, write_shard
from model.masks import IGNORE
from model.tokenizer import SpecialIds, Tokenizer

IDS = SpecialIds()


# ---- a tiny .mo writer (GNU gettext layout) -------------------------------------------
def mo_bytes(messages: dict, order: str = "<", charset: str = "UTF-8") -> bytes:
    """messages: {msgid (may hold \\x04 context / \\x00 plural): msgstr (\\x00 forms)}."""
    messages = {"": f"Content-Type: text/plain; charset={charset}\n", **messages}
    keys = sorted(messages)  # gettext sorts msgids for binary search
    ids = [k.encode(charset) for k in keys]
    strs = [messages[k].encode(charset) for k in keys]
    n = len(keys)
    o_table, t_table = 28, 28 + 8 * n
    data = bytearray(28 + 16 * n)
    struct.pack_into(order + "7I", data, 0, 0x950412DE, 0, n, o_table, t_table, 0, 0)
    for table, strings in ((o_table, ids), (t_table, strs)):
        for i, s in enumerate(strings):
            struct.pack_into(order + "2I", data, table + 8 * i, len(s), len(data))
            data += s + b"\x00"
    return bytes(data)


MESSAGES = {
    "Open file": "打开文件",
    "%d file\x00%d files": "%d 个文件\x00%d 个文件(复数)",        # plural
    "menu\x04_File": "文件(_F)",                                 # msgctxt + accelerator
    "Quit": "",                                                  # untranslated
    "Version %s": "Version %s",                                  # "translated" to itself
    "Cancel": "---",                                             # no CJK
    "Copy %1$s to %(name)s {0}": "将 %1$s 复制到 %(name)s {0}",     # placeholders
    "Line one\nline\ttwo": "第一行\n第二行",                        # whitespace
    "x" * 301: "长",                                              # too long
    "   ": "空",                                                 # empty after strip
}
EXPECTED = [("%d file", "%d 个文件"), ("Copy %1$s to %(name)s {0}", "将 %1$s 复制到 %(name)s {0}"),
            ("Line one line two", "第一行 第二行"), ("Open file", "打开文件"),
            ("_File", "文件(_F)")]


@pytest.mark.parametrize("order", ["<", ">"])
def test_parse_mo_both_byte_orders(order):
    entries = parse_mo(mo_bytes(MESSAGES, order), "t.mo")
    by_id = {e.msgid: e for e in entries}
    assert "" not in by_id                                      # header dropped
    assert len(entries) == len(MESSAGES)
    assert by_id["%d file"].msgid_plural == "%d files"
    assert by_id["%d file"].msgstr == "%d 个文件"                 # first plural form
    assert by_id["_File"].context == "menu" and by_id["_File"].msgstr == "文件(_F)"
    assert by_id["Quit"].msgstr == ""


def test_parse_mo_charset_and_corruption():
    gbk = parse_mo(mo_bytes({"Open file": "打开文件"}, charset="GB2312"), "gbk.mo")
    assert [(e.msgid, e.msgstr) for e in gbk] == [("Open file", "打开文件")]
    good = mo_bytes(MESSAGES)
    with pytest.raises(ValueError, match=r"^bad\.mo: not a \.mo file \(bad magic"):
        parse_mo(b"\x00" * 64, "bad.mo")
    with pytest.raises(ValueError, match=r"^cut\.mo: truncated"):
        parse_mo(good[:200], "cut.mo")
    with pytest.raises(ValueError, match="tiny.mo"):
        parse_mo(good[:10], "tiny.mo")


def test_extract_filters_and_dedupes(tmp_path):
    for name in ("coreutils", "wget-gnulib"):
        d = tmp_path / "locale" / "zh_CN" / "LC_MESSAGES"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.mo").write_bytes(mo_bytes(MESSAGES, "<" if name == "coreutils" else ">"))
    cats = find_catalogs([tmp_path])
    assert [(c.name, c.group) for c in cats] == [("coreutils", "coreutils"),
                                                 ("wget-gnulib", "wget")]
    pairs, per_catalog = extract_pairs(cats)
    assert sorted((p.english, p.chinese) for p in pairs) == EXPECTED
    assert all(p.sources == ["coreutils", "wget-gnulib"] for p in pairs)
    assert per_catalog == {"coreutils": 5, "wget-gnulib": 5}
    (tmp_path / "locale" / "zh_CN" / "LC_MESSAGES" / "broken.mo").write_bytes(b"junk" * 10)
    with pytest.warns(UserWarning, match="broken.mo: not a .mo file"):
        assert len(extract_pairs(find_catalogs([tmp_path]))[0]) == len(EXPECTED)


def test_clean_pair_rules():
    assert clean_pair("Save %s as %1$d", "将 %s 另存为 %1$d") == ("Save %s as %1$d", "将 %s 另存为 %1$d")
    assert clean_pair("  a\n\tb ", "甲\n乙") == ("a b", "甲 乙")
    assert clean_pair("OK", "OK") is None
    assert clean_pair("Yes", "Oui") is None                       # no CJK
    assert clean_pair("中文", "中文版") is None                      # msgid not English
    assert clean_pair("a" * 301, "长") is None
    assert clean_pair("Name", "名" * 301) is None


def test_find_catalogs_only_simplified_chinese(tmp_path):
    keep = ["locale/zh_CN/LC_MESSAGES/a.mo", "vim/vim90/lang/zh_CN.UTF-8/LC_MESSAGES/vim.mo",
            "site/django/conf/locale/zh_Hans/LC_MESSAGES/django.mo"]
    skip = ["locale/zh_TW/LC_MESSAGES/a.mo", "locale/fr/LC_MESSAGES/a.mo",
            "locale/zh_CN/LC_MESSAGES/readme.txt"]
    for rel in keep + skip:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = sorted(str(c.path.relative_to(tmp_path)) for c in find_catalogs([tmp_path]))
    assert found == sorted(keep)
    assert catalogs.catalog_group("psql-15") == "psql"
    assert catalogs.catalog_group("man-db-gnulib") == "man-db"


# ---- split ------------------------------------------------------------------------------
def _pairs():
    pairs = [Pair(f"msg {i}", f"消息 {i}", [src]) for i, src in
             enumerate(["coreutils"] * 300 + ["git"] * 300 + ["wget"] * 20 + ["wget-gnulib"] * 5
                       + ["tar"] * 10)]
    pairs.append(Pair("msg 600", "另一个消息 600", ["git"]))        # same English as a wget pair
    pairs.append(Pair("shared", "共享", ["coreutils", "tar"]))      # same pair in train + test
    return pairs


def test_split_holds_out_catalogs_without_leakage():
    cfg = SplitConfig(test_catalogs="wget,tar", dev_fraction=0.1, seed=3)
    s = split_pairs(_pairs(), cfg)
    assert {src for p in s.test for src in p.sources} >= {"wget", "wget-gnulib", "tar"}
    assert all(not p.groups & {"wget", "tar"} for p in s.train + s.dev)
    test_en = {p.english for p in s.test}
    assert not test_en & {p.english for p in s.train + s.dev}
    assert s.leaked == 1 and len(s.test) == 36
    assert not {p.english for p in s.dev} & {p.english for p in s.train}
    assert len(s.dev) == 60 and len(s.train) == 540
    # deterministic for the seed, different for another seed
    again = split_pairs(_pairs(), cfg)
    assert [p.english for p in again.dev] == [p.english for p in s.dev]
    other = split_pairs(_pairs(), SplitConfig(test_catalogs="wget,tar", dev_fraction=0.1, seed=4))
    assert {p.english for p in other.dev} != {p.english for p in s.dev}
    with pytest.raises(ValueError, match="dev_fraction"):
        SplitConfig(dev_fraction=1.5)


def test_empty_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=rf"only 0 training pairs .* under {tmp_path}.*"
                                         r"pip install -e \.\[data\]"):
        load_corpus(SplitConfig(), roots=[tmp_path])


# ---- TSV ----------------------------------------------------------------------------------
def test_tsv_round_trip_and_errors(tmp_path):
    path = tmp_path / "p.tsv"
    write_tsv(path, [("Open", "打开"), Pair("Close %s", "关闭 %s", ["x"])])
    assert read_tsv(path) == [("Open", "打开"), ("Close %s", "关闭 %s")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("Open\t打开\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{bad}:2: .*no tab"):
        read_tsv(bad)
    bad.write_text("Open\t打开\nClose\t \n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{bad}:2: empty chinese side"):
        read_tsv(bad)
    bad.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{bad}: empty pairs file"):
        read_tsv(bad)
    with pytest.raises(ValueError, match="not found"):
        read_tsv(tmp_path / "missing.tsv")


# ---- shards -------------------------------------------------------------------------------
def test_shard_round_trip(tmp_path):
    docs = [[9, 10, 11], [12], [13, 14]]
    write_shard(tmp_path / "s", docs, vocab_size=100, tokenizer_sha256="ab" * 32)
    s = Shard(tmp_path / "s", expect_tokenizer_sha256="ab" * 32)
    assert s.dtype == np.uint16 and len(s) == 3 and s.num_tokens == 6
    assert [s[i].tolist() for i in range(3)] == docs
    big = [([70000, 1], [2, 3, 4])]
    write_shard(tmp_path / "t", big, vocab_size=80000, tokenizer_sha256="cd", fields=("en", "zh"))
    t = Shard(tmp_path / "t")
    assert t.dtype == np.uint32 and t.fields == ("en", "zh")
    assert [a.tolist() for a in t[0]] == [[70000, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="written with tokenizer"):
        Shard(tmp_path / "s", expect_tokenizer_sha256="ff" * 32)
    with pytest.raises(ValueError, match=r"token id outside \[0, 100\)"):
        write_shard(tmp_path / "u", [[100]], vocab_size=100, tokenizer_sha256="x")


def test_shard_read_errors(tmp_path):
    write_shard(tmp_path / "s", [[1, 2, 3]], vocab_size=10, tokenizer_sha256="x")
    p = shard_paths(tmp_path / "s")
    with open(p["bin"], "r+b") as f:
        f.truncate(4)
    with pytest.raises(ValueError, match=rf"^{p['bin']}: 4 bytes, header says 3"):
        Shard(tmp_path / "s")
    p["idx"].unlink()
    with pytest.raises(ValueError, match=rf"^{p['idx']}: shard file not found"):
        Shard(tmp_path / "s")
    with pytest.raises(ValueError, match="empty shard"):
        write_shard(tmp_path / "e", [], vocab_size=10, tokenizer_sha256="x")
    # an empty shard on disk (written by hand) is refused on read
    e = shard_paths(tmp_path / "e")
    e["bin"].write_bytes(b"")
    np.save(e["idx"], np.zeros(1, dtype=np.int64))
    e["json"].write_text(json.dumps({"dtype": "uint16", "num_tokens": 0, "num_docs": 0,
                                     "fields": ["text"], "vocab_size": 10,
                                     "tokenizer_sha256": "x"}))
    with pytest.raises(ValueError, match=rf"^{e['json']}: empty shard"):
        Shard(tmp_path / "e")


def test_failed_write_leaves_existing_shard_untouched(tmp_path, monkeypatch):
    write_shard(tmp_path / "s", [[1, 2, 3], [4]], vocab_size=10, tokenizer_sha256="x")
    before = {k: p.read_bytes() for k, p in shard_paths(tmp_path / "s").items()}

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(np, "save", boom)  # fails after the new .bin is already written
    with pytest.raises(OSError, match="disk full"):
        write_shard(tmp_path / "s", [[5, 6, 7, 8, 9]], vocab_size=10, tokenizer_sha256="y")
    assert {k: p.read_bytes() for k, p in shard_paths(tmp_path / "s").items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx.npy", "s.json"]
    assert Shard(tmp_path / "s")[0].tolist() == [1, 2, 3]


# ---- datasets -----------------------------------------------------------------------------
def _pretrain_shard(tmp_path, n_pairs=60, seed=0):
    """Documents as prepare_data writes them, from random 'words' (ids >= 9: no specials)."""
    rng = random.Random(seed)
    pairs = [([rng.randrange(9, 100) for _ in range(rng.randint(1, 12))],
              [rng.randrange(9, 100) for _ in range(rng.randint(1, 12))]) for _ in range(n_pairs)]
    docs = pretrain_documents(pairs, IDS, seed)
    docs.append(list(range(9, 100)) * 2)          # one document longer than any window
    write_shard(tmp_path / "pre", docs, vocab_size=100, tokenizer_sha256="x")
    return tmp_path / "pre", pairs


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("objective", ["glm", "causal"])
def test_pretrain_batches_are_pure_functions_of_seed_and_index(tmp_path, objective):
    prefix, _ = _pretrain_shard(tmp_path)
    ds = PretrainDataset(prefix, IDS, seq_len=48, objective=objective, seed=1)
    b = ds.get_batch(3, 4)
    assert set(b) == {"input_ids", "position_ids", "block_position_ids", "labels", "prefix_lens"}
    assert b["input_ids"].shape == (4, 48) and b["prefix_lens"].shape == (4,)
    fresh = PretrainDataset(prefix, IDS, seq_len=48, objective=objective, seed=1)
    late = ds.samples_in_epoch(0) + ds.samples_in_epoch(1) + 2   # epoch 2, built out of order
    assert _equal(fresh.get_batch(late // 4, 4), ds.get_batch(late // 4, 4))
    assert _equal(fresh.get_batch(3, 4), b)
    assert not _equal(ds.get_batch(4, 4), b)
    other_seed = PretrainDataset(prefix, IDS, seq_len=48, objective=objective, seed=2)
    assert not _equal(other_seed.get_batch(3, 4), b)


def test_pretrain_epoch_covers_every_token_once(tmp_path):
    prefix, _ = _pretrain_shard(tmp_path)
    shard = Shard(prefix)
    for objective in ("glm", "causal"):
        ds = PretrainDataset(shard, IDS, seq_len=40, objective=objective)
        for epoch in (0, 1):
            start = sum(ds.samples_in_epoch(e) for e in range(epoch))
            windows = [ds.window(start + j)[0] for j in range(ds.samples_in_epoch(epoch))]
            got = Counter(t for w in windows for t in w)
            want = Counter(np.asarray(shard.tokens).tolist())
            if objective == "causal":   # one-token tail pieces are dropped (nothing to predict)
                assert not got - want and sum((want - got).values()) <= 1
            else:
                assert got == want
        first = [ds.window(j)[0] for j in range(3)]
        assert first != [ds.window(ds.samples_in_epoch(0) + j)[0] for j in range(3)]


def test_blank_infilling_invariants(tmp_path):
    prefix, _ = _pretrain_shard(tmp_path)
    seq_len = 40
    ds = PretrainDataset(prefix, IDS, seq_len=seq_len, objective="glm", seed=0)
    kinds = Counter()
    for j in range(ds.samples_in_epoch(0)):
        tokens, kind = ds.window(j)
        ex = ds.example(j)
        kinds[kind] += 1
        p = ex.prefix_len
        assert len(ex.input_ids) <= seq_len
        assert all(label == IGNORE for label in ex.labels[:p])   # no loss on Part A
        part_a, part_b = ex.input_ids[:p], ex.input_ids[p:]
        masks = [i for i, t in enumerate(part_a) if t in (IDS.mask, IDS.gmask)]
        # split Part B into spans at each <sop>; each span belongs to the mask at its position
        spans, labels = {}, ex.labels[p:]
        k = 0
        while k < len(part_b):
            assert part_b[k] == IDS.sop and ex.block_position_ids[p + k] == 1
            mask_at = ex.position_ids[p + k]
            end = k + 1
            while end < len(part_b) and part_b[end] != IDS.sop:
                end += 1
            span = part_b[k + 1:end]
            assert labels[k:end] == span + [IDS.eop]               # predicts the span, then <eop>
            assert ex.block_position_ids[p + k:p + end] == list(range(1, end - k + 1))
            assert set(ex.position_ids[p + k:p + end]) == {mask_at}
            spans[mask_at] = span
            k = end
        assert sorted(spans) == masks                               # one span per mask
        # every masked token appears exactly once as a label: refilling Part A restores it
        restored = []
        for i, t in enumerate(part_a):
            restored += spans[i] if i in spans else [t]
        if kind == "gmask":
            assert part_a[-1] == IDS.gmask and len(masks) == 1
            assert len(spans[masks[0]]) >= len(tokens) / 2
        else:
            assert IDS.gmask not in part_a
        assert restored == tokens
    assert kinds["span"] > 5 and kinds["gmask"] > 5


def test_span_capacity_is_tight():
    for seq_len in (16, 40, 128, 256):
        n = span_capacity(seq_len, 0.15)
        assert n + 2 * max(1, round(0.15 * n)) <= seq_len
        assert (n + 1) + 2 * max(1, round(0.15 * (n + 1))) > seq_len


def test_causal_labels_are_shifted_inputs(tmp_path):
    prefix, _ = _pretrain_shard(tmp_path)
    ds = PretrainDataset(prefix, IDS, seq_len=32, objective="causal")
    for j in range(5):
        tokens, _ = ds.window(j)
        ex = ds.example(j)
        assert ex.input_ids == tokens[:-1] and ex.labels == tokens[1:] and ex.prefix_len == 0


def _translation_shard(tmp_path, pairs):
    write_shard(tmp_path / "tr", pairs, vocab_size=100, tokenizer_sha256="x", fields=("en", "zh"))
    return tmp_path / "tr"


def test_translation_labels_only_on_target(tmp_path):
    _, pairs = _pretrain_shard(tmp_path)
    ds = TranslationDataset(_translation_shard(tmp_path, pairs), IDS, seq_len=32)
    seen = []
    for j in range(len(pairs)):
        b = ds.get_batch(j, 1)
        ids, labels = b["input_ids"][0].tolist(), b["labels"][0].tolist()
        p = int(b["prefix_lens"][0])
        en, zh = pairs[ds.pair_index(j)]
        seen.append(ds.pair_index(j))
        assert ids[:p] == [IDS.en] + en + [IDS.gmask]
        assert ids[p:p + len(zh) + 1] == [IDS.sop] + zh
        target = [i for i, t in enumerate(labels) if t != IGNORE]
        assert target == list(range(p, p + len(zh) + 1))          # loss on target + <eop> only
        assert [labels[i] for i in target] == zh + [IDS.eop]
        assert set(b["block_position_ids"][0, p:p + len(zh) + 1].tolist()) != {0}
    assert sorted(seen) == list(range(len(pairs)))                # an epoch visits each pair once
    rev = TranslationDataset(pairs, IDS, seq_len=32, direction="zh-en")
    part_a, tgt, direction = rev.prompt_and_target(0)
    en, zh = pairs[rev.pair_index(0)]
    assert part_a == [IDS.zh] + zh + [IDS.gmask] and tgt == en and direction == "zh-en"
    both = TranslationDataset(pairs, IDS, seq_len=32, direction="both")
    assert {both.prompt_and_target(j)[2] for j in range(20)} == {"en-zh", "zh-en"}


def test_translation_truncates_to_seq_len_and_is_deterministic(tmp_path):
    pairs = [(list(range(10, 60)), list(range(60, 90))), ([11, 12], list(range(20, 99)))]
    ds = TranslationDataset(pairs, IDS, seq_len=24, shuffle=False)
    for j in range(2):
        ex = ds.example(j)
        assert len(ex.input_ids) == 24                           # room is shared, not wasted
        assert ex.labels[-1] == IDS.eop
    part_a, tgt, _ = ds.prompt_and_target(1)
    assert part_a == [IDS.en, 11, 12, IDS.gmask] and tgt == list(range(20, 39))
    shuffled = TranslationDataset(pairs * 10, IDS, seq_len=24, seed=5)
    again = TranslationDataset(pairs * 10, IDS, seq_len=24, seed=5)
    assert _equal(shuffled.get_batch(7, 3), again.get_batch(7, 3))
    assert not _equal(shuffled.get_batch(0, 3), shuffled.get_batch(1, 3))
    with pytest.raises(ValueError, match="direction="):
        TranslationDataset(pairs, IDS, seq_len=24, direction="fr-en")
    with pytest.raises(ValueError, match="not a translation shard"):
        TranslationDataset(_pretrain_shard(tmp_path)[0], IDS, seq_len=24)


# ---- prepare_data end to end on synthetic catalogues ---------------------------------------
def _synthetic_catalogs(root, n=150):
    rng = random.Random(0)
    words = {"open": "打开", "file": "文件", "save": "保存", "cannot": "无法", "read": "读取",
             "the": "该", "archive": "归档", "link": "链接", "user": "用户", "write": "写入"}
    for name in ("coreutils", "git", "wget", "wget-gnulib"):
        msgs = {}
        for _ in range(n if name in ("coreutils", "git") else 20):
            ws = [rng.choice(list(words)) for _ in range(rng.randint(2, 6))]
            msgs[" ".join(ws) + f" %s {rng.randint(0, 99)}"] = \
                "".join(words[w] for w in ws) + f" %s {rng.randint(0, 99)}"
        d = root / "zh_CN" / "LC_MESSAGES"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.mo").write_bytes(mo_bytes(msgs))


def test_prepare_end_to_end(tmp_path):
    _synthetic_catalogs(tmp_path / "locale")
    out = tmp_path / "data"
    cfg = PrepareConfig(out=str(out), vocab_size=350, test_catalogs=("wget",), min_train=100,
                        roots=[str(tmp_path / "locale")], dev_fraction=0.05)
    logs = []
    manifest = prepare(cfg, log=logs.append)
    assert all((out / f).is_file() for f in manifest["files"])
    train = read_tsv(out / "pairs" / "train.tsv")
    test = read_tsv(out / "pairs" / "test.tsv")
    assert manifest["pairs"]["train"] == len(train) >= 250 and len(test) >= 35
    assert not {e for e, _ in train} & {e for e, _ in test}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["per_source"]["wget"]["train"] == 0 and stats["per_source"]["wget"]["test"] > 0
    tok = Tokenizer(out / "tokenizer")
    assert tok.sha256 == manifest["tokenizer_sha256"]
    from_shard = TranslationDataset(out / "shards" / "translation_test", None, seq_len=64,
                                    tokenizer=tok)
    from_tsv = TranslationDataset(out / "pairs" / "test.tsv", tok, seq_len=64, tokenizer=tok)
    assert len(from_shard) == len(test) and from_shard.pairs == from_tsv.pairs
    assert tok.decode(from_shard.pairs[0][1]) == test[0][1]
    pre = PretrainDataset(out / "shards" / "pretrain_train", IDS, seq_len=64)
    assert pre.get_batch(0, 2)["input_ids"].shape == (2, 64)
    # reused when complete and equal, refused when settings differ, rebuilt with force
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(cfg, log=logs.append) == manifest
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    cfg2 = PrepareConfig(**{**cfg.settings(), "out": str(out), "vocab_size": 380,
                            "test_catalogs": ("wget",)})
    with pytest.raises(ValueError, match=r"different settings \(vocab_size\).*--force"):
        prepare(cfg2, log=logs.append)
    assert prepare(cfg2, force=True, log=logs.append)["settings"]["vocab_size"] == 380
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "locale"]   # no temp left


def test_prepare_refuses_too_little_data(tmp_path):
    (tmp_path / "locale").mkdir()
    with pytest.raises(ValueError, match=rf"only 0 training pairs.*{tmp_path / 'locale'}"):
        prepare(PrepareConfig(out=str(tmp_path / "data"), roots=[str(tmp_path / "locale")]),
                log=lambda *_: None)
    assert not (tmp_path / "data").exists()
