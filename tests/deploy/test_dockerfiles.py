"""services/<name>/Dockerfile: read as instructions (no Docker engine needed)."""

from __future__ import annotations

import json
import re

import pytest


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            result.append((keyword.upper(), " ".join(arguments.split())))
    return result


def dockerfile_problems(text: str, name: str) -> list[str]:
    steps = instructions(text)
    keywords = [keyword for keyword, _ in steps]
    problems = []
    if not steps or steps[0][0] != "FROM" or steps[0][1].split(" AS ")[0] != "python:3.11-slim":  # may name a stage
        problems.append("base image must be python:3.11-slim")
    runs = " && ".join(arguments for keyword, arguments in steps if keyword == "RUN")
    if "torch==2.13.0" not in runs:
        problems.append("torch is not pinned to 2.13.0")
    if f"./services/{name}" not in runs or not re.search(r"\./libs/(\*|common)(\s|$)", runs):
        problems.append("the local libraries and the service are not installed")
    if ("COPY", f"services/{name}/ services/{name}/") not in steps:
        problems.append(f"services/{name} is not copied")
    users = [arguments for keyword, arguments in steps if keyword == "USER"]
    if not users or users[-1] in {"root", "0"}:
        problems.append("the image must run as a non-root user")
    if ("EXPOSE", "8000") not in steps:
        problems.append("port 8000 is not exposed")
    commands = [arguments for keyword, arguments in steps if keyword == "CMD"]
    if not commands or json.loads(commands[-1]) != ["python", "-m", f"dlforge.{name}"]:
        problems.append(f"CMD must be python -m dlforge.{name}")
    elif keywords[-1] != "CMD":
        problems.append("CMD should be the last instruction")
    return problems


def test_dockerfile_follows_the_shared_pattern(repo, service_name):
    text = (repo / "services" / service_name / "Dockerfile").read_text(encoding="utf-8")
    assert dockerfile_problems(text, service_name) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("USER 10001", "USER root"), "non-root"),
        (lambda t: t.replace("torch==2.13.0", "torch"), "torch"),
        (lambda t: t.replace('"dlforge.tuner"', '"dlforge.trainer"'), "CMD"),
        (lambda t: t.replace("EXPOSE 8000", "EXPOSE 8080"), "8000"),
        (lambda t: t.replace("./libs/*", "./libs/README.md"), "libraries"),
    ],
)
def test_dockerfile_checks_catch_broken_files(repo, edit, expected):
    text = (repo / "services" / "tuner" / "Dockerfile").read_text(encoding="utf-8")
    problems = dockerfile_problems(edit(text), "tuner")
    assert any(expected in problem for problem in problems), problems


def test_the_optimizers_gpu_target_installs_its_gpu_extra_and_the_default_stays_cpu(repo):
    text = (repo / "services" / "optimizer" / "Dockerfile").read_text(encoding="utf-8")
    stages: dict[str, list[tuple[str, str]]] = {}
    name = ""
    for keyword, arguments in instructions(text):
        if keyword == "FROM":
            name = arguments.split(" AS ")[-1] if " AS " in arguments else "<default>"
            stages[name] = []
        stages[name].append((keyword, arguments))
    assert list(stages)[-1] == "<default>" and "gpu" in stages  # `docker build` without --target: the CPU image
    gpu_runs = " && ".join(a for k, a in stages["gpu"] if k == "RUN")
    cpu_runs = " && ".join(a for k, a in stages["<default>"] if k == "RUN")
    assert '"./services/optimizer[gpu]"' in gpu_runs and "--find-links /wheels" in gpu_runs
    assert "pip install --no-cache-dir --no-deps \"onnxruntime-gpu==" in gpu_runs  # the GPU build wins
    assert "[gpu]" not in cpu_runs
    assert ("COPY", "--from=pycuda /wheels /wheels") in stages["gpu"]
    assert any(k == "RUN" and "pip wheel" in a and "pycuda" in a for k, a in stages["pycuda"])


def test_the_edge_image_holds_dlforge_edge_alone(repo):
    """libs/edge/Dockerfile: the bundle runner without torch or the platform, as a non-root user."""
    steps = instructions((repo / "libs" / "edge" / "Dockerfile").read_text(encoding="utf-8"))
    assert steps[0] == ("FROM", "python:3.11-slim")
    copies = [arguments for keyword, arguments in steps if keyword in ("COPY", "ADD")]
    assert copies == ["libs/edge/ ./"]  # nothing of the platform goes in
    runs = " && ".join(arguments for keyword, arguments in steps if keyword == "RUN")
    assert "torch" not in runs and "pip install --no-cache-dir ." in runs
    users = [arguments for keyword, arguments in steps if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert ("ENTRYPOINT", '["dlforge-edge"]') in steps
    assert json.loads(next(a for k, a in steps if k == "CMD"))[:2] == ["serve", "/bundle/bundle.zip"]
