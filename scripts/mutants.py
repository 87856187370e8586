"""Mutation check: break one claim at a time and make sure a test notices (`make mutants`, format in mutants/README.md).

For each ``mutants/<name>.yaml`` the runner copies the project (the files git tracks or would track) into a scratch
folder, replaces the ``find`` text of ``file`` with ``replace``, and runs only the mutation's ``tests`` there, with
the scratch ``src/`` first on the import path. A mutation whose tests still pass *survived*: the claim is unguarded.

Before mutating anything it runs every selected mutation's tests once on the unmutated copy: a test that already
fails would make every mutation look killed. Each test run is a child forked from the runner, which has imported
torch, transformers and peft once (never tunelab), so a mutation costs only its own tests.

Written by hand (rather than mutmut or cosmic-ray) because those generate thousands of operator-level mutants
with no named claims, and take hours on a training loop; here each mutation is a curated, named claim.

    python scripts/mutants.py                      # every mutation
    python scripts/mutants.py --only best,pickle   # mutation files whose stem contains one of these words
"""

from __future__ import annotations

import argparse
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


def _pytest_command(tests: list[str]) -> list[str]:
    return ["-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", *tests]


def run_tests(scratch: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout' | 'error', seconds, output tail) of pytest on ``tests`` in ``scratch``.

    The tests run in a child forked from this process, which has already imported torch, transformers and peft
    (but never tunelab): each run then pays only for its own tests, not ~10 s of imports, and still imports the
    scratch copy's (mutated) tunelab afresh."""
    started = time.time()
    log = scratch.parent / f"{scratch.name}.log"
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

            origin = importlib.util.find_spec("tunelab").origin or ""
            if not Path(origin).resolve().is_relative_to(scratch.resolve()):
                print(f"mutants: tunelab would come from {origin}, not the scratch copy")
                os._exit(4)

            code = int(pytest.main(_pytest_command(tests)))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    outcome = "timeout"
    while time.time() - started < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            outcome = {0: "passed", 1: "failed"}.get(code, "error")  # 2-5: interrupted, usage, no tests
            break
        time.sleep(0.2)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    text = log.read_text(errors="replace") if log.is_file() else ""
    log.unlink(missing_ok=True)
    return outcome, time.time() - started, "\n".join(text.strip().splitlines()[-15:])


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
    scratch = make_scratch(root)
    try:
        check_imports_scratch(scratch)
        preload()
        if mutations and not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutations for t in m.tests))
            print(f"baseline: {len(tests)} test selections on the unmutated copy ...", flush=True)
            outcome, seconds, tail = run_tests(scratch, tests, args.timeout * 2)
            if outcome != "passed":
                print(tail)
                raise SystemExit(f"mutants: the guarding tests do not pass unmutated ({outcome}, {seconds:.0f}s): "
                                 "fix them first (or name the right tests)")
            print(f"baseline: passed in {seconds:.0f}s", flush=True)
        survivors = []
        for i, mutation in enumerate(mutations, start=1):
            target = scratch / mutation.file
            original = target.read_text()
            target.write_text(original.replace(mutation.find, mutation.replace, 1))
            try:
                outcome, seconds, tail = run_tests(scratch, mutation.tests, args.timeout)
            finally:
                target.write_text(original)
            verdict = "SURVIVED" if outcome == "passed" else f"killed ({outcome})"
            print(f"[{i}/{len(mutations)}] {verdict:<18} {seconds:5.0f}s  {mutation.name}: {mutation.claim}", flush=True)
            if outcome == "passed":
                survivors.append(mutation)
            elif outcome == "error":  # not a test failure: collection broke (an import the mutation removed?)
                print("    " + tail.replace("\n", "\n    "))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    for message in invalid:
        print(f"INVALID {message}")
    for mutation in survivors:
        print(f"SURVIVED {mutation.name} ({mutation.file}): {mutation.claim}\n    guarded by {' '.join(mutation.tests)}")
    print(f"{len(mutations)} mutations: {len(mutations) - len(survivors)} killed, {len(survivors)} survived, "
          f"{len(invalid)} invalid files")
    return 1 if survivors or invalid else 0


if __name__ == "__main__":
    sys.exit(main())
