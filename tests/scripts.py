"""Helpers for tests that run the command-line scripts: a run in a subprocess or, for input refused before any
work, through the script's entry point in this process; and the one-line error (exit status 2, no traceback) the
scripts owe bad input."""

import contextlib
import dataclasses
import errno
import functools
import importlib.util
import inspect
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_readme_example(name: str, replacements: dict[str, str] | None = None) -> dict:
    """Runs the README's code block marked ``<!-- tested: name -->``, each key of ``replacements`` (a path the block
    names, say) replaced by its value, and returns its variables."""
    match = re.search(rf"<!-- tested: {name} -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert match, f"the README lost its tested example {name}"
    code = match.group(1)
    for old, new in (replacements or {}).items():
        assert old in code, f"the README's example {name} no longer names {old!r}"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, f"README.md ({name})", "exec"), namespace)
    return namespace


def environment(cache: Path) -> dict:
    """The environment of a training run that shares XLA's persistent compilation cache ``cache`` with the other runs
    of its test file, so only the first one pays for compiling the step; runs inherit the suite's fast-compile XLA
    flags (conftest.py)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_training(script: Path, args, cache: Path, **kwargs) -> subprocess.CompletedProcess:
    """``python <script> args...`` from the root with the compilation cache ``cache`` (:func:`environment`)."""
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=ROOT,
                          env=environment(cache), timeout=900, **kwargs)


def killed_after_the_first_checkpoint(script: Path, args, out: Path, cache: Path) -> list[str]:
    """Starts a training run into ``out`` and kills it (SIGKILL) as soon as its epoch-1 checkpoint exists; checks
    that it had not finished, and returns the ``metrics.jsonl`` line of that checkpointed epoch (a resume must
    leave it as it is: an epoch checkpointed is not trained again)."""
    errors = out.parent / f"{out.name}.stderr"  # a file: a pipe nobody reads could fill and stall the run
    with open(errors, "w") as stderr, subprocess.Popen([sys.executable, str(script), *args, "--out", str(out)],
                                                       cwd=ROOT, env=environment(cache), stdout=subprocess.DEVNULL,
                                                       stderr=stderr) as process:
        deadline = time.time() + 600
        while not (out / "checkpoints" / "1").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        ended = process.poll()  # before the kill: the run's own exit status, if it stopped by itself
        process.send_signal(signal.SIGKILL)
    assert ended is None, f"the run stopped by itself (status {ended}) before it could be killed:\n" + \
        errors.read_text()[-3000:]
    assert not (out / "results.json").exists(), "the run ended before it could be killed"
    return (out / "metrics.jsonl").read_text().splitlines()[:1]


# A training script run with its step replaced by a stand-in that records what the loop hands it (the step's key,
# the batch after augmentation, the counterfactual flag, the state's step counter and the balancer's), one JSON line
# per step, and counts steps in the state and in a balancer state. STOP_AT: the step at which the run is
# interrupted; NAN_EVALUATION: the call of deep.trainer.evaluate (from 1) whose first metric is made NaN. Both
# scripts' step builders are replaced (train_nyuv2.py calls deep.trainer.make_step with the epoch's controls,
# train_celeba.py deep.attributes.make_attribute_step without).
STAND_IN_LOOP = """
import json, os, runpy, sys
import jax, jax.numpy as jnp, numpy as np
script, log, stop_at = sys.argv[1], os.environ["STEP_LOG"], int(os.environ.get("STOP_AT", "-1"))
sys.path.insert(0, os.path.dirname(script))
from deep import attributes, trainer
calls = []

class CountingBalancer:
    def init(self, num_tasks, num_params=None):  # the Balancer contract's signature
        return {"steps": jnp.zeros((), jnp.int32)}

def make_step(method, graphdef, optimizer, weights, perceptual=None, jacobian_chunk=None):
    def step(state, balancer_state, batch, key, controls=None, counterfactual=None):
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        calls.append(1)
        record = {"key": np.asarray(jax.random.key_data(key)).tolist(),
                  "images": float(np.asarray(batch["images"], np.float64).sum()),
                  "counterfactual": bool(counterfactual), "state": int(state.step),
                  "balancer": int(balancer_state["steps"]) if balancer_state else None}
        with open(log, "a") as file:
            file.write(json.dumps(record) + "\\n")
        state = state._replace(step=state.step + 1)
        if balancer_state:
            balancer_state = {"steps": balancer_state["steps"] + 1}
        return state, balancer_state, {"finite": jnp.array(True), "loss": jnp.array(1.0)}
    return (CountingBalancer() if method != "core" else ()), step

trainer.make_step = attributes.make_attribute_step = make_step
evaluate, evaluations, nan_at = trainer.evaluate, [], int(os.environ.get("NAN_EVALUATION", "0"))

def evaluate_or_nan(*args, **kwargs):
    metrics = evaluate(*args, **kwargs)
    evaluations.append(1)
    return {**metrics, next(iter(metrics)): float("nan")} if len(evaluations) == nan_at else metrics

