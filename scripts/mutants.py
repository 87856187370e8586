"""Mutation check: break one claim at a time and make sure a test notices (`make mutants`, format in mutants/README.md).

For each ``mutants/<name>.yaml`` the runner copies the project (the files git tracks or would track) into a scratch
folder, replaces the ``find`` text of ``file`` with ``replace``, and runs only the mutation's ``tests`` there, with
the scratch ``src/`` first on the import path. A mutation whose tests still pass *survived*: the claim is unguarded.
A mutation whose tests did not all run (one was skipped, e.g. for a missing browser, or none was collected) is
*not checked*, with the reason: it fails the run too, and is never counted as killed.
Mutations run in parallel (``--jobs``, one per core by default), each worker in its own scratch copy and with
torch's threads divided between the workers.

Before mutating anything it runs every selected mutation's tests once on the unmutated copy: a test that already
fails would make every mutation look killed. Each test run is a child forked from the runner, which has imported
torch, transformers and peft once (never tunelab), so a mutation costs only its own tests.

Written by hand (rather than mutmut or cosmic-ray) because those generate thousands of operator-level mutants
with no named claims, and take hours on a training loop; here each mutation is a curated, named claim.

    python scripts/mutants.py                      # every mutation
    python scripts/mutants.py --only best,pickle   # mutation files whose stem contains one of these words
    python scripts/mutants.py --jobs 1             # one at a time (what `make mutants JOBS=1` runs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("claim", "file", "find", "replace", "tests")


@dataclass
class Mutation:
    path: Path
    claim: str
    file: str
    find: str
    replace: str
    tests: list[str]

    @property
    def name(self) -> str:
        return self.path.stem


class MutationFileError(ValueError):
    pass


def load_mutation(path: Path, root: Path = ROOT) -> Mutation:
    """Read and check one mutation file: every field present, the file there, ``find`` in it exactly once."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MutationFileError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise MutationFileError(f"{path}: expected a mapping with {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in data]
    unknown = sorted(set(data) - set(FIELDS))
    if missing or unknown:
        raise MutationFileError(f"{path}: missing {missing}, unknown {unknown}; expected {', '.join(FIELDS)}")
    tests = data["tests"]
    if isinstance(tests, str):
        tests = [tests]
    if not tests or not all(isinstance(t, str) and t for t in tests):
        raise MutationFileError(f"{path}: 'tests' must list pytest arguments (file::test)")
    target = root / data["file"]
    if not target.is_file():
        raise MutationFileError(f"{path}: file {data['file']} does not exist")
    found = target.read_text().count(data["find"])
    if found != 1:
        raise MutationFileError(f"{path}: 'find' occurs {found} times in {data['file']}, it must occur exactly once")
    if data["find"] == data["replace"]:
        raise MutationFileError(f"{path}: 'replace' equals 'find': nothing is mutated")
    return Mutation(path, str(data["claim"]), data["file"], data["find"], data["replace"], tests)


def project_files(root: Path) -> list[str]:
    """Tracked files plus untracked ones git would not ignore (a new test not yet committed is included)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return [name for name in out.split("\0") if name and (root / name).is_file()]


def make_scratch(root: Path) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="tunelab-mutants-"))
    for name in project_files(root):
        target = scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    return scratch


def _pytest_command(tests: list[str], basetemp: Path) -> list[str]:
    # Each scratch copy gets its own --basetemp: parallel children must not share (or clean up) pytest's temp dirs.
    return ["-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", f"--basetemp={basetemp}", *tests]


@dataclass
class Child:
    """One pytest run in a forked child, on one scratch copy."""

    pid: int
    scratch: Path
    log: Path
    started: float

    @property
    def skips(self) -> Path:
        """Where the child writes the tests it skipped (JSON), beside its log."""
        return self.log.with_name(self.log.name + ".skips.json")


@dataclass
class TestRun:
    """What one pytest run of a mutation's tests came to."""

    outcome: str  # 'passed' | 'failed' | 'timeout' | 'error' | 'no tests'
    seconds: float
    tail: str  # the end of pytest's output
    skipped: list[tuple[str, str]]  # (test id, why) of each guarding test that did not run


class SkipRecorder:
    """A pytest plugin (in the child) that notes every test or module that was skipped, and why: a skipped test
    cannot kill a mutation, so its pass must not read as one. An xfail-marked test counts too (it may fail)."""

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report: "pytest.TestReport") -> None:
        if report.skipped:
            self.skipped.append((report.nodeid, skip_reason(report)))

    def pytest_collectreport(self, report: "pytest.CollectReport") -> None:
        if report.skipped:  # a module-level skip (pytest.importorskip, pytestmark skipif)
            self.skipped.append((report.nodeid, skip_reason(report)))


