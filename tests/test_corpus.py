"""The Zarr corpus: round trips, attributes, tables, splits, appends, atomicity, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from particleseg_model.corpus.store import (
    CorpusWriter,
    append_to_corpus,
    assign_split,
    assign_splits,
    chunk_particles_for,
    list_corpus,
    normalise_id,
    open_corpus,
    write_corpus,
)

ATTRS = {
    "pixel_size_a": 1.34,
    "threshold": 10.0,
    "edge_px": 11,
    "source_star": "Refine3D/job019/run_data.star",
}
REPO = Path(__file__).resolve().parents[1]


def particles(n: int, box: int = 16, seed: int = 0, prefix: str = "p"):
    rng = np.random.default_rng(seed)
    images = rng.normal(3.0, 2.0, (n, box, box)).astype(np.float32)
    labels = rng.integers(0, 3, (n, box, box)).astype(np.uint8)
    table = pd.DataFrame(
        {
            "image_name": [f"{i + 1:06d}@{prefix}.mrcs" for i in range(n)],
            "rot_deg": rng.uniform(0, 360, n),
            "tilt_deg": rng.uniform(0, 180, n),
            "defocus_u_a": rng.uniform(8000, 25000, n),
        }
    )
    return images, labels, table


def zscore(images: np.ndarray) -> np.ndarray:
    mean = images.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    return (images - mean) / images.std(axis=(1, 2), keepdims=True, dtype=np.float64)


def write(root: Path, key: str = "10028", n: int = 40, *, chunk: int = 8, **kwargs):
    images, labels, table = particles(n, **kwargs)
    ds = write_corpus(
        root, key, images, labels, table, batch=13, attrs=ATTRS, chunk_particles=chunk
    )
    return ds, images, labels, table


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_round_trip_arrays_attrs_and_table(tmp_path: Path):
    ds, images, labels, table = write(tmp_path, "EMPIAR-10028")
    assert ds.empiar_id == "10028" and ds.location == str(tmp_path / "10028.zarr")
    assert ds.images.shape == ds.labels.shape == (40, 16, 16)
    assert ds.images.chunks == ds.labels.chunks == (8, 16, 16)
    assert ds.images.dtype == np.float16 and ds.labels.dtype == np.uint8
    np.testing.assert_array_equal(ds.labels[:], labels)  # exact
    stored = ds.images[:].astype(np.float32)
    expected = zscore(images)
    # float16 keeps 11 significant bits: error at most 2**-11 of the value
    assert np.all(np.abs(stored - expected) <= np.abs(expected) * 2.0**-11 + 1e-7)
    np.testing.assert_allclose(stored.mean(axis=(1, 2)), 0, atol=2e-3)
    np.testing.assert_allclose(stored.std(axis=(1, 2)), 1, atol=2e-3)

    a = ds.attrs
    for key, value in ATTRS.items():
        assert a[key] == value
    assert (a["box"], a["n_particles"], a["image_dtype"], a["chunk_particles"]) == (
        16,
        40,
        "float16",
        8,
    )
    assert a["complete"] is True and a["format"] == "particleseg-corpus"
    assert a["code_version"].startswith("particleseg ") and a["created"].endswith("+00:00")
    assert a["split_fractions"] == [0.8, 0.1, 0.1]
    assert a["label_codes"] == {"0": "background", "1": "signal", "2": "edge"}
    assert [h["n_added"] for h in a["history"]] == [40]

    t = ds.table
    assert list(t.columns) == [
        "particle_index",
        "image_name",
        "rot_deg",
        "tilt_deg",
        "defocus_u_a",
        "split",
    ]
    assert t["particle_index"].tolist() == list(range(40))
    assert t["image_name"].tolist() == table["image_name"].tolist()
    np.testing.assert_array_equal(t["rot_deg"], table["rot_deg"])
    assert t["split"].tolist() == [assign_split("10028", n) for n in table["image_name"]]
    assert (tmp_path / "10028.zarr" / "particles.parquet").is_file()
    assert list_corpus(tmp_path) == ["10028"]
    assert entries(tmp_path) == ["10028.zarr"]


def test_float32_option_is_exact_and_chunk_sizing(tmp_path: Path):
    images, labels, table = particles(10)
    ds = write_corpus(
        tmp_path, "sim", images, labels, table, attrs=ATTRS, dtype="float32", normalise=False
    )
    np.testing.assert_array_equal(ds.images[:], images)
    assert ds.attrs["normalisation"] == "as given"
    # about 4 MiB of images a chunk
    assert chunk_particles_for(128, "float16") == 128
    assert chunk_particles_for(256, "float16") == 32
    assert chunk_particles_for(128, "float32") == 64
    assert ds.images.chunks[0] == chunk_particles_for(16, "float32")


def test_splits_are_stable_hashes():
    # pinned: a change of the hash would move particles between splits
    names = [f"{i}@Extract/job012/particles.mrcs" for i in range(1, 9)]
    assert [assign_split("10028", n) for n in names] == [
        "train",
        "train",
        "train",
        "test",
        "train",
        "train",
        "train",
        "train",
    ]
    assert assign_split("EMPIAR-10028", names[3]) == assign_split(10028, names[3]) == "test"
    many = [f"{i}@s.mrcs" for i in range(20000)]
    splits = assign_splits("10406", many)
    share = pd.Series(splits).value_counts(normalize=True)
    assert abs(share["train"] - 0.8) < 0.01 and abs(share["val"] - 0.1) < 0.01
    assert list(splits[:50]) == [assign_split("10406", n) for n in many[:50]]
    assert set(assign_splits("10406", many[:200], (0.0, 0.0, 1.0))) == {"test"}
    with pytest.raises(ValueError, match="fractions"):
        assign_split("10406", "1@a", (0.5, 0.2, 0.2))
    assert normalise_id("empiar-10406") == "10406"
    with pytest.raises(ValueError, match="bad dataset id"):
        normalise_id("../etc")


def test_append_keeps_old_particles_chunks_and_splits(tmp_path: Path):
    ds, images, labels, table = write(tmp_path, n=44)  # 5 full chunks of 8 + 4
    live = tmp_path / "10028.zarr"
    full_chunk = live / "images" / "c.0.0.0"
    tail_chunk = live / "images" / "c.5.0.0"
    assert full_chunk.is_file() and tail_chunk.is_file()
    inode_full, inode_tail = full_chunk.stat().st_ino, tail_chunk.stat().st_ino
    old_images = ds.images[:]
    old_splits = ds.table["split"].tolist()

    more_images, more_labels, more_table = particles(30, seed=1, prefix="q")
    with CorpusWriter(tmp_path, "10028", 16, mode="a") as writer:  # adds nothing: no change
        assert table["image_name"][3] in writer and more_table["image_name"][0] not in writer
    assert full_chunk.stat().st_ino == inode_full and tail_chunk.stat().st_ino == inode_tail
    grown = append_to_corpus(
        tmp_path,
        "10028",
        more_images,
        more_labels,
        more_table,
        batch=7,
        attrs={"source_star": "more.star"},
    )
    assert grown.n_particles == 74 and grown.attrs["n_particles"] == 74
    np.testing.assert_array_equal(grown.images[:44], old_images)
    np.testing.assert_array_equal(grown.labels[:44], labels)
    np.testing.assert_array_equal(grown.labels[44:], more_labels)
    t = grown.table
    assert t["split"].tolist()[:44] == old_splits
    assert (
        t["image_name"].tolist() == table["image_name"].tolist() + more_table["image_name"].tolist()
    )
    assert t["particle_index"].tolist() == list(range(74))
    assert [(h["mode"], h["n_added"], h["source_star"]) for h in grown.attrs["history"]] == [
        ("w", 44, ATTRS["source_star"]),
        ("a", 30, "more.star"),
    ]
    assert grown.attrs["source_star"] == ATTRS["source_star"]  # the first source stays
    # copy-on-write: full old chunks are shared (same inode), the partial one was rewritten
    assert full_chunk.stat().st_ino == inode_full
    assert tail_chunk.stat().st_ino != inode_tail
    assert entries(tmp_path) == ["10028.zarr"]


def test_append_creates_missing_partition(tmp_path: Path):
    images, labels, table = particles(5)
    ds = append_to_corpus(tmp_path, "new", images, labels, table, attrs=ATTRS)
    assert ds.n_particles == 5 and ds.attrs["history"][0]["mode"] == "a"


def test_exception_mid_write_keeps_previous_version(tmp_path: Path):
    ds, _, labels, table = write(tmp_path)
    before = ds.images[:]
    images2, labels2, table2 = particles(40, seed=5, prefix="z")
    for mode in ("w", "a"):
        with (
            pytest.raises(RuntimeError, match="boom"),
            CorpusWriter(
                tmp_path, "10028", 16, attrs=ATTRS, mode=mode, chunk_particles=8
            ) as writer,
        ):
            writer.append(images2[:20], labels2[:20], table2.iloc[:20])  # chunks on disk
            assert Path(writer.temp_location).is_dir()
            raise RuntimeError("boom")
        assert entries(tmp_path) == ["10028.zarr"]  # the temporary version is gone
        again = open_corpus(tmp_path, "10028")
        np.testing.assert_array_equal(again.images[:], before)
        np.testing.assert_array_equal(again.labels[:], labels)
        assert again.table["image_name"].tolist() == table["image_name"].tolist()


def test_killed_writer_leaves_previous_version_and_next_writer_cleans(tmp_path: Path):
    ds, _, labels, _ = write(tmp_path)
    script = textwrap.dedent(f"""
        import os, numpy as np, pandas as pd
        from particleseg_model.corpus.store import CorpusWriter
        w = CorpusWriter({str(tmp_path)!r}, "10028", 16, attrs={{"pixel_size_a": 1.34}},
                         chunk_particles=8)
        w.open()
        w.append(np.random.rand(20, 16, 16), np.ones((20, 16, 16), np.uint8),
                 {{"image_name": [str(i) for i in range(20)]}})
        os._exit(3)  # killed mid-write: no cleanup, no commit
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    stale = [e for e in entries(tmp_path) if ".tmp-" in e]
    assert len(stale) == 1 and (tmp_path / stale[0] / "images" / "c.1.0.0").is_file()
    assert list_corpus(tmp_path) == ["10028"]
    np.testing.assert_array_equal(open_corpus(tmp_path, "10028").labels[:], labels)
    # the next writer of the partition (the dead one's lock is gone) removes the stale temp
    images, more_labels, table = particles(3, seed=9, prefix="n")
    append_to_corpus(tmp_path, "10028", images, more_labels, table)
    assert entries(tmp_path) == ["10028.zarr"]
    assert open_corpus(tmp_path, "10028").n_particles == 43


