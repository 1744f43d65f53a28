"""The scripts' shared helpers: atomic output and one-line flag errors."""

import argparse
import dataclasses
import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from _common import (check_output_path, null_non_finite, parse_choices, parse_config, parse_floats,  # noqa: E402
                     parse_overrides, require_finite, require_integer, run_main, write_atomically, write_json)
from scripts import (ROOT, assert_one_line_error, interrupted_write_text, load_script, run_in_process,  # noqa: E402
                     run_script)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_json_is_written_atomically_with_ordinary_permissions(tmp_path, umask):
    """A result file gets 0666 less the umask, what open() would give it, whatever the umask: 0664 under 002 for a
    shared group, 0600 under 077 for a private one (a fixed 0644 passes only under 022)."""
    path = tmp_path / "out" / "result.json"
    previous = os.umask(umask)
    try:
        write_json(path, {"a": 1})
    finally:
        os.umask(previous)
    assert json.loads(path.read_text()) == {"a": 1}
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
    # NaN is not JSON: refused, naming where it is, and the file is untouched.
    with pytest.raises(ValueError, match=r"result.json: methods.ew.gap\[1\] is not a finite number"):
        write_json(path, {"methods": {"ew": {"gap": [0.5, float("nan")]}}})
    assert json.loads(path.read_text()) == {"version": 1}


def test_a_diverged_record_is_written_with_nulls(tmp_path):
    """What the scripts write for a run that diverged: NaN and ±infinity become null, at any depth; the finite numbers,
    integers, booleans and strings stay as they were."""
    record = {"gap": (0.5, float("nan")), "runs": [{"risk": float("inf"), "steps": 3, "ok": False}], "name": "ew",
              "seconds": -float("inf")}
    cleaned = null_non_finite(record)
    assert cleaned == {"gap": [0.5, None], "runs": [{"risk": None, "steps": 3, "ok": False}], "name": "ew",
                       "seconds": None}
    write_json(tmp_path / "result.json", cleaned)
    assert json.loads((tmp_path / "result.json").read_text()) == cleaned


def test_parse_choices():
    assert parse_choices("--m", "b,a,b", ("a", "b")) == ("b", "a")
    assert parse_choices("--m", "all", ("a", "b")) == ("a", "b")
    with pytest.raises(ValueError, match="--m must be 'all' or comma-separated names from a, b; got 'c'"):
        parse_choices("--m", "c", ("a", "b"))
    # A named set (train_nyuv2's --corruptions paper), named in the error too.
    assert parse_choices("--m", " pair ", ("a", "b", "c"), {"pair": ("c", "a")}) == ("c", "a")
    with pytest.raises(ValueError, match="--m must be 'all', 'pair' or comma-separated names from a, b; got 'd'"):
        parse_choices("--m", "d", ("a", "b"), {"pair": ("a",)})
    # Empty pieces (a trailing comma, a space between commas) name nothing; nothing at all is refused.
    assert parse_choices("--m", "a, ,b,", ("a", "b")) == ("a", "b")
    with pytest.raises(ValueError, match="--m must be 'all' or comma-separated names from a, b; got ' , '"):
        parse_choices("--m", " , ", ("a", "b"))


def test_parse_floats():
    assert parse_floats("--b", "1, 2.5,-3e-1") == (1.0, 2.5, -0.3)
    assert parse_floats("--b", (2, 0.5)) == (2.0, 0.5)
    with pytest.raises(ValueError, match=r"^--b must be comma-separated numbers, e.g. 1.0,2.0; got '1,,2'$"):
        parse_floats("--b", "1,,2")
    with pytest.raises(ValueError, match="^--b must hold at least one number$"):
        parse_floats("--b", ())


@dataclasses.dataclass(frozen=True)
class Weights:
    task: float = 1.0
    independence: float = 0.5
    start_epoch: int = 20

    def __post_init__(self):
        if self.independence < 0:
            raise ValueError(f"independence must be >= 0; got {self.independence}")


def test_parse_overrides_replaces_the_named_fields_and_spells_them_one_way():
    replaced, canonical = parse_overrides("--w", " start_epoch = 3, independence=0.250 ", Weights())
    assert replaced == Weights(independence=0.25, start_epoch=3) and isinstance(replaced.start_epoch, int)
    assert canonical == "independence=0.25,start_epoch=3"  # the fields' order, Python's spelling
    assert parse_overrides("--w", canonical, Weights()) == (replaced, canonical)
    assert parse_overrides("--w", "", Weights()) == (Weights(), "")
    # A value equal to the base's changes nothing, and is spelt as nothing.
    assert parse_overrides("--w", "start_epoch=20,task=1", Weights()) == (Weights(), "")