trainer.evaluate = evaluate_or_nan
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
"""


def run_with_a_stand_in_step(script: Path, args: list[str], cache: Path, log: Path, stop_at: int = -1,
                             nan_evaluation: int = 0) -> subprocess.CompletedProcess:
    """``python <script> args...`` with the stand-in step of :data:`STAND_IN_LOOP`, which writes its steps to ``log``
    (``stop_at``, ``nan_evaluation``: its STOP_AT and NAN_EVALUATION)."""
    env = dict(environment(cache), STEP_LOG=str(log), STOP_AT=str(stop_at), NAN_EVALUATION=str(nan_evaluation))
    return subprocess.run([sys.executable, "-c", STAND_IN_LOOP, str(script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=900)


def steps_of_a_resumed_stand_in_loop(script: Path, flags: list[str], cache: Path, folder: Path) -> list[dict]:
    """The epoch loop's side of an exact resume, with a stand-in step (:data:`STAND_IN_LOOP`, no training compiled;
    ``flags`` must give 2 steps per epoch): a run interrupted at the 2nd step of its 2nd epoch and resumed hands
    every step what the uninterrupted run did (key, batch, coin flip, state, balancer state), from that epoch's first
    step and each step once. Checks that, that the state counts every step of the uninterrupted run and that each
    step has its own key (drawn from the global step, not the step within the epoch), and returns the uninterrupted
    run's steps."""
    def run_loop(out, log, stop_at=-1, resume=False):
        return run_with_a_stand_in_step(script, [*flags, "--out", str(out), *(["--resume"] if resume else [])],
                                        cache, log, stop_at=stop_at)

    steps = lambda log: [json.loads(line) for line in log.read_text().splitlines()]  # noqa: E731
    result = run_loop(folder / "whole", folder / "whole.jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = steps(folder / "whole.jsonl")
    assert [step["state"] for step in expected] == list(range(len(expected)))
    interrupted = run_loop(folder / "killed", folder / "killed.jsonl", stop_at=3)
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert steps(folder / "killed.jsonl") == expected[:3]
    result = run_loop(folder / "killed", folder / "resumed.jsonl", resume=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps(folder / "resumed.jsonl") == expected[2:]
    assert len({str(step["key"]) for step in expected}) == len(expected)
    return expected


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python <script> args...`` from the repository root on the CPU (``script`` relative to the root)."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=timeout)


@functools.cache
def load_script(script: str):
    """The script ``script`` (relative to the root) as a module, loaded once (its ``main`` is not run)."""
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def weights_reaching(script: str, step_builder: str, *args: str):
    """The loss weights (its fourth argument) with which ``python <script> args...``, run through its ``main`` in this
    process, calls ``step_builder`` (a dotted path), where the run is stopped: what the run would train with."""
    seen = {}

    class Reached(Exception):
        pass

    def capture(method, graphdef, optimizer, weights, *rest, **keywords):
        seen["weights"] = weights
        raise Reached

    with mock.patch(step_builder, side_effect=capture), pytest.raises(Reached):
        load_script(script).main(list(args))
    return seen["weights"]


def run_in_process(script: str, *args: str, computation: str = "run") -> subprocess.CompletedProcess:
    """``python <script> args...`` as its ``__main__`` block runs it (``run_main(main)``), but in this process, with
    its output captured, and read like :func:`run_script`'s result. Only for input a script refuses before any work
    (a subprocess would spend seconds importing JAX for each case): ``computation``, the script's attribute where
    the work starts (or a dotted path for ``mock.patch``), raises instead, so input that is no longer refused fails
    at once rather than running an experiment in the test process (which has float64 on, see conftest.py)."""
    module = load_script(script)
    from _common import run_main  # the copy the script itself imported (from experiments/, on the path now)

    target = computation if "." in computation else f"{module.__name__}.{computation}"
    reached = AssertionError(f"{script} {' '.join(args)} was not refused before its computation ({computation})")
    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch(target, side_effect=reached), mock.patch.object(sys, "argv", [str(ROOT / script), *args]), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            pytest.raises(SystemExit) as exit_:
        run_main(module.main, list(args))  # always ends in sys.exit
    code = exit_.value.code
    return subprocess.CompletedProcess([script, *args], code if isinstance(code, int) else int(code is not None),
                                       stdout.getvalue(), stderr.getvalue())


def with_cpu_devices(env: dict, count: int) -> dict:
    """``env`` for a JAX process on the CPU with ``count`` devices, its other XLA flags kept (the suite's
    fast-compile ones, tests/conftest.py)."""
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    return dict(env, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def run_processes(code: str, args: list[str], env: dict, count: int = 2, devices_each: int = 2,
                  timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """``python -c code args...`` in ``count`` processes joined as one JAX run on this machine (``JAX_*``
    variables, a free local port; Gloo collectives on CPUs), each with ``devices_each`` CPU devices. ``code`` must
    call :func:`deep.devices.initialize_distributed` (the script does) after :data:`USE_GLOO`. Returns each
    process's result, in rank order, once all have exited with status 0. The first process to exit with an error,
    or the ``timeout`` (seconds, for all together), ends the run: the others are killed, so none is left waiting in
    a collective, and the assertion shows the failed process's error (on a timeout, every process's)."""
    import socket
    import tempfile
    import time

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = dict(with_cpu_devices(env, devices_each), JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES=str(count))
    with tempfile.TemporaryDirectory() as folder:
        # Output to files, not pipes: a process that writes much never blocks on a pipe nobody is reading.
        outputs = [(Path(folder) / f"{rank}.out", Path(folder) / f"{rank}.err") for rank in range(count)]
        processes = []
        try:
            for rank, (out, err) in enumerate(outputs):
                with open(out, "w") as stdout, open(err, "w") as stderr:
                    processes.append(subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=stdout,
                                                      stderr=stderr, env=dict(env, JAX_PROCESS_ID=str(rank))))
            deadline = time.monotonic() + timeout
            while None in (codes := [process.poll() for process in processes]):  # every process polled each time
                failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
                assert not failed, f"process {failed[0]} failed: {outputs[failed[0]][1].read_text()[-3000:]}"
                # A process that failed after joining may wait in JAX's shutdown barrier instead of exiting: then
                # the time runs out, and every process's last words say which one failed.
                assert time.monotonic() < deadline, f"the {count} processes ran past {timeout} s; their stderr: " + \
                    " | ".join(f"{rank}: {err.read_text()[-1000:]}" for rank, (_, err) in enumerate(outputs))
                time.sleep(0.1)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        results = [subprocess.CompletedProcess(process.args, process.returncode, out.read_text(), err.read_text())
                   for process, (out, err) in zip(processes, outputs)]
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"process {rank} failed: {result.stderr[-3000:]}"
    return results


# Collectives between CPU processes need Gloo; the first line of run_processes' code.
USE_GLOO = "import jax; jax.config.update('jax_cpu_collectives_implementation', 'gloo')"


def interrupted_write_text(self, data, *args, **kwargs):
    """Path.write_text that stops half-way, as a full disk would (patched in to check that a write goes beside the
    file and is then renamed over it, so the previous file stays whole)."""
    with open(self, "w") as handle:
        handle.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", str(self))


def median_seconds_recording_warmups(seconds: float, warmups: list):
    """A stand-in for the benchmarks' median_seconds that times nothing: it appends each call's ``warmup`` flag to
    ``warmups`` (whether an untimed first call was asked for) and returns ``seconds``."""
    return lambda function, repeats, warmup=False: warmups.append(warmup) or seconds


@contextlib.contextmanager
def drawn_calls(*names: str):
    """Records the calls that matplotlib's ``Axes`` methods ``names`` (``"errorbar"``, ``"plot"``, ...) receive while
    a figure is drawn, which still draws them; yields ``{name: [arguments, ...]}``, each call's arguments bound to the
    method's parameter names (``x``, ``y``, ``yerr`` for errorbar; ``x``, ``y1``, ``y2`` for fill_between; ``args``
    and ``kwargs`` for plot), so a test reads the plotted values however the script passed them."""
    import matplotlib.axes

    calls = {name: [] for name in names}

    def recorder(name):
        original = getattr(matplotlib.axes.Axes, name)
        signature = inspect.signature(original)

        def record(self, *args, **kwargs):
            calls[name].append(signature.bind(self, *args, **kwargs).arguments)
            return original(self, *args, **kwargs)
        return record

    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(matplotlib.axes.Axes, name, recorder(name)))
        yield calls


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def with_out(flags: list[str], out: Path) -> list[str]:
    """``flags`` plus ``--out out`` unless they name their own; skips a test whose ``--out`` is under a missing
    /proc (the unwritable place these tests use)."""
    if any(flag.startswith("/proc/") for flag in flags) and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    return [*flags] if "--out" in flags else [*flags, "--out", str(out)]


def assert_each_flag_reaches_its_field(script: str | Path, lines: list[dict], out: Path) -> None:
    """Parses each of ``lines`` (config field -> a value other than its default; between them every field of the
    script's TrainConfig) as a command line of ``script`` and checks that each value lands in its own field: a flag
    read into another field, or dropped, would train another run than the one asked for. ``--out out`` is added to a
    line without its own."""
    module = load_script(script)
    fields = {field.name: field.default for field in dataclasses.fields(module.TrainConfig)}
    assert set().union(*lines) == set(fields)  # every flag is given somewhere
    parser = module.parser_for(module.TrainConfig, "train", prog=Path(script).name)
    for line in lines:
        assert all(line[name] != fields[name] for name in line)
        flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
        argv = [part for name, value in line.items() for part in ([flag(name)] if value is True
                                                                  else [flag(name), str(value)])]
        config = module.parse_config(module.TrainConfig, parser, with_out(argv, out), out_kind="folder")
        assert {name: value for name, value in dataclasses.asdict(config).items() if name in line} == line