def test_killed_between_renames_rolls_back(tmp_path: Path):
    _, _, labels, _ = write(tmp_path)
    # the state a non-atomic swap leaves when killed between its two renames
    os.rename(tmp_path / "10028.zarr", tmp_path / "10028.zarr.old-0123abcd")
    (tmp_path / "10028.zarr.tmp-4567").mkdir()
    assert list_corpus(tmp_path) == ["10028"]
    np.testing.assert_array_equal(open_corpus(tmp_path, "10028").labels[:], labels)
    images, more_labels, table = particles(2, seed=3, prefix="m")
    grown = append_to_corpus(tmp_path, "10028", images, more_labels, table)
    assert grown.n_particles == 42
    assert entries(tmp_path) == ["10028.zarr"]


def test_second_writer_waits_for_the_lock(tmp_path: Path):
    write(tmp_path)
    with (
        CorpusWriter(tmp_path, "10028", 16, attrs=ATTRS, mode="a"),
        pytest.raises(TimeoutError, match="10028"),
    ):
        CorpusWriter(tmp_path, "10028", 16, mode="a", lock_timeout_s=0.2).open()
    # another partition is not blocked
    images, labels, table = particles(2)
    write_corpus(tmp_path, "other", images, labels, table, attrs=ATTRS)


def test_bad_input_names_the_dataset(tmp_path: Path):
    images, labels, table = particles(6)
    bad = labels.copy()
    bad[2, 3, 4] = 3
    with pytest.raises(ValueError, match=r"10028: labels contain codes \[3\]"):
        write_corpus(tmp_path, "10028", images, bad, table, attrs=ATTRS)
    with pytest.raises(ValueError, match="10028: labels shape"):
        write_corpus(tmp_path, "10028", images, labels[:, :8], table, attrs=ATTRS)
    with pytest.raises(ValueError, match="10028: 5 table rows for 6"):
        write_corpus(tmp_path, "10028", images, labels, table.iloc[:5], attrs=ATTRS)
    with pytest.raises(ValueError, match="10028: attrs need 'pixel_size_a'"):
        write_corpus(tmp_path, "10028", images, labels, table)
    nan = images.copy()
    nan[4, 0, 0] = np.nan
    with pytest.raises(ValueError, match="10028: non-finite pixels in images \\[4\\]"):
        write_corpus(tmp_path, "10028", nan, labels, table, attrs=ATTRS)
    dup = table.copy()
    dup.loc[5, "image_name"] = dup.loc[0, "image_name"]
    with pytest.raises(ValueError, match="10028: image names already"):
        write_corpus(tmp_path, "10028", images, labels, dup, attrs=ATTRS)
    with (
        pytest.raises(ValueError, match="10028: no particles"),
        CorpusWriter(tmp_path, "10028", 16, attrs=ATTRS),
    ):
        pass
    assert entries(tmp_path) == []  # nothing was committed, no temporary left

    write_corpus(tmp_path, "10028", images, labels, table, attrs=ATTRS)
    big, big_labels, big_table = particles(2, box=20, prefix="b")
    with pytest.raises(ValueError, match="10028: box mismatch: appending box 20 .* box 16"):
        append_to_corpus(tmp_path, "10028", big, big_labels, big_table)
    with pytest.raises(ValueError, match="10028: image names already"):
        append_to_corpus(tmp_path, "10028", images[:1], labels[:1], table.iloc[:1])
    with pytest.raises(ValueError, match="10028: split fractions"):
        append_to_corpus(tmp_path, "10028", *particles(1, prefix="f"), fractions=(0.5, 0.25, 0.25))
    assert entries(tmp_path) == ["10028.zarr"]
    assert open_corpus(tmp_path, "10028").n_particles == 6
    with pytest.raises(FileNotFoundError, match="nothing"):
        open_corpus(tmp_path, "nothing")