@pytest.mark.parametrize("text, message", [
    ("cka=1", "--w takes comma-separated name=value from task, independence, start_epoch; got 'cka=1'"),
    ("task", "--w takes comma-separated name=value from task, independence, start_epoch; got 'task'"),
    ("start_epoch=2.5", "--w: start_epoch must be an integer; got '2.5'"),
    ("task=one", "--w: task must be a number; got 'one'"),
    ("task=1,task=2", "--w names task twice"),
    ("independence=-1", "--w: independence must be >= 0; got -1.0"),  # the dataclass's own check
])
def test_parse_overrides_refuses_in_one_line(text, message):
    with pytest.raises(ValueError) as refused:
        parse_overrides("--w", text, Weights())
    assert str(refused.value) == message


@pytest.mark.parametrize("value, positive, refused", [
    (1e-9, True, False), (0.0, True, True), (0.0, False, False), (-1e-9, False, True),
    # Infinities pass a comparison with 0 (a learning rate of inf would only fail later, in the optimiser); nan none.
    (float("inf"), True, True), (float("inf"), False, True), (float("-inf"), False, True), (float("nan"), False, True),
])
def test_require_finite_refuses_what_is_not_finite_and_positive(value, positive, refused):
    config = argparse.Namespace(learning_rate=value)
    if refused:
        bound = ">" if positive else ">="
        with pytest.raises(ValueError, match=rf"^--learning-rate must be a finite number {bound} 0; got {value}$"):
            require_finite(config, "learning_rate", positive)
    else:
        require_finite(config, "learning_rate", positive)


def test_require_integer_takes_its_bound_itself():
    require_integer(argparse.Namespace(batch_size=1), "batch_size", 1)
    with pytest.raises(ValueError, match=r"^--batch-size must be an integer >= 1 \(one full batch\); got 0$"):
        require_integer(argparse.Namespace(batch_size=0), "batch_size", 1, "one full batch")


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


