"""glibc's per-thread cache (tcache) off for the runs that need it: which runs (a quantized base or an online
objective on a CPU, the config's switch), the GLIBC_TUNABLES a restart sets, the command `tunelab train` re-runs
itself with (built here, not exec'd), glibc's real behaviour under the tunable, and one real CLI run that restarts;
oneDNN's primitive cache bounded for online runs by the command before any matmul (docs/choosing.md, the heap
policy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.online import ONEDNN_VARIABLES, without_onednn_bound
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl
from tunelab.models import glibc_tcache_on
from tunelab.plan.memory import NO_TCACHE, RESTARTED_WITHOUT_TCACHE, tunables_without_tcache
from tunelab.plan.planner import tcache_off_reason
from tunelab.training import restart
from tunelab.training.restart import restart_command, restart_without_tcache

GLIBC_236 = ("glibc", "2.36")
GRPO = {"name": "grpo", "num_generations": 2, "max_completion_length": 8, "rewards": ["rouge_l"]}
HAS_OLD_GLIBC = tunables_without_tcache(tunables="") is not None  # this host keeps aligned blocks with the cache on


def _config(model_dir: Path, tmp_path: Path, technique: str = "lora", objective: dict | None = None, **training):  # noqa: ANN001, ANN201
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(24))
    sections = {"objective": objective} if objective else {}
    return tiny_config(model_dir, data={"train": [str(data)], "val_size": 0, "max_length": 64},
                       technique={"name": technique}, training={"max_steps": 2, "micro_batch_size": 2, **training},
                       eval={"before_after": False, "forgetting": False, "num_samples": 0},
                       output={"dir": str(tmp_path / "run")}, **sections)


def test_the_tunables_a_restart_sets():
    """The cache's entry is added to the user's own tunables; none where glibc merges the remainders (2.39 on),
    where it is not glibc, or where the user's tunables already set the cache's count (theirs stands)."""
    assert tunables_without_tcache(GLIBC_236, "") == NO_TCACHE
    assert tunables_without_tcache(GLIBC_236, "glibc.malloc.mxfast=0") == f"glibc.malloc.mxfast=0:{NO_TCACHE}"
    assert tunables_without_tcache(GLIBC_236, "glibc.malloc.tcache_count=7") is None
    assert tunables_without_tcache(GLIBC_236, f"glibc.malloc.mxfast=0:{NO_TCACHE}") is None
    assert tunables_without_tcache(("glibc", "2.39"), "") is None
    assert tunables_without_tcache(("", ""), "") is None


def test_which_runs_train_with_the_cache_off(tiny_model_dir, tmp_path):
    """Every run on a CPU by default (a quantized base and an online objective say so); any GPU run keeps it; the
    config's switch wins both ways (negative controls)."""
    assert tcache_off_reason(_config(tiny_model_dir, tmp_path, "qlora"), "cpu") == "a quantized base on a CPU"
    assert tcache_off_reason(_config(tiny_model_dir, tmp_path, objective=GRPO), "cpu") == "an online objective on a CPU"
    assert tcache_off_reason(_config(tiny_model_dir, tmp_path), "cpu") == "training on a CPU"
    assert tcache_off_reason(_config(tiny_model_dir, tmp_path), "cuda") is None
    assert tcache_off_reason(_config(tiny_model_dir, tmp_path, "qlora"), "cuda") is None
    assert tcache_off_reason(_config(tiny_model_dir, tmp_path, "qlora", glibc_tcache_off=False), "cpu") is None
    assert tcache_off_reason(_config(tiny_model_dir, tmp_path, glibc_tcache_off=True), "cpu") == \
        "training.glibc_tcache_off: true"
    assert tcache_off_reason(_config(tiny_model_dir, tmp_path, glibc_tcache_off=True), "cuda") is None


def test_the_restart_command_is_the_same_command_with_the_tunable_and_the_marker():
    """The interpreter's whole command line again (`-m tunelab`, a console script, torchrun's `-u`), its program
    the same interpreter by path (argv[0] may be a bare `python`), the environment this one plus the tunables
    and the marker; the caller's environment is not changed."""
    environ = {"PATH": "/bin", "RANK": "1"}
    program, argv, env = restart_command("/venv/bin/python", ["python", "-u", "-m", "tunelab", "train", "c.yaml",
                                                               "--set", "a.b=1"], environ, NO_TCACHE, "why")
    assert program == "/venv/bin/python"
    assert argv == ["/venv/bin/python", "-u", "-m", "tunelab", "train", "c.yaml", "--set", "a.b=1"]
    assert env == {"PATH": "/bin", "RANK": "1", "GLIBC_TUNABLES": NO_TCACHE, RESTARTED_WITHOUT_TCACHE: "why"}
    assert environ == {"PATH": "/bin", "RANK": "1"}


