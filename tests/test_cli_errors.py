"""Every mistake of issue 17 fed to the command line: one line naming the file (and the row),
the documented exit status, nothing half written, ``--verbose`` for the traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from edge_inputs import can_mount, edit_row, project, small_mount, threshold_model, write_stack
from helpers import BIN, BOX, REPO, disc_particles

from particleseg_model.cli import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    main,
)
from particleseg_model.em.star import read_star


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return threshold_model(tmp_path_factory.mktemp("edge") / "models")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch) -> None:
    monkeypatch.setenv("PARTICLESEG_PROGRESS", "0")
    monkeypatch.setenv("PARTICLESEG_HTTP_RETRIES", "1")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``particleseg argv``: (exit status, stdout, stderr)."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str, command: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"particleseg {command}: error")]


def assert_one_error(err: str, command: str, *parts: str) -> str:
    """Exactly one error line, no traceback, naming every one of ``parts``."""
    lines = error_lines(err, command)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


# ------------------------------------------------------------------------- STAR inconsistencies


def test_duplicate_column_labels_are_one_line_in_every_command(models, tmp_path, capsys) -> None:
    star = project(tmp_path / "p")
    dup = tmp_path / "p" / "dup.star"  # rlnClassNumber's column relabelled rlnDefocusU
    dup.write_text(star.read_text().replace("_rlnClassNumber #3", "_rlnDefocusU #3"))
    for argv in (
        ["star-info", str(dup)],
        ["clean", str(dup), "--out", str(tmp_path / "c.star"), "--models-root", str(models)],
        ["segment", str(dup), "--out", str(tmp_path / "s.zarr"), "--models-root", str(models)],
    ):
        code, _, err = run(capsys, *argv)
        assert code == EXIT_BAD_INPUT
        assert_one_error(err, argv[0], str(dup), "_rlnDefocusU more than once")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # nothing written


def test_a_row_one_field_short_is_refused_naming_the_row(models, tmp_path, capsys) -> None:
    star = project(tmp_path / "p")
    # row 7 loses its last value (rlnOpticsGroup): pandas would pad it with NaN
    short = edit_row(star, tmp_path / "p" / "short.star", 7, lambda line: line.rsplit(None, 1)[0])
    for argv in (
        ["star-info", str(short)],
        ["clean", str(short), "--out", str(tmp_path / "c.star"), "--models-root", str(models)],
    ):
        code, _, err = run(capsys, *argv)
        assert code == EXIT_BAD_INPUT
        line = assert_one_error(err, argv[0], str(short), "data_particles, row 7 (line ")
        assert "has 3 of 4 values" in line
    assert not (tmp_path / "c.star").exists()
    # a row short of a middle value (its integer column shifted into floats) is found too
    middle = edit_row(
        star, tmp_path / "p" / "middle.star", 3, lambda line: " ".join(line.split()[:2])
    )
    code, _, err = run(capsys, "star-info", str(middle))
    assert code == EXIT_BAD_INPUT and "row 3 (line" in assert_one_error(err, "star-info")


def test_optics_groups_of_different_boxes_are_refused_as_segment_does(
    models, tmp_path, capsys
) -> None:
    star = project(tmp_path / "p", n=10, boxes=(BOX, 48))
    for command, out in (("clean", "c.star"), ("segment", "s.zarr")):
        code, _, err = run(
            capsys, command, str(star), "--out", str(tmp_path / out), "--models-root", str(models)
        )
        assert code == EXIT_BAD_INPUT
        assert_one_error(
            err,
            command,
            str(star),
            "group 1: 32 px, 10 particles; group 2: 48 px, 10 particles",
            "rlnOpticsGroup",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_a_stack_that_disagrees_with_rln_image_size_is_named(models, tmp_path, capsys) -> None:
    # both groups say 32 px; the second group's stack holds 48 px images
    star = project(tmp_path / "p", n=10, boxes=(BOX, 48), declared=(BOX, BOX))
    stack = tmp_path / "p" / "Particles" / "stack_2.mrcs"
    for command, out in (("clean", "c.star"), ("segment", "s.zarr")):
        code, _, err = run(
            capsys, command, str(star), "--out", str(tmp_path / out), "--models-root", str(models)
        )
        assert code == EXIT_BAD_INPUT
        assert_one_error(err, command, str(stack), "48 x 48 px", "rlnImageSize", "rows 11-20")


def test_nan_pixels_are_counted_unreadable_in_clean_and_segment(models, tmp_path, capsys) -> None:
    star = project(tmp_path / "p", n=20)
    stack = tmp_path / "p" / "Particles" / "stack_1.mrcs"
    images, _ = disc_particles(20, seed=5)
    images[6, 3, 3] = np.nan  # row 7
    write_stack(stack, images)
    code, out, err = run(
        capsys, "clean", str(star), "--out", str(tmp_path / "c.star"),
        "--models-root", str(models), "--drop", "0",
    )  # fmt: skip
    assert code == 0
    assert "kept 19/20 particles" in out and "skipped 1 unreadable" in out
    assert "row 7 (000007@Particles/stack_1.mrcs: 1 non-finite pixels" in err
    kept = read_star(tmp_path / "c.star").particles["image_name"]
    assert "000007@Particles/stack_1.mrcs" not in set(kept) and len(kept) == 19
    code, out, err = run(
        capsys, "segment", str(star), "--out", str(tmp_path / "s.zarr"),
        "--models-root", str(models),
    )  # fmt: skip
    assert code == 0 and "; 1 unreadable" in out and "(rows 7)" in err


def test_keep_above_that_keeps_nothing_is_refused(models, tmp_path, capsys) -> None:
    star = project(tmp_path / "p", n=12)
    code, out, err = run(
        capsys, "clean", str(star), "--out", str(tmp_path / "c.star"),
        "--models-root", str(models), "--keep-above", "1000",
    )  # fmt: skip
    assert code == EXIT_BAD_INPUT and out == ""
    line = assert_one_error(err, "clean", str(star), "above 1000 keeps none of the 12 readable")
    assert "scores run from" in line and "nothing written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_ties_at_the_cut_do_not_depend_on_the_row_order(models, tmp_path, capsys) -> None:
    from particleseg_model.cleaning.clean import select_particles, tie_order

    # every particle ties: which 3 of 10 go is decided by the names' hash, in any row order
    names = [f"{i:06d}@Particles/stack.mrcs" for i in range(1, 11)]
    scores = pd.DataFrame({"image_name": names, "readable": True, "ets": 0.5})
    dropped = {names[i] for i in np.flatnonzero(~select_particles(scores, score="ets", drop=0.3))}
    shuffled = scores.iloc[::-1].reset_index(drop=True)
    kept = select_particles(shuffled, score="ets", drop=0.3)
    again = {shuffled["image_name"][i] for i in np.flatnonzero(~kept)}
    assert dropped == again and len(dropped) == 3
    lowest = np.argsort(tie_order(scores), kind="stable")[:3]
    assert dropped == {names[i] for i in lowest}
    # the whole command: a STAR and its rows reversed keep the same particles
    star = project(tmp_path / "p", n=30)
    parsed = read_star(star)
    block = parsed.blocks["particles"]
    reverse = tmp_path / "p" / "reversed.star"
    from particleseg_model.em.star import write_loop_blocks

    write_loop_blocks(reverse, {"optics": parsed.blocks["optics"], "particles": block[::-1]})
    kept = []
    for source, out in ((star, "a.star"), (reverse, "b.star")):
        code, _, _ = run(
            capsys, "clean", str(source), "--out", str(tmp_path / out), "--models-root",
            str(models), "--drop", "0.5",
        )  # fmt: skip
        assert code == 0
        kept.append(set(read_star(tmp_path / out).particles["image_name"]))
    assert kept[0] == kept[1] and len(kept[0]) == 15


def test_rows_are_numbered_from_1_in_skip_and_stop_mode_and_the_stack_named_once(
    models, tmp_path, capsys
) -> None:
    star = project(tmp_path / "p", n=12)
    bad = edit_row(
        star, tmp_path / "p" / "bad.star", 5, lambda line: line.replace("000005@", "000099@", 1)
    )
    stack = "p/Particles/stack_1.mrcs"
    code, out, err = run(
        capsys, "clean", str(bad), "--out", str(tmp_path / "c.star"), "--models-root", str(models)
    )
    assert code == 0 and "skipped 1 unreadable" in out
    skipped = next(line for line in err.splitlines() if "cannot be read and are skipped" in line)
    assert "row 5 (" in skipped and "'000099@Particles/stack_1.mrcs' is beyond" in skipped
    assert skipped.count(stack) == 1
    code, _, err = run(
        capsys, "clean", str(bad), "--out", str(tmp_path / "d.star"), "--models-root",
        str(models), "--on-bad", "stop",
    )  # fmt: skip
    assert code == EXIT_BAD_INPUT
    line = assert_one_error(err, "clean", str(bad), "particle row 5 of 12 cannot be read")
    assert line.count(stack) == 1 and "0-based" not in line
    # a broken stack reached through a relative path is named once, not as given and resolved
    (tmp_path / "p" / "Particles" / "stack_1.mrcs").write_bytes(b"\0" * 100)
    code, _, err = run(capsys, "clean", str(star), "--out", str(tmp_path / "e.star"),
                       "--models-root", str(models), "--on-bad", "stop")  # fmt: skip
    line = assert_one_error(err, "clean", "shorter than the 1024-byte header")
    assert line.count("stack_1.mrcs") == 1


# ----------------------------------------------------------------------------------- models


def test_a_model_is_any_folder_with_a_valid_manifest(models, tmp_path, capsys) -> None:
    import shutil

    star = project(tmp_path / "p", n=10)
    copy = tmp_path / "my good model"
    shutil.copytree(models / "v0001", copy)
    outputs = iter(f"c{i}.star" for i in range(10))

    def clean(model: Path) -> tuple[int, str, str]:
        out = str(tmp_path / next(outputs))
        return run(capsys, "clean", str(star), "--out", out, "--model", str(model))

    for model in (copy, copy / "model.keras", models):  # a copy, its file, a registry root
        code, out, err = clean(model)
        assert code == 0 and "model v0001" in out, err
    code, _, err = clean(tmp_path / "no such model")
    assert code == EXIT_BAD_INPUT
    assert_one_error(err, "clean", "no such model folder or file")
    code, _, err = clean(tmp_path / "p")  # a folder, but not a model
    assert code == EXIT_BAD_INPUT
    assert_one_error(err, "clean", f"{tmp_path / 'p'}: not a particleSeg model: no manifest.json")
    assert "invalid literal" not in err


def test_a_truncated_model_file_and_a_latest_naming_a_missing_version(
    models, tmp_path, capsys
) -> None:
    import shutil

    star = project(tmp_path / "p", n=10)
    cut = tmp_path / "cut"
    shutil.copytree(models / "v0001", cut)
    data = (cut / "model.keras").read_bytes()
    (cut / "model.keras").write_bytes(data[: len(data) // 2])
    code, _, err = run(
        capsys, "clean", str(star), "--out", str(tmp_path / "c.star"), "--model", str(cut)
    )
    assert code == EXIT_BAD_INPUT
    assert_one_error(err, "clean", str(cut / "model.keras"), "is corrupt or truncated")
    assert "File not found" not in err

    registry = tmp_path / "registry"
    shutil.copytree(models, registry)
    (registry / "LATEST").write_text("v0007\n")
    code, _, err = run(
        capsys, "clean", str(star), "--out", str(tmp_path / "c.star"),
        "--models-root", str(registry),
    )  # fmt: skip
    assert code == EXIT_BAD_INPUT
    assert_one_error(err, "clean", str(registry / "LATEST"), "names 'v0007'", "known: v0001")


# -------------------------------------------------------------------------------- downloads


def _listener(behaviour: str) -> tuple[socket.socket, int, list[socket.socket]]:
    """A loopback server that closes every connection without a reply ("gone") or holds it
    open without a byte ("hang")."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if behaviour == "gone":
                conn.recv(65536)
                conn.close()
            else:
                held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1], held