def test_fsspec_url_root(tmp_path: Path):
    pytest.importorskip("fsspec")
    root = f"memory://corpus-{tmp_path.name}"
    images, labels, table = particles(20)
    ds = write_corpus(root, "10028", images, labels, table, attrs=ATTRS, chunk_particles=8)
    assert ds.location.startswith(f"{root}/10028.zarr.v-")  # a version the pointer names
    more = particles(5, seed=2, prefix="r")
    grown = append_to_corpus(root, "10028", *more)
    assert list_corpus(root) == ["10028"]
    np.testing.assert_array_equal(grown.labels[:], np.concatenate([labels, more[1]]))
    assert len(grown.table) == 25
    # file:// URLs are local paths (with atomic renames)
    local = write_corpus(tmp_path.as_uri(), "10029", images, labels, table, attrs=ATTRS)
    assert local.location == str(tmp_path / "10029.zarr")


def test_replace_without_rename_exchange(tmp_path: Path, monkeypatch):
    import particleseg_model.corpus.store as corpus

    write(tmp_path)
    # where renameat2(RENAME_EXCHANGE) is missing: rename aside, rename in, delete the old
    monkeypatch.setattr(corpus, "_exchange", lambda a, b: False)
    images, labels, table = particles(12, seed=4, prefix="w")
    table["split"] = "train"  # assigned by the corpus, not taken from the caller
    ds = write_corpus(tmp_path, "10028", images, labels, table, attrs=ATTRS)
    assert ds.n_particles == 12 and [h["mode"] for h in ds.attrs["history"]] == ["w"]
    np.testing.assert_array_equal(ds.labels[:], labels)
    assert ds.table["split"].tolist() == list(assign_splits("10028", table["image_name"]))
    assert entries(tmp_path) == ["10028.zarr"]
