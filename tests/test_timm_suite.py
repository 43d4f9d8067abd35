"""timm's own model tests (``tests/test_models.py`` of the installed timm's sdist) on
every registered TransNeXt variant and pretrained tag, on the CPU.

The file is fetched by ``scripts/fetch_timm_tests.py`` (cached under ``.cache/``) and run
in a child pytest with ``tests/timm_suite_plugin.py``, which keeps the TransNeXt items
and applies this family's exclusions (hub downloads; TorchScript, see the plugin).
The tests run at timm's own reduced sizes (forward at the default 224, 256 for
micro_aaaa; backward and FX 128; features 96; the config checks, 384 fine-tunes
included, on the meta device). The items run in two child pytests side by side (``SHARDS``,
each about half the work, one thread each): about a minute on a 2-core CPU.

timm parametrises its forward_intermediates and pruning tests by a list of its own
model modules only; ``test_timm_intermediates_tests`` calls those test functions of the
same file directly for the smaller variants.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

import transnext
from timm_suite_plugin import JIT_REASON, JIT_TESTS

REPO = Path(__file__).resolve().parents[1]

PER_VARIANT = ("test_model_forward", "test_model_backward", "test_model_forward_features",
               "test_model_forward_fx", "test_model_backward_fx")
PER_TAG = ("test_model_default_cfgs",)


def _timm_test_file() -> Path:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_timm_tests.py")],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"cannot get timm {timm.__version__}'s tests/test_models.py "
                    f"(needs PyPI): {proc.stderr.strip()}", pytrace=False)
    return Path(proc.stdout.strip())


def _outcomes(junit: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(test function, model name) -> (outcome, message) from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "")
        model = re.search(r"(transnext[\w.]*)", name)
        key = (name.split("[")[0], model.group(1) if model else name)
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag, node.get("message", "")
                break
        out[key] = (outcome, message)
    return out


# The two halves of the suite's items (-k expressions, complements of each other): the
# two large variants (their 384 config checks, on the meta device, apart), and the rest.
# About a minute of one core each; the large variants' FX runs never side by side (memory).
_LARGE = "(transnext_small or transnext_base) and not in1k_384"
SHARDS = (_LARGE, f"not ({_LARGE})")


@pytest.mark.slow
def test_timm_model_suite(tmp_path):
    path = _timm_test_file()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    # timm's file switches filters on these; run its plain CPU form.
    for name in ("GITHUB_ACTIONS", "TORCH_DEVICE", "TORCH_BACKEND", "TIMEOUT",
                 "TRANSNEXT_ATTN_BACKEND"):
        env.pop(name, None)
    junits = [tmp_path / f"timm_models_{i}.xml" for i in range(len(SHARDS))]
    cmds = [[sys.executable, "-m", "pytest", str(path), "-p", "timm_suite_plugin",
             "-p", "no:cacheprovider", "-q", "-k", k, f"--junitxml={junit}"]
            for k, junit in zip(SHARDS, junits)]
    logs = [tmp_path / f"timm_models_{i}.log" for i in range(len(SHARDS))]
    procs = []
    try:
        for cmd, log in zip(cmds, logs):
            with open(log, "w") as f:  # a file, not a pipe: neither child waits on a reader
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 900
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail("timm's test_models.py on the TransNeXt models ran over 900 s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for cmd, proc, log in zip(cmds, procs, logs):
        tail = "\n".join(log.read_text().splitlines()[-60:])
        assert proc.returncode == 0, f"timm's test_models.py failed ({' '.join(cmd)}):\n{tail}"

    got = {k: v for junit in junits for k, v in _outcomes(junit).items()}
    variants = sorted(transnext.MODEL_NAMES)
    tags = timm.list_models("transnext_*", include_tags=True)
    assert len(variants) == 6 and len(tags) == 8, (variants, tags)
    want_pass = {(t, v) for t in PER_VARIANT for v in variants}
    want_pass |= {(t, tag) for t in PER_TAG for tag in tags}
    not_passed = sorted(k for k in want_pass if got.get(k, ("missing",))[0] != "passed")
    assert not not_passed, f"expected to pass, but {[(k, got.get(k)) for k in not_passed]}"

    skipped = {k: msg for k, (res, msg) in got.items() if res == "skipped"}
    assert set(skipped) == {(t, v) for t in JIT_TESTS for v in variants}, sorted(skipped)
    assert all(JIT_REASON in msg for msg in skipped.values()), skipped
    # Nothing but this family ran (the plugin's filter holds).
    assert {m for _, m in got} <= set(variants) | set(tags), sorted(got)


# timm's tests parametrised by timm's module list (FEAT_INTER_FILTERS) instead of by model.
INTERMEDIATES_TESTS = ("test_model_forward_intermediates_features",
                       "test_model_forward_intermediates")


@pytest.fixture(scope="module")
def timm_test_module():
    spec = importlib.util.spec_from_file_location("timm_test_models", _timm_test_file())
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # timm's markers, declared in timm's own config
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model_name", ["transnext_femto", "transnext_micro",
                                        "transnext_micro_aaaa", "transnext_tiny"])
def test_timm_intermediates_tests(timm_test_module, model_name):
    for name in INTERMEDIATES_TESTS:
        getattr(timm_test_module, name)(model_name, 1)
    timm_test_module.test_prune_intermediate_layers_contract(model_name)