def test_restart_execs_once_and_only_for_the_runs_that_need_it(tiny_model_dir, tmp_path, monkeypatch):
    """A CPU run on an old glibc with the cache on replaces its process (os.execve, faked here) by the same
    command with the tunable; the switch off, the cache already off or a process already restarted (the marker)
    go on in place."""
    execs: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(restart.os, "execve", lambda program, argv, env: execs.append((program, argv, env)))
    monkeypatch.setattr("platform.libc_ver", lambda *args: GLIBC_236)
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "tunelab", "train", "q.yaml"])
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mxfast=0")
    monkeypatch.delenv(RESTARTED_WITHOUT_TCACHE, raising=False)
    quantized = _config(tiny_model_dir, tmp_path, "qlora")
    restart_without_tcache(quantized, process_is_the_command=False)  # in-process: a CliRunner, a notebook
    assert execs == []
    restart_without_tcache(quantized, process_is_the_command=True)
    assert len(execs) == 1
    program, argv, env = execs[0]
    assert program == sys.executable and argv == [sys.executable, "-m", "tunelab", "train", "q.yaml"]
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.mxfast=0:{NO_TCACHE}"
    assert env[RESTARTED_WITHOUT_TCACHE] == "a quantized base on a CPU"
    restart_without_tcache(_config(tiny_model_dir, tmp_path, "qlora", glibc_tcache_off=False), process_is_the_command=True)
    assert len(execs) == 1
    restart_without_tcache(_config(tiny_model_dir, tmp_path), process_is_the_command=True)  # an ordinary run too
    assert len(execs) == 2 and execs[1][2][RESTARTED_WITHOUT_TCACHE] == "training on a CPU"
    execs.pop()
    monkeypatch.setenv(RESTARTED_WITHOUT_TCACHE, "a quantized base on a CPU")
    restart_without_tcache(quantized, process_is_the_command=True)
    monkeypatch.delenv(RESTARTED_WITHOUT_TCACHE)
    monkeypatch.setenv("GLIBC_TUNABLES", NO_TCACHE)
    restart_without_tcache(quantized, process_is_the_command=True)
    assert len(execs) == 1


@pytest.mark.skipif(glibc_tcache_on() is None, reason="glibc 2.33 or later (mallinfo2)")
def test_the_probe_sees_what_glibc_does():
    """``glibc_tcache_on`` reads glibc's behaviour: on in this process (started without the tunable), off in a
    process started with it."""
    if NO_TCACHE in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        pytest.skip("this test process was started with the cache off")
    assert glibc_tcache_on() is True
    probe = "from tunelab.models import glibc_tcache_on; print(glibc_tcache_on())"
    started = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                             env={**os.environ, "GLIBC_TUNABLES": NO_TCACHE})
    assert started.stdout.strip() == "False"


