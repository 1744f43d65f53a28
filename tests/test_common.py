"""The scripts' shared helpers: atomic output and one-line flag errors."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from _common import check_output_path, parse_choices, run_main, write_atomically, write_json  # noqa: E402


def test_json_is_written_atomically_with_ordinary_permissions(tmp_path):
    path = tmp_path / "out" / "result.json"
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary left behind


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"version": 1})

    def failing(tmp):
        tmp.write_text("partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_atomically(path, failing)
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    with pytest.raises(ValueError):
        write_json(path, {"x": float("nan")})  # NaN is not JSON: refused, file untouched
    assert json.loads(path.read_text()) == {"version": 1}


def test_parse_choices():
    assert parse_choices("--m", "b,a,b", ("a", "b")) == ("b", "a")
    assert parse_choices("--m", "all", ("a", "b")) == ("a", "b")
    with pytest.raises(ValueError, match="--m must be 'all' or comma-separated names from a, b; got 'c'"):
        parse_choices("--m", "c", ("a", "b"))


def test_an_unwritable_out_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    (tmp_path / "folder.json").mkdir()
    check_output_path(str(tmp_path / "new" / "folder"))  # a folder still to make
    check_output_path(str(tmp_path / "result.json"))
    for out, message in ((afile, "must be a folder"), (afile / "sub", "which is a file, not a folder"),
                         (tmp_path / "folder.json", "must be a JSON file path"), (afile / "r.json", "which is a file")):
        with pytest.raises(ValueError, match=message):
            check_output_path(str(out))


@pytest.mark.parametrize("error", [ValueError("bad value"), FileExistsError(17, "File exists", "/x"),
                                   PermissionError(13, "Permission denied", "/y")])
def test_run_main_turns_bad_input_and_os_errors_into_one_line_and_status_2(error, capsys):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
