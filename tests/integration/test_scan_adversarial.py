"""Issue 14 through ``diffguard scan``: an uploader trying to get past the scan (real local directories, moto's S3
server over HTTP, the session's local Ray). Images under any name are scored; what cannot be scored is withheld;
change detection survives a restored mtime; odd and colliding keys never share a quarantine file; symlinks are not
followed; nothing is overwritten or lost."""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from tests.adversarial import huge_bilevel_png, image_bytes, oversized_png, truncated
from tests.integration.scan_support import (
    all_keys,
    body,
    new_bucket,
    rows_by_key,
    scan,
    summary,
)

pytestmark = pytest.mark.slow  # deselected by `make test-fast`


def files(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (symlinks not followed), by path relative to it."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def digests(blobs) -> Counter:
    return Counter(hashlib.sha256(b).hexdigest() for b in blobs)


@pytest.mark.usefixtures("ray_cluster")
def test_local_corpus_fails_closed_and_loses_nothing(tmp_path, capsys):
    src, held, dest, outside = tmp_path / "src", tmp_path / "held", tmp_path / "results", tmp_path / "outside"
    images = {  # images whatever their names: scored
        "upload.bin": image_bytes(1, "PNG"),
        "photo.png.txt": image_bytes(2, "JPEG"),
        "noext": image_bytes(3, "GIF"),
        "deep/dir/PROGRESSIVE": image_bytes(4, "PROGRESSIVE_JPEG"),
        "100%.png": image_bytes(5, "PNG"),  # '%' and a decomposed name: encoded in the quarantine
        unicodedata.normalize("NFD", "café.png"): image_bytes(6, "PNG"),
    }
    cut = {f"cut/{fmt.lower()}": truncated(fmt, 0.98, seed=i) for i, fmt in enumerate(("JPEG", "PNG", "GIF"))}
    cut["cut/progressive.jpg"] = truncated("PROGRESSIVE_JPEG", 0.98, seed=7)
    unscorable = {
        "big.png": oversized_png(300_000, seed=1),  # over --max-object-bytes: withheld unread
        "huge-bilevel": huge_bilevel_png(3000, seed=2),  # 9 MP from a few KB, over --max-pixels: withheld
        "empty.png": b"",
        "garbage.jpg": b"\xff\xd8\xff\xe0 and then nothing an image decoder can use",
    }
    others = {"notes.txt": b"not an image\n", "data.bin": os.urandom(5000), "large.log": b"line\n" * 40_000}
    corpus = {**images, **cut, **unscorable, **others}
    for rel, data in corpus.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.png").write_bytes(image_bytes(8, "PNG"))
    (outside / "dir" / "x.png").write_bytes(image_bytes(9, "PNG"))
    (src / "link.png").symlink_to(outside / "secret.png")  # out of the source: never followed nor read
    (src / "linked-dir").symlink_to(outside / "dir", target_is_directory=True)
    before_src, before_outside = files(src), files(outside)
    scored = len(images) + len(cut)
    args = (str(src), "--output", str(dest), "--adjustment", "1", "--quarantine", str(held))
    args += ("--max-object-bytes", "200000", "--max-pixels", "4000000")

    rc, out = scan(capsys, *args)
    n = scored + len(unscorable)
    assert rc == 0 and out == summary(n, 0, len(others), n, len(unscorable), str(dest), symlinks=2)
    rows = rows_by_key(str(dest))
    assert set(rows) == set(images) | set(cut) | set(unscorable)  # non-images are not in the current view
    for key in [*images, *cut]:
        assert rows[key]["error"] is None and rows[key]["flagged"] and rows[key]["action"] == "block", key
        assert rows[key]["sha256"] == hashlib.sha256(corpus[key]).hexdigest()  # of the bytes scored
    assert rows["cut/jpeg"]["truncated"] and rows["cut/progressive.jpg"]["truncated"]
    for key in unscorable:
        r = rows[key]
        assert (r["unscorable"], r["flagged"], r["action"], r["error_kind"]) == (True, True, "block", "decode"), key
    assert "--max-object-bytes" in rows["big.png"]["error"] and rows["big.png"]["sha256"] is None  # never read
    assert "MP" in rows["huge-bilevel"]["error"]
    assert not held.exists()  # a dry run

    rc, out = scan(capsys, *args)  # nothing read again: images unchanged, non-images recorded
    assert out == summary(0, n, len(others), 0, 0, str(dest), symlinks=2)

    rc, out = scan(capsys, *args, "--apply")
    assert rc == 0 and out == summary(0, n, len(others), 0, 0, str(dest), symlinks=2)
    rows = rows_by_key(str(dest))
    assert all(r["quarantined_to"] for r in rows.values())  # nothing unscored or flagged left in place
    after_src, after_held = files(src), files(held)
    assert set(after_src) == set(others)  # only the non-images stay
    assert set(after_held) == {r["quarantined_to"][len(str(held)) + 1 :] for r in rows.values()}
    assert "%25" in next(k for k in after_held if "100" in k)  # '%' and non-NFC names: one encoded file each
    assert digests([*after_src.values(), *after_held.values()]) == digests(before_src.values())  # nothing lost
    assert sum(map(len, after_src.values())) + sum(map(len, after_held.values())) == sum(map(len, corpus.values()))
    assert files(outside) == before_outside and (src / "link.png").is_symlink()  # the symlinks' targets untouched


@pytest.mark.usefixtures("ray_cluster")
def test_same_size_rewrite_with_restored_mtime_is_rescored(tmp_path, capsys):
    src, dest = tmp_path / "src", tmp_path / "results"
    src.mkdir()
    first, second = image_bytes(10, "BMP"), image_bytes(11, "BMP")  # BMP: same dimensions, same size
    assert len(first) == len(second) and first != second
    for name in ("rewritten.bmp", "renamed-over.bmp"):
        (src / name).write_bytes(first)
    rc, out = scan(capsys, str(src), "--output", str(dest))
    assert rc == 0 and out["scanned"] == 2

    st = os.stat(src / "rewritten.bmp")
    (src / "rewritten.bmp").write_bytes(second)  # in place: same inode, same size, then the old mtime restored
    os.utime(src / "rewritten.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    st = os.stat(src / "renamed-over.bmp")
    (src / "new.tmp").write_bytes(second)  # another file renamed over it with the old mtime: a new inode
    os.utime(src / "new.tmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(src / "new.tmp", src / "renamed-over.bmp")
    for name in ("rewritten.bmp", "renamed-over.bmp"):
        now = os.stat(src / name)
        assert (now.st_size, now.st_mtime_ns) == (len(first), st.st_mtime_ns) or name == "rewritten.bmp"

    rc, out = scan(capsys, str(src), "--output", str(dest))
    assert rc == 0 and out["scanned"] == 2 and out["skipped_unchanged"] == 0
    rows = rows_by_key(str(dest))
    assert {r["sha256"] for r in rows.values()} == {hashlib.sha256(second).hexdigest()}


def test_quarantine_paths_and_exclusive_creates(s3, s3_endpoint, tmp_path):
    from pipeline.scan.actions import encoded_name, local_name, quarantine_location
    from pipeline.storage import LocalStore, ObjectExists, S3Store, parse_location

    source = parse_location(f"s3://{new_bucket(s3)}/in", s3_endpoint)
    for text in (str(tmp_path / "held"), "./held", "../held", "~/held"):
        assert isinstance(quarantine_location(text, source, s3_endpoint).store, LocalStore), text
    assert quarantine_location("held/", source, s3_endpoint) == type(source)(source.store, "held/")

    nfd, nfc = unicodedata.normalize("NFD", "é"), unicodedata.normalize("NFC", "é")
    keys = ["a//b.png", "a/b.png", "./c.png", "c.png", "d/", "d", "..", "x/../y", "n\x00ul", "%41", "A", nfd, nfc]
    names = [local_name(k) or encoded_name(k) for k in keys]
    assert len(set(names)) == len(keys)  # one name each
    plain = ("a/b.png", "c.png", "d", "A", nfc)
    assert [local_name(k) for k in plain] == list(plain) and local_name(nfd) is None
    assert len(encoded_name("k" * 5000)) <= 255

    bucket = new_bucket(s3)
    store = S3Store(bucket, s3_endpoint)
    store.create("k", b"first")
    with pytest.raises(ObjectExists):
        store.create("k", b"second")
    assert body(s3, bucket, "k") == b"first"
    local = LocalStore(str(tmp_path / "q"))
    local.create("f", b"file")
    for key in ("f", "f/g"):  # taken, or under a file
        with pytest.raises(ObjectExists):
            local.create(key, b"other")
    assert (tmp_path / "q" / "f").read_bytes() == b"file" and files(tmp_path / "q") == {"f": b"file"}


ODD_KEYS = [
    "a//b.png",
    "a/b.png",
    "./c.png",
    "c.png",
    "d/",  # not a folder marker: it has bytes
    "d/e.png",
    "f",  # a file name and a folder name in a local quarantine
    "f/g.png",
    "x/../y.png",
    "/lead.png",
    "n\x00ul.png",
    "ctl\x01.png",
    "%41.png",
    "A.png",
    unicodedata.normalize("NFD", "é.png"),
    unicodedata.normalize("NFC", "é.png"),
]


@pytest.mark.usefixtures("ray_cluster")
def test_s3_odd_and_colliding_keys_into_a_local_quarantine(s3, s3_endpoint, tmp_path, capsys):
    from tests.faultproxy import FaultProxy

    bucket = new_bucket(s3)
    objects = {key: image_bytes(100 + i, "PNG") for i, key in enumerate(ODD_KEYS)}
    objects["imgs.tar"] = b"ustar" * 20_000  # not images: sniffed once with a ranged read, then recorded
    objects["readme"] = b"# hello\n"
    for key, data in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    held, dest = tmp_path / "held", str(tmp_path / "results")
    reads: list[str] = []

    def count_gets(method: str, path: str) -> None:
        if method == "GET" and any(name in path for name in ("imgs.tar", "readme")):
            reads.append(path)

    with FaultProxy(s3_endpoint, rate=0.0, hook=count_gets) as proxy:
        args = (f"s3://{bucket}", "--output", dest, "--endpoint-url", proxy.url, "--adjustment", "1")
        rc, out = scan(capsys, *args, "--quarantine", str(held))  # an absolute path: a local directory
        assert rc == 0 and out == summary(len(ODD_KEYS), 0, 2, len(ODD_KEYS), 0, dest)
        assert len(reads) == 2  # one small ranged read per object that is not an image
        rc, out = scan(capsys, *args, "--quarantine", str(held), "--apply")
        assert rc == 0 and out == summary(0, len(ODD_KEYS), 2, 0, 0, dest)
        assert len(reads) == 2  # not read again while unchanged
    assert all_keys(s3, bucket) == {"imgs.tar", "readme"}  # every image quarantined, none lost
    rows = rows_by_key(dest)
    assert set(rows) == set(ODD_KEYS)
    targets = [rows[k]["quarantined_to"] for k in ODD_KEYS]
    assert len(set(targets)) == len(ODD_KEYS)  # one file each
    for key in ODD_KEYS:
        assert Path(rows[key]["quarantined_to"]).read_bytes() == objects[key], key  # each with its own bytes
    stored = files(held)
    assert len(stored) == len(ODD_KEYS) and digests(stored.values()) == digests(objects[k] for k in ODD_KEYS)
    assert stored["a/b.png"] == objects["a/b.png"] and stored["c.png"] == objects["c.png"]  # plain keys keep paths
    assert not (tmp_path / "results" / "_quarantine").exists() or not os.listdir(tmp_path / "results" / "_quarantine")


@pytest.mark.usefixtures("ray_cluster")
def test_s3_tag_withholds_every_unscored_image_and_versions_are_compared(s3, s3_endpoint, capsys):
    bucket = new_bucket(s3)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    objects = {
        "in/ok.png": image_bytes(20, "PNG"),
        "in/upload.bin": truncated("JPEG", 0.98, seed=21),  # a truncated JPEG under a non-image name
        "in/big": oversized_png(300_000, seed=22),  # over --max-object-bytes, no suffix: sniffed, then withheld
        "in/garbage.webp": b"RIFF\x10\x00\x00\x00WEBPVP8 broken",
        "in/notes.md": b"# not an image\n",
    }
    for key, data in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    s3.put_object(Bucket=bucket, Key="in/cold.png", Body=image_bytes(23, "PNG"), StorageClass="GLACIER")
    dest = f"s3://{bucket}/results"
    args = (f"s3://{bucket}/in", "--output", dest, "--endpoint-url", s3_endpoint, "--adjustment", "1")
    args += ("--max-object-bytes", "200000", "--tag")

    def tags(key: str) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}

    rc, out = scan(capsys, *args, "--apply")
    assert rc == 0 and out == summary(5, 0, 1, 4, 3, dest)  # the read error counts in errors, never in flagged
    rows = rows_by_key(dest, s3_endpoint)
    assert rows["in/upload.bin"]["truncated"] and rows["in/upload.bin"]["error"] is None
    assert rows["in/big"]["unscorable"] and rows["in/garbage.webp"]["unscorable"]
    cold = rows["in/cold.png"]
    assert (cold["error_kind"], cold["action"], cold["flagged"], cold["tagged"]) == ("read", None, False, False)
    withheld = {k for k in objects if k != "in/notes.md"}
    assert {k for k, r in rows.items() if r["tagged"]} == withheld
    assert all(tags(k) == {"moderation": "nsfw"} for k in withheld)  # (moto refuses tag reads on GLACIER)
    assert all(r["version_id"] for k, r in rows.items() if k != "in/cold.png")  # the versions read

    s3.put_object(Bucket=bucket, Key="in/ok.png", Body=objects["in/ok.png"])  # same bytes, same ETag: a new version
    rc, out = scan(capsys, *args)
    assert rc == 0 and out["scanned"] == 2 and out["skipped_unchanged"] == 3  # the new version and the retried read
    assert rows_by_key(dest, s3_endpoint)["in/ok.png"]["version_id"] != rows["in/ok.png"]["version_id"]