def test_download_failures_are_one_line_after_the_retries(archive_server, tmp_path, capsys) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    gone, gone_port, _ = _listener("gone")
    try:
        cases = {
            f"http://127.0.0.1:{port}/p.mrcs": "connection failed (Connection refused)",
            f"{archive_server.archive_url}/10028/missing.mrcs": "not found (404)",
            f"http://127.0.0.1:{gone_port}/p.mrcs": "Remote end closed connection without",
        }
        for url, reason in cases.items():
            code, out, err = run(capsys, "download", url, str(tmp_path / "p.mrcs"))
            assert code == EXIT_ENVIRONMENT and out == ""
            assert_one_error(err, "download", url, str(tmp_path / "p.mrcs"), reason)
            assert len(err.splitlines()) <= 2  # the retry's warning, then the error
    finally:
        gone.close()
    assert not (tmp_path / "dl").exists() or list((tmp_path / "dl").iterdir()) == []


def test_ctrl_c_is_one_line_and_exit_130(tmp_path) -> None:
    hang, port, held = _listener("hang")
    env = {**os.environ, "PARTICLESEG_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.Popen(
            [str(BIN / "particleseg"), "download", f"http://127.0.0.1:{port}/p.mrcs",
             str(tmp_path / "p.mrcs")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # a shell's background job inherits SIGINT ignored, and Python then installs no
            # KeyboardInterrupt: the child gets the default whatever started pytest
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not held and time.monotonic() < deadline:  # the request waits on the server
            time.sleep(0.1)
        assert held, "the download never connected"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        hang.close()
    assert proc.returncode == EXIT_INTERRUPTED
    assert err.strip().splitlines()[-1].startswith("particleseg download: error: interrupted")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_verbose_prints_the_traceback_and_a_bug_is_an_internal_error(
    tmp_path, capsys, monkeypatch
) -> None:
    star = project(tmp_path / "p", n=4)
    dup = tmp_path / "p" / "dup.star"
    dup.write_text(star.read_text().replace("_rlnOpticsGroup #4", "_rlnClassNumber #4"))
    code, _, err = run(capsys, "--verbose", "star-info", str(dup))
    assert code == EXIT_BAD_INPUT
    assert "Traceback (most recent call last)" in err and "StarError" in err
    assert err.strip().splitlines()[-1].startswith("particleseg star-info: error: ")

    import particleseg_model.em.star as star_module

    def broken(path):
        raise TypeError("arg must be a list")

    monkeypatch.setattr(star_module, "read_star", broken)
    code, _, err = run(capsys, "star-info", str(star))
    assert code == EXIT_INTERNAL
    assert_one_error(err, "star-info", "internal error: TypeError: arg must be a list", "--verbose")


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["clean"])
    assert exited.value.code == 2
    assert "the following arguments are required" in capsys.readouterr().err


# --------------------------------------------------------------------------- output folders


def test_a_read_only_output_folder_is_found_before_the_run(models, tmp_path, capsys) -> None:
    star = project(tmp_path / "p", n=10)
    folder = tmp_path / "ro"
    if can_mount():
        context = small_mount(folder, read_only=True)
    elif os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        context = None
    else:
        pytest.skip("root without CAP_SYS_ADMIN: no read-only folder can be made here")
    with context or _nothing():
        code, out, err = run(
            capsys, "clean", str(star), "--out", str(folder / "c.star"), "--models-root",
            str(models),
        )  # fmt: skip
    assert code == EXIT_ENVIRONMENT and out == ""
    assert_one_error(err, "clean", str(folder), "cannot write --out here", "nothing was run")
    assert "calibrated score" not in err  # refused before scoring


def test_a_full_disk_names_the_file_and_leaves_nothing(models, tmp_path, capsys) -> None:
    from particleseg_model.atomic import atomic_write_bytes

    if not can_mount():
        pytest.skip("no tmpfs can be mounted here (needs root with CAP_SYS_ADMIN)")
    star = project(tmp_path / "p", n=200)
    with small_mount(tmp_path / "full", size="8k") as folder:
        # clean: too little space for its outputs is found before the run
        code, out, err = run(
            capsys, "clean", str(star), "--out", str(folder / "c.star"), "--models-root",
            str(models),
        )  # fmt: skip
        left = sorted(p.name for p in folder.iterdir())
        # a write that fills the disk half way: ENOSPC names the file, nothing is left
        with pytest.raises(OSError) as full:
            atomic_write_bytes(folder / "big.bin", b"x" * 65536)
        after = sorted(p.name for p in folder.iterdir())
    assert code == EXIT_ENVIRONMENT and out == ""
    line = assert_one_error(err, "clean", str(folder / "c.star"), "No space left on device")
    assert "nothing was run" in line and "calibrated score" not in err
    assert left == [] and after == []  # no output, no temporary file
    assert full.value.errno == 28 and full.value.filename == str(folder / "big.bin")
    from particleseg_model.cli import error_line

    assert error_line(full.value) == (
        f"{folder / 'big.bin'}: No space left on device",
        EXIT_ENVIRONMENT,
    )


def test_temporaries_of_a_killed_run_are_removed_on_rerun(models, tmp_path, capsys) -> None:
    from particleseg_model.atomic import _host_tag, temporary_name

    star = project(tmp_path / "p", n=10)
    out = tmp_path / "c.star"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host_tag()
    killed = tmp_path / f".c.star.{host}-{dead.pid}-0123456789abcdef.tmp"  # its writer is gone
    old = tmp_path / ".c_scores.parquet.0123456789abcdef.tmp"  # the old form, a day old
    live = temporary_name(out)  # this process: a write in progress
    other = tmp_path / f".c.star.ffffff-{dead.pid}-0123456789abcdef.tmp"  # another host's
    for path in (killed, old, live, other):
        path.write_bytes(b"half")
    stale = time.time() - 2 * 24 * 3600
    os.utime(old, (stale, stale))
    code, _, err = run(capsys, "clean", str(star), "--out", str(out), "--models-root", str(models))
    assert code == 0, err
    assert not killed.exists() and not old.exists()
    assert live.exists() and other.exists()


def test_a_stale_part_file_is_restarted_not_resumed(
    archive_server, tmp_path, capsys, caplog
) -> None:
    payload = os.urandom(150_000)
    source = archive_server.mirror.root / "archive" / "10028" / "data" / "p.mrcs"
    source.parent.mkdir(parents=True)
    source.write_bytes(payload)
    url = f"{archive_server.archive_url}/10028/data/p.mrcs"
    dest = tmp_path / "p.mrcs"
    (tmp_path / "p.mrcs.part").write_bytes(os.urandom(90_000))  # not this file's bytes
    code, _, err = run(capsys, "download", url, str(dest))
    assert code == 0 and dest.read_bytes() == payload
    assert "does not match the remote file" in err + caplog.text
    caplog.clear()
    # a real partial download is resumed: one ranged GET from 64 KiB before its end
    dest.unlink()
    archive_server.requests.clear()
    (tmp_path / "p.mrcs.part").write_bytes(payload[:100_000])
    code, _, err = run(capsys, "download", url, str(dest))
    assert code == 0 and dest.read_bytes() == payload
    assert "does not match" not in err + caplog.text
    statuses = [s for m, p, s in archive_server.requests if p.endswith("p.mrcs")]
    assert statuses == [206]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
