"""scripts/mutants.py's verdicts: a mutation whose guarding test was skipped (or that ran no test) is "not
checked", with the reason, and fails the run; it is never counted as killed or as a real survivor."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mutants():  # noqa: ANN201 - the runner module (scripts/ is not a package)
    spec = importlib.util.spec_from_file_location("mutants_runner", ROOT / "scripts" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _skips_of(mutants, tmp_path: Path, name: str, source: str) -> tuple[int, list[tuple[str, str]]]:  # noqa: ANN001
    """Run pytest on one test file with the runner's SkipRecorder, as the runner's child does. (Each file gets
    its own module name: this process may have imported another under the same name.)"""
    path = tmp_path / f"test_{name}.py"
    path.write_text(source)
    recorder = mutants.SkipRecorder()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", f"--rootdir={tmp_path}", str(path)],
                       plugins=[recorder])
    sys.modules.pop(f"test_{name}", None)
    return int(code), recorder.skipped


def test_a_skipped_guard_is_not_checked_and_says_why(mutants, tmp_path: Path) -> None:  # noqa: ANN001
    code, skipped = _skips_of(mutants, tmp_path, "guarded_page", "import pytest\n\n"
                              "@pytest.mark.skip(reason='chromium is not installed')\ndef test_page():\n    pass\n")
    assert code == 0  # pytest itself calls this run a success: the runner must not
    run = mutants.TestRun("passed", 1.0, "", skipped)
    verdict, killed = mutants.classify(run)
    assert not killed and verdict.startswith("not checked: test skipped")
    assert "test_guarded_page.py::test_page" in verdict and "chromium is not installed" in verdict


def test_a_module_level_skip_and_an_xfail_are_not_checked_either(mutants, tmp_path: Path) -> None:  # noqa: ANN001
    _, skipped = _skips_of(mutants, tmp_path, "guarded_import", "import pytest\n\npytest.importorskip('no_such_module_here')\n"
                           "def test_x():\n    pass\n")
    verdict, killed = mutants.classify(mutants.TestRun("passed", 1.0, "", skipped))
    assert not killed and "no_such_module_here" in verdict
    _, skipped = _skips_of(mutants, tmp_path, "guarded_xfail", "import pytest\n\n"
                           "@pytest.mark.xfail(reason='known bug')\ndef test_x():\n    assert False\n")
    verdict, killed = mutants.classify(mutants.TestRun("passed", 1.0, "", skipped))
    assert not killed and "xfail" in verdict and "known bug" in verdict


def test_verdicts_of_the_other_outcomes(mutants) -> None:  # noqa: ANN001
    run = mutants.TestRun
    assert mutants.classify(run("failed", 1.0, "", [])) == ("killed (failed)", True)
    assert mutants.classify(run("timeout", 1.0, "", [])) == ("killed (timeout)", True)
    assert mutants.classify(run("passed", 1.0, "", [])) == ("SURVIVED", False)
    # one guarding test failed while another skipped: the failure is a kill
    assert mutants.classify(run("failed", 1.0, "", [("t::a", "why")])) == ("killed (failed)", True)
    verdict, killed = mutants.classify(run("no tests", 1.0, "", []))
    assert not killed and verdict.startswith("not checked: no test ran")


def test_every_mutation_file_still_applies(mutants) -> None:  # noqa: ANN001
    # `make mutants` is slow and CI runs `make test`: a change to guarded code that makes a mutation's `find` match
    # nothing (or twice) would only show there. Reading every file here (each `find` exactly once in its file, the
    # fields present) keeps the list applicable on every commit.
    problems = []
    for path in sorted((ROOT / "mutants").glob("*.yaml")):
        try:
            mutants.load_mutation(path)
        except mutants.MutationFileError as exc:
            problems.append(str(exc))
    assert len(list((ROOT / "mutants").glob("*.yaml"))) > 100
    assert problems == []


def test_a_mutation_whose_find_matches_nothing_is_refused(mutants, tmp_path: Path) -> None:  # noqa: ANN001
    (tmp_path / "src.py").write_text("x = 1\n")
    path = tmp_path / "m.yaml"
    path.write_text("claim: c\nfile: src.py\nfind: 'x = 2'\nreplace: 'x = 3'\ntests:\n  - tests/test_x.py\n")
    with pytest.raises(mutants.MutationFileError, match="exactly once"):
        mutants.load_mutation(path, root=tmp_path)
