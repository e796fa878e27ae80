"""One grammar on every command (mmdiff/cli.py): each console script and each `python -m` spelling answers
--help and --version without importing torch, Ray or MLflow; every flag is --kebab-case; a command that
takes --config takes --set; every example in every help text parses (and, in the extended run, runs: the
examples are the demo's steps, run in order on the tiny models)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from mmdiff.cli import COMMANDS
from tests.helpers import free_port, serves

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
KEBAB = re.compile(r"--[a-z0-9]+(?:-[a-z0-9]+)*")
HEAVY = ("torch", "ray", "mlflow")

# Runs in a fresh interpreter: every command's --help and --version (console script targets and `python -m`
# modules, in one process, checking after each that nothing heavy was imported), then every example of every
# help parsed by its own command with the parse stopped before the command runs.
PROBE = r"""
import contextlib, importlib, io, json, runpy, shlex, sys, tomllib
from mmdiff.cli import COMMANDS, CommandParser

HEAVY = %r
scripts = tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"]

def entry(name):
    if name.startswith("python -m "):
        module = name.split()[-1]
        def run(argv):
            sys.argv = [module, *argv]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        return run
    module, attr = scripts[name].split(":")
    return lambda argv: getattr(importlib.import_module(module), attr)(argv)

def call(name, argv):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            entry(name)(argv)
        except SystemExit as exc:
            code = exc.code
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(),
            "heavy": [m for m in HEAVY if m in sys.modules]}

class Parsed(Exception):
    pass

depth = [0]
parse = CommandParser.parse_known_args
def stop_after_parsing(self, args=None, namespace=None):
    depth[0] += 1
    try:
        result = parse(self, args, namespace)
    finally:
        depth[0] -= 1
    if depth[0] == 0:
        raise Parsed(vars(result[0]))
    return result

report = {}
names = [*scripts, *(f"python -m {m}" for m in COMMANDS)]
for name in names:
    report[name] = {"help": call(name, ["--help"]), "version": call(name, ["--version"])}
    usage = report[name]["help"]["out"].split("\n\n")[0]
    for sub in (usage.split("{", 1)[1].split("}")[0].split(",") if "{" in usage else []):
        report[name][f"help {sub}"] = call(name, [sub, "--help"])
CommandParser.parse_known_args = stop_after_parsing
for name in names:
    examples = report[name]["help"]["out"].partition("\nexamples:\n")[2]
    report[name]["examples"] = []
    for line in filter(None, (l.strip() for l in examples.splitlines())):
        argv = shlex.split(line, comments=True)
        command = " ".join(argv[:3]) if argv[0] == "python" else argv[0]
        args = argv[3:] if argv[0] == "python" else argv[1:]
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                entry(command)(args)
            parsed = "not stopped at parsing"
        except Parsed as done:
            parsed = done.args[0]
        except SystemExit as exc:
            parsed = f"exit {exc.code}: {err.getvalue()[-500:]}"
        report[name]["examples"].append({"line": line, "command": command, "parsed": parsed, "stderr": err.getvalue()})