@pytest.mark.parametrize("status, code", [(0, 0), (None, 0), (3, 3)])
def test_run_main_exits_with_the_status_main_returns(status, code):
    """A main that returns a status ends the script with it (a failed check must not read as success), and None or 0
    with 0."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda argv: status, [])
    assert exit_info.value.code == code


def _parse(config_class, argv, **kwargs):
    from _common import parse_config, parser_for

    return parse_config(config_class, parser_for(config_class, "test", prog="prog"), argv, **kwargs)


@dataclasses.dataclass(frozen=True)
class _HelpConfig:
    steps: int = dataclasses.field(default=800, metadata={"help": "training steps"})
    batch_size: int = dataclasses.field(default=0, metadata={"help": "batch (0: the paper's)"})
    data: str = dataclasses.field(default="", metadata={"help": "data folder"})
    conv: str = dataclasses.field(default="auto", metadata={"help": "xla or fast (default: the fastest)"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})


def test_help_shows_a_default_only_where_it_says_something():
    from _common import parser_for

    text = " ".join(parser_for(_HelpConfig, "test", prog="prog").format_help().split())  # unwrapped
    assert "--steps STEPS training steps (default: 800) --batch-size" in text, text
    assert "batch (0: the paper's) (default: 0) --data" in text, text  # a zero is a value
    assert "--data DATA data folder --conv" in text, text  # not "(default: )"
    assert "--conv CONV xla or fast (default: the fastest) --quiet" in text, text  # the help's own default, once
    assert text.endswith("--quiet print nothing"), text  # not "(default: False)"


@dataclasses.dataclass(frozen=True)
class _SeedConfig:
    seed: int = 0
    data_seed: int = 0
    seeds: int = 2  # a count, not a seed: not range-checked


@pytest.mark.parametrize("value", [2**63 - 1, -1, -(2**63), 0])
def test_seeds_in_the_range_jax_accepts_pass_and_make_keys(value):
    import jax

    config = _parse(_SeedConfig, ["--seed", str(value), "--data-seed", str(value)])
    assert config.seed == config.data_seed == value
    jax.random.key(config.seed)  # the whole accepted range really is usable


@pytest.mark.parametrize("flag, value", [("--seed", 2**63), ("--seed", -(2**63) - 1), ("--data-seed", 10**30)])
def test_seeds_outside_the_range_jax_accepts_are_one_line_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(_SeedConfig, [flag, str(value)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} must be an integer in [-2^63, 2^63 - 1]" in err and str(value) in err
    assert _parse(_SeedConfig, ["--seeds", str(2**70)]).seeds == 2**70


def test_an_out_that_cannot_be_created_is_refused_and_leaves_no_folders(tmp_path):
    too_long = "x" * 300  # longer than any file system allows a name: refused even for root
    for out, kind in ((tmp_path / "a" / "b" / too_long, "folder"), (tmp_path / "a" / "b" / too_long / "c", None),
                      (tmp_path / "a" / "b" / too_long / "r.json", "file")):
        with pytest.raises(ValueError, match=r"--out .* cannot be written") as error:
            check_output_path(str(out), kind=kind)
        assert str(out) in str(error.value) and "\n" not in str(error.value)
        assert list(tmp_path.iterdir()) == []  # the folders the check made are gone again
    if Path("/proc/self").is_dir():
        for out, kind in (("/proc/x", "folder"), ("/proc/x.json", "file")):
            with pytest.raises(ValueError, match=f"--out {out} cannot be written"):
                check_output_path(out, kind=kind)


def test_a_writable_out_passes_and_the_check_leaves_only_its_folder(tmp_path):
    check_output_path(str(tmp_path / "new" / "deeper"), kind="folder")
    check_output_path(str(tmp_path / "new2" / "result.txt"), kind="file")
    check_output_path(str(tmp_path), kind="folder")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["new", "new/deeper", "new2"]


def test_processes_checking_one_new_out_at_once_all_pass(tmp_path):
    """Every process of a multi-process run checks --out before they meet: none may undo another's folder."""
    import multiprocessing

    out = tmp_path / "a" / "b" / "run"
    with multiprocessing.get_context("spawn").Pool(4) as pool:  # fork would copy JAX's threads
        results = pool.starmap(_check_or_error, [(str(out), "folder")] * 200)
    assert results == [None] * 200


def _check_or_error(out, kind):
    try:
        check_output_path(out, kind=kind)
    except ValueError as error:
        return str(error)
    return None


def test_scripts_declare_whether_out_is_a_file_or_a_folder(tmp_path):
    existing_file = tmp_path / "existing.json"
    existing_file.write_text("{}")
    check_output_path(str(tmp_path / "text.txt"), kind="file")  # a JSON file need not end in .json
    with pytest.raises(ValueError, match=f"--out must be a JSON file path; {tmp_path} is an existing folder"):
        check_output_path(str(tmp_path), kind="file")
    with pytest.raises(ValueError, match="--out must be a folder; .*existing.json is an existing file"):
        check_output_path(str(existing_file), kind="folder")
    check_output_path(str(tmp_path / "run"))  # without a kind, the suffix decides, as before
    with pytest.raises(ValueError, match="which is a file, not a folder"):
        check_output_path(str(existing_file / "x"))


def test_write_errors_name_the_users_path_not_the_temporary(tmp_path):
    target = tmp_path / "result.json"
    target.mkdir()  # a folder where the file should go: os.replace fails
    with pytest.raises(IsADirectoryError) as error:
        write_json(target, {"a": 1})
    assert error.value.filename == str(target) and error.value.filename2 is None
    assert ".result." not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]

    def no_space(tmp):
        raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(OSError, match="No space left on device") as error:
        write_atomically(tmp_path / "other.json", no_space)
    assert error.value.filename == str(tmp_path / "other.json")


def test_run_main_reports_any_os_error_about_a_path_in_one_line(capsys):
    def main(argv):
        raise OSError(28, "No space left on device", "/data/result.json")

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/data/result.json" in err


class _Checked(Exception):
    pass


@pytest.mark.parametrize("script, kind", [*((name, "file") for name in (
    "bench_atrous", "bench_balancers", "bench_checkpoint", "bench_data", "bench_flops", "bench_measures",
    "bench_sweep", "bench_train_step")),
    *((name, "folder") for name in ("sweep_theta", "leakage_bound", "grad_orthogonality", "learned_encoder"))])