def skip_reason(report: object) -> str:
    """The reason pytest gives for a skip: ``longrepr`` is (file, line, 'Skipped: why'); an xfail keeps its own."""
    xfail = getattr(report, "wasxfail", None)
    if xfail is not None:
        return f"expected to fail (xfail){': ' + xfail if xfail else ''}"
    longrepr = getattr(report, "longrepr", None)
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")
    return text.removeprefix("Skipped: ").strip() or "no reason given"


def classify(run: TestRun) -> tuple[str, bool]:
    """(verdict, counts as killed) of one mutation from its test run. A failure or a hang kills it. A pass
    survives, unless a guarding test was skipped or none ran: then the mutation was not checked at all."""
    if run.outcome in ("failed", "timeout", "error"):
        return f"killed ({run.outcome})", True
    if run.outcome == "no tests":
        return "not checked: no test ran (check the test ids)", False
    if run.skipped:
        return "not checked: test skipped (" + "; ".join(f"{test}: {why}" for test, why in run.skipped) + ")", False
    return "SURVIVED", False


def start_tests(scratch: Path, tests: list[str], threads: int) -> Child:
    """Fork a child that runs pytest on ``tests`` in ``scratch`` and exits with pytest's code.

    The child is forked from this process, which has already imported torch, transformers and peft (but never
    tunelab): each run then pays only for its own tests, not ~10 s of imports, and still imports the scratch
    copy's (mutated) tunelab afresh. ``threads`` caps torch's intra-op threads, so that parallel children share
    the cores instead of oversubscribing them."""
    log = scratch.parent / f"{scratch.name}.log"
    started = time.time()
    skips = Child(0, scratch, log, started).skips
    skips.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(scratch)
            os.environ["PYTHONPATH"] = os.pathsep.join([str(scratch / "src"), os.environ.get("PYTHONPATH", "")])
            sys.path[:0] = [str(scratch / "src"), str(scratch / "tests")]
            import importlib.util

            import pytest
            import torch

            torch.set_num_threads(threads)
            origin = importlib.util.find_spec("tunelab").origin or ""
            if not Path(origin).resolve().is_relative_to(scratch.resolve()):
                print(f"mutants: tunelab would come from {origin}, not the scratch copy")
                os._exit(4)

            recorder = SkipRecorder()
            code = int(pytest.main(_pytest_command(tests, scratch.parent / f"{scratch.name}.tmp"), plugins=[recorder]))
            skips.write_text(json.dumps(recorder.skipped))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return Child(pid, scratch, log, started)


def poll(child: Child, timeout: float) -> TestRun | None:
    """None while ``child`` runs; then its TestRun. A child past ``timeout`` is killed and counts as 'timeout'
    (a hang is a kill for a mutation)."""
    done, status = os.waitpid(child.pid, os.WNOHANG)
    if done:
        code = os.waitstatus_to_exitcode(status)
        outcome = {0: "passed", 1: "failed", 5: "no tests"}.get(code, "error")  # 2-4: interrupted, internal, usage
    elif time.time() - child.started > timeout:
        os.kill(child.pid, 9)
        os.waitpid(child.pid, 0)
        outcome = "timeout"
    else:
        return None
    text = child.log.read_text(errors="replace") if child.log.is_file() else ""
    child.log.unlink(missing_ok=True)
    skipped = [tuple(s) for s in json.loads(child.skips.read_text())] if child.skips.is_file() else []
    child.skips.unlink(missing_ok=True)
    return TestRun(outcome, time.time() - child.started, "\n".join(text.strip().splitlines()[-15:]), skipped)


def run_tests(scratch: Path, tests: list[str], timeout: float, threads: int) -> TestRun:
    """Run ``tests`` in ``scratch`` in one forked child and wait for its outcome (see ``poll``)."""
    child = start_tests(scratch, tests, threads)
    while (result := poll(child, timeout)) is None:
        time.sleep(0.2)
    return result


def run_mutations(mutations: list[Mutation], scratches: list[Path], timeout: float,
                  threads: int) -> tuple[list[Mutation], list[tuple[Mutation, str]]]:
    """Apply each mutation in a free scratch copy and run its tests there, one child per copy at a time.
    Prints each verdict as it comes; returns the survivors and the mutations not checked (with why). A copy is
    restored as soon as its child ends."""
    pending = list(enumerate(mutations, start=1))
    free = list(scratches)
    running: dict[int, tuple[int, Mutation, Child, str]] = {}
    survivors: list[Mutation] = []
    unchecked: list[tuple[Mutation, str]] = []
    while pending or running:
        while pending and free:
            i, mutation = pending.pop(0)
            scratch = free.pop()
            target = scratch / mutation.file
            original = target.read_text()
            target.write_text(original.replace(mutation.find, mutation.replace, 1))
            child = start_tests(scratch, mutation.tests, threads)
            running[child.pid] = (i, mutation, child, original)
        time.sleep(0.2)
        for pid, (i, mutation, child, original) in list(running.items()):
            result = poll(child, timeout)
            if result is None:
                continue
            del running[pid]
            (child.scratch / mutation.file).write_text(original)
            free.append(child.scratch)
            verdict, killed = classify(result)
            label = verdict if killed or verdict == "SURVIVED" else "NOT CHECKED"
            print(f"[{i}/{len(mutations)}] {label:<18} {result.seconds:5.0f}s  {mutation.name}: {mutation.claim}", flush=True)
            if verdict == "SURVIVED":
                survivors.append(mutation)
            elif not killed:
                unchecked.append((mutation, verdict))
                print(f"    {verdict}")
            if result.outcome == "error":  # not a test failure: collection broke (an import the mutation removed?)
                print("    " + result.tail.replace("\n", "\n    "))
    return sorted(survivors, key=lambda m: m.name), sorted(unchecked, key=lambda u: u[0].name)