print(json.dumps(report, default=str))
""" % (HEAVY,)


@pytest.fixture(scope="module")
def probe() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def flags(help_text: str) -> set[str]:
    """The flags a help text defines: those in its usage block and its option lines (not the prose)."""
    usage, _, rest = help_text.partition("\n\n")
    lines = [usage, *(line for line in rest.splitlines() if re.match(r"\s{2}-", line))]
    return {flag for line in lines for flag in re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", line) if flag.startswith("--")}


def test_every_console_script_is_listed_with_its_module(probe):
    """COMMANDS names every console script, and each runs the same parser as its `python -m` spelling."""
    assert sorted(filter(None, COMMANDS.values())) == sorted(SCRIPTS)
    for module, script in COMMANDS.items():
        if script:
            spelled = probe[f"python -m {module}"]["help"]["out"]
            assert probe[script]["help"]["out"] == spelled, (script, module)


def test_help_and_version_import_nothing_heavy(probe):
    version = metadata.version("mmdiff")
    for name, answers in probe.items():
        for key, answer in answers.items():
            if key == "examples":
                continue
            assert answer["code"] == 0, (name, key, answer["err"][-2000:])
            assert not answer["heavy"], f"{name} {key} imported {answer['heavy']}"
        assert answers["help"]["out"].startswith("usage: "), name
        assert answers["version"]["out"].strip().endswith(f"(mmdiff) {version}"), (name, answers["version"])


def test_every_flag_is_kebab_case_and_configs_take_set(probe):
    for name, answers in probe.items():
        for key, answer in answers.items():
            if not key.startswith("help"):
                continue
            defined = flags(answer["out"])
            assert {"--help", "--version"} <= defined, (name, key)
            assert all(KEBAB.fullmatch(flag) for flag in defined), (name, key, sorted(defined))
            if "--config" in defined or "--gates" in defined:
                assert "--set" in defined, (name, key, sorted(defined))


def test_every_help_example_parses_with_its_own_command(probe):
    spellings = {f"python -m {module}": {f"python -m {module}", script} for module, script in COMMANDS.items()}
    spellings.update({script: spellings[f"python -m {module}"] for module, script in COMMANDS.items() if script})
    total = 0
    for name, answers in probe.items():
        for example in answers["examples"]:
            total += 1
            assert example["command"] in spellings[name], (name, example["line"])
            assert isinstance(example["parsed"], dict), (name, example["line"], example["parsed"])
            assert "deprecated" not in example["stderr"], (name, example["line"], example["stderr"])
    assert total >= 20


def test_old_spellings_still_parse_with_a_warning(capsys):
    from evaluation.promote import main as promote
    from train.cli import generate_parser, launch_parser

    args = launch_parser().parse_args(["--config", "c.yaml", "--num_gpus", "2", "--master_port=29501", "a=1",
                                       "--set", "b=2"])
    assert (args.num_gpus, args.master_port, args.set) == (2, 29501, ["a=1", "b=2"])
    args = generate_parser().parse_args(["--model", "models:/m/1", "--prompt", "a [cat]", "--subject", "x.png",
                                         "--out", "o.png", "--guidance_scale", "3"])
    assert (args.model_uri, args.guidance_scale) == ("models:/m/1", 3.0)
    err = capsys.readouterr().err
    for old, new in [("--num_gpus", "--num-gpus"), ("--master_port", "--master-port"), ("--model", "--model-uri"),
                     ("--guidance_scale", "--guidance-scale")]:
        assert f"{old} is deprecated; use {new}" in err
    assert "use --set a=1" in err
    with pytest.raises(SystemExit) as refused:  # abbreviations are refused: a new flag must not change old lines
        promote(["--model-n", "m", "--versions", "1", "--gates", "g.yaml"])
    assert refused.value.code == 2 and "--model-n" in capsys.readouterr().err


def test_generate_needs_no_training_config_and_refuses_an_unmarked_prompt_before_loading(capsys, tmp_path):
    from train.cli import generate

    base = ["--subject", "skimage:chelsea", "--out", str(tmp_path / "x.png")]
    for argv, message in [
        ([*base, "--prompt", "a [cat]"], "give --model-uri, or --config"),
        ([*base, "--prompt", "a [cat]", "--model-uri", "m", "--set", "a=1"], "--set overrides keys of --config"),
        ([*base, "--prompt", "a cat on the beach", "--model-uri", str(tmp_path / "no-model")],
         "marks 0 subject word(s) as [word] but 1 --subject image(s)"),
    ]:
        with pytest.raises(SystemExit) as refused:
            generate(argv)
        assert refused.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "x.png").exists()


def test_a_config_error_is_named_with_exit_status_2(tmp_path, capsys):
    from evaluation.cli import benchmark, evaluate
    from pipeline.cli import preprocess
    from train.cli import latents

    missing = tmp_path / "nope.yaml"
    for command, argv in [(preprocess, ["--config", str(missing)]), (latents, ["--config", str(missing)]),
                          (benchmark, ["list", "--config", str(missing)]),
                          (evaluate, ["--config", "configs/eval/demo.yaml", "--model-uri", "m", "--set", "bogus=1"])]:
        assert command(argv) == 2, argv
        err = capsys.readouterr().err
        assert "config error:" in err and (f"{missing}: config file not found" in err or "bogus" in err), err


def test_the_examples_that_need_no_server_run(probe, tmp_path, monkeypatch):
    """The demo inputs, the demo benchmark (written, then listed) and the RayService manifest, in-process in a
    scratch folder holding the repository's configs: the same example lines the extended run runs."""
    import importlib

    (tmp_path / "configs").symlink_to(REPO / "configs")
    shutil.copytree(REPO / "infra" / "serving", tmp_path / "infra" / "serving", ignore=shutil.ignore_patterns("*.py"))
    (tmp_path / "infra" / "k8s" / "serve").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for module in ("pipeline.example_inputs", "evaluation.benchmark", "infra.k8s.rayservice"):
        for example in probe[f"python -m {module}"]["examples"]:
            argv = shlex.split(example["line"], comments=True)
            assert importlib.import_module(module).main(argv[(3 if argv[0] == "python" else 1):]) == 0, example["line"]
    assert len(list((tmp_path / "outputs/inputs/photos").glob("*.jpg"))) == 7
    generated = (tmp_path / "infra/k8s/serve/rayservice.yaml").read_text()
    assert generated == (REPO / "infra/k8s/serve/rayservice.yaml").read_text()  # the shipped manifest, regenerated