def test_each_script_declares_what_its_out_is(script, kind, monkeypatch, tmp_path):
    """The bench scripts write one JSON file whatever its name; the experiments write a folder, whatever its name."""
    import importlib.util

    import _common

    root = Path(__file__).resolve().parents[1]
    path = root / ("bench" if script.startswith("bench") else "experiments") / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"_out_kind_{script}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    seen = {}

    def check(out, kind=None):
        seen["out"], seen["kind"] = out, kind
        raise _Checked

    monkeypatch.setattr(_common, "check_output_path", check)
    out = str(tmp_path / ("text.txt" if kind == "file" else "results.json"))  # the suffix must not decide
    with pytest.raises(_Checked):
        module.main(["--out", out])
    assert seen == {"out": out, "kind": kind}


def test_a_profiler_trace_folder_is_checked_before_any_step_is_compiled(tmp_path):
    taken = tmp_path / "trace"
    taken.write_text("a file where the trace folder should go")
    result = run_script("bench/bench_train_step.py", "--trace", str(taken), "--out", str(tmp_path / "bench.json"))
    assert_one_line_error(result, f"--trace must be a folder; {taken} is an existing file")
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("script, args, computation, message", [
    ("bench/bench_atrous.py", ["--height", "0"], "_forward_backward", "--height must be an integer >= 1; got 0"),
    ("bench/bench_measures.py", ["--max-1d", "1000"], "median_seconds",
     "--max-1d must be an integer >= 10000 (two sample sizes for the growth order); got 1000"),
    ("bench/bench_train_step.py", ["--variant", "authors", "--methods", "ew,mtan_pcgrad"], "training_steps",
     "--methods mtan_pcgrad times MTAN, which has its own architecture; use --variant paper for it"),
    ("bench/bench_checkpoint.py", ["--dir", "TMP/binary.json"], "_state",
     "--dir must be an existing folder; got 'TMP/binary.json'"),
    ("bench/bench_data.py", ["--step-json", "TMP"], "deep.data.nyuv2_arrays",
     "--step-json: cannot read TMP (Is a directory)"),
    ("bench/bench_data.py", ["--step-json", "TMP/binary.json"], "deep.data.nyuv2_arrays",
     "--step-json: TMP/binary.json is not a bench_train_step result"),
])
def test_bench_flags_name_the_flag_and_the_value(tmp_path, script, args, computation, message):
    (tmp_path / "binary.json").write_bytes(bytes(range(128, 256)))  # not UTF-8
    args = [arg.replace("TMP", str(tmp_path)) for arg in args]
    result = run_in_process(script, *args, "--out", str(tmp_path / "bench.json"), computation=computation)
    assert_one_line_error(result, message.replace("TMP", str(tmp_path)))


def test_gpu_figures_usage_is_one_line_and_status_2(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_figures.sh"
    (tmp_path / "file").write_text("a file where a folder should go")
    for args, message in (([], "give an output folder"),
                          ([str(tmp_path), "8"], "PART must be 1, 2, 3, 4, 5, 6, 7 or all"),
                          ([str(tmp_path / "file" / "sub"), "1"],
                           f"cannot write to the folder '{tmp_path / 'file' / 'sub'}' (Not a directory)")):
        result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                                env=dict(os.environ, LC_ALL="C"))  # mkdir's reason in English
        assert_one_line_error(result, message)


def test_the_evaluation_loader_fills_the_last_batch_with_labels_every_metric_ignores():
    """Both training scripts' evaluation batches: in order, all of one size, the filler rows black and unlabelled
    (for a dense split and for CelebA's attributes)."""
    import numpy as np

    from _training import evaluation_loader
    from deep.metrics import IGNORED_LABELS

    dense = {"images": np.ones((6, 2, 2, 3), np.float32), "segmentation": np.ones((6, 2, 2), np.int32),
             "depth": np.ones((6, 2, 2, 1), np.float32)}
    faces = {"images": np.ones((6, 2, 2, 3), np.uint8), "attributes": np.ones((6, 5), np.int32)}
    for split in (dense, faces):
        batches = list(evaluation_loader(split, 4, seed=0, placement={}).epoch(0))
        assert [len(batch["images"]) for batch in batches] == [4, 4]
        last = batches[-1]
        assert np.all(np.asarray(last["images"][:2]) == 1) and np.all(np.asarray(last["images"][2:]) == 0)
        for name in split.keys() - {"images"}:
            assert np.all(np.asarray(last[name][2:]) == IGNORED_LABELS[name]), name
            assert np.all(np.asarray(last[name][:2]) == 1), name