@pytest.mark.skipif(not HAS_OLD_GLIBC, reason="glibc before 2.39 with its cache on: the restart applies")
def test_tunelab_train_restarts_itself_with_the_cache_off(tiny_model_dir, tmp_path):
    """A real `tunelab train` asked for the cache off says why it restarts, and the process that trains has the
    cache off (run_info.json: glibc's measured behaviour, the tunables it read, who set them)."""
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(12))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {data}, val_size: 0, max_length: 32}}\n"
                      "technique: {name: lora, r: 2}\ntraining: {max_steps: 1, micro_batch_size: 2}\n"
                      "eval: {before_after: false, forgetting: false, num_samples: 0}\n"
                      f"output: {{dir: {tmp_path / 'run'}}}\n")
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", RESTARTED_WITHOUT_TCACHE)}
    done = subprocess.run([sys.executable, "-c", "from tunelab.cli import main; main()", "train", str(config),
                           "--no-progress", "--set", "training.glibc_tcache_off=true"],
                          env={**env, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"restarting with GLIBC_TUNABLES={NO_TCACHE} because of training.glibc_tcache_off: true" in done.stderr
    tcache = json.loads((tmp_path / "run" / "run_info.json").read_text())["heap_policy"]["tcache"]
    assert tcache == {"glibc_tunables": NO_TCACHE, "off": True,
                      "set_by": "tunelab train (restarted: training.glibc_tcache_off: true)"}


def test_only_the_command_itself_restarts_not_a_cli_called_in_process(tiny_model_dir, tmp_path, monkeypatch):
    """`tunelab train` started by the entry point (`main`) replaces its process; the same command invoked in-process
    (a CliRunner, as tests and notebooks do) must not: execve would start the calling program over with its output
    still redirected (a pytest run restarted itself silently this way). os.execve and training are faked here."""
    from typer.testing import CliRunner

    from tunelab import cli

    class Execed(Exception):
        pass

    class Trained(Exception):
        pass

    def fake_execve(program: str, argv: list[str], env: dict[str, str]) -> None:
        raise Execed(argv, env)

    def fake_train(*args: object, **kwargs: object) -> None:
        raise Trained()

    monkeypatch.setattr(restart.os, "execve", fake_execve)
    monkeypatch.setattr("tunelab.api.train", fake_train)
    monkeypatch.setattr("platform.libc_ver", lambda *args: GLIBC_236)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(RESTARTED_WITHOUT_TCACHE, raising=False)
    monkeypatch.setattr(cli, "_PROCESS_IS_THE_COMMAND", False)
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(12))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {data}, val_size: 0, max_length: 32}}\n"
                      "technique: {name: lora, r: 2}\ntraining: {max_steps: 1, glibc_tcache_off: true}\n"
                      f"output: {{dir: {tmp_path / 'run'}}}\n")
    args = ["train", str(config), "--no-progress"]
    done = CliRunner().invoke(cli.app, args)
    assert isinstance(done.exception, Trained), done.output  # trained in place, the cache kept
    monkeypatch.setattr(sys, "argv", ["tunelab", *args])
    with pytest.raises(Execed):  # restarted before training
        cli.main()
    without_onednn_bound(monkeypatch)  # an online run: oneDNN's cache bounded first, and the restart keeps the bound
    grpo = tmp_path / "grpo.yaml"
    grpo.write_text(_config(tiny_model_dir, tmp_path, objective=GRPO).to_yaml())
    monkeypatch.setattr(sys, "argv", ["tunelab", "train", str(grpo), "--no-progress"])
    with pytest.raises(Execed) as execed:
        cli.main()
    assert execed.value.args[1]["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"



def test_both_bounds_give_one_reason_in_the_same_words(tiny_model_dir, tmp_path):
    """glibc's per-thread cache and oneDNN's primitive cache are bounded for the same runs, for the same reason in
    the same words (the restart records it, notes and run_info.json quote it): the two functions were near-copies
    and could drift apart. Only a quantized base is a reason of glibc's own; oneDNN's reason is then the run's
    next kind (an online objective, else training on a CPU)."""
    from tunelab.plan.planner import onednn_cache_bound, tcache_needed

    kinds = {"plain": _config(tiny_model_dir, tmp_path), "online": _config(tiny_model_dir, tmp_path, objective=GRPO),
             "quantized": _config(tiny_model_dir, tmp_path, "qlora"),
             "quantized online": _config(tiny_model_dir, tmp_path, "qlora", objective=GRPO)}
    reasons = {kind: (tcache_needed(config, "cpu"), onednn_cache_bound(config, "cpu")) for kind, config in kinds.items()}
    assert reasons == {"plain": ("training on a CPU", "training on a CPU"),
                       "online": ("an online objective on a CPU", "an online objective on a CPU"),
                       "quantized": ("a quantized base on a CPU", "training on a CPU"),
                       "quantized online": ("a quantized base on a CPU", "an online objective on a CPU")}
    assert all(tcache_needed(config, "cuda") is onednn_cache_bound(config, "cuda") is None for config in kinds.values())


def test_the_command_bounds_onednns_cache_for_runs_on_a_cpu_only(tiny_model_dir, tmp_path, monkeypatch):
    """Every run on a CPU, in the command's own process, gets oneDNN's primitive cache bounded (the variable and
    tunelab's marker, which a restart keeps); a GPU run, a process that is not the command and a capacity the user
    set (either of oneDNN's names) are left alone (negative controls)."""
    from tunelab.plan.planner import onednn_cache_bound, onednn_note
    from tunelab.training.restart import bound_onednn_cache

    without_onednn_bound(monkeypatch)
    grpo = _config(tiny_model_dir, tmp_path, objective=GRPO)
    assert onednn_cache_bound(grpo, "cpu") == "an online objective on a CPU"
    assert onednn_cache_bound(grpo, "cuda") is None
    assert onednn_cache_bound(_config(tiny_model_dir, tmp_path, "qlora"), "cpu") == "training on a CPU"
    assert onednn_cache_bound(_config(tiny_model_dir, tmp_path), "cpu") == "training on a CPU"
    assert onednn_cache_bound(_config(tiny_model_dir, tmp_path), "cuda") is None
    why = "an online objective on a CPU"  # the plan's notes: tunelab bounds it; the user's within; the user's above
    assert onednn_note(None, why).startswith("tunelab train bounds oneDNN's primitive cache to 32 primitives")
    assert "within this plan's bound" in onednn_note(16, why)
    assert "keeps 1024 primitives" in onednn_note(1024, why) and "keeps its default" in onednn_note(None, why, False)
    bound_onednn_cache(grpo, process_is_the_command=False)
    with monkeypatch.context() as on_a_gpu:
        on_a_gpu.setattr("tunelab.training.restart.default_device", lambda: torch.device("cuda"))
        bound_onednn_cache(_config(tiny_model_dir, tmp_path), process_is_the_command=True)
    assert not any(name in os.environ for name in ONEDNN_VARIABLES)
    bound_onednn_cache(_config(tiny_model_dir, tmp_path), process_is_the_command=True)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    assert os.environ["TUNELAB_BOUNDED_ONEDNN_CACHE"] == "training on a CPU"
    without_onednn_bound(monkeypatch)
    bound_onednn_cache(grpo, process_is_the_command=True)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    assert os.environ["TUNELAB_BOUNDED_ONEDNN_CACHE"] == "an online objective on a CPU"
    _, _, env = restart_command(sys.executable, ["python", "-m", "tunelab"], os.environ, NO_TCACHE, "why")
    assert env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    for name in ONEDNN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "500")
    bound_onednn_cache(grpo, process_is_the_command=True)
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ


ONEDNN_CHILD = """
import os, sys, torch
if sys.argv[1] == "bounded":
    from tunelab.training.restart import bound_onednn_cache
    from tunelab.config import build_config
    import yaml
    bound_onednn_cache(build_config(yaml.safe_load(open(sys.argv[2]))), process_is_the_command=True)
torch.set_num_threads(1)
weight = torch.randn(576, 1536, dtype=torch.bfloat16)
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
start = resident()
for rows in range(1, 301):  # a new shape each time, as an online run's micro-batches
    torch.randn(rows, 576, dtype=torch.bfloat16) @ weight
print(resident() - start)
"""


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="bfloat16 matmuls through oneDNN")
def test_the_bound_set_in_the_process_takes_effect_before_the_first_matmul(tiny_model_dir, tmp_path):
    """oneDNN reads its capacity once, at its first primitive: set by the command before any matmul, it holds.
    300 new shapes grow the process by far less with the bound than with oneDNN's default (measured here: about
    210 against 410 MiB for 400 shapes)."""
    grpo = _config(tiny_model_dir, tmp_path, objective=GRPO)
    path = tmp_path / "grpo.yaml"
    path.write_text(grpo.to_yaml())
    env = {key: value for key, value in os.environ.items() if key not in ONEDNN_VARIABLES}
    grown = {variant: int(subprocess.run([sys.executable, "-c", ONEDNN_CHILD, variant, str(path)], env=env,
                                         capture_output=True, text=True, check=True, timeout=300).stdout.split()[-1])
             for variant in ("default", "bounded")}
    assert grown["bounded"] < grown["default"] - 64 * 2**20, grown


def test_quickstart_prepares_its_process_as_train_does(monkeypatch):
    """`tunelab quickstart` started by the entry point restarts as `tunelab train` would for its run (here the
    switch asks for the cache off on any CPU run); os.execve is faked."""
    from tunelab import cli

    class Execed(Exception):
        pass

    def fake_execve(program: str, argv: list[str], env: dict[str, str]) -> None:
        raise Execed(env)

    monkeypatch.setattr(restart.os, "execve", fake_execve)
    monkeypatch.setattr("platform.libc_ver", lambda *args: GLIBC_236)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(RESTARTED_WITHOUT_TCACHE, raising=False)
    monkeypatch.setattr(cli, "_PROCESS_IS_THE_COMMAND", False)
    monkeypatch.setattr(sys, "argv", ["tunelab", "quickstart", "--no-progress", "--set", "training.glibc_tcache_off=true"])
    with pytest.raises(Execed) as execed:
        cli.main()
    assert execed.value.args[0][RESTARTED_WITHOUT_TCACHE] == "training.glibc_tcache_off: true"


def test_only_the_first_torchrun_worker_says_it_bounds_onednns_cache(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Every worker bounds its own cache (each is its own process), but the line was printed once per worker."""
    import logging

    from tunelab.distributed import first_launched_process
    from tunelab.training.restart import bound_onednn_cache

    assert first_launched_process({}) and first_launched_process({"RANK": "0"})
    assert not first_launched_process({"RANK": "1"})
    grpo = _config(tiny_model_dir, tmp_path, objective=GRPO)
    caplog.set_level(logging.INFO, logger="tunelab")
    for rank in ("1", "0"):
        without_onednn_bound(monkeypatch)
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        bound_onednn_cache(grpo, process_is_the_command=True)
        assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"  # bounded on every worker
        said = [r for r in caplog.records if "primitive cache bounded" in r.getMessage()]
        assert len(said) == (1 if rank == "0" else 0)