# The extended run: every example of every help, as written, in a scratch copy of the repository's configs,
# one test per command in the order of COMMANDS (the demo's order: photos, shards, training, generation,
# evaluation, comparison, promotion, the RayService manifest, serving); each command's examples run on what
# the ones before it wrote. About as long as `make demo`. To run it in pieces (`-k train.launch`, ...),
# point MMDIFF_EXAMPLES_DIR at one folder for every piece: each piece runs on what the earlier ones left there.
EXAMPLES_FAILED: list[str] = []  # the commands whose examples failed in this session: later ones would build on them


@pytest.fixture(scope="module")
def example_work(tmp_path_factory) -> Path:
    work = Path(os.environ.get("MMDIFF_EXAMPLES_DIR") or tmp_path_factory.mktemp("examples"))
    if not (work / "configs").exists():
        shutil.copytree(REPO / "configs", work / "configs")
        shutil.copytree(REPO / "infra", work / "infra", ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return work


@pytest.mark.extended
@pytest.mark.parametrize("module", list(COMMANDS))
def test_every_help_example_runs(probe, example_work, module):
    examples = probe[f"python -m {module}"]["examples"]
    if not examples:
        pytest.skip(f"{module}'s help has no examples")
    if EXAMPLES_FAILED:
        pytest.skip(f"the examples of {', '.join(EXAMPLES_FAILED)} failed; {module}'s would run on their outputs")
    script = COMMANDS[module]
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "PATH": f"{bindir}{os.pathsep}{env['PATH']}"})
    EXAMPLES_FAILED.append(module)  # until every example below has passed
    for example in examples:
        argv = shlex.split(example["line"], comments=True)
        if argv[0] == script:  # the console script's target, as its installed wrapper runs it
            target, attr = SCRIPTS[script].split(":")
            argv = [sys.executable, "-c", f"import sys; from {target} import {attr}; sys.exit({attr}())", *argv[1:]]
        else:
            argv = [sys.executable, *argv[1:]]
        started = time.monotonic()
        if script == "mmdiff-serve":
            serve_answers(argv, example_work, env)
        else:
            result = subprocess.run(argv, cwd=example_work, env=env, capture_output=True, text=True, timeout=1800)
            assert result.returncode == 0, (example["line"], result.stdout[-3000:], result.stderr[-5000:])
        print(f"example ran in {time.monotonic() - started:.1f} s: {example['line']}")
    EXAMPLES_FAILED.remove(module)


def serve_answers(argv: list[str], work: Path, env: dict) -> None:
    """Start the serving example, wait until it has loaded the model (/readyz), stop it with Ctrl-C. On a free
    port rather than the example's (8000 is often taken on a shared machine, as on CI's)."""
    argv = [*argv]
    port = argv[argv.index("--port") + 1] = str(free_port())
    log = work / "serve.log"
    with log.open("w") as sink:
        server = subprocess.Popen(argv, cwd=work, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert serves(f"http://127.0.0.1:{port}/readyz", 600, server, poll_s=2), \
            f"mmdiff-serve did not answer:\n{log.read_text()[-4000:]}"
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_training_on_one_node_rendezvous_on_a_free_port(monkeypatch, tmp_path):
    """Without --master-port, a one-node run must not take DeepSpeed's fixed 29500 (busy whenever another run is
    on the machine); across nodes every node names the same port, so the default stays DeepSpeed's there."""
    import train.launch

    launched = []
    monkeypatch.setattr(train.launch, "tracking_preflight", lambda config: None)
    monkeypatch.setattr(train.launch.os, "execvpe", lambda exe, argv, env: launched.append(argv))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").touch()  # the launcher checks that shards are there, not what they hold
    base = ["--config", "configs/train/demo.yaml", "--num-gpus", "2", "--set", f"data.shards={tmp_path}"]
    for argv in (base, base, [*base, "--master-port", "29611"],
                 [*base, "--num-nodes", "2", "--node-rank", "1", "--master-addr", "node-0"]):
        train.launch.run(train.cli.launch_parser().parse_args(argv))
    ports = [argv[argv.index("--master_port") + 1] if "--master_port" in argv else None for argv in launched]
    assert ports[0] and ports[1] and "29500" not in ports[:2] and ports[2] == "29611" and ports[3] is None, ports
    with socket.socket() as sock:  # the port picked was free
        sock.bind(("", int(ports[0])))