def preload() -> None:
    """Import the heavy libraries once, before any fork (never tunelab: each child must import its own copy)."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import pytest  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    assert "tunelab" not in sys.modules, "the runner must not import tunelab before forking"


def check_imports_scratch(scratch: Path) -> None:
    """The tests must import the scratch copy's tunelab, not the installed one, or no mutation would count."""
    env = {**os.environ, "PYTHONPATH": str(scratch / "src")}
    where = subprocess.run([sys.executable, "-c", "import tunelab; print(tunelab.__file__)"], cwd=scratch, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(scratch.resolve()):
        raise SystemExit(f"mutants: the tests would import {where}, not the scratch copy; cannot check mutations")


def select(paths: list[Path], only: str | None) -> list[Path]:
    if not only:
        return paths
    words = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [p for p in paths if any(w in p.stem for w in words)]
    if not chosen:
        raise SystemExit(f"mutants: no mutation file matches {only!r} (there are {len(paths)} in mutants/)")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=os.environ.get("ONLY") or None,
                        help="comma-separated words: run the mutation files whose name contains one")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run (a hang counts as killed)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS") or (os.cpu_count() or 1)),
                        help="mutations run in parallel, each in its own scratch copy (default: one per core)")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests unmutated first")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.root.resolve()

    paths = select(sorted((root / "mutants").glob("*.yaml")), args.only)
    mutations, invalid = [], []
    for path in paths:
        try:
            mutations.append(load_mutation(path, root))
        except MutationFileError as exc:
            invalid.append(str(exc))
    jobs = max(1, min(args.jobs, len(mutations)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    scratches = [make_scratch(root) for _ in range(jobs)]  # one copy per parallel child: mutations edit files
    survivors: list[Mutation] = []
    unchecked: list[tuple[Mutation, str]] = []
    started = time.time()
    try:
        check_imports_scratch(scratches[0])
        preload()
        if mutations and not args.no_baseline:
            # Grouped by file (stable): a module's tests must run together, as in `make test`, or pytest tears
            # down and rebuilds its module-scoped fixtures over state that the first build already changed.
            tests = sorted(dict.fromkeys(t for m in mutations for t in m.tests), key=lambda t: t.split("::")[0])
            print(f"baseline: {len(tests)} test selections on the unmutated copy ...", flush=True)
            baseline = run_tests(scratches[0], tests, args.timeout * 2, os.cpu_count() or 1)
            if baseline.outcome != "passed":
                print(baseline.tail)
                raise SystemExit(f"mutants: the guarding tests do not pass unmutated ({baseline.outcome}, "
                                 f"{baseline.seconds:.0f}s): fix them first (or name the right tests)")
            skipped = f", {len(baseline.skipped)} skipped (their mutations cannot be checked)" if baseline.skipped else ""
            print(f"baseline: passed in {baseline.seconds:.0f}s{skipped}; mutating with {jobs} parallel run(s)", flush=True)
        survivors, unchecked = run_mutations(mutations, scratches, args.timeout, threads)
    finally:
        for scratch in scratches:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(scratch.parent / f"{scratch.name}.tmp", ignore_errors=True)

    for message in invalid:
        print(f"INVALID {message}")
    for mutation in survivors:
        print(f"SURVIVED {mutation.name} ({mutation.file}): {mutation.claim}\n    guarded by {' '.join(mutation.tests)}")
    for mutation, why in unchecked:
        print(f"NOT CHECKED {mutation.name}: {why.removeprefix('not checked: ')}")
    killed = len(mutations) - len(survivors) - len(unchecked)
    print(f"{len(mutations)} mutations: {killed} killed, {len(survivors)} survived, {len(unchecked)} not checked, "
          f"{len(invalid)} invalid files ({time.time() - started:.0f}s)")
    return 1 if survivors or unchecked or invalid else 0


if __name__ == "__main__":
    sys.exit(main())