def test_a_batch_larger_than_the_training_split_is_refused_with_one_that_fits():
    """Both training scripts: the remedy is the largest batch size that fits the split and splits over the devices
    (6 examples on 4 devices: 4, not 6), or says that the split is smaller than one example per device."""
    from _training import check_full_batch

    check_full_batch(6, 6, 2)  # the whole split in one batch: allowed
    for batch_size, examples, devices, remedy in (
            (8, 6, 4, "give --batch-size 4 or less"), (8, 7, 1, "give --batch-size 7 or less"),
            (4, 3, 4, "it needs at least one example for each of the 4 devices")):
        with pytest.raises(ValueError) as error:
            check_full_batch(batch_size, examples, devices, note=" (a note)")
        assert str(error.value) == (f"--batch-size {batch_size} is larger than the training split ({examples} "
                                    f"examples), which would leave no full batch; {remedy} (a note)")


def test_an_interrupted_script_exits_130_while_jax_computes(tmp_path):
    """Ctrl-C in the middle of a computation: one line and exit status 130. Ended through the interpreter's normal
    teardown, learned_encoder.py died of signal 11 instead when a JAX computation was still running on another
    thread: at some moments only (here, with the interrupt 3 s into the first run, 1 of 3 tries; 2 of 2 at 10 s from
    the start), so this test catches that regression only sometimes; the exit status it checks always."""
    import signal
    import time

    script = str(ROOT / "experiments/learned_encoder.py")
    # Ctrl-C's handler set in the child: one started from a background shell job would inherit SIGINT ignored.
    launcher = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                f"sys.argv = [{script!r}, *sys.argv[1:]]; runpy.run_path({script!r}, run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", launcher, "--out", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    seen, deadline = b"", time.time() + 300
    while b"/run" not in seen and time.time() < deadline:  # its progress bar: the first run is under way
        seen += os.read(process.stderr.fileno(), 4096)
    time.sleep(3.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()[-2000:]
    assert stderr.decode().rstrip().endswith("\nlearned_encoder.py: interrupted")
    assert not list((tmp_path / "out").glob("learned_encoder.*"))  # no result of a run that did not end


def test_a_ctrl_c_that_lands_in_a_garbage_collection_callback_still_ends_the_script():
    """Python drops an exception raised in a gc callback or a destructor (sys.unraisablehook), and JAX runs a gc
    callback at every collection: the test above once ran on after its Ctrl-C, which had ended in jax's
    _xla_gc_callback (7th of 25 tries with both cores busy). run_main delivers such an interrupt again. Here the
    callback raises it itself, as a SIGINT handled there does; without the hook the script runs to its end."""
    program = textwrap.dedent("""
        import gc, signal, sys, time
        sys.path.insert(0, "experiments")
        from _common import run_main

        # As in a terminal: a shell's background job starts with SIGINT ignored, where nothing could interrupt it.
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def interrupted_inside_a_collection(phase, info):
            gc.callbacks.remove(interrupted_inside_a_collection)
            raise KeyboardInterrupt

        def main(argv):
            gc.callbacks.append(interrupted_inside_a_collection)
            gc.collect()
            for _ in range(100):
                time.sleep(0.05)
            print("ran to the end")
            return 0

        run_main(main, [])
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr[-2000:]
    assert "ran to the end" not in result.stdout and "Exception ignored" not in result.stderr
    assert result.stderr.rstrip().endswith("-c: interrupted")


def test_a_json_write_that_fails_half_way_leaves_the_previous_file(tmp_path):
    """A write that stops half-way (a full disk) must leave the previous results.json whole: write_json goes through
    a temporary file and a rename, never writes the file in place."""
    path = tmp_path / "results.json"
    path.write_text('{"version": 1}\n')
    with mock.patch("pathlib.Path.write_text", interrupted_write_text), pytest.raises(OSError):
        write_json(path, {"version": 2, "padding": "x" * 1000})
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_run_folder_with_only_its_record_is_not_overwritten_and_the_history_is_written_atomically(tmp_path):
    """A run killed after writing run.json but before its first checkpoint still holds a run: a new run there is
    refused (pass --resume). metrics.jsonl rewritten by an epoch that fails half-way keeps the previous lines."""
    from _training import check_run_folder, write_history

    script = load_script("experiments/train_nyuv2.py")
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run: pass --resume"):
        check_run_folder(out, {}, False, script.TrainConfig, script.PATH_FIELDS, "train_nyuv2.py")
    # An empty checkpoints folder alone holds no run: the folder is free.
    (out / "run.json").unlink()
    (out / "checkpoints").mkdir()
    assert check_run_folder(out, {}, False, script.TrainConfig, script.PATH_FIELDS, "train_nyuv2.py") is None
    history = out / "metrics.jsonl"
    write_history(history, [{"epoch": 1}])
    with mock.patch("pathlib.Path.write_text", interrupted_write_text), pytest.raises(OSError):
        write_history(history, [{"epoch": 1}, {"epoch": 2, "padding": "x" * 1000}])
    assert history.read_text() == '{"epoch": 1}\n'


def test_the_file_then_its_folder_are_flushed_around_the_rename(tmp_path, monkeypatch):
    """What makes the write survive a power loss cannot be caused in a test, so the calls are watched: the new
    file's data is fsynced before the rename puts it in place, and its folder (the rename itself) after."""
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(descriptor):
        info = os.fstat(descriptor)
        events.append(("fsync", stat.S_ISDIR(info.st_mode), info.st_ino))
        real_fsync(descriptor)

    def renaming(real):
        def rename(source, destination, *args, **kwargs):
            events.append(("rename", os.stat(source).st_ino))
            real(source, destination, *args, **kwargs)
        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renaming(real_replace))
    monkeypatch.setattr(os, "rename", renaming(real_rename))
    path = tmp_path / "result.json"
    write_atomically(path, lambda tmp: tmp.write_text("new"))
    monkeypatch.undo()
    file, folder = ("fsync", False, path.stat().st_ino), ("fsync", True, tmp_path.stat().st_ino)
    assert file in events and folder in events, events
    assert events.index(file) < events.index(("rename", path.stat().st_ino)) < events.index(folder), events


def test_a_temporary_that_cannot_be_created_is_reported_under_the_users_path(tmp_path, monkeypatch):
    """A folder where the temporary cannot be created (simulated: chmod does not stop root) is reported as the
    user's path, not the temporary's hidden name."""
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if Path(path).name.startswith(".result."):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(PermissionError) as error:
        write_atomically(tmp_path / "result.json", lambda tmp: tmp.write_text("x"))
    monkeypatch.undo()
    assert error.value.filename == str(tmp_path / "result.json") and ".result." not in str(error.value)


def test_an_error_about_another_file_keeps_that_files_name(tmp_path):
    """An OSError about a file ``write`` reads is about that file: renaming it to the output would mislead."""
    missing = tmp_path / "input.txt"
    with pytest.raises(FileNotFoundError) as error:
        write_atomically(tmp_path / "result.json", lambda tmp: tmp.write_text(missing.read_text()))
    assert error.value.filename == str(missing)
    assert list(tmp_path.iterdir()) == []


def test_an_error_with_no_errno_is_passed_on_as_it_is(tmp_path):
    """Pillow says "cannot write mode RGBA as JPEG" as an OSError with no errno and no file name: there is nothing to
    rename, and its words are the message, so it reaches the user unchanged (and the temporary is gone)."""
    def refused(tmp):
        raise OSError("cannot write mode RGBA as JPEG")

    with pytest.raises(OSError, match="^cannot write mode RGBA as JPEG$"):
        write_atomically(tmp_path / "figure.jpg", refused)
    assert list(tmp_path.iterdir()) == []


def test_an_fsync_failure_names_the_users_path_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """fsync's errors carry no file name (EIO on a failing disk): the one to name is the user's path."""
    path = tmp_path / "result.json"
    path.write_text("old")

    def fsync(descriptor):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as error:
        write_atomically(path, lambda tmp: tmp.write_text("new"))
    monkeypatch.undo()
    assert error.value.errno == errno.EIO and error.value.filename == str(path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_an_os_error_without_errno_is_passed_on_unchanged(tmp_path):
    """A library's own ``OSError("...")`` has no errno to rebuild it from: it keeps its message."""
    def write(tmp):
        raise OSError("quota of the share exceeded")

    with pytest.raises(OSError, match=r"^quota of the share exceeded$"):
        write_atomically(tmp_path / "result.json", write)
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_name_already_taken_is_never_reused(tmp_path, monkeypatch):
    """The temporary is created with O_EXCL: a file of the same name (another writer's temporary) is left alone and
    the next name drawn is used."""
    import secrets

    names = iter(["000000000000", "111111111111"])
    monkeypatch.setattr(secrets, "token_hex", lambda size: next(names))
    taken = tmp_path / ".result.000000000000.json"
    taken.write_text("another writer's")
    write_atomically(tmp_path / "result.json", lambda tmp: tmp.write_text("mine"))
    monkeypatch.undo()
    assert taken.read_text() == "another writer's" and (tmp_path / "result.json").read_text() == "mine"


def test_a_writer_that_picks_its_format_by_the_suffix_writes_the_file(tmp_path):
    """np.save (like PIL and matplotlib) goes by the name, and appends .npy to a name without it: the temporary
    keeps the target's suffix, so the array lands in the file that is renamed into place."""
    import numpy as np

    array = np.arange(6.0).reshape(2, 3)
    path = tmp_path / "array.npy"
    write_atomically(path, lambda tmp: np.save(tmp, array))
    np.testing.assert_array_equal(np.load(path), array)
    assert [p.name for p in tmp_path.iterdir()] == ["array.npy"]


def test_a_name_as_long_as_the_file_system_allows_is_written(tmp_path):
    """The temporary's name must fit where the user's does: it keeps only the start of a long stem."""
    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    path = tmp_path / ("r" * (longest - len(".json")) + ".json")
    write_atomically(path, lambda tmp: tmp.write_text("long"))
    assert path.read_text() == "long" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_failed_or_interrupted_script_leaves_no_empty_output_folder_behind(tmp_path, capsys):
    """Folders the output check made are removed when the script then stops with bad input or an interrupt, unless
    something was written there; folders that were there before are never touched."""
    existing = tmp_path / "existing"
    existing.mkdir()

    def failing(out, write=False, error=ValueError("bad input met late")):
        def main(argv):
            check_output_path(str(out), kind="folder")
            assert out.is_dir()
            if write:
                (out / "data").mkdir()
            raise error
        return main

    for out in (tmp_path / "new" / "run", existing / "run"):
        with pytest.raises(SystemExit) as exit_:
            run_main(failing(out), [])
        assert exit_.value.code == 2 and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and list(existing.iterdir()) == []
    with pytest.raises(SystemExit):
        run_main(failing(tmp_path / "kept" / "run", write=True), [])
    assert (tmp_path / "kept" / "run" / "data").is_dir()
    with mock.patch("os._exit", side_effect=SystemExit) as exit_, pytest.raises(SystemExit):
        run_main(failing(tmp_path / "stopped" / "run", error=KeyboardInterrupt()), [])
    assert exit_.call_args.args == (130,) and not (tmp_path / "stopped").exists()
    # "missing/../existing" names the existing folder, which the check did not make (only "missing").
    with pytest.raises(SystemExit):
        run_main(failing(tmp_path / "missing" / ".." / "existing"), [])
    assert existing.is_dir() and not (tmp_path / "missing").exists()

    def two_checks(argv):  # the deeper folder made by the second check: both removed, the deeper first
        check_output_path(str(tmp_path / "trace"), kind="folder", name="--trace")
        check_output_path(str(tmp_path / "trace" / "sub" / "r.json"), kind="file")
        raise ValueError("bad input met late")

    with pytest.raises(SystemExit):
        run_main(two_checks, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "kept"]
    assert capsys.readouterr().err.count("\n") == 6


def test_a_refused_configuration_leaves_no_folder_that_its_checks_made(tmp_path, capsys):
    """parse_config: a folder checked in the configuration's own checks (bench_train_step's --trace) is removed again
    when a later check (--out) refuses, before argparse's exit."""
    @dataclasses.dataclass
    class Config:
        trace: str = ""
        out: str = ""

        def __post_init__(self):
            check_output_path(self.trace, kind="folder", name="--trace")

    (tmp_path / "file").write_text("")
    parser = argparse.ArgumentParser(prog="script")
    parser.add_argument("--trace", default="")
    parser.add_argument("--out", default="")
    with pytest.raises(SystemExit):
        parse_config(Config, parser, ["--trace", str(tmp_path / "trace"), "--out", str(tmp_path / "file")],
                     out_kind="folder")
    assert "--out must be a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
